"""python -m fastloc.probe linear: a linear head on frozen last-block patch tokens, trained, then
scored by mIoU over the evaluation split.

Two protocols, a module each, picked by --protocol (their configs: ``LINEAR`` in config.py):
leopart_voc.py, Leopart's VOC probe, and dinov3_ade20k.py, DINOv2/v3's ADE20k probe. Each gives
``run`` its ``Head``, ``training_loader``, ``train``, ``evaluator`` and ``knobs``; the run and what
both share are here. Both apply the 1x1 conv on the patch grid and upsample its logits: equal to
upsampling the features first (they commute).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from fastloc.probe.dense.config import DenseConfig
from fastloc.probe.dense.data import DenseRun, open_run
from fastloc.probe.dense.report import counted, write_result
from fastloc.probe.run import timed


def to_grid(tokens: torch.Tensor, grid: int) -> torch.Tensor:
    """Patch tokens [B, g * g, D] (row-major) -> float32 feature map [B, D, g, g]."""
    b, _, d = tokens.shape
    return tokens.float().transpose(1, 2).reshape(b, d, grid, grid)


def upsample(x: torch.Tensor, size) -> torch.Tensor:
    """Bilinear, align_corners=False (both references), to ``size`` (an int: square)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def protocol_module(cfg: DenseConfig):
    """The module of the config's protocol (leopart-voc: fastloc.probe.dense.leopart_voc)."""
    return importlib.import_module(f"fastloc.probe.dense.{cfg.protocol.replace('-', '_')}")


def knobs(cfg: DenseConfig, opened: DenseRun, own: dict[str, Any], updates_per_epoch: int) -> dict[str, Any]:
    """The protocol's name and every knob used, for result.json and the CSV: what both protocols
    record, then the protocol's ``own`` (its differences after the shared one)."""
    image, used = opened.backbone.image, len(opened.backbone.model.blocks)
    autocast = [] if cfg.precision == "fp32" else [f"the backbone runs under {cfg.precision} autocast (fp32)"]
    return {
        "name": cfg.protocol_name(),
        "feature_layer": f"block {used} of {used + cfg.skip_blocks}: patch tokens after the final norm, no prefix",
        "patch_size": image.patch_size,
        "grid": image.grid,
        "precision": cfg.precision,
        "backbone_digest": opened.backbone.digest,
        "train_split": opened.data.train.manifest["split"],
        "eval_split": opened.data.val.manifest["split"],
        "num_classes": opened.labels.num_classes,
        "zero_is_ignore": opened.labels.zero_is_ignore,
        "batch_size": cfg.batch_size,
        "updates_per_epoch": updates_per_epoch,
        "processes": 1,
        "seed": cfg.seed,
        "miou": "TP/FP/FN summed over the split; mean over classes incl. class 0; a class neither present "
        "nor predicted is left out",
        **own,
        "differences": [*autocast, *own["differences"]],
    }


def run(cfg: DenseConfig) -> Path:
    """Train the protocol's head on the frozen backbone, score it, write the results; returns the run directory."""
    protocol = protocol_module(cfg)
    opened = open_run(cfg)
    head = protocol.Head(opened.backbone.dim, opened.labels.num_classes).to(opened.device)
    with timed(opened.timings, "features_s"):
        evaluate = protocol.evaluator(cfg, opened)
    train = opened.data.train
    if train.num_samples < cfg.batch_size:
        raise ValueError(f"{train.root}: fewer samples than one batch of {cfg.batch_size}")
    loader = protocol.training_loader(cfg, opened)
    updates_per_epoch = len(loader)
    with timed(opened.timings, "train_s"):
        try:
            losses = protocol.train(cfg, head, loader, opened)
        finally:
            loader.close()
    with timed(opened.timings, "eval_s"):
        counts = evaluate(head)
        figures = {"miou": counts.miou(), "pixel_accuracy": counts.pixel_accuracy()}
    out = write_result(
        cfg,
        knobs(cfg, opened, protocol.knobs(cfg, opened), updates_per_epoch),
        opened.data,
        opened.labels,
        opened.backbone.model,
        figures,
        {"miou": counts.iou().tolist()},
        extra={"train_loss": losses, "timings_s": opened.timings, **counted(counts)},
    )
    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, str(out / "head.safetensors"))
    return out
