"""``python -m fastloc.bench probe``: a Patch-Seg probe run's wall time, fastloc's against the
original style: ``cold`` (the feature cache built), ``cached`` (reused) and ``original-style``
(no cache, the original's per-patch label loop), each split into features, training, evaluation
and the rest; their per-epoch figures must be equal and the table says whether they are. The rows
and aims: README.md, "Benchmarks".
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch

from fastloc.bench.common import MissingRow, at_least, check_paths, print_table, write_results
from fastloc.cli import BadValue, flowing_help, require
from fastloc.data.shards import ShardError
from fastloc.kernels.label_pool import label_pool_loop
from fastloc.models.exported import is_export
from fastloc.models.registry import backbone as registered_backbone
from fastloc.probe.cache import pack_bits, pool_targets
from fastloc.probe.config import ProbeConfig
from fastloc.probe.data import open_data
from fastloc.probe.run import probe
from fastloc.shard.convert import convert
from fastloc.shard.sources.synthetic import SyntheticConfig

SETTINGS = ("cold", "cached", "original-style")
AIM_SECONDS = 180  # 5 COCO-size epochs with ViT-B/16 on one H100, the cache build included
AIM_SPEEDUP = 10
COLUMNS = ["setting", "wall_s", "features_s", "train_s", "eval_s", "other_s", "macro_recall", "vs_original"]


@flowing_help
@dataclass(frozen=True, kw_only=True)
class ProbeBench:
    """A probe run's wall time: feature cache built (cold) and reused (cached), against the original style."""

    data: Path | None = None
    """An existing shard set with train and validation splits (e.g. shards/coco); default: a generated synthetic set."""

    images: int = 256
    """Training images of the generated set (64-96 px); at least --batch-size."""

    val_images: int = 64
    """Validation images of the generated set."""

    backbone: str = "tiny"
    """The probe's backbone (python -m fastloc.probe --help lists them), e.g. clip-vit-b on a GPU."""

    weights: str = "random"
    """random (no download), pretrained, or a weights file; the timings do not depend on it."""

    epochs: int = 2
    """Epochs of each run."""

    batch_size: int = 32
    """Training, evaluation and feature-extraction batch (one size: every setting sees the same batches)."""

    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """auto: bf16 with CUDA (the probe's default), fp32 on a CPU (bf16 matmuls are slow on most CPUs)."""

    workers: int = -1
    """Loader and cache-reader worker processes (-1: 0 on a CPU, 8 with CUDA)."""

    warmup: bool = True
    """First an untimed run on a few generated images, so that no setting pays the process's first-use costs."""

    skip_original: bool = False
    """Leave out the original-style run (slow at COCO size: its per-patch loop pools every label map every epoch)."""

    workdir: Path | None = None
    """Scratch folder for the generated data, the feature caches and the runs (default: a temporary folder, deleted)."""

    out: Path | None = None
    """JSON results path (default: runs/bench/probe-DATE.json)."""

    def validate(self) -> None:
        """A ``BadValue`` for the first option out of its range, before any work."""
        at_least(self, 1, "images", "val_images", "epochs", "batch_size")
        rule = f"must be at least --batch-size {self.batch_size} (a training batch is never partial)"
        require(self.data is not None or self.images >= self.batch_size, "--images", self.images, rule)
        at_least(self, -1, "workers", meaning="-1: 0 on a CPU, 8 with CUDA")
        check_model(self.backbone, self.weights)
        if self.data is not None:
            _check_data(self.data)
        check_paths(self.out, self.workdir)


def check_model(backbone: str, weights: str) -> None:
    """--backbone and --weights as the probe reads them: a registered name, a timm id or an aligned
    export (which holds its own weights: pretrained), and random, pretrained or a weights file."""
    export = _is_export(backbone)
    rule = "must be a registered name (python -m fastloc.probe --help lists them), a timm id or an aligned export"
    require(export or _known(backbone), "--backbone", backbone, rule)
    if export:
        rule = "must be pretrained for an aligned export (the file holds its weights)"
        require(weights == "pretrained", "--weights", weights, rule)
    else:
        known = weights in ("random", "pretrained") or Path(weights).is_file()
        require(known, "--weights", weights, "must be random, pretrained or a weights file")


