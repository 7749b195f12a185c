"""Checkpoints of a run: ``ckpt-STEP.pt`` in the run directory, plus ``best.pt``.

Each is written atomically (a hidden temporary file, fsynced, renamed into place); a write that
fails (a full disk) removes its temporary file and raises the ``OSError`` naming the checkpoint.
After a new step checkpoint, all but the newest two are removed, never one newer than it. Loading
uses ``torch.load(weights_only=True)``: a checkpoint holds only tensors, numbers, strings and
plain containers. ``latest`` falls back from an unreadable checkpoint to the one before it (the
unreadable one is moved aside as ``NAME.unreadable``), then to ``best.pt``, and refuses with one
line when none is readable. A checkpoint made with another configuration is refused with the
differing fields named (``config_fingerprint``: what changes the computation, paths resolved).
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
import warnings
from pathlib import Path
from typing import Any

import torch

from fastloc.cli import exception_line
from fastloc.files import temporary_files, write_atomically

STEP_FILE = re.compile(r"ckpt-(\d{8})\.pt")
BEST = "best.pt"
KEEP = 2
KEYS = ("config", "step", "objective", "optimizer", "loader", "rng")  # what every checkpoint holds

# Fields that do not change what a run computes: they may differ on resume.
UNFINGERPRINTED = {
    "data.workers",
    "data.threads",
    "run.log_every",
    "run.checkpoint_every",
    "run.progress",
    "run.out",
    "run.name",
    "system.compile",
    "system.device",
    "system.peak_tflops",
}
PATHS = {"data.train", "data.val", "method.weights"}  # compared resolved


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used for this run; the message says why and what to do."""


class RunBusy(CheckpointError):
    """Another process is writing the run directory."""


def plain(value: Any) -> Any:
    """A dataclass config as JSON-like data (paths as strings, tuples as lists)."""
    if dataclasses.is_dataclass(value):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def from_plain(cls: type, data: dict[str, Any]) -> Any:
    """The dataclass ``cls`` from ``plain``'s form of it (a TypeError for fields it does not have);
    JSON's lists become the configs' tuples again."""
    hints = typing.get_type_hints(cls)
    return cls(
        **{k: from_plain(hints[k], v) if dataclasses.is_dataclass(hints.get(k)) else _tuple(v) for k, v in data.items()}
    )


def _tuple(value: Any) -> Any:
    return tuple(_tuple(v) for v in value) if isinstance(value, list) else value


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        out.update(_flatten(value, name + ".") if isinstance(value, dict) else {name: value})
    return out


def _resolved(key: str, value: Any) -> Any:
    """A flattened field with its path made absolute (the config's paths, and a weights file), so
    a run resumes from another working directory or with its paths given otherwise."""
    if key in PATHS and isinstance(value, str) and (key != "method.weights" or os.path.isfile(value)):
        return str(Path(value).resolve())
    return value


def config_fingerprint(cfg: Any) -> dict[str, Any]:
    """The flattened config, paths resolved, without the fields a resumed run may change."""
    flat = _flatten(plain(cfg))
    return {k: _resolved(k, v) for k, v in flat.items() if k not in UNFINGERPRINTED}


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{field: (saved, current)} of the fingerprints' differences."""
    keys = sorted(set(saved) | set(current))
    return {k: (saved.get(k), current.get(k)) for k in keys if saved.get(k) != current.get(k)}


