"""Tiny alignment runs for tests: their shard set, their command line, their loss curves and the
kills that interrupt them."""

from __future__ import annotations

import json
from pathlib import Path


def make_shards(out: Path) -> Path:
    """128 synthetic training images (8 updates of 16 per epoch) and 32 validation images."""
    from fastloc.shard.convert import convert
    from fastloc.shard.sources.synthetic import SyntheticConfig

    for split, n in (("train", 128), ("val", 32)):
        convert(
            SyntheticConfig(
                out=out,
                split=split,
                num_samples=n,
                shard_samples=32,
                processes=1,
                progress=False,
                min_size=64,
                max_size=128,
                fsync=False,
            )
        )
    return out / "synthetic"


def args(shards: Path, out: Path, *extra, preset: str = "tiny") -> list[str]:
    """``python -m fastloc.align`` arguments of a ``preset`` run on ``shards``, written under ``out``."""
    return [
        "train",
        preset,
        "--data.train",
        str(shards / "train"),
        "--data.val",
        str(shards / "val"),
        "--run.out",
        str(out),
        "--run.log-every",
        "1",
        "--run.no-progress",
        *map(str, extra),
    ]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def curve(run: Path) -> list[tuple]:
    return [(m["step"], m.get("loss"), m.get("grad_norm"), m.get("lr"), m.get("val_loss")) for m in metrics(run)]


def assert_same_curve(a: Path, b: Path, rel: float = 1e-5) -> None:
    """Two runs logged the same steps with the same loss, grad norm, lr and val loss, to ``rel``
    (2-rank runs differ in the last bits with the order of gloo's reductions and thread counts)."""
    x, y = curve(a), curve(b)
    assert [s[0] for s in x] == [s[0] for s in y], (x, y)
    for u, v in zip(x, y):
        for p, q in zip(u[1:], v[1:]):
            assert (p is None) == (q is None) and (p is None or abs(p - q) <= rel * abs(q)), (u, v)


class Killed(BaseException):
    """Stands for SIGKILL in this process: nothing of the run catches it, nothing more is written."""


def kill_on_call(monkeypatch, owner, name: str, call: int, before: bool = False) -> None:
    """Replace ``owner.name`` so that its ``call``-th call raises ``Killed`` (after doing its work,
    or ``before`` it)."""
    original, calls = getattr(owner, name), []

    def wrapped(*a, **k):
        calls.append(1)
        if before and len(calls) == call:
            raise Killed
        out = original(*a, **k)
        if len(calls) == call:
            raise Killed
        return out

    monkeypatch.setattr(owner, name, wrapped)
