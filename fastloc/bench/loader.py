"""``python -m fastloc.bench loader``: images/s of each loader and recipe at several worker counts.

Data: the synthetic set (192-320 px scenes with labels) and a set of real JPEGs of ImageNet size
(the ImageNet excerpt in the shared fixtures, replicated; without it, generated 500x375 JPEGs),
both converted to shards first (untimed). Each row times ``--batches`` batches after one warm-up
batch, at ``--size`` px, with ``workers`` host processes (and as many DALI threads). Rows:

- ``host feed``: DALI's input side alone: the host stage (read, check, draw, label) in the
  workers and DALI's external source, with a pass-through graph instead of decoding. Its rate
  is the ceiling of the DALI GPU path on this machine's cores (aim: >= 5,000 images/s on a
  GPU node's cores, so the GPU is never starved);
- ``torch twin`` and ``DALI cpu``: the two loaders on the CPU (aim: DALI-CPU >= 1.5x the twin);
- ``DALI gpu`` (CUDA only): nvJPEG and GPU resize (aim on one H100: >= 5,000 images/s, train).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from fastloc.bench.common import MissingRow, at_least, check_paths, cuda_missing_reason, print_table, write_results
from fastloc.bench.shard import ShardBench, _build_jpeg_folder
from fastloc.cli import flowing_help, require
from fastloc.data.config import SOLO, LoaderConfig
from fastloc.data.dali_loader import DaliLoader
from fastloc.data.dali_pipeline import build_pipeline
from fastloc.data.recipes import CentreSquare, Rkrc
from fastloc.data.torch_loader import TorchLoader
from fastloc.shard.convert import convert
from fastloc.shard.sources.imagenet import ImagenetConfig
from fastloc.shard.sources.synthetic import SyntheticConfig


@flowing_help
@dataclass(frozen=True, kw_only=True)
class LoaderBench:
    """Loader throughput: DALI (GPU and CPU operators), the torch twin and the host feed alone, per recipe."""

    images: int = 1024
    """Samples in each shard set (synthetic, and real JPEGs); at least 2 x --batch-size (a warm-up batch,
    then timed ones)."""

    batch_size: int = 64
    """Batch size."""

    batches: int = 10
    """Timed batches per row (after one warm-up batch); capped by the epoch length."""

    size: int = 224
    """Output side in pixels."""

    workers: tuple[int, ...] = (1, 2)
    """Host worker process counts to compare (DALI gets as many CPU threads); 0 is the main process."""

    workdir: Path | None = None
    """Scratch folder for the shard sets (default: a temporary folder, deleted afterwards)."""

    out: Path | None = None
    """JSON results path (default: runs/bench/loader-DATE.json)."""

    def validate(self) -> None:
        """A ``BadValue`` for the first option out of its range, before any work."""
        at_least(self, 1, "images", "batch_size", "batches", "size")
        rule = f"must be at least 2 x --batch-size {self.batch_size} (a warm-up batch, then a timed one)"
        require(self.images >= 2 * self.batch_size, "--images", self.images, rule)
        require(len(self.workers) > 0, "--workers", list(self.workers), "must list at least one worker count")
        rule = "must each be at least 0 (0: the main process)"
        require(min(self.workers) >= 0, "--workers", list(self.workers), rule)
        check_paths(self.out, self.workdir)


def _pass_through(spec, jpg, crop, box, out, pads, interp, flip):
    """The feed-only graph: consumes every input, decodes nothing."""
    from nvidia.dali import fn, types

    def f(x):
        return fn.cast(x, dtype=types.FLOAT)

    return fn.cat(f(jpg.shape()), f(crop), box, out, f(pads), f(fn.stack(interp, flip)))


class FeedOnly(DaliLoader):
    """The DALI loader with its graph replaced by a pass-through: what feeding alone costs."""

    def _build(self):
        return build_pipeline(
            self.spec, self._feeder, self.cfg.batch_size, self.threads, self.device_id, graph=_pass_through
        )


LOADERS = {
    "host feed": lambda c: FeedOnly(c, SOLO, device="cpu"),
    "torch twin": lambda c: TorchLoader(c, SOLO),
    "DALI cpu": lambda c: DaliLoader(c, SOLO, device="cpu"),
    "DALI gpu": lambda c: DaliLoader(c, SOLO, device="gpu"),
}


def run(cfg: LoaderBench, command: str) -> Path:
    rows = []
    no_cuda = cuda_missing_reason()
    names = [n for n in LOADERS if n != "DALI gpu" or no_cuda is None]
    missing = [MissingRow("DALI gpu (every data, recipe and worker count)", no_cuda)] if no_cuda else []
    with tempfile.TemporaryDirectory(dir=cfg.workdir) as scratch:
        sets = _make_sets(Path(scratch), cfg)
        for data, shards in sets.items():
            for recipe, made in {"train": Rkrc(), "eval": CentreSquare()}.items():
                for workers in cfg.workers:
                    for name in names:
                        loader_cfg = LoaderConfig(
                            shards=shards,
                            batch_size=cfg.batch_size,
                            size=cfg.size,
                            recipe=made,
                            workers=workers,
                            threads=max(1, workers),
                            shuffle=True,
                        )
                        samples, seconds, main_cpu = _time_epoch(LOADERS[name](loader_cfg), cfg.batches)
                        rows.append(
                            {
                                "data": data,
                                "recipe": recipe,
                                "loader": name,
                                "workers": workers,
                                "images": samples,
                                "seconds": seconds,
                                "images_per_s": samples / seconds,
                                "main_cpu_us_per_image": 1e6 * main_cpu / samples,
                            }
                        )
    summary = _summary(rows)
    columns = ["data", "recipe", "loader", "workers", "images", "seconds", "images_per_s", "main_cpu_us_per_image"]
    print_table(rows, columns, missing)
    for line in summary:
        print(line)
    payload = {"config": {k: str(v) for k, v in cfg.__dict__.items()}, "rows": rows, "summary": summary}
    return write_results("loader", cfg.out, command, payload, missing)


def _make_sets(work: Path, cfg: LoaderBench) -> dict[str, Path]:
    jpegs, _ = _build_jpeg_folder(work / "jpegs", ShardBench(images=cfg.images))
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        convert(SyntheticConfig(out=work, num_samples=cfg.images, shard_samples=128, progress=False))
        convert(ImagenetConfig(src=jpegs, out=work, shard_samples=128, progress=False))
    return {"synthetic": work / "synthetic/train", "imagenet-size JPEGs": work / "imagenet/train"}


def _time_epoch(loader, batches: int) -> tuple[int, float, float]:
    """Samples, wall seconds and this (main) process's CPU seconds of ``batches`` batches after one
    warm-up batch. The main process's share is what more workers cannot take over."""
    iterator = iter(loader)
    next(iterator)
    samples, start, cpu = 0, time.perf_counter(), time.process_time()
    for i, batch in enumerate(iterator):
        samples += len(batch)
        if i + 1 == batches:
            break
    return samples, time.perf_counter() - start, time.process_time() - cpu