def load(path: Path) -> dict[str, Any]:
    """A checkpoint's state, or a ``CheckpointError`` saying why ``path`` is not a usable one."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, tampered, not a torch file, unreadable
        reason = exception_line(exc, 200)
        raise CheckpointError(f"{path}: unreadable checkpoint ({reason})") from None
    missing = [k for k in KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path}: not a checkpoint of python -m fastloc.align (no {', '.join(missing)})")
    return state


def all_finite(state: dict[str, Any]) -> bool:
    """Whether every floating-point tensor of a checkpoint state is finite (one host sync)."""
    flags = [torch.isfinite(t).all() for t in _tensors(state) if t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


def _tensors(tree: Any):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for value in tree.values():
            yield from _tensors(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from _tensors(value)


def load_objective(objective: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Load a checkpoint's objective state: every key of the objective's state must be there and fit."""
    try:
        missing, unexpected = objective.load_state_dict(weights, strict=False)
    except RuntimeError as exc:  # a shape that does not fit
        raise CheckpointError(
            f"the checkpoint does not fit the objective: {' '.join(str(exc).split())[:300]}"
        ) from None
    if missing or unexpected:
        raise CheckpointError(
            f"the checkpoint does not fit the objective: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


class Checkpointer:
    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)

    def steps(self) -> list[Path]:
        """Step checkpoints, newest first."""
        found = [p for p in self.run_dir.glob("ckpt-*.pt") if STEP_FILE.fullmatch(p.name)]
        return sorted(found, key=lambda p: p.name, reverse=True)

    def save(self, state: dict[str, Any], step: int, best: bool = False) -> Path:
        """Write ``state`` as ``best.pt`` (when ``best``) and ``ckpt-STEP.pt``, then drop the step
        checkpoints older than the newest two (``best.pt`` first: a kill between the two writes
        resumes from an earlier checkpoint and writes both again)."""
        if best:
            _atomic_save(state, self.run_dir / BEST)
        path = self.run_dir / f"ckpt-{step:08d}.pt"
        _atomic_save(state, path)
        older = [p for p in self.steps() if int(STEP_FILE.fullmatch(p.name)[1]) < step]
        for old in older[KEEP - 1 :]:
            old.unlink(missing_ok=True)
        return path

    def clean(self) -> None:
        """Remove the temporary files of writes a killed run left unfinished."""
        for tmp in temporary_files(self.run_dir):
            tmp.unlink(missing_ok=True)

    def latest(self, fingerprint: dict[str, Any], move_aside: bool = True) -> tuple[Path, dict[str, Any]] | None:
        """The newest readable checkpoint of this configuration (a step checkpoint, else
        ``best.pt``), or None when there is none. Unreadable ones newer than it are moved aside
        (by the one process that ``move_aside``) with a warning; when some exist and none is
        readable, a ``CheckpointError``; one of another configuration is refused."""
        unreadable: list[tuple[Path, str]] = []
        best = self.run_dir / BEST
        for path in [*self.steps(), *([best] if best.is_file() else [])]:
            try:
                state = load(path)
            except CheckpointError as exc:
                unreadable.append((path, str(exc)))
                continue
            self._check(path, state, fingerprint)
            for bad, reason in unreadable:
                aside = bad.with_name(bad.name + ".unreadable")
                if move_aside:
                    os.replace(bad, aside)
                warnings.warn(f"{reason}; moved aside as {aside.name}, resuming from {path.name}", stacklevel=2)
            return path, state
        if unreadable:
            reasons = "; ".join(reason for _, reason in unreadable)
            raise CheckpointError(
                f"{self.run_dir}: no readable checkpoint ({reasons}); move them away to start the run afresh"
            )
        return None

    @staticmethod
    def _check(path: Path, state: dict[str, Any], fingerprint: dict[str, Any]) -> None:
        differ = config_differences(state["config"], fingerprint)
        if differ:
            shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in differ.items())
            raise CheckpointError(
                f"{path} was saved by a run with another configuration ({shown}); "
                f"use another run name (--run.name) or the saved configuration"
            )


class _Writer:
    """A file's ``write`` that keeps the first ``OSError``: torch.save reports a failed write as a
    RuntimeError of its own ("enforce fail at inline_container.cc"), which names neither the file
    nor the cause."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        self.file.flush()


def _atomic_save(state: dict[str, Any], path: Path) -> None:
    def save(f) -> None:
        writer = _Writer(f)
        try:
            torch.save(state, writer)
        except RuntimeError:
            if writer.error is None:
                raise
            raise writer.error from None

    write_atomically(path, save, fsync=True)
