"""python -m fastloc.probe linear: a linear probe on frozen last-block patch tokens, scored by mIoU.

leopart-voc is Leopart's VOC linear probe (../shared/methods/OTHER-METHODS.md section 1; leopart
experiments/linear_probing/{linear_finetune,eval_linear}.py): Conv1x1 trained by SGD with
cross-entropy at 100 x 100 on live RandomResizedCrop batches, scored on the whole evaluation split
(square 448, from the feature cache) with logits bilinear at 448. dinov3-ade20k is DINOv2/v3's
ADE20k linear probe (facebookresearch/dinov3 dinov3/eval/segmentation: configs/
config-ade20k-linear-training.yaml, train.py, loss.py, schedulers.py, models/heads/linear_head.py,
transforms.py, inference.py): Dropout2d -> BatchNorm -> Conv1x1 trained by AdamW under
WarmupOneCycleLR on the reference's training pipeline (mmseg.py: random short side, a crop with
cat_max_ratio, flip, PhotoMetricDistortion, padding), scored by sliding windows at full resolution
(slide.py).

Where fastloc departs from them (each result's protocol dict lists the same under "differences"):
both score the last update's head (Leopart keeps its top-3 checkpoints by mIoU on 8 validation
batches; dinov3 reports the best of its evaluations every 5,000 iterations) and run the backbone
under --precision (bf16 by default; the references run fp32). leopart-voc runs its global batch of
120 in one process (the reference averages two GPUs' losses over 60 images each) and leaves a class
neither present nor predicted out of the mean (Leopart counts it as 0; dinov3 leaves it out too).
dinov3-ade20k's warmup is scaled with --iterations (1,500 of 40,000); its training pipeline departs
from dinov3's only as mmseg.py says (fastloc's seeded draws, --short-side as the base short side, a
sample that does not decode replaced); its backbone takes the crop as its input size, so a window
smaller than the crop is zero-padded (slide.py). The 1x1 conv runs on the patch grid and its logits
are upsampled: equal to upsampling the features first (they commute).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from fastloc.data.config import TrainRecipe
from fastloc.probe.dense import mmseg
from fastloc.probe.dense.config import LinearConfig
from fastloc.probe.dense.data import (
    VOID,
    Backbone,
    LabelSpace,
    dense_backbone,
    eval_batches,
    eval_split,
    open_dense,
    patch_encoder,
    resize_nearest,
    train_loader,
)
from fastloc.probe.dense.metrics import SegCounts
from fastloc.probe.dense.report import counted, write_result
from fastloc.probe.dense.slide import score_split
from fastloc.progress import Progress

# Leopart: linear_finetune.py (SGD, StepLR stepped per epoch) and configs/pascal/*.yml (drop_at 20 of 25)
LEOPART_MOMENTUM, LEOPART_WEIGHT_DECAY, LEOPART_GAMMA, LEOPART_DROP_FRACTION = 0.9, 1e-4, 0.1, 0.8
LEOPART_AUGMENTATION = TrainRecipe(kind="rrc", scale=(0.8, 1.0), flip_p=0.5, interpolations=("bilinear",))

# dinov3: config-ade20k-linear-training.yaml (optimizer, scheduler kwargs) and config.py (dropout)
DINOV3_BETAS, DINOV3_WEIGHT_DECAY, DINOV3_DROPOUT = (0.9, 0.999), 1e-3, 0.1
DINOV3_WARMUP, DINOV3_TOTAL, DINOV3_WARMUP_RATIO = 1500, 40_000, 1e-6
LOG_EVERY = 50  # dinov3's MetricLogger interval: updates per loss line


# --------------------------------------------------------------------------- config


def label_space(cfg: LinearConfig, data) -> LabelSpace:
    return LabelSpace.of(data, cfg.zero_is_ignore or cfg.protocol == "dinov3-ade20k")


# --------------------------------------------------------------------------- heads


class ConvHead(nn.Module):
    """Leopart's probe: Conv2d(D, C, 1) (PyTorch's default init). [B, D, g, g] -> [B, C, g, g]."""

    def __init__(self, dim: int, classes: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, classes, 1)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return self.conv(grid)


class BNHead(nn.Module):
    """dinov3's LinearHead (one layer, no CLS, use_batchnorm): Dropout2d -> BatchNorm -> Conv2d(D, C, 1),
    the conv drawn from N(0, 0.01) with zero bias. Dropout acts in train mode only, as the
    reference's ``predict`` skips it. [B, D, g, g] -> [B, C, g, g]."""

    def __init__(self, dim: int, classes: int, dropout: float = DINOV3_DROPOUT):
        super().__init__()
        self.dropout = nn.Dropout2d(dropout)
        self.bn = nn.BatchNorm2d(dim)  # the reference's SyncBatchNorm over 8 x 2 = this batch of 16
        self.conv = nn.Conv2d(dim, classes, 1)
        nn.init.normal_(self.conv.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.conv.bias)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return self.conv(self.bn(self.dropout(grid)))


