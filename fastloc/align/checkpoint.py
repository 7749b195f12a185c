"""Checkpoints of a run: ``ckpt-STEP.pt`` in the run directory, plus ``best.pt``.

Each is written atomically (a hidden temporary file, fsynced, renamed into place), then all but
the newest two step checkpoints are removed, so a checkpoint that turns out unreadable falls back
to the one before it. Loading uses ``torch.load(weights_only=True)``: a checkpoint holds only
tensors, numbers, strings and plain containers. A checkpoint made with another configuration is
refused with the differing fields named (``config_fingerprint``: what changes the computation).
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch

STEP_FILE = re.compile(r"ckpt-(\d{8})\.pt")
BEST = "best.pt"
KEEP = 2

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


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used for this run; the message says why and what to do."""


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


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        out.update(_flatten(value, name + ".") if isinstance(value, dict) else {name: value})
    return out


def config_fingerprint(cfg: Any) -> dict[str, Any]:
    """The flattened config without the fields a resumed run may change."""
    return {k: v for k, v in _flatten(plain(cfg)).items() if k not in UNFINGERPRINTED}


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{field: (saved, current)} of the fingerprints' differences."""
    keys = sorted(set(saved) | set(current))
    return {k: (saved.get(k), current.get(k)) for k in keys if saved.get(k) != current.get(k)}


class Checkpointer:
    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)

    def steps(self) -> list[Path]:
        """Step checkpoints, newest first."""
        found = [p for p in self.run_dir.glob("ckpt-*.pt") if STEP_FILE.fullmatch(p.name)]
        return sorted(found, key=lambda p: p.name, reverse=True)

    def save(self, state: dict[str, Any], step: int, best: bool = False) -> Path:
        """Write ``state`` as ``ckpt-STEP.pt`` (and ``best.pt``); drop all but the newest two."""
        path = self.run_dir / f"ckpt-{step:08d}.pt"
        _atomic_save(state, path)
        if best:
            _atomic_save(state, self.run_dir / BEST)
        for old in self.steps()[KEEP:]:
            old.unlink(missing_ok=True)
        return path

    def latest(self, fingerprint: dict[str, Any]) -> tuple[Path, dict[str, Any]] | None:
        """The newest readable step checkpoint of this configuration, or None when there is none.
        An unreadable one is skipped with a warning; one of another configuration is refused."""
        for path in self.steps():
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:
                reason = " ".join(str(exc).split())[:200]
                warnings.warn(f"{path}: unreadable checkpoint ({reason}); using the one before it", stacklevel=2)
                continue
            differ = config_differences(state.get("config", {}), fingerprint)
            if differ:
                shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in differ.items())
                raise CheckpointError(
                    f"{path} was saved by a run with another configuration ({shown}); "
                    f"use another run name (--run.name) or the saved configuration"
                )
            return path, state
        return None


def _atomic_save(state: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself survives a crash
    finally:
        os.close(fd)