def _summary(rows: list[dict]) -> list[str]:
    lines = []
    rate = {(r["data"], r["recipe"], r["loader"], r["workers"]): r["images_per_s"] for r in rows}
    main = {(r["data"], r["recipe"], r["loader"], r["workers"]): r["main_cpu_us_per_image"] for r in rows}
    for (data, recipe, loader, workers), value in rate.items():
        if loader == "DALI cpu":
            twin = rate[(data, recipe, "torch twin", workers)]
            lines.append(
                f"{data}, {recipe}, {workers} worker(s): DALI-CPU {value / twin:.2f}x the torch twin (aim >= 1.5x)"
            )
        if loader == "host feed" and workers >= 1:
            need = -(-5000 * workers // max(1, int(value)))
            ceiling = 1e6 / max(main[(data, recipe, loader, workers)], 1e-9)
            lines.append(
                f"{data}, {recipe}, host feed: {value:,.0f} images/s with {workers} worker(s) (aim >= 5,000: about "
                f"{need} workers at this rate per worker; the main process's share caps it at {ceiling:,.0f})"
            )
        if loader == "DALI gpu" and recipe == "train":
            lines.append(
                f"{data}, train, DALI-GPU, {workers} worker(s): {value:,.0f} images/s (aim >= 5,000 on one H100)"
            )
    return lines
