"""``python -m fastloc.bench evals``: each dense protocol's wall time (overcluster, linear
leopart-voc, hummingbird), beside baselines measured in the same run on the same inputs (scipy's
k-means, Leopart's head order, one whole similarity matrix), at a ``tiny`` or ``voc`` scale. The
rows and aims: README.md, "Benchmarks".
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from fastloc.bench.common import MissingRow, at_least, check_paths, print_table, time_runs, write_results
from fastloc.bench.probe import check_model, synthetic_set
from fastloc.cli import flowing_help, require
from fastloc.probe.dense import config as dense
from fastloc.probe.dense.metrics import knn_transfer

PROTOCOLS = ("overcluster", "linear", "hummingbird")
AIMS = {"overcluster": 120.0, "linear": 600.0}  # seconds on one H100 at VOC size
COLUMNS = ["row", "setting", "seconds", "baseline_s", "speedup", "figure", "value"]
SCALES = {  # images (train, val), side range of the generated images, backbone
    "tiny": ((48, 32), (64, 96), "tiny"),
    "voc": ((1464, 1449), (300, 500), "in1k-vit-b"),
}


@flowing_help
@dataclass(frozen=True, kw_only=True)
class EvalsBench:
    """The dense protocols' wall times (overcluster, linear leopart-voc, hummingbird), each beside a baseline."""

    data: Path | None = None
    """A shard set with train and val splits (e.g. shards/voc with --train-split trainaug left to
    the protocols' defaults); default: a generated synthetic set of the scale's size."""

    scale: Literal["auto", "tiny", "voc"] = "auto"
    """tiny (CPU-sized) or voc (VOC's size and each protocol's recipe); auto: voc with CUDA, tiny without."""

    backbone: str = ""
    """The backbone (default: tiny at the tiny scale, in1k-vit-b = ViT-B/16 at VOC's)."""

    weights: str = "random"
    """random (no download), pretrained, or a weights file; the timings do not depend on it."""

    protocols: tuple[Literal["overcluster", "linear", "hummingbird"], ...] = PROTOCOLS
    """The protocols to run."""

    workers: int = -1
    """Loader worker processes (-1: 0 on a CPU, 8 with CUDA)."""

    workdir: Path | None = None
    """Scratch folder for the generated data, caches and runs (default: a temporary folder, deleted)."""

    out: Path | None = None
    """JSON results path (default: runs/bench/evals-DATE.json)."""

    def validate(self) -> None:
        """A ``BadValue`` for the first option out of its range, before any work (the protocols read
        --data's splits themselves: here only the folder is checked)."""
        require(len(self.protocols) > 0, "--protocols", list(self.protocols), "must name at least one protocol")
        at_least(self, -1, "workers", meaning="-1: 0 on a CPU, 8 with CUDA")
        check_model(self.backbone or SCALES["tiny"][2], self.weights)  # each scale's default: a registered name
        if self.data is not None:
            rule = "must be a shard set folder (python -m fastloc.shard converts one)"
            require(self.data.is_dir(), "--data", str(self.data), rule)
        check_paths(self.out, self.workdir)


def run(cfg: EvalsBench, command: str) -> Path:
    cuda = torch.cuda.is_available()
    scipy = _have_scipy()
    scale = cfg.scale if cfg.scale != "auto" else ("voc" if cuda else "tiny")
    (train, val), sides, backbone = SCALES[scale]
    rows = []
    with tempfile.TemporaryDirectory(dir=cfg.workdir) as scratch:
        work = Path(scratch)
        data = cfg.data or synthetic_set(work / "data", train, val, sides)
        common = {
            "data": data,
            "backbone": cfg.backbone or backbone,
            "weights": cfg.weights,
            "device": "cuda" if cuda else "cpu",
            "loader": "cpu",
            "workers": cfg.workers if cfg.workers >= 0 else (8 if cuda else 0),
            "precision": "bf16" if cuda else "fp32",
            "cache_dir": work / "cache",
            "out": work / "runs",
            "results": work / "results",
        }
        print(f"scale {scale}: {data}, {common['backbone']} ({cfg.weights} weights) on {common['device']}", flush=True)
        for name in cfg.protocols:
            protocol_cfg = _config(name, scale, common, scipy)
            row, result = _protocol_row(name, protocol_cfg)
            rows.append(row)
            if name != "overcluster" or scipy:
                rows.append(_baseline(name, protocol_cfg, result))
    summary = _summary(rows, scale)
    missing = [MissingRow(p, "not asked for (--protocols)") for p in PROTOCOLS if p not in cfg.protocols]
    if not scipy:
        why = "needs scipy (its Hungarian matching, its k-means), which is not installed"
        missing.append(MissingRow("overcluster K = C, hummingbird Hungarian matching, kmeans", why))
    print_table(rows, COLUMNS, missing)
    for line in summary:
        print(line)
    payload = {"config": {k: str(v) for k, v in cfg.__dict__.items()}, "scale": scale, "rows": rows}
    return write_results("evals", cfg.out, command, payload | {"summary": summary}, missing)