def _is_export(name: str) -> bool:
    try:
        return is_export(name)
    except Exception:  # a damaged .safetensors file: not an export, refused as no backbone
        return False


def _known(name: str) -> bool:
    try:
        registered_backbone(name)
    except ValueError:
        return False
    return True


def _check_data(data: Path) -> None:
    """--data: a shard set with train and validation splits that carry label maps."""
    try:
        open_data(data)
    except (ValueError, ShardError, OSError) as exc:
        raise BadValue(f"--data {' '.join(str(exc).split())}") from None


def run(cfg: ProbeBench, command: str) -> Path:
    base = _probe_config(cfg)
    rows, missing = [], []
    with tempfile.TemporaryDirectory(dir=cfg.workdir) as scratch:
        work = Path(scratch)
        data = cfg.data or synthetic_set(work / "data", cfg.images, cfg.val_images)
        base = replace(base, data=data, cache_dir=work / "cache", out=work / "runs", results=work / "results")
        source = str(cfg.data) if cfg.data else "generated synthetic set, 64-96 px"
        splits = open_data(data)
        sizes = {"train": splits.train.num_samples, "val": splits.val.num_samples}
        print(
            f"{cfg.backbone} ({cfg.weights} weights), {base.precision}, {base.device}, loader {base.loader}, "
            f"{base.workers} workers: {cfg.epochs} epoch(s) of {sizes['train']:,} training / {sizes['val']:,} "
            f"validation images ({source}), batch {cfg.batch_size}",
            flush=True,
        )
        if cfg.warmup:
            _warm_up(work / "warmup", base)
        rows.append(_setting("cold", base))
        rows.append(_setting("cached", base))
        if cfg.skip_original:
            missing.append(MissingRow("original-style", "--skip-original"))
        else:
            rows.append(_setting("original-style", replace(base, cache=False), original_pool(base.reduction)))
    _add_speedups(rows)
    summary = _summary(rows, cfg, sizes)
    print_table(rows, COLUMNS, missing)
    for line in summary:
        print(line)
    config = {k: str(v) for k, v in cfg.__dict__.items()}
    resolved = {"precision": base.precision, "device": base.device, "loader": base.loader, "workers": base.workers}
    payload = {"config": config, "resolved": resolved, "data": source, "samples": sizes}
    payload |= {"rows": rows, "metrics_equal": _metrics_equal(rows), "summary": summary}
    return write_results("probe", cfg.out, command, payload, missing)


def _probe_config(cfg: ProbeBench) -> ProbeConfig:
    """The probe's own defaults but for what the benchmark sets (paths are filled in later)."""
    cuda = torch.cuda.is_available()
    dali = cuda and importlib.util.find_spec("nvidia.dali") is not None
    return ProbeConfig(
        data=Path("."),
        backbone=cfg.backbone,
        weights=cfg.weights,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        eval_batch_size=cfg.batch_size,
        precision=cfg.precision if cfg.precision != "auto" else ("bf16" if cuda else "fp32"),
        device="cuda" if cuda else "cpu",
        loader="gpu" if dali else "cpu",
        workers=cfg.workers if cfg.workers >= 0 else (8 if cuda else 0),
        predictions=0,
    )


def synthetic_set(root: Path, images: int, val_images: int, sides: tuple[int, int] = (64, 96)) -> Path:
    """A synthetic shard set with train and val splits, images of ``sides`` px (untimed; the
    converter's output silenced)."""
    for split, count in (("train", images), ("val", val_images)):
        synthetic = SyntheticConfig(
            out=root,
            split=split,
            num_samples=count,
            shard_samples=256,
            min_size=sides[0],
            max_size=sides[1],
            progress=False,
            fsync=False,
        )
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            convert(synthetic)
    return root / "synthetic"


