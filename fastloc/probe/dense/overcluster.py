"""Leopart's overclustering (``python -m fastloc.probe overcluster DATA``): k-means on the evaluation
split's patch tokens, clusters matched to classes by their pixels, mIoU; the mean over seeds.

The recipe (../shared/methods/OTHER-METHODS.md section 1; leopart ``sup_overcluster.py`` and
``experiments/utils.py``): the split's last-block patch tokens in batches of 60 with drop_last,
StandardScaler + PCA-50 fitted on them, k-means (100 iterations, 5 restarts) per K and seed, cluster
maps nearest-upsampled and ground truth nearest-downsampled to 100 x 100, a K x C contingency of the
non-void pixels; K > C: each cluster to its class of highest precision, K <= C: Hungarian on IoU;
per-class IoU over the split, mean over classes with background. Known differences: k-means,
scaler and PCA are torch (kmeans.py) with faiss's semantics but not its random streams, so one seed
is not faiss's clustering for it; the features are cached in bf16 under the default --precision
(Leopart ran fp32); the mIoU leaves out a class neither present nor predicted (Leopart counts it as
0; every VOC val class is present); K < C is matched by Hungarian (Leopart's code would use
many-to-one there, a K it never runs).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastloc.probe.dense import report
from fastloc.probe.dense.config import OverclusterConfig
from fastloc.probe.dense.data import VOID, LabelSpace, eval_batches, eval_split, open_run, resize_nearest
from fastloc.probe.dense.kmeans import PCA_MAX_POINTS_PER_DIM, kmeans, standardize_and_project
from fastloc.probe.dense.metrics import SegCounts, class_iou, fold_clusters, hungarian, many_to_one, mean_iou
from fastloc.probe.run import timed

PROTOCOL = "overcluster"


@dataclass
class Clustering:
    """One k-means clustering of the split, scored."""

    k: int
    seed: int
    miou: float
    iou: list[float]  # [C], NaN where a class is neither present nor predicted
    objective: float
    kmeans_s: float
    score_s: float


def gather(
    cache, cfg: OverclusterConfig, device: torch.device, labels: LabelSpace
) -> tuple[torch.Tensor, torch.Tensor]:
    """All patch tokens [N * g * g, D] float32 and the label maps at mask_size [N, m, m] of the batches used
    (drop_last leaves out the last partial batch)."""
    tokens, targets = [], []
    for features, label in eval_batches(cache, cfg.batch_size, device, labels, drop_last=cfg.drop_last):
        tokens.append(features.flatten(0, 1))  # [B * g * g, D]
        targets.append(resize_nearest(label, cfg.mask_size))
    if not tokens:
        raise ValueError(
            f"no batch of {cfg.batch_size} images in the evaluation split: lower --batch-size or pass --no-drop-last"
        )
    return torch.cat(tokens), torch.cat(targets)


def cluster_counts(
    assignments: torch.Tensor, targets: torch.Tensor, grid: int, k: int, num_classes: int, batch: int
) -> SegCounts:
    """K x C pixel counts of the cluster maps (assignments [N * g * g] in image order, upsampled to the
    targets' side) against targets [N, m, m]; void pixels left out. Batched, on the device, no host sync."""
    counts = SegCounts(num_classes, targets.device, num_preds=k, ignore=VOID)
    maps = assignments.view(-1, grid, grid)  # [N, g, g]
    side = targets.shape[-1]
    for start in range(0, maps.shape[0], batch):
        counts.update(resize_nearest(maps[start : start + batch], side), targets[start : start + batch])
    return counts


def match(contingency: torch.Tensor, num_classes: int, score: str) -> torch.Tensor:
    """Cluster -> class [K]: many-to-one by ``score`` when K > C, else Hungarian on IoU (Leopart's K = 21)."""
    if contingency.shape[0] > num_classes:
        return many_to_one(contingency, score)
    return hungarian(contingency)


def score(counts: SegCounts, score: str = "precision") -> tuple[torch.Tensor, float]:
    """(per-class IoU [C] float64 on the host, mIoU with background) of the matched clusters."""
    contingency = counts.checked_counts()
    folded = fold_clusters(contingency, match(contingency, counts.num_classes, score), counts.num_classes)
    return class_iou(folded), mean_iou(folded, include_background=True)


def cluster_and_score(
    features: torch.Tensor, targets: torch.Tensor, grid: int, k: int, num_classes: int, cfg, seed: int
) -> Clustering:
    """One seed: k-means on features [N * g * g, d], every token assigned, scored against targets [N, m, m]."""
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    result = kmeans(features, k, cfg.iterations, cfg.restarts, generator, cfg.max_points_per_centroid)
    middle = time.perf_counter()
    counts = cluster_counts(result.assignments, targets, grid, k, num_classes, cfg.batch_size)
    iou, miou = score(counts, cfg.many_to_one)
    return Clustering(k, seed, miou, iou.tolist(), result.objective, middle - start, time.perf_counter() - middle)


def overcluster(
    features: torch.Tensor, targets: torch.Tensor, grid: int, num_classes: int, cfg
) -> dict[int, list[Clustering]]:
    """Every K of cfg.clusters, seeds cfg.seed .. cfg.seed + cfg.seeds - 1; a progress line per K."""
    out = {}
    for k in cfg.clusters:
        out[k] = [
            cluster_and_score(features, targets, grid, k, num_classes, cfg, cfg.seed + s) for s in range(cfg.seeds)
        ]
        mious = np.array([c.miou for c in out[k]])
        seconds = sum(c.kmeans_s + c.score_s for c in out[k])
        print(
            f"overcluster K={k}: mIoU {100 * mious.mean():.2f} +- {100 * mious.std():.2f}"
            f" ({len(mious)} seeds, {seconds:.1f} s)"
        )
    return out


def summarise(results: dict[int, list[Clustering]]) -> tuple[dict[str, float], dict[str, list[float]], dict]:
    """Figures miou_k{K} (mean over seeds), per-class IoU per K (mean over seeds where defined), and the
    per-seed values, std and timings."""
    figures, per_class, seeds = {}, {}, {}
    for k, runs in results.items():
        name = f"miou_k{k}"
        mious = np.array([c.miou for c in runs])
        figures[name] = float(mious.mean())
        per_class[name] = torch.tensor([c.iou for c in runs], dtype=torch.float64).nanmean(0).tolist()
        seeds[name] = {
            "seeds": [c.seed for c in runs],
            "miou": mious.tolist(),
            "miou_std": float(mious.std()),
            "objective": [c.objective for c in runs],
            "kmeans_s": [c.kmeans_s for c in runs],
            "score_s": [c.score_s for c in runs],
        }
    return figures, per_class, {"per_seed": seeds}


def protocol(cfg: OverclusterConfig, images: int) -> dict:
    """The protocol's name and every knob (the CSV's knobs column and result.json's protocol)."""
    return {
        "name": PROTOCOL,
        "clusters": list(cfg.clusters),
        "seeds": cfg.seeds,
        "first_seed": cfg.seed,
        "iterations": cfg.iterations,
        "restarts": cfg.restarts,
        "max_points_per_centroid": cfg.max_points_per_centroid,
        "pca_dim": cfg.pca_dim,
        "pca_max_points_per_dim": PCA_MAX_POINTS_PER_DIM,
        "standardize": cfg.pca_dim > 0,
        "mask_size": cfg.mask_size,
        "many_to_one": cfg.many_to_one,
        "one_to_one": "hungarian on IoU (K <= classes)",
        "batch_size": cfg.batch_size,
        "drop_last": cfg.drop_last,
        "image_size": cfg.image_size,
        "images": images,
        "features": "last block after the final norm, patch tokens",
        "kmeans": "torch, faiss semantics",
        "skip_blocks": cfg.skip_blocks,
        "feature_dtype": "bfloat16" if cfg.precision == "bf16" else "float32",
        "include_background": True,
    }


def run(cfg: OverclusterConfig) -> Path:
    """The whole protocol; returns the run directory (result.json, and the CSV rows under cfg.results)."""
    opened = open_run(cfg)
    device, labels, backbone, timings = opened.device, opened.labels, opened.backbone, opened.timings
    with timed(opened.timings, "features_s"):
        cache = eval_split(cfg, opened.data.val, backbone, device)
        tokens, targets = gather(cache, cfg, device, labels)
    reduction = {}
    with timed(opened.timings, "scaler_pca_s"):
        if cfg.pca_dim:
            tokens, reduction = standardize_and_project(tokens, cfg.pca_dim, torch.Generator().manual_seed(cfg.seed))
    print(f"overcluster: {targets.shape[0]} images, {tokens.shape[0]} tokens of dimension {tokens.shape[1]}")
    results = overcluster(tokens, targets, backbone.image.grid, labels.num_classes, cfg)
    figures, per_class, extra = summarise(results)
    timings["kmeans_s"] = sum(c.kmeans_s for runs in results.values() for c in runs)
    timings["score_s"] = sum(c.score_s for runs in results.values() for c in runs)
    extra.update(timings=timings, reduction=reduction, device=str(device), tokens=int(tokens.shape[0]))
    knobs = protocol(cfg, int(targets.shape[0]))
    return report.write_result(cfg, knobs, opened.data, labels, backbone.model, figures, per_class, extra)