def _have_scipy() -> bool:
    """scipy is a dependency of fastloc, but the GPU machine's minimal install may lack it."""
    try:
        import scipy.cluster.vq
        import scipy.optimize  # noqa: F401
    except ImportError:
        return False
    return True


def _config(name: str, scale: str, common: dict, scipy: bool) -> dense.DenseConfig:
    """The protocol's published recipe at VOC's size, or a short one at the tiny scale; without
    scipy, no Hungarian matching (overcluster's K = C, Hummingbird's matching)."""
    from fastloc.probe.data import open_data

    classes = int(open_data(common["data"]).num_classes)
    if scale == "voc":
        sizes = {"overcluster": 448, "linear": 448, "hummingbird": 512}
        cfg = dense.PROTOCOLS[name](image_size=sizes[name], **common)
        if name == "overcluster":
            cfg = replace(cfg, clusters=(100, 300, 500, classes))
    else:
        tiny = {
            "overcluster": {
                "clusters": (30, classes),
                "seeds": 2,
                "iterations": 20,
                "restarts": 2,
                "mask_size": 32,
                "batch_size": 16,
            },
            "linear": {"epochs": 2, "batch_size": 16, "probe_size": 16},
            "hummingbird": {"memory_size": 1024},
        }
        cfg = dense.PROTOCOLS[name](image_size=64, eval_batch_size=16, **common, **tiny[name])
    if not scipy and name == "overcluster":
        cfg = replace(cfg, clusters=tuple(k for k in cfg.clusters if k > classes))
    if not scipy and name == "hummingbird":
        cfg = replace(cfg, matching="none")
    return cfg


def _protocol_row(name: str, cfg: dense.DenseConfig) -> tuple[dict, dict]:
    """One whole protocol run (its output silenced) as a row, and its result.json."""
    import importlib

    print(f"running {name} ...", flush=True)
    start = time.perf_counter()
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        run_dir = importlib.import_module(f"fastloc.probe.dense.{name}").run(replace(cfg, name=name))
    seconds = time.perf_counter() - start
    result = json.loads((run_dir / "result.json").read_text())
    figure, value = next(iter(result["selected"].items()))
    row = {"row": name, "setting": cfg.protocol_name(), "seconds": seconds, "figure": figure, "value": value}
    return row | {"aim_s": AIMS.get(name), "selected": result["selected"]}, result


def _baseline(name: str, cfg: dense.DenseConfig, result: dict) -> dict:
    """The protocol's baseline row, on inputs of the run's sizes."""
    device = torch.device(cfg.device)
    dim, grid = int(result["backbone"]["width"]), cfg.image_size // int(result["backbone"]["image"]["patch_size"])
    if name == "overcluster":
        return _kmeans_row(cfg, device)
    if name == "linear":
        return _head_row(cfg, device, dim, grid, int(result["dataset"]["num_classes"]))
    return _knn_row(cfg, device, dim, grid, int(result["dataset"]["num_classes"]))


def _row(name: str, setting: str, fast: list[float], slow: list[float]) -> dict:
    best, baseline = min(fast), min(slow)
    return {"row": name, "setting": setting, "seconds": best, "baseline_s": baseline, "speedup": baseline / best}


