"""DINOv2/v3's ADE20k linear probe (--protocol dinov3-ade20k; facebookresearch/dinov3
dinov3/eval/segmentation): Dropout2d -> BatchNorm -> 1x1 conv trained by AdamW under
WarmupOneCycleLR on the reference's training pipeline (mmseg.py), scored by sliding windows at
full resolution (slide.py). Where it departs from dinov3: ``knobs``'s "differences".
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastloc.probe.dense import mmseg
from fastloc.probe.dense.config import Dinov3Ade20kConfig
from fastloc.probe.dense.data import VOID, DenseRun, patch_encoder, train_loader
from fastloc.probe.dense.linear import set_lr, to_grid, upsample
from fastloc.probe.dense.metrics import SegCounts
from fastloc.probe.dense.slide import score_split
from fastloc.progress import Progress

# config-ade20k-linear-training.yaml (optimizer, scheduler kwargs) and config.py (dropout)
BETAS, WEIGHT_DECAY, DROPOUT = (0.9, 0.999), 1e-3, 0.1
WARMUP, TOTAL, WARMUP_RATIO = 1500, 40_000, 1e-6
LOG_EVERY = 50  # dinov3's MetricLogger interval: updates per loss line


class Head(nn.Module):
    """dinov3's LinearHead (one layer, no CLS, use_batchnorm): Dropout2d -> BatchNorm -> Conv2d(D, C, 1),
    the conv drawn from N(0, 0.01) with zero bias. Dropout acts in train mode only, as the
    reference's ``predict`` skips it. [B, D, g, g] -> [B, C, g, g]."""

    def __init__(self, dim: int, classes: int, dropout: float = DROPOUT):
        super().__init__()
        self.dropout = nn.Dropout2d(dropout)
        self.bn = nn.BatchNorm2d(dim)  # the reference's SyncBatchNorm over 8 x 2 = this batch of 16
        self.conv = nn.Conv2d(dim, classes, 1)
        nn.init.normal_(self.conv.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.conv.bias)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return self.conv(self.bn(self.dropout(grid)))


def warmup_updates(iterations: int) -> int:
    """The reference's 1,500 warmup updates of 40,000, scaled with --iterations."""
    return round(iterations * WARMUP / TOTAL)


def onecycle_lr(step: int, total: int, warmup: int, max_lr: float, warmup_ratio: float = WARMUP_RATIO) -> float:
    """dinov3's WarmupOneCycleLR (warmup_ratio 1e-6, pct_start 0, cos, final_div_factor inf: min lr 0)
    after ``step`` scheduler steps."""
    if step < warmup:
        k = (1 - step / warmup) * (1 - warmup_ratio)
        return max_lr * (1 - k) * (1 - step / total)
    return max_lr * (1 + math.cos(math.pi * (step + 1) / total)) / 2


def update_lr(update: int, total: int, warmup: int, max_lr: float) -> float:
    """The lr of update ``update`` (0-based): the reference steps its scheduler after every update
    but the first (``if global_step > 0: scheduler.step()``)."""
    return onecycle_lr(max(update - 1, 0), total, warmup, max_lr)


def training_loader(cfg: Dinov3Ade20kConfig, opened: DenseRun):
    """The reference's pipeline (the mmseg recipe) at the crop's size, its labels mapped (VOID)."""
    recipe = mmseg.Mmseg(labels=opened.labels, short_side=cfg.short_side)
    return train_loader(opened.data.train, opened.backbone.image, cfg.batch_size, cfg, recipe, size=cfg.crop_size)


