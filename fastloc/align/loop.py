"""The training loop every objective shares: ``train(cfg)`` runs (or resumes) one run directory.

A run directory holds ``config.json`` (the resolved config and the git revision), ``run.json``
(the objective's calibration, e.g. sigma, and the attempts), ``metrics.jsonl`` (one line per
logging step and per validation), the step checkpoints and ``best.pt``. Running the same command
again resumes from the newest readable checkpoint exactly where it stopped (the whole
``TrainState``), and the metric lines written after that checkpoint are dropped, so the metrics
continue as if the run had never stopped. One process writes a run directory at a time (a folder lock); a checkpoint is
written only from finite state. Under torchrun (or the SLURM launcher) every rank runs ``train``.
"""

from __future__ import annotations

import json
import math
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils._pytree import tree_map

from fastloc.align.checkpoint import Checkpointer, RunBusy, all_finite, config_fingerprint, plain
from fastloc.align.config import OBJECTIVES, AlignConfig
from fastloc.align.objective import Inputs, Objective
from fastloc.align.prepare import learning_rate, prepare, weight_decay
from fastloc.align.state import TrainState
from fastloc.align.step import Update, train_step
from fastloc.cli import BadValue, check_writable
from fastloc.data.batch import Batch
from fastloc.data.config import LoaderConfig
from fastloc.data.loader import make_loader
from fastloc.data.stream import EpochLoader
from fastloc.files import write_atomically
from fastloc.lock import Busy, folder_lock
from fastloc.progress import Progress
from fastloc.runtime import Runtime, any_rank, autocast, setup


class NonFiniteLoss(RuntimeError):
    """The loss or the gradient became NaN or infinite; the run stopped, its last good checkpoint kept."""


def train(cfg: AlignConfig, preset: str = "") -> Path:
    """Run (or resume) the alignment described by ``cfg``; returns the run directory."""
    cfg.validate()
    runtime = setup(cfg.system.device)
    run_dir = cfg.run.out / (cfg.run.name or preset or "align")
    with run_lock(run_dir, runtime):
        torch.manual_seed(cfg.run.seed)  # the same initialization on every rank (DDP also broadcasts it)
        objective = OBJECTIVES[type(cfg.method)](cfg.method)
        train_loader, val_loader = loaders(cfg, objective, runtime)
        prepared = prepare(objective, cfg.optim, cfg.system, runtime)
        masks = torch.Generator(runtime.device).manual_seed(_seed(cfg.run.seed))  # the same on every rank
        loop = Loop(cfg, TrainState(objective, prepared, train_loader, masks), val_loader, runtime, run_dir)
        loop.begin(preset)
        loop.run()
    return run_dir


@contextmanager
def run_lock(run_dir: Path, runtime: Runtime) -> Iterator[None]:
    """One writer per run directory: rank 0 makes sure it can write there and holds its folder lock
    for the whole run (a second run of the same directory is refused at once); every rank learns
    whether it may go on, so that none waits in a collective for a rank that stopped."""
    with ExitStack() as stack:
        refusal: Exception | None = None
        if runtime.main:
            try:
                check_writable("--run.out", run_dir)
                stack.enter_context(folder_lock(run_dir, wait=False))
            except BadValue as exc:
                refusal = exc
            except Busy as busy:
                refusal = RunBusy(
                    f"{run_dir}: another run is writing this run directory{busy.holder}; "
                    "rerun this command when it has ended (it resumes), or use another --run.name"
                )
        if any_rank(refusal is not None):
            raise refusal or RunBusy(f"{run_dir}: rank 0 cannot take this run directory (its error says why)")
        yield


