"""Supervised pre-training of a ViT from scratch, for the demo's baseline and ceiling.

``image`` supervision is what CLIP and SigLIP get: which classes are in the image (multi-label
BCE on the pooled output, the set of classes present in the label map), never where. ``patch``
supervision says where (multi-label BCE on every patch token's union target): the ceiling a
backbone of this size can reach. The backbone is saved under timm's own key names without the
classifier, so ``create_model(name, FILE)`` (``--weights FILE`` everywhere) loads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from fastloc.align.config import OptimConfig
from fastloc.align.prepare import learning_rate
from fastloc.data.config import SOLO, LoaderConfig
from fastloc.data.loader import make_loader
from fastloc.data.recipes import Rkrc
from fastloc.data.shards import open_shards
from fastloc.data.stream import EpochLoader
from fastloc.kernels.label_pool import label_pool
from fastloc.models.registry import ImageConfig, create_model, image_config
from fastloc.progress import Progress
from fastloc.runtime import autocast


@dataclass(frozen=True, kw_only=True)
class PretrainConfig:
    """One supervised pre-training run."""

    supervision: Literal["image", "patch"]
    backbone: str = "tiny"
    epochs: int = 10
    batch_size: int = 32  # more updates per epoch: at this size, updates are what a ViT from scratch lacks
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_updates: int = 50
    seed: int = 0
    workers: int = 2
    precision: Literal["bf16", "fp32"] = "fp32"
    pool: Literal["token", "avg"] = "token"  # image labels from the class token, or the mean patch token


def targets(labels: torch.Tensor, supervision: str, patch: int, classes: int) -> torch.Tensor:
    """image: [B, C] classes present; patch: [B, N, C] union per patch."""
    reduction = "global-union" if supervision == "image" else "union"
    return label_pool(labels, patch, classes, reduction)


def logits_of(model: nn.Module, classifier: nn.Linear, images: torch.Tensor, cfg: PretrainConfig) -> torch.Tensor:
    tokens = model.forward_features(images)  # [B, T, D]
    patches = tokens[:, model.num_prefix_tokens :]  # [B, N, D]
    if cfg.supervision == "patch":
        return classifier(patches)  # [B, N, C]
    if cfg.pool == "avg":
        return classifier(patches.mean(1))  # [B, C]
    return classifier(model.forward_head(tokens, pre_logits=True))  # [B, C]: the class token


def train_loader(
    train: Path,
    image: ImageConfig,
    device: torch.device,
    *,
    batch_size: int,
    seed: int,
    workers: int,
    captions: bool = False,
) -> EpochLoader:
    """The demo's training loader (pre-training and contrastive training): Rkrc, full batches."""
    return make_loader(
        LoaderConfig(
            shards=train,
            batch_size=batch_size,
            size=image.size,
            recipe=Rkrc(scale=(0.5, 1.0)),  # mild zoom: objects stay whole enough to be named
            mean=image.mean,
            std=image.std,
            seed=seed,
            loader="gpu" if device.type == "cuda" else "cpu",
            workers=workers,
            captions=captions,
        ),
        SOLO,
    )


def save_weights(model: nn.Module, out: Path) -> None:
    """``model``'s state dict as safetensors under its own key names, written whole or not at all."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(out)


def pretrain(cfg: PretrainConfig, train: Path, out: Path, device: torch.device) -> dict:
    """Train, save ``out`` (the backbone's safetensors) and return the last epoch's mean loss."""
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.backbone, "random").to(device)
    image = image_config(model)
    classes = int(open_shards(train).manifest["num_classes"])
    classifier = nn.Linear(int(model.num_features), classes).to(device)
    loader = train_loader(train, image, device, batch_size=cfg.batch_size, seed=cfg.seed, workers=cfg.workers)
    params = [*model.parameters(), *classifier.parameters()]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total, update, losses = cfg.epochs * len(loader), 0, []
    schedule = OptimConfig(lr=cfg.lr, min_lr_ratio=0.0, warmup_updates=cfg.warmup_updates)  # cosine to 0
    model.train()
    progress = Progress(total, 0, f"pre-train ({cfg.supervision} labels)", unit="updates", rate_unit="it/s")
    try:
        for epoch in range(cfg.epochs):
            loader.set_epoch(epoch)
            running = torch.zeros((), device=device)
            for batch in loader:
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(schedule, update, total)
                y = targets(batch.labels, cfg.supervision, image.patch_size, classes).to(device)
                with autocast(device, cfg.precision):
                    logits = logits_of(model, classifier, batch.images.to(device), cfg)
                loss = F.binary_cross_entropy_with_logits(logits.float(), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                running += loss.detach()
                update += 1
                progress.update(1)
            losses.append(float(running) / len(loader))
    finally:
        progress.close()
        loader.close()
    save_weights(model, out)
    return {"loss_per_epoch": losses, "updates": update, "classes": classes}
