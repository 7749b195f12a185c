"""``python -m fastloc.bench loader``: images/s of each loader and recipe at several thread counts.

Data: the synthetic set (192-320 px scenes with labels) and a set of real JPEGs of ImageNet size
(the ImageNet excerpt in the shared fixtures, replicated; without it, generated 500x375 JPEGs),
both converted to shards first (untimed). Each row times one pass over ``--batches`` batches
after one warm-up batch, at ``--size`` px. On a CPU machine the contenders are the DALI pipeline
with CPU operators and the torch twin at the same thread / worker count (aim: DALI-CPU >= 1.5x);
on a GPU machine the DALI GPU pipeline too (aim on one H100: >= 5,000 images/s with `train`).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fastloc.bench.common import print_table, write_results
from fastloc.bench.shard import ShardBench, _build_jpeg_folder
from fastloc.data.config import LoaderConfig
from fastloc.data.dali_loader import DaliLoader
from fastloc.data.torch_loader import TorchLoader
from fastloc.shard.convert import convert
from fastloc.shard.sources.imagenet import ImagenetConfig
from fastloc.shard.sources.synthetic import SyntheticConfig


@dataclass(frozen=True, kw_only=True)
class LoaderBench:
    """Loader throughput: DALI (GPU and CPU operators) and the torch twin, per recipe."""

    images: int = 1024
    """Samples in each shard set (synthetic, and real JPEGs)."""

    batch_size: int = 64
    """Batch size."""

    batches: int = 10
    """Timed batches per row (after one warm-up batch); capped by the epoch length."""

    size: int = 224
    """Output side in pixels."""

    threads: tuple[int, ...] = (1, 2)
    """Thread / worker counts to compare (0 would mean the main process for the torch twin)."""

    workdir: Path | None = None
    """Scratch folder for the shard sets (default: a temporary folder, deleted afterwards)."""

    out: Path | None = None
    """JSON results path (default: runs/bench/loader-DATE.json)."""


def run(cfg: LoaderBench, command: str) -> Path:
    rows = []
    with tempfile.TemporaryDirectory(dir=cfg.workdir) as scratch:
        work = Path(scratch)
        sets = _make_sets(work, cfg)
        backends = [("torch twin", lambda c: TorchLoader(c)), ("DALI cpu", lambda c: DaliLoader(c, device="cpu"))]
        if torch.cuda.is_available():
            backends.append(("DALI gpu", lambda c: DaliLoader(c, device="gpu")))
        for data, shards in sets.items():
            for recipe in ("train", "eval"):
                for threads in cfg.threads:
                    for name, build in backends:
                        loader_cfg = LoaderConfig(shards=shards, batch_size=cfg.batch_size, size=cfg.size,
                                                  recipe=recipe, workers=threads, shuffle=True)  # fmt: skip
                        samples, seconds = _time_epoch(build(loader_cfg), cfg.batches)
                        rows.append({"data": data, "recipe": recipe, "loader": name, "threads": threads,
                                     "images": samples, "seconds": seconds,
                                     "images_per_s": samples / seconds})  # fmt: skip
    summary = _summary(rows)
    print_table(rows, ["data", "recipe", "loader", "threads", "images", "seconds", "images_per_s"])
    for line in summary:
        print(line)
    return write_results("loader", cfg.out, command, {
        "config": {k: str(v) for k, v in cfg.__dict__.items()}, "rows": rows, "summary": summary,
    })  # fmt: skip


def _make_sets(work: Path, cfg: LoaderBench) -> dict[str, Path]:
    jpegs, _ = _build_jpeg_folder(work / "jpegs", ShardBench(images=cfg.images))
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        convert(SyntheticConfig(out=work, num_samples=cfg.images, shard_samples=128, progress=False))
        convert(ImagenetConfig(src=jpegs, out=work, shard_samples=128, progress=False))
    return {"synthetic": work / "synthetic/train", "imagenet-size JPEGs": work / "imagenet/train"}


def _time_epoch(loader, batches: int) -> tuple[int, float]:
    """Samples and seconds of ``batches`` batches after one warm-up batch."""
    iterator = iter(loader)
    next(iterator)
    samples, start = 0, time.perf_counter()
    for i, batch in enumerate(iterator):
        samples += len(batch)
        if i + 1 == batches:
            break
    return samples, time.perf_counter() - start


def _summary(rows: list[dict]) -> list[str]:
    lines = []
    rate = {(r["data"], r["recipe"], r["loader"], r["threads"]): r["images_per_s"] for r in rows}
    for (data, recipe, loader, threads), value in rate.items():
        if loader == "DALI cpu":
            twin = rate[(data, recipe, "torch twin", threads)]
            lines.append(f"{data}, {recipe}, {threads} thread(s): DALI-CPU {value / twin:.2f}x the torch "
                         f"twin (aim >= 1.5x)")  # fmt: skip
        if loader == "DALI gpu" and recipe == "train":
            lines.append(f"{data}, train, DALI-GPU: {value:,.0f} images/s (aim >= 5,000 on one H100)")
    return lines

