"""What a launched job runs: the local CLIs' own entry points, under SLURM's ranks.

``parse`` resolves a command line exactly as ``python -m fastloc.align train`` or ``python -m
fastloc.probe`` would, checks its values with the config's own ``validate`` and opens the shard
sets it names as the job's loaders will: a typo, a bad value or a missing data folder fails at
submission, not after the queue. ``Job`` is the
pickled callable submitit runs on every task: it exports the SLURM ranks as torchrun's variables
(one code path for local, torchrun and SLURM), records the attempt in the run directory, and
calls the same ``train`` or ``probe``. On the time-limit signal its ``checkpoint`` hands submitit
a fresh copy of itself; the requeued job finds the run's newest checkpoint and resumes exactly.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tyro

from fastloc.probe.dense.config import PROTOCOLS

COMMANDS = ("align", "probe")
ZEROSHOT = "zeroshot"  # python -m fastloc.probe zeroshot: a dense protocol's job, its config its own


@dataclass(frozen=True)
class JobPlan:
    """A resolved job: its command line, its config and the run directory it writes."""

    command: str
    args: tuple[str, ...]
    config: Any
    preset: str
    run_dir: Path


def parse(command: str, args: tuple[str, ...]) -> JobPlan:
    """The config ``python -m fastloc.COMMAND`` would run for ``args`` (SystemExit on a usage error)."""
    if command == "align":
        from fastloc.align.presets import parse_train

        cfg, preset = parse_train(args, "python -m fastloc.launch align")
        cfg.validate()
        check_shards("--data.train", cfg.data.train)
        check_shards("--data.val", cfg.data.val)
        return JobPlan(command, args, cfg, preset, cfg.run.out / (cfg.run.name or preset or "align"))
    if command == "probe" and args and args[0] in (*PROTOCOLS, ZEROSHOT):
        return _dense(args)
    if command == "probe":
        from fastloc.probe.config import ProbeConfig
        from fastloc.probe.data import open_data
        from fastloc.probe.run import run_name

        cfg = tyro.cli(ProbeConfig, args=list(args), prog="python -m fastloc.launch probe")
        cfg.validate()
        return JobPlan(command, args, cfg, "", cfg.out / run_name(cfg, open_data(cfg.data).dataset))
    raise ValueError(f"unknown command {command!r}: one of {', '.join(COMMANDS)}")


def check_shards(flag: str, folder: Path) -> None:
    """Open the shard set at ``folder`` as the align loaders will (manifest, every tar and index
    listed, their sizes); a ``BadValue`` naming the option and the folder if that would fail."""
    from fastloc.cli import BadValue
    from fastloc.data.shards import ShardError, open_shards

    if not Path(folder).exists():
        raise BadValue(f"{flag} {folder}: no such folder")
    try:
        open_shards(folder)
    except ShardError as exc:
        raise BadValue(f"{flag} {folder}: not a usable shard set ({exc})") from None


def _dense(args: tuple[str, ...]) -> JobPlan:
    """A dense protocol's (or zero-shot's) job: ``probe PROTOCOL DATA ...`` as python -m fastloc.probe parses it."""
    from fastloc.probe.dense.config import parse
    from fastloc.probe.dense.data import open_dense_data
    from fastloc.probe.dense.report import run_dir

    prog = f"python -m fastloc.launch probe {args[0]}"
    if args[0] == ZEROSHOT:
        from fastloc.probe.zeroshot.config import ZeroShotConfig

        cfg = tyro.cli(ZeroShotConfig, args=list(args[1:]), prog=prog)
    else:
        cfg = parse(args[0], list(args[1:]), prog=prog)
    cfg.validate()
    if args[0] == "knn":  # image-level classes, no label maps; the image size names the run directory
        from fastloc.probe.dense.knn import planned

        cfg, dataset = planned(cfg)
        return JobPlan("probe", args, cfg, "", run_dir(cfg, dataset))
    return JobPlan("probe", args, cfg, "", run_dir(cfg, open_dense_data(cfg).dataset))  # the splits are checked here


def run(plan: JobPlan) -> dict[str, Any]:
    """Run a resolved job in this process (every rank calls it); a short result for the summary."""
    if plan.command == "align":
        from fastloc.align.loop import train

        run_dir = train(plan.config, plan.preset)
        return {"run": str(run_dir), **_last_validation(run_dir / "metrics.jsonl")}
    if plan.args and plan.args[0] in (*PROTOCOLS, ZEROSHOT):
        import importlib

        name = plan.args[0]
        module = "fastloc.probe.zeroshot.run" if name == ZEROSHOT else f"fastloc.probe.dense.{name}"
        run_dir = importlib.import_module(module).run(plan.config)
        return {"run": str(run_dir), **json.loads((run_dir / "result.json").read_text())["selected"]}
    from fastloc.probe.run import probe

    run_dir = probe(plan.config)
    last = json.loads((run_dir / "result.json").read_text())["last"]
    return {"run": str(run_dir), "macro_recall": last["macro_recall"], "macro_ap": last["macro_ap"]}


def _last_validation(metrics: Path) -> dict[str, float]:
    lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    val = [line for line in lines if "val_loss" in line]
    return {"step": val[-1]["step"], "val_loss": val[-1]["val_loss"]} if val else {}


_REQUEUED = False  # checkpoint() ran in this process: the attempt is stopping, not failing


def _leave_the_signal_to_the_task() -> None:
    """In a forked child (a loader worker): ignore the time-limit signal. SLURM signals every
    process of the step, and a worker would inherit submitit's handler and requeue the job again."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