def _warm_up(root: Path, base: ProbeConfig) -> None:
    """One untimed cold run of one epoch on 2 + 1 batches of generated images, in its own folders:
    library loading, thread pools, the CUDA context and the loader's start-up are paid here."""
    print("warming up ...", flush=True)
    data = synthetic_set(root / "data", 2 * base.batch_size, base.eval_batch_size)
    cfg = replace(base, data=data, epochs=1, cache_dir=root / "cache", out=root / "runs", results=root / "results")
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        probe(replace(cfg, name="warmup"))


# ---------------------------------------------------------------- the original's label pooling


def original_pool(reduction: str) -> Callable[[torch.Tensor, int, int], dict[str, torch.Tensor]]:
    """``pool_targets``' three outputs, the run's reduction pooled by the original's per-patch
    ``torch.unique`` loop on the host. The original pooled only that one reduction, so the other
    two (which the run never reads) come from the kernel: the baseline is not charged the loop
    three times."""
    name = {"union": "union", "majority": "majority", "global-union": "global"}[reduction]

    def pool(labels: torch.Tensor, patch: int, classes: int) -> dict[str, torch.Tensor]:
        stored = pool_targets(labels, patch, classes)
        looped = label_pool_loop(labels, patch, classes, reduction, torch.uint8)
        stored[name] = (looped if reduction == "majority" else pack_bits(looped)).to(labels.device)
        return stored

    return pool


# ---------------------------------------------------------------- one setting


def _setting(name: str, probe_cfg: ProbeConfig, pool=pool_targets) -> dict:
    """One timed probe run (its own output silenced; its progress stays on stderr) as a table row."""
    print(f"running {name} ...", flush=True)
    start = time.perf_counter()
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        run_dir = probe(replace(probe_cfg, name=name), pool=pool)
    wall = time.perf_counter() - start
    result = json.loads((run_dir / "result.json").read_text())
    timings = result["timings_s"]
    recall = [float(epoch["macro_recall"]) for epoch in result["epochs"]]
    return {
        "setting": name,
        "wall_s": wall,
        "features_s": timings["sources_s"],
        "train_s": timings["train_s"],
        "eval_s": timings["eval_s"],
        "other_s": wall - sum(timings.values()),
        "macro_recall": recall[-1],
        "vs_original": None,
        "macro_recall_per_epoch": recall,
        "timings_s": timings,
    }


def _add_speedups(rows: list[dict]) -> None:
    """vs_original: the original style's wall time over the row's."""
    original = next((r["wall_s"] for r in rows if r["setting"] == "original-style"), None)
    for row in rows:
        row["vs_original"] = original / row["wall_s"] if original else None


def _metrics_equal(rows: list[dict]) -> bool:
    return all(r["macro_recall_per_epoch"] == rows[0]["macro_recall_per_epoch"] for r in rows)


def _summary(rows: list[dict], cfg: ProbeBench, sizes: dict[str, int]) -> list[str]:
    by = {r["setting"]: r for r in rows}
    cold = by["cold"]["wall_s"]
    lines = [
        f"cold: {cold:,.1f} s for {cfg.epochs} epoch(s) of {sizes['train']:,} images, the cache build included "
        f"(aim on one H100: 5 COCO-size epochs, 118k train / 5k val, ViT-B/16, in <= {AIM_SECONDS} s)"
    ]
    if "original-style" in by:
        lines.append(
            f"original-style / cold: {by['cold']['vs_original']:.2f}x, original-style / cached: "
            f"{by['cached']['vs_original']:.2f}x (aim on one H100 at COCO size: >= {AIM_SPEEDUP}x)"
        )
    names = ", ".join(r["setting"] for r in rows)
    if _metrics_equal(rows):
        recall = ", ".join(f"{v:.4f}" for v in rows[0]["macro_recall_per_epoch"])
        lines.append(f"macro recall per epoch: equal in {names} ({recall})")
    else:
        detail = "; ".join(f"{r['setting']} {r['macro_recall_per_epoch']}" for r in rows)
        lines.append(f"macro recall per epoch: NOT equal in {names}: {detail}")
    return lines