def build_head(protocol: str, dim: int, classes: int) -> nn.Module:
    return ConvHead(dim, classes) if protocol == "leopart-voc" else BNHead(dim, classes)


def to_grid(tokens: torch.Tensor, grid: int) -> torch.Tensor:
    """Patch tokens [B, g * g, D] (row-major) -> float32 feature map [B, D, g, g]."""
    b, _, d = tokens.shape
    return tokens.float().transpose(1, 2).reshape(b, d, grid, grid)


def upsample(x: torch.Tensor, size) -> torch.Tensor:
    """Bilinear, align_corners=False (both references), to ``size`` (an int: square)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


# --------------------------------------------------------------------------- schedules


def leopart_drop_at(epochs: int) -> int:
    """StepLR's step: epoch 20 of 25, int(0.8 * epochs) otherwise (at least 1)."""
    return max(1, int(LEOPART_DROP_FRACTION * epochs))


def dinov3_warmup(iterations: int) -> int:
    """The reference's 1,500 warmup updates of 40,000, scaled with --iterations."""
    return round(iterations * DINOV3_WARMUP / DINOV3_TOTAL)


def onecycle_lr(step: int, total: int, warmup: int, max_lr: float, warmup_ratio: float = DINOV3_WARMUP_RATIO) -> float:
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


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# --------------------------------------------------------------------------- training


def make_train_loader(cfg: LinearConfig, data, backbone: Backbone, labels: LabelSpace):
    """leopart-voc: the shared loader's RandomResizedCrop; dinov3-ade20k: the reference's pipeline
    (mmseg.py), its labels already mapped (VOID)."""
    if data.train.num_samples < cfg.batch_size:
        raise ValueError(f"{data.train.root}: fewer samples than one batch of {cfg.batch_size}")
    if cfg.protocol == "dinov3-ade20k":
        image = backbone.image
        return mmseg.train_loader(
            data.train,
            labels,
            cfg.batch_size,
            cfg.seed,
            cfg.short_side,
            cfg.crop_size,
            image.mean,
            image.std,
            cfg.workers,
        )
    return train_loader(data.train, backbone.image, cfg.batch_size, cfg, LEOPART_AUGMENTATION)


def train_leopart(cfg: LinearConfig, head, loader, encode, grid: int, labels: LabelSpace, device) -> list[float]:
    """SGD over ``epochs`` passes, lr x 0.1 from epoch int(0.8 epochs); per epoch the mean loss
    (read from the device once per epoch)."""
    optimizer = torch.optim.SGD(
        head.parameters(), lr=cfg.lr, momentum=LEOPART_MOMENTUM, weight_decay=LEOPART_WEIGHT_DECAY
    )
    drop_at, losses = leopart_drop_at(cfg.epochs), []
    head.train()
    for epoch in range(cfg.epochs):
        lr = cfg.lr * LEOPART_GAMMA ** (epoch // drop_at)  # StepLR(step_size=drop_at), stepped per epoch
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


def train_dinov3(cfg: LinearConfig, head, loader, encode, grid: int, labels: LabelSpace, device) -> list[float]:
    """AdamW over ``iterations`` updates under WarmupOneCycleLR, looping epochs of the loader (its
    labels already mapped by ``labels``); the mean loss of every LOG_EVERY updates (read from the
    device once per interval)."""
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, betas=DINOV3_BETAS, weight_decay=DINOV3_WEIGHT_DECAY)
    warmup, losses, step = dinov3_warmup(cfg.iterations), [], 0
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


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def score_cached(head, cache, cfg: LinearConfig, grid: int, labels: LabelSpace, device) -> SegCounts:
    """Leopart's final evaluation: every cached sample, logits bilinear from the grid to the square
    label maps (image_size), argmax, counts over the split."""
    head.eval()
    counts = SegCounts(labels.num_classes, device, ignore=VOID)
    for features, target in eval_batches(cache, cfg.eval_batch_size, device, labels):
        logits = upsample(head(to_grid(features, grid)), target.shape[-2:])  # [B, C, S, S]
        counts.update(logits.argmax(1), target)
    return counts