class Job:
    """The callable submitit pickles: ``Job(command, args, run_dir)()`` on every task of the job."""

    def __init__(self, command: str, args: tuple[str, ...], run_dir: Path):
        self.command, self.args, self.run_dir = command, tuple(args), Path(run_dir)

    def __call__(self) -> dict[str, Any]:
        import submitit

        environment = submitit.JobEnvironment()
        os.register_at_fork(after_in_child=_leave_the_signal_to_the_task)
        if environment.num_tasks > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        if environment.global_rank == 0:
            self.record("started", environment)
        try:
            result = run(parse(self.command, self.args))
        except BaseException as exc:
            # after checkpoint() the attempt is stopping: submitit's SystemExit, or what it became
            # while the run unwound (e.g. a collective whose peer had left) is not the job failing
            if environment.global_rank == 0 and not isinstance(exc, SystemExit):
                self.record("stopped" if _REQUEUED else "failed", environment, error=f"{type(exc).__name__}: {exc}")
            raise
        if environment.global_rank == 0:
            self.record("finished", environment, **result)
        return result

    def checkpoint(self, *args: Any, **kwargs: Any):
        """Called by submitit on rank 0 at the time-limit (or preemption) signal: the run's own
        checkpoints are the state, so the requeued job is this same job again."""
        import submitit

        # submitit requeues next, and SLURM then stops this attempt's loader workers: torch's
        # SIGCHLD handler would raise "worker killed" here, and submitit would record the job as failed
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        global _REQUEUED
        _REQUEUED = True
        self.record("requeued", submitit.JobEnvironment())
        return submitit.helpers.DelayedSubmission(Job(self.command, self.args, self.run_dir))

    def record(self, event: str, environment, **extra: Any) -> None:
        """One line per event in RUN_DIR/attempts.jsonl: which job, which attempt, where."""
        line = {
            "event": event,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "job_id": environment.job_id,
            "attempt": int(os.environ.get("SLURM_RESTART_COUNT", 0)),
            "host": socket.gethostname(),
            "tasks": environment.num_tasks,
            "nodes": environment.num_nodes,
            **extra,
        }
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "attempts.jsonl", "a") as f:
            f.write(json.dumps(line, default=str) + "\n")
