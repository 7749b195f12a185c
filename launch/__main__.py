"""python -m fastloc.launch: run fastloc's jobs on SLURM through submitit.

    python -m fastloc.launch align PRESET [--section.field VALUE ...] [--launch.FIELD VALUE ...]
    python -m fastloc.launch probe DATA [--field VALUE ...] [--launch.FIELD VALUE ...]
    python -m fastloc.launch probe overcluster|linear|hummingbird DATA [...]   a dense protocol
    python -m fastloc.launch summary SWEEP_DIR                      how each member of a sweep ended

The job's own arguments are exactly those of python -m fastloc.align train / python -m
fastloc.probe; the --launch.* ones say where it runs (nodes, GPUs, time, partition, ...). The
job requeues itself at its time limit and resumes from its last checkpoint. --launch.sweep
FIELD=V1,V2 submits an array; --launch.dry-run prints the sbatch script and the resolved config.

    python -m fastloc.launch align clip-vit-l --launch.nodes 8 --launch.partition h100
    python -m fastloc.launch probe shards/coco --launch.gpus-per-node 1 \\
        --launch.sweep backbone=clip-vit-b,siglip-vit-b,dino-vit-b
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path

import tyro

from fastloc.cli import run_command
from fastloc.launch.config import LaunchConfig
from fastloc.launch.job import COMMANDS


@dataclass(frozen=True)
class _Args:
    launch: LaunchConfig = dataclasses.field(default_factory=LaunchConfig)


def split(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the --launch.* tokens with their values, the job's own tokens)."""
    hints = typing.get_type_hints(LaunchConfig)
    kinds = {f.name.replace("_", "-"): hints[f.name] for f in dataclasses.fields(LaunchConfig)}
    launch, job, i = [], [], 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if not token.startswith("--launch."):
            job.append(token)
            continue
        launch.append(token)
        name = token.removeprefix("--launch.").partition("=")[0]
        kind = kinds.get(name.removeprefix("no-"), str)
        if "=" in token or kind is bool:
            continue
        many = typing.get_origin(kind) is tuple
        while i < len(argv) and not argv[i].startswith("--"):
            launch.append(argv[i])
            i += 1
            if not many:
                break
    return launch, job


def launch(command: str, argv: list[str]) -> int:
    from fastloc.align.checkpoint import plain
    from fastloc.launch import submit, sweep

    launch_args, job_args = split(argv)
    cfg = tyro.cli(_Args, args=launch_args, prog=f"python -m fastloc.launch {command}").launch.validate()
    if cfg.sweep:
        pairs = sweep.members(command, tuple(job_args), cfg.sweep)
        folder = cfg.folder or cfg.sweep_dir / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}"
        name = f"fastloc-{command}-sweep"
    else:
        from fastloc.launch.job import parse

        pairs = [({}, parse(command, tuple(job_args)))]
        folder = cfg.folder or pairs[0][1].run_dir / "slurm"
        name = f"fastloc-{command}-{pairs[0][1].run_dir.name}"
    plans = [plan for _, plan in pairs]
    if cfg.dry_run:
        if cfg.cluster == "slurm":
            print(submit.sbatch_script(cfg, folder, name, len(plans)))
        else:
            print(f"# local executor: {cfg.tasks} task(s) in {folder}")
        for values, plan in pairs:
            print(json.dumps({"sweep": values, "run_dir": str(plan.run_dir), "config": plain(plan.config)}, indent=1))
        return 0
    jobs = submit.submit(cfg, plans, folder, name)
    for job, plan in zip(jobs, plans):
        print(f"submitted {job.job_id}: {plan.run_dir} (logs: {job.paths.stdout})")
    if cfg.sweep:
        print(f"sweep: {sweep.write_record(folder, command, cfg.cluster, pairs, jobs).parent}")
    if not cfg.wait:
        return 0
    while not all(job.done(force_check=True) for job in jobs):
        time.sleep(2)
    if cfg.sweep:
        return 0 if print_summary(folder) else 1
    ended = sweep.outcome(jobs[0])
    print(json.dumps(ended, indent=1, default=str))
    return 0 if ended["state"] == "COMPLETED" else 1


def print_summary(folder: Path) -> bool:
    """Print a sweep's table and where its CSV is; whether every member completed."""
    from fastloc.launch import sweep

    text, csv_path, completed = sweep.summarize(folder)
    print(f"{text}\nsummary: {csv_path}")
    return completed


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stdout if argv else sys.stderr)
        if not argv:
            return 2
        try:
            tyro.cli(_Args, args=["--help"], prog="python -m fastloc.launch COMMAND")
        except SystemExit:  # tyro prints the --launch.* options, then exits
            pass
        return 0
    command, rest = argv[0], argv[1:]
    interrupted = "what was submitted before stays queued (squeue, or python -m fastloc.launch summary for a sweep)"
    return run_command(lambda: command_line(command, rest), interrupted)


def command_line(command: str, rest: list[str]) -> int:
    if command == "summary":
        if len(rest) != 1:
            raise ValueError("summary takes one argument: the sweep folder")
        print_summary(Path(rest[0]))
        return 0
    if command not in COMMANDS:
        raise ValueError(f"unknown command {command!r}: one of {', '.join(COMMANDS)}, summary")
    return launch(command, rest)


if __name__ == "__main__":
    sys.exit(main())