def loaders(cfg: AlignConfig, objective: Objective, runtime: Runtime) -> tuple[EpochLoader, EpochLoader]:
    """This rank's training and validation loaders, with the objective's recipes and sizes
    (MaskEmbed: rkrc and timm's eval transform; uint8)."""
    data, (train_in, val_in) = cfg.data, objective.inputs()
    loader = "gpu" if runtime.device.type == "cuda" else "cpu"
    common = {"normalize": False, "labels": False, "loader": loader, "workers": data.workers, "threads": data.threads}
    train = make_loader(
        LoaderConfig(
            shards=data.train,
            batch_size=data.batch_size,
            size=train_in.size,
            recipe=train_in.recipe,
            seed=cfg.run.seed,
            **common,
            **language(train_in),
        ),
        runtime,
    )
    val = make_loader(
        LoaderConfig(
            shards=data.val,
            batch_size=data.val_batch_size or data.batch_size // data.accumulation,
            size=val_in.size,
            recipe=val_in.recipe,
            shuffle=False,
            drop_last=False,
            **common,
            **language(val_in),
        ),
        runtime,
    )
    return train, val


def language(inputs: Inputs) -> dict[str, Any]:
    """The loader options of an objective that reads captions (one per sample) or superpixels."""
    return {"captions": inputs.captions, "one_caption": inputs.captions, "superpixels": inputs.superpixels}


