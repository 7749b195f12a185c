"""``python -m fastloc.bench evals``: each dense protocol's wall time (overcluster, linear
leopart-voc, hummingbird), beside baselines measured in the same run on the same inputs (scipy's
k-means, Leopart's head order, one whole similarity matrix), and the zero-shot harness's sliding
windows beside the reference's per-window loop, at a ``tiny`` or ``voc`` scale. The rows and aims:
README.md, "Benchmarks".
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
from fastloc.probe.dense.kmeans import ieee_fp32
from fastloc.probe.dense.metrics import knn_transfer
from fastloc.probe.dense.slide import window_boxes

PROTOCOLS = ("overcluster", "linear", "hummingbird", "zeroshot")
AIMS = {"overcluster": 120.0, "linear": 600.0}  # seconds on one H100 at VOC size
SLIDE_AIM = 2.0  # zeroshot slide: batched windows against the per-window loop, on one H100 at VOC size
COLUMNS = ["row", "setting", "seconds", "baseline_s", "speedup", "figure", "value"]
SCALES = {  # images (train, val), side range of the generated images, backbone
    "tiny": ((48, 32), (64, 96), "tiny"),
    "voc": ((1464, 1449), (300, 500), "in1k-vit-b"),
}
ZEROSHOT = {  # images, short side, sliding (window, stride), CLIP tower (random weights): NACLIP's slide at VOC's size
    "tiny": (4, 64, (48, 24), "tiny"),
    "voc": (16, 336, (224, 112), "clip-vit-b"),
}
QUERIES = 21  # random unit query embeddings, one per VOC class
LOGITS_ATOL = 1e-4  # cosines lie in [-1, 1]; batch size changes only float32 summation order (~1e-6)


@flowing_help
@dataclass(frozen=True, kw_only=True)
class EvalsBench:
    """The evaluations' wall times (overcluster, linear leopart-voc, hummingbird, zero-shot sliding windows), each
    beside a baseline."""

    data: Path | None = None
    """A shard set with train and val splits (e.g. shards/voc with --train-split trainaug left to
    the protocols' defaults); default: a generated synthetic set of the scale's size."""

    scale: Literal["auto", "tiny", "voc"] = "auto"
    """tiny (CPU-sized) or voc (VOC's size and each protocol's recipe); auto: voc with CUDA, tiny without."""

    backbone: str = ""
    """The dense protocols' backbone (default: tiny at the tiny scale, in1k-vit-b = ViT-B/16 at VOC's);
    zeroshot always times its scale's CLIP tower with random weights (tiny, or clip-vit-b at VOC's)."""

    weights: str = "random"
    """random (no download), pretrained, or a weights file; the timings do not depend on it."""

    protocols: tuple[Literal["overcluster", "linear", "hummingbird", "zeroshot"], ...] = PROTOCOLS
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
    rows, unavailable = [], []  # unavailable: rows this install cannot produce
    with tempfile.TemporaryDirectory(dir=cfg.workdir) as scratch:
        work = Path(scratch)
        dense_asked = any(name != "zeroshot" for name in cfg.protocols)  # zeroshot generates its own images
        data = cfg.data or (synthetic_set(work / "data", train, val, sides) if dense_asked else None)
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
        backbone_text = f"{common['backbone']} ({cfg.weights} weights) on {common['device']}"
        print(f"scale {scale}: {data or 'no shard set'}, {backbone_text}", flush=True)
        for name in cfg.protocols:
            if name == "zeroshot":
                rows += _zeroshot_rows(scale, torch.device(common["device"]))
                continue
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
    missing += unavailable
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
    row = {"row": name, "setting": setting, "seconds": best, "baseline_s": baseline, "speedup": baseline / best}
    return row | {"timings_s": fast, "baseline_timings_s": slow}


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


def _zeroshot_rows(scale: str, device: torch.device) -> list[dict]:
    """``zeroshot slide``: ``segment_logits`` (each image's windows of one size as one batch) against
    ``slide_logits_loop`` (the reference's loop, the model once per window) on the same generated images,
    model and random queries, after an untimed check that both give the same logits; ``zeroshot pamr``:
    PAMR on those logits, no baseline. float32 with TF32 matmuls off, so that the check's tolerance
    only covers summation order. The queries are random, so neither needs open_clip (the GPU machine's
    minimal install has none)."""
    from fastloc.probe.zeroshot.decide import Settings
    from fastloc.probe.zeroshot.pamr import DILATIONS, ITERATIONS, pamr
    from fastloc.probe.zeroshot.readout import create_tower
    from fastloc.probe.zeroshot.segment import resize, segment_logits

    count, short_side, window, tower = ZEROSHOT[scale]
    print("running zeroshot ...", flush=True)
    model = create_tower(tower, "random").to(device).eval()
    gen = torch.Generator().manual_seed(0)
    low, high = SCALES[scale][1]
    images = []
    for _ in range(count):  # normalised images of the scale's sides, either orientation
        h, w = torch.randint(low, high + 1, (2,), generator=gen).tolist()
        images.append(torch.randn(3, h, w, generator=gen).to(device))
    width = model.num_classes or model.num_features  # the projection head's width, or the tokens' without one
    queries = F.normalize(torch.randn(QUERIES, width, generator=gen), dim=1).to(device)  # [Q, D]
    settings = Settings("", 0.0, 40.0, short_side, window, pamr=False)  # only short_side and window are read

    def batched() -> list[torch.Tensor]:
        out = [segment_logits(model, image, queries, settings) for image in images]
        _sync(device)
        return out

    def looped() -> list[torch.Tensor]:
        out = [slide_logits_loop(model, image, queries, short_side, window) for image in images]
        _sync(device)
        return out

    resized = [resize(image, short_side) for image in images]

    def refine() -> None:
        for image, out in zip(resized, logits):
            pamr(image, out)
        _sync(device)

    with ieee_fp32():
        logits = batched()  # the untimed check, which warms both up
        diff = max((a - b).abs().max().item() for a, b in zip(logits, looped()))
        fast, slow = time_runs(batched, 3), time_runs(looped, 3)
        refine()  # warm-up
        refined = time_runs(refine, 3)
    windows = sum(len(window_boxes(*image.shape[-2:], *window)) for image in resized) / count
    images_text = f"{count} images {low}-{high} px"
    where = f"short side {short_side}, windows {window[0]}/{window[1]} ({windows:.1f}/image)"
    model_text = f"{tower} random fp32, NACLIP, {QUERIES} random unit queries x {width}"
    setting = f"{images_text}, {where}; {model_text}: batched vs one window a call"
    slide = _row("zeroshot slide", setting, fast, slow) | {"figure": "images/s", "value": count / min(fast)}
    slide |= {"aim_speedup": SLIDE_AIM, "max_abs_diff": diff, "same_logits": diff <= LOGITS_ATOL}
    setting = f"{images_text}, {QUERIES} queries at the original size: {ITERATIONS} iterations, dilations {DILATIONS}"
    refine_row = {"row": "zeroshot pamr", "setting": setting, "seconds": min(refined), "timings_s": refined}
    return [slide, refine_row | {"figure": "ms/image", "value": 1000 * min(refined) / count}]


@torch.no_grad()
def slide_logits_loop(
    model: torch.nn.Module,
    image: torch.Tensor,
    queries: torch.Tensor,
    short_side: int,
    window: tuple[int, int],
    readout: str = "naclip",
) -> torch.Tensor:
    """``segment_logits`` without PAMR written as NACLIP's ``forward_slide`` and ``forward_feature``
    (naclip.py:71-108 @ 0cac3a6; SCLIP's the same): the image resized to the short side, then a Python
    loop over mmseg's windows, the model run on one window at a time, its cosine logits resized
    bilinearly to the window, padded to the image and summed, divided by the count map; resized back."""
    from fastloc.probe.zeroshot.readout import dense_tokens
    from fastloc.probe.zeroshot.segment import resize

    resized = resize(image, short_side)
    h, w = resized.shape[-2:]
    ph, pw = model.patch_embed.patch_size
    preds = queries.new_zeros((queries.shape[0], h, w), dtype=torch.float32)  # [Q, h, w]
    count = queries.new_zeros((1, h, w), dtype=torch.float32)
    for y1, y2, x1, x2 in window_boxes(h, w, *window):
        gh, gw = (y2 - y1) // ph, (x2 - x1) // pw  # the strided convolution's grid
        crop = resized[None, :, y1 : y1 + gh * ph, x1 : x1 + gw * pw]
        tokens = dense_tokens(model, crop, readout)[0]  # [gh, gw, D]
        crop_logits = (tokens.float() @ queries.float().T).permute(2, 0, 1)  # [Q, gh, gw]
        crop_logits = F.interpolate(crop_logits[None], size=(y2 - y1, x2 - x1), mode="bilinear", align_corners=False)
        preds += F.pad(crop_logits[0], (x1, w - x2, y1, h - y2))
        count[:, y1:y2, x1:x2] += 1
    preds = preds / count
    if preds.shape[-2:] == image.shape[-2:]:
        return preds
    return F.interpolate(preds[None], size=image.shape[-2:], mode="bilinear", align_corners=False)[0]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _summary(rows: list[dict], scale: str) -> list[str]:
    lines = []
    measured = " (measured at VOC size)" if scale == "voc" else ""
    for row in rows:
        if row.get("aim_speedup") is not None:
            same = "equal logits" if row["same_logits"] else f"LOGITS DIFFER beyond {LOGITS_ATOL:g}: not equal work"
            lines.append(
                f"{row['row']}: {row['speedup']:.1f}x the per-window loop ({same}, max |diff| "
                f"{row['max_abs_diff']:.1e}); aim on one H100 at VOC size: >= {row['aim_speedup']:.0f}x{measured}"
            )
        if row.get("aim_s") is None:
            continue
        verdict = f"aim on one H100 at VOC size: < {row['aim_s']:.0f} s{measured}"
        lines.append(f"{row['row']}: {row['seconds']:.1f} s, {row['figure']} {row['value']:.4f}; {verdict}")
    return lines