def _kmeans_row(cfg: dense.OverclusterConfig, device: torch.device) -> dict:
    """torch k-means against scipy's kmeans2 on the same points (K x max_points_per_centroid
    PCA-sized Gaussian points: what faiss's subsampling trains on), one restart each."""
    from scipy.cluster.vq import kmeans2

    from fastloc.probe.dense.kmeans import kmeans

    k = max(cfg.clusters)
    n, d = k * cfg.max_points_per_centroid, cfg.pca_dim or 64
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(0))
    x_device, x_numpy = x.to(device), x.numpy()

    def ours() -> None:
        kmeans(x_device, k, cfg.iterations, 1, torch.Generator(device).manual_seed(0))
        _sync(device)

    def scipy() -> None:
        kmeans2(x_numpy, k, iter=cfg.iterations, minit="points", seed=0)

    ours()  # warm-up
    setting = f"K {k}, {n:,} x {d} points, {cfg.iterations} iterations: torch ({device.type}) vs scipy kmeans2 (CPU)"
    return _row("kmeans", setting, time_runs(ours, 2), time_runs(scipy, 1))


def _head_row(cfg: dense.LeopartVocConfig, device: torch.device, dim: int, grid: int, classes: int) -> dict:
    """The head's forward + backward at the loss size: logits upsampled against features upsampled first."""
    batch, size = cfg.batch_size, cfg.probe_size
    features = torch.randn(batch, dim, grid, grid, device=device)
    target = torch.randint(0, classes, (batch, size, size), device=device)
    head = torch.nn.Conv2d(dim, classes, 1).to(device)

    def step(logits_first: bool):
        def go() -> None:
            if logits_first:
                logits = F.interpolate(head(features), size=(size, size), mode="bilinear", align_corners=False)
            else:
                logits = head(F.interpolate(features, size=(size, size), mode="bilinear", align_corners=False))
            F.cross_entropy(logits, target).backward()
            _sync(device)

        return go

    step(True)(), step(False)()  # warm-up
    setting = f"batch {batch}, {dim} x {grid}^2 -> {size}^2: conv then upsample vs upsample then conv (Leopart's)"
    return _row("linear head step", setting, time_runs(step(True), 3), time_runs(step(False), 3))


def _knn_row(cfg: dense.HummingbirdConfig, device: torch.device, dim: int, grid: int, classes: int) -> dict:
    """knn_transfer (chunked) against one whole similarity matrix and its top-k, on a random bank
    of the protocol's size and 8 images' patches."""
    gen = torch.Generator(device).manual_seed(0)
    bank = F.normalize(torch.randn(cfg.memory_size or 65536, dim, device=device, generator=gen), dim=1)
    labels = torch.softmax(torch.randn(bank.shape[0], classes, device=device, generator=gen), dim=1)
    query = torch.randn(8 * grid * grid, dim, device=device, generator=gen)

    def chunked() -> None:
        knn_transfer(query, bank, labels, cfg.neighbours, cfg.temperature, bank_chunk=cfg.bank_chunk)
        _sync(device)

    def whole() -> None:
        sims = F.normalize(query, dim=1) @ bank.T
        values, index = sims.topk(cfg.neighbours, dim=1)
        weights = torch.softmax(values / cfg.temperature, dim=1)
        (weights[..., None] * labels[index]).sum(1).argmax(1)
        _sync(device)

    chunked(), whole()  # warm-up
    setting = f"{query.shape[0]:,} queries x {bank.shape[0]:,} bank, k {cfg.neighbours}: chunked vs one matrix"
    return _row("knn transfer", setting, time_runs(chunked, 3), time_runs(whole, 3))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _summary(rows: list[dict], scale: str) -> list[str]:
    lines = []
    for row in rows:
        aim = row.get("aim_s")
        if aim is None:
            continue
        verdict = f"aim on one H100 at VOC size: < {aim:.0f} s" + (" (measured at VOC size)" if scale == "voc" else "")
        lines.append(f"{row['row']}: {row['seconds']:.1f} s, {row['figure']} {row['value']:.4f}; {verdict}")
    return lines