class Loop:
    """One run directory's training: ``begin`` (resume, or start and calibrate), then ``run``."""

    def __init__(self, cfg: AlignConfig, state: TrainState, val_loader: EpochLoader, runtime: Runtime, run_dir: Path):
        self.cfg, self.state, self.objective, self.val_loader = cfg, state, state.objective, val_loader
        self.runtime, self.run_dir, self.device = runtime, run_dir, runtime.device
        self.checkpointer, self.fingerprint = Checkpointer(run_dir), config_fingerprint(cfg)
        self.total = cfg.optim.epochs * len(state.loader)
        self.flops = self.objective.flops_per_image()

    def begin(self, preset: str) -> None:
        """Resume from the newest readable checkpoint of this config, or start the run: its
        config.json, then the objective's calibration; either way recorded in run.json."""
        cfg, runtime, run_dir = self.cfg, self.runtime, self.run_dir
        if runtime.main:
            self.checkpointer.clean()
        found = self.checkpointer.latest(self.fingerprint, move_aside=runtime.main)
        if found is not None:
            self.state.load_state_dict(found[1])
        _trim_metrics(run_dir, self.state, runtime)  # a killed attempt's lines after that state
        if found is not None:
            record(run_dir, runtime, {"resumed_from": str(found[0]), "step": self.state.step})
            return
        if runtime.main:
            _write_json(run_dir / "config.json", {"preset": preset, "config": plain(cfg), "git": git_revision()})
        _barrier(runtime)
        with autocast(self.device, cfg.system.precision):
            batches = validation_batches(self.objective, self.val_loader, runtime, cfg.data.max_val_batches)
            calibration = self.objective.calibrate(batches)
        record(run_dir, runtime, {"started": True, **calibration}, facts=calibration)

    def run(self) -> None:
        cfg, runtime, state = self.cfg, self.runtime, self.state
        progress = Progress(
            self.total,
            state.step,
            self.run_dir.name,
            enabled=cfg.run.progress and runtime.main,
            unit="updates",
            rate_unit="updates/s",
        )
        window = _Window(self.device)
        try:
            for epoch in range(state.validated, cfg.optim.epochs):
                if state.loader.epoch <= epoch:  # else its last update was done before a resume
                    self.train_epoch(epoch, window, progress)
                self.end_epoch(epoch)
        finally:
            progress.close()

    def train_epoch(self, epoch: int, window: _Window, progress: Progress) -> None:
        """The updates of ``epoch`` from the loader's position (a restored one is kept)."""
        cfg, runtime, state = self.cfg, self.runtime, self.state
        state.loader.set_epoch(epoch)
        for batch in state.loader:
            batch = batch.to(self.device)
            sample = global_sample(self.objective, batch, state.masks, runtime)
            lr = learning_rate(cfg.optim, state.step, self.total)
            update = Update(state.step, self.total, lr, weight_decay(cfg.optim, state.step, self.total))
            metrics = train_step(
                self.objective,
                state.prepared,
                batch.images,
                sample,
                update,
                cfg.data.accumulation,
                cfg.optim.clip_grad_norm,
                cfg.system.precision,
            )
            state.step += 1
            window.add(metrics, state.step, len(batch) * runtime.world_size, lr)
            progress.update(1)
            if state.step % cfg.run.log_every == 0:
                self.log(window.flush(), epoch)
            if state.step % cfg.run.checkpoint_every == 0:
                self.log(window.flush(), epoch)  # checks the loss and gradient before they are saved
                self.save()
        if window.steps:
            self.log(window.flush(), epoch)

    def end_epoch(self, epoch: int) -> None:
        """Validate ``epoch``'s weights, then the epoch-end checkpoint (and ``best.pt``)."""
        state, val = self.state, self.validate()
        best = val < state.best_val
        state.best_val, state.validated = min(state.best_val, val), epoch + 1
        self.append({"step": state.step, "epoch": epoch, "val_loss": val})
        self.save(best=best)

    # ------------------------------------------------------------ logging, checkpoints, validation

    def log(self, metrics: dict[str, Any] | None, epoch: int) -> None:
        if metrics is None:
            return
        bad = metrics.pop("first_bad_step")
        if bad >= 0 or not math.isfinite(metrics["loss"]):
            self.stop(f"the loss or the gradient norm is not finite at update {bad if bad >= 0 else metrics['step']}")
        flops = self.flops * metrics["images_per_s"]
        peak = self.cfg.system.peak_tflops * 1e12 * self.runtime.world_size if self.device.type == "cuda" else None
        self.append({**metrics, "epoch": epoch, "mfu": flops / peak if peak else None})

    def stop(self, what: str) -> None:
        """Stop the run (``NonFiniteLoss``) naming its last good checkpoint: every one written is finite."""
        newest = self.checkpointer.steps()
        keep = f"the last good checkpoint is {newest[0]}" if newest else "no checkpoint was written"
        raise NonFiniteLoss(f"{self.run_dir}: {what}; stopped, {keep}")

    def append(self, line: dict[str, Any]) -> None:
        if self.runtime.main:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(line) + "\n")

    def save(self, best: bool = False) -> None:
        """Write the checkpoint of the train state (rank 0), only if every weight and moment is finite."""
        state, step = {"config": self.fingerprint, **self.state.state_dict()}, self.state.step
        if not all_finite(state):  # the same weights on every rank: each stops here alike
            self.stop(f"the weights or optimizer state are not finite after update {step}")
        if self.runtime.main:
            self.checkpointer.save(state, step, best=best)
        _barrier(self.runtime)

    @torch.no_grad()
    def validate(self) -> float:
        """Mean per-image loss over the validation split (masks seeded by batch index; repeats that
        fill the last batches left out), across ranks."""
        self.objective.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        batches = validation_batches(self.objective, self.val_loader, self.runtime, self.cfg.data.max_val_batches)
        for batch, sample in batches:
            with autocast(self.device, self.cfg.system.precision):
                losses = self.objective.losses(batch.images, sample)  # eager: no recompile for no_grad
            valid = batch.valid.double()
            total += torch.stack([(losses.double() * valid).sum(), valid.sum()])
        if self.runtime.distributed:
            dist.all_reduce(total)
        self.objective.train()
        return float(total[0] / total[1])


