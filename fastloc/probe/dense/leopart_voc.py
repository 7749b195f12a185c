"""Leopart's VOC linear probe (--protocol leopart-voc; leopart experiments/linear_probing/
{linear_finetune,eval_linear}.py): a 1x1 conv trained by SGD with cross-entropy at 100 x 100 on
live RandomResizedCrop batches, scored on the whole evaluation split (square 448, from the feature
cache) with logits bilinear at 448. Where it departs from Leopart: ``knobs``'s "differences".
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastloc.data.recipes import Rrc
from fastloc.probe.dense.config import LeopartVocConfig
from fastloc.probe.dense.data import (
    VOID,
    DenseRun,
    eval_batches,
    eval_split,
    patch_encoder,
    resize_nearest,
    train_loader,
)
from fastloc.probe.dense.linear import set_lr, to_grid, upsample
from fastloc.probe.dense.metrics import SegCounts
from fastloc.progress import Progress

# linear_finetune.py (SGD, StepLR stepped per epoch) and configs/pascal/*.yml (drop_at 20 of 25)
MOMENTUM, WEIGHT_DECAY, GAMMA, DROP_FRACTION = 0.9, 1e-4, 0.1, 0.8
AUGMENTATION = Rrc(scale=(0.8, 1.0), flip_p=0.5, interpolations=("bilinear",))


class Head(nn.Module):
    """Leopart's probe: Conv2d(D, C, 1) (PyTorch's default init). [B, D, g, g] -> [B, C, g, g]."""

    def __init__(self, dim: int, classes: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, classes, 1)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return self.conv(grid)


def drop_at(epochs: int) -> int:
    """StepLR's step: epoch 20 of 25, int(0.8 * epochs) otherwise (at least 1)."""
    return max(1, int(DROP_FRACTION * epochs))


def training_loader(cfg: LeopartVocConfig, opened: DenseRun):
    """The shared loader's RandomResizedCrop batches of the training split."""
    return train_loader(opened.data.train, opened.backbone.image, cfg.batch_size, cfg, AUGMENTATION)


def train(cfg: LeopartVocConfig, head: nn.Module, loader, opened: DenseRun) -> list[float]:
    """SGD over ``epochs`` passes, lr x 0.1 from epoch int(0.8 epochs); per epoch the mean loss
    (read from the device once per epoch)."""
    device, labels = opened.device, opened.labels
    encode, grid = patch_encoder(opened.backbone, cfg.precision, device), opened.backbone.image.grid
    optimizer = torch.optim.SGD(head.parameters(), lr=cfg.lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    step_size, losses = drop_at(cfg.epochs), []
    head.train()
    for epoch in range(cfg.epochs):
        lr = cfg.lr * GAMMA ** (epoch // step_size)  # StepLR(step_size), stepped per epoch
        set_lr(optimizer, lr)
        total = torch.zeros((), device=device)
        bar = Progress(len(loader), 0, f"head epoch {epoch + 1}/{cfg.epochs}", unit="updates", rate_unit="it/s")
        for batch in loader:
            target = resize_nearest(labels.map(batch.labels.to(device, non_blocking=True)), cfg.probe_size)
            logits = upsample(head(to_grid(encode(batch.images), grid)), cfg.probe_size)  # [B, C, P, P]
            loss = F.cross_entropy(logits, target, ignore_index=VOID)  # mean over counted pixels
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach()
            bar.update(1)
        bar.close()
        losses.append(float(total) / len(loader))
        print(f"epoch {epoch + 1}/{cfg.epochs}: loss {losses[-1]:.4f} (lr {lr:.3g})")
    return losses


def evaluator(cfg: LeopartVocConfig, opened: DenseRun):
    """Leopart's final evaluation, the split's features cached first: head -> counts over every
    sample, logits bilinear from the grid to the square label maps (image_size), argmax."""
    cache, grid = eval_split(cfg, opened.data.val, opened.backbone, opened.device), opened.backbone.image.grid

    @torch.no_grad()
    def evaluate(head: nn.Module) -> SegCounts:
        head.eval()
        counts = SegCounts(opened.labels.num_classes, opened.device, ignore=VOID)
        for features, target in eval_batches(cache, cfg.eval_batch_size, opened.device, opened.labels):
            logits = upsample(head(to_grid(features, grid)), target.shape[-2:])  # [B, C, S, S]
            counts.update(logits.argmax(1), target)
        return counts

    return evaluate


def knobs(cfg: LeopartVocConfig, opened: DenseRun) -> dict[str, Any]:
    """The protocol's own knobs (after the shared ones)."""
    return {
        "image_size": cfg.image_size,
        "probe_size": cfg.probe_size,
        "head": "Conv2d(D, C, 1), PyTorch's default init; run on the grid, logits bilinear (commutes)",
        "loss": "cross-entropy at probe_size (logits bilinear from the grid, labels nearest from image_size), "
        "void ignored, mean over counted pixels",
        "optimizer": {"name": "SGD", "lr": cfg.lr, "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY},
        "schedule": {"name": "StepLR per epoch", "step_size": drop_at(cfg.epochs), "gamma": GAMMA},
        "epochs": cfg.epochs,
        "train_augmentation": "RandomResizedCrop(image_size, scale (0.8, 1.0), ratio (3/4, 4/3), bilinear; "
        "labels nearest) + horizontal flip 0.5",
        "evaluation": "every sample resized to image_size x image_size (labels nearest), logits bilinear to "
        "image_size, argmax",
        "eval_samples": int(opened.data.val.num_samples),
        "selection": "last epoch",
        "differences": [
            "selection: the last epoch (Leopart: top-3 checkpoints by mIoU on 8 validation batches)",
            "one process with the global batch (Leopart: 2 GPUs x 60, their losses averaged)",
            "a class neither present nor predicted is left out of the mean (Leopart: counted as 0)",
        ],
    }