def train(cfg: Dinov3Ade20kConfig, head: nn.Module, loader, opened: DenseRun) -> list[float]:
    """AdamW over ``iterations`` updates under WarmupOneCycleLR, looping epochs of the loader; the
    mean loss of every LOG_EVERY updates (read from the device once per interval)."""
    device = opened.device
    encode, grid = patch_encoder(opened.backbone, cfg.precision, device), opened.backbone.image.grid
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, betas=BETAS, weight_decay=WEIGHT_DECAY)
    warmup, losses, step = warmup_updates(cfg.iterations), [], 0
    total = torch.zeros((), device=device)
    bar = Progress(cfg.iterations, 0, "head", unit="updates", rate_unit="it/s")
    head.train()
    while step < cfg.iterations:
        for batch in loader:
            lr = update_lr(step, cfg.iterations, warmup, cfg.lr)
            set_lr(optimizer, lr)
            target = batch.labels.to(device, non_blocking=True)  # [B, crop, crop], VOID for void
            logits = upsample(head(to_grid(encode(batch.images), grid)), target.shape[-2:])
            # mmseg's CrossEntropyLoss (avg_non_ignore=False): void pixels add 0 but count in the mean
            loss = F.cross_entropy(logits, target, ignore_index=VOID, reduction="none").mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()  # gradient_clip 'inf' in the reference: no clipping
            total += loss.detach()
            step += 1
            bar.update(1)
            if step % LOG_EVERY == 0 or step == cfg.iterations:
                losses.append(float(total) / ((step - 1) % LOG_EVERY + 1))
                total.zero_()
                print(f"iteration {step}/{cfg.iterations}: loss {losses[-1]:.4f} (lr {lr:.3g})")
            if step == cfg.iterations:
                break
    bar.close()
    return losses


def evaluator(cfg: Dinov3Ade20kConfig, opened: DenseRun):
    """dinov3's slide evaluation: head -> counts over every evaluation image at its own resolution,
    the windows' logits (BN, conv, bilinear to the window) averaged."""
    image, device = opened.backbone.image, opened.device
    encode = patch_encoder(opened.backbone, cfg.precision, device)

    def evaluate(head: nn.Module) -> SegCounts:
        head.eval()

        @torch.no_grad()
        def predict(windows: torch.Tensor) -> torch.Tensor:  # [n, 3, crop, crop] -> [n, C, crop, crop]
            return upsample(head(to_grid(encode(windows), image.grid)), windows.shape[-2:])

        return score_split(
            opened.data.val,
            predict,
            opened.labels,
            image.mean,
            image.std,
            cfg.short_side,
            cfg.crop_size,
            cfg.stride,
            device,
        )

    return evaluate


def knobs(cfg: Dinov3Ade20kConfig, opened: DenseRun) -> dict[str, Any]:
    """The protocol's own knobs (after the shared ones)."""
    return {
        "crop_size": cfg.crop_size,
        "image_size": cfg.crop_size,
        "head": f"Dropout2d({DROPOUT}) -> BatchNorm2d -> Conv2d(D, C, 1) (N(0, 0.01), bias 0) on the grid",
        "loss": "cross-entropy on logits bilinear to the crop, void ignored, sum over counted pixels / all pixels",
        "labels": "reduce_zero_label: 0 is void, class c is c - 1",
        "optimizer": {
            "name": "AdamW",
            "lr": cfg.lr,
            "betas": list(BETAS),
            "weight_decay": WEIGHT_DECAY,
            "gradient_clip": None,
        },
        "schedule": {
            "name": "WarmupOneCycleLR",
            "total_iter": cfg.iterations,
            "warmup_iters": warmup_updates(cfg.iterations),
            "warmup_ratio": WARMUP_RATIO,
            "anneal": "cos to 0 (final_div_factor inf)",
            "stepped": "after every update but the first",
        },
        "iterations": cfg.iterations,
        "train_augmentation": mmseg.describe(cfg.short_side, cfg.crop_size),
        "evaluation": {
            "mode": "slide",
            "short_side": cfg.short_side,
            "resize": "PIL bilinear, aspect kept, long side int(x + 0.5)",
            "crop_size": cfg.crop_size,
            "stride": cfg.stride,
            "windows": "mean of overlapping window logits, bilinear to the label's original size, argmax",
        },
        "eval_samples": int(opened.data.val.num_samples),
        "selection": "last iteration",
        "differences": [
            *mmseg.DIFFERENCES,
            f"warmup: {warmup_updates(cfg.iterations)} of {cfg.iterations} updates (the reference: 1500 of 40000)",
            "selection: the last iteration (the reference: the best of evaluations every 5,000 iterations)",
            "windows smaller than the crop are zero-padded (the reference runs them unpadded)",
        ],
    }