class _Window:
    """Metrics accumulated on the device between logging steps (no host sync per step)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss = torch.zeros((), device=self.device)
        self.grad_norm = torch.zeros((), device=self.device)
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=self.device)
        self.steps, self.images, self.lr, self.started = 0, 0, 0.0, time.perf_counter()

    def add(self, metrics: dict[str, torch.Tensor], step: int, images: int, lr: float) -> None:
        finite = torch.isfinite(metrics["loss"]) & torch.isfinite(metrics["grad_norm"])
        bad = ~finite & (self.first_bad < 0)
        self.first_bad = torch.where(bad, torch.full_like(self.first_bad, step), self.first_bad)
        self.loss += metrics["loss"]
        self.grad_norm += metrics["grad_norm"].to(self.grad_norm.dtype)
        self.steps, self.images, self.lr, self.step = self.steps + 1, self.images + images, lr, step

    def flush(self) -> dict[str, Any] | None:
        if not self.steps:
            return None
        values = torch.stack([self.loss, self.grad_norm, self.first_bad.to(self.loss.dtype)])
        if dist.is_available() and dist.is_initialized():  # the mean over ranks; any rank's first bad step
            values[0] /= dist.get_world_size()
            dist.all_reduce(values[:1])
            dist.all_reduce(values[2:], op=dist.ReduceOp.MAX)
        values = values.tolist()  # the sync
        seconds = time.perf_counter() - self.started
        out = {
            "step": self.step,
            "loss": values[0] / self.steps,
            "grad_norm": values[1] / self.steps,
            "lr": self.lr,
            "images_per_s": self.images / seconds,
            "first_bad_step": int(values[2]),
        }
        self.reset()
        return out


def global_sample(objective: Objective, batch: Batch, generator: torch.Generator, runtime: Runtime) -> Any:
    """The step's sample of this rank's ``batch``: every rank draws the random inputs of the whole
    global batch from the same generator and keeps rows rank, rank + world, ... (the order deals
    samples to ranks that way), so a sample's draws do not depend on how many ranks share the
    batch; the objective joins them to what the batch carries (``step_sample``)."""
    drawn = objective.sample(len(batch) * runtime.world_size, generator)
    return objective.step_sample(batch, tree_map(lambda t: t[runtime.rank :: runtime.world_size], drawn))


def validation_batches(objective: Objective, loader: EpochLoader, runtime: Runtime, limit: int):
    """(batch on the device, its sample seeded by the batch index, as the reference's validation
    masks) of the validation split, from its start, at most ``limit`` batches (0: all): what
    sigma and the validation loss both read."""
    loader.rewind()
    for i, batch in enumerate(loader):
        if limit and i >= limit:
            break
        batch = batch.to(runtime.device)
        yield batch, global_sample(objective, batch, torch.Generator(runtime.device).manual_seed(i), runtime)


def _seed(seed: int) -> int:
    return int(np.random.SeedSequence([seed, 1]).generate_state(1, np.uint64)[0] >> 1)


def _barrier(runtime: Runtime) -> None:
    if runtime.distributed:
        dist.barrier()


def _write_json(path: Path, data: dict[str, Any]) -> None:
    write_atomically(path, json.dumps(data, indent=1) + "\n")


def record(run_dir: Path, runtime: Runtime, entry: dict[str, Any], facts: dict[str, Any] | None = None) -> None:
    """Append an attempt's facts to run.json (rank 0); ``facts`` (the calibration: MaskEmbed's
    sigma) also at its top level."""
    if not runtime.main:
        return
    path = run_dir / "run.json"
    data = json.loads(path.read_text()) if path.is_file() else {"attempts": []}
    data["attempts"].append({"time": time.strftime("%Y-%m-%d %H:%M:%S"), "world_size": runtime.world_size, **entry})
    _write_json(path, data | (facts or {}))


def _trim_metrics(run_dir: Path, state: TrainState, runtime: Runtime) -> None:
    """Drop the metric lines written after the state a run (re)starts from, since they will be
    redone: training lines after its update, validation lines of epochs it has not validated, and
    a line a failed write left half-written."""
    path = run_dir / "metrics.jsonl"
    if not runtime.main or not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
            keep = entry["step"] <= state.step and ("val_loss" not in entry or entry["epoch"] < state.validated)
        except (ValueError, KeyError, TypeError):
            keep = False
        if keep:
            kept.append(line + "\n")
    write_atomically(path, "".join(kept))


def git_revision() -> str:
    root = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain"], capture_output=True, text=True)
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