def window_predictor(head, backbone: Backbone, cfg: LinearConfig, device):
    """Windows [n, 3, crop, crop] -> logits [n, C, crop, crop] (dinov3's ``predict``: BN, conv, bilinear)."""
    encode, grid = patch_encoder(backbone, cfg.precision, device), backbone.image.grid

    @torch.no_grad()
    def predict(windows: torch.Tensor) -> torch.Tensor:
        return upsample(head(to_grid(encode(windows), grid)), windows.shape[-2:])

    return predict


def evaluate(cfg: LinearConfig, head, backbone: Backbone, data, labels: LabelSpace, device, cache=None) -> SegCounts:
    """The protocol's evaluation of ``head`` over the whole evaluation split (counts on the device)."""
    head.eval()
    if cfg.protocol == "leopart-voc":
        cache = cache if cache is not None else eval_split(cfg, data.val, backbone, device)
        return score_cached(head, cache, cfg, backbone.image.grid, labels, device)
    predict = window_predictor(head, backbone, cfg, device)
    image = backbone.image
    return score_split(
        data.val, predict, labels, image.mean, image.std, cfg.short_side, cfg.crop_size, cfg.stride, device
    )


# --------------------------------------------------------------------------- the run


def protocol(cfg: LinearConfig, backbone: Backbone, data, labels: LabelSpace, updates_per_epoch: int) -> dict[str, Any]:
    """The protocol's name and every knob used, for result.json and the CSV."""
    image, used = backbone.image, len(backbone.model.blocks)
    common = {
        "feature_layer": f"block {used} of {used + cfg.skip_blocks}: patch tokens after the final norm, no prefix",
        "patch_size": image.patch_size,
        "grid": image.grid,
        "precision": cfg.precision,
        "backbone_digest": backbone.digest,
        "train_split": data.train.manifest["split"],
        "eval_split": data.val.manifest["split"],
        "num_classes": labels.num_classes,
        "zero_is_ignore": labels.zero_is_ignore,
        "batch_size": cfg.batch_size,
        "updates_per_epoch": updates_per_epoch,
        "processes": 1,
        "seed": cfg.seed,
        "miou": "TP/FP/FN summed over the split; mean over classes incl. class 0; a class neither present "
        "nor predicted is left out",
    }
    differences = [] if cfg.precision == "fp32" else [f"the backbone runs under {cfg.precision} autocast (fp32)"]
    if cfg.protocol == "leopart-voc":
        return {
            "name": "linear-leopart-voc",
            **common,
            "image_size": cfg.image_size,
            "probe_size": cfg.probe_size,
            "head": "Conv2d(D, C, 1), PyTorch's default init; run on the grid, logits bilinear (commutes)",
            "loss": "cross-entropy at probe_size (logits bilinear from the grid, labels nearest from image_size), "
            "void ignored, mean over counted pixels",
            "optimizer": {
                "name": "SGD",
                "lr": cfg.lr,
                "momentum": LEOPART_MOMENTUM,
                "weight_decay": LEOPART_WEIGHT_DECAY,
            },
            "schedule": {"name": "StepLR per epoch", "step_size": leopart_drop_at(cfg.epochs), "gamma": LEOPART_GAMMA},
            "epochs": cfg.epochs,
            "train_augmentation": "RandomResizedCrop(image_size, scale (0.8, 1.0), ratio (3/4, 4/3), bilinear; "
            "labels nearest) + horizontal flip 0.5",
            "evaluation": "every sample resized to image_size x image_size (labels nearest), logits bilinear to "
            "image_size, argmax",
            "eval_samples": int(data.val.num_samples),
            "selection": "last epoch",
            "differences": [
                *differences,
                "selection: the last epoch (Leopart: top-3 checkpoints by mIoU on 8 validation batches)",
                "one process with the global batch (Leopart: 2 GPUs x 60, their losses averaged)",
                "a class neither present nor predicted is left out of the mean (Leopart: counted as 0)",
            ],
        }
    return {
        "name": "linear-dinov3-ade20k",
        **common,
        "crop_size": cfg.crop_size,
        "image_size": cfg.crop_size,
        "head": f"Dropout2d({DINOV3_DROPOUT}) -> BatchNorm2d -> Conv2d(D, C, 1) (N(0, 0.01), bias 0) on the grid",
        "loss": "cross-entropy on logits bilinear to the crop, void ignored, sum over counted pixels / all pixels",
        "labels": "reduce_zero_label: 0 is void, class c is c - 1",
        "optimizer": {
            "name": "AdamW",
            "lr": cfg.lr,
            "betas": list(DINOV3_BETAS),
            "weight_decay": DINOV3_WEIGHT_DECAY,
            "gradient_clip": None,
        },
        "schedule": {
            "name": "WarmupOneCycleLR",
            "total_iter": cfg.iterations,
            "warmup_iters": dinov3_warmup(cfg.iterations),
            "warmup_ratio": DINOV3_WARMUP_RATIO,
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
        "eval_samples": int(data.val.num_samples),
        "selection": "last iteration",
        "differences": [
            *differences,
            *mmseg.DIFFERENCES,
            f"warmup: {dinov3_warmup(cfg.iterations)} of {cfg.iterations} updates (the reference: 1500 of 40000)",
            "selection: the last iteration (the reference: the best of evaluations every 5,000 iterations)",
            "windows smaller than the crop are zero-padded (the reference runs them unpadded)",
        ],
    }


def run(cfg: LinearConfig) -> Path:
    """Train the protocol's head on the frozen backbone, score it, write the results; returns the run directory."""
    cfg = cfg.resolved()
    device, data = open_dense(cfg)
    labels = label_space(cfg, data)
    try:
        backbone = dense_backbone(cfg, device)
    except ValueError as exc:
        if cfg.protocol == "dinov3-ade20k":  # the crop is the input size there
            raise ValueError(f"--crop-size {cfg.crop_size} is the backbone's input size: {exc}") from None
        raise
    head = build_head(cfg.protocol, backbone.dim, labels.num_classes).to(device)
    timings = {}
    start = time.perf_counter()
    cache = eval_split(cfg, data.val, backbone, device) if cfg.protocol == "leopart-voc" else None
    timings["features_s"] = time.perf_counter() - start
    loader = make_train_loader(cfg, data, backbone, labels)
    updates_per_epoch = len(loader)
    train = train_leopart if cfg.protocol == "leopart-voc" else train_dinov3
    start = time.perf_counter()
    try:
        encode = patch_encoder(backbone, cfg.precision, device)
        losses = train(cfg, head, loader, encode, backbone.image.grid, labels, device)
    finally:
        loader.close()
    timings["train_s"] = time.perf_counter() - start
    start = time.perf_counter()
    counts = evaluate(cfg, head, backbone, data, labels, device, cache)
    figures = {"miou": counts.miou(), "pixel_accuracy": counts.pixel_accuracy()}
    timings["eval_s"] = time.perf_counter() - start
    out = write_result(
        cfg,
        protocol(cfg, backbone, data, labels, updates_per_epoch),
        data,
        labels,
        backbone.model,
        figures,
        {"miou": counts.iou().tolist()},
        extra={"train_loss": losses, "timings_s": timings, **counted(counts)},
    )
    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, str(out / "head.safetensors"))
    return out
