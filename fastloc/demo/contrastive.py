"""Contrastive image-text training of the demo's baseline: the language side of the miniature.

CLIP's objective at the demo's scale: the image tower starts from the image-level baseline, a tiny
text tower (``fastloc.models.text``, the ``tiny`` pairing) from random init, and both learn from
the synthetic set's captions by the symmetric InfoNCE loss over the batch with a learnable
temperature. No projection on the image side: the pooled output after the final norm is the
embedding, so the text tower's embedding width must equal the ViT's. The image tower is saved as
``pretrain`` saves one (``create_model(name, FILE)`` loads it), the text tower as an open_clip
state dict (``load_text_tower(name, FILE)`` loads it; it carries the learnt ``logit_scale``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from fastloc.align.config import OptimConfig
from fastloc.align.contrastive import MAX_LOGIT_SCALE
from fastloc.align.prepare import learning_rate
from fastloc.data.batch import Batch
from fastloc.demo.pretrain import save_weights, train_loader
from fastloc.models.registry import create_model, image_config
from fastloc.models.text import load_text_tower
from fastloc.progress import Progress
from fastloc.runtime import autocast


@dataclass(frozen=True, kw_only=True)
class ContrastiveConfig:
    """One contrastive image-text run."""

    backbone: str = "tiny"  # the image tower's registry name; its text tower is load_text_tower(backbone, "random")
    epochs: int = 5
    batch_size: int = 32  # the negatives of each image and caption: the rest of its batch
    lr: float = 5e-4
    weight_decay: float = 0.05  # not on gains, biases and the logit scale (open_clip's rule)
    warmup_updates: int = 50
    seed: int = 0
    workers: int = 2
    precision: Literal["bf16", "fp32"] = "fp32"
    pool: Literal["token", "avg"] = "token"  # the image embedding: the class token, or the mean patch token


def image_embeddings(model: nn.Module, images: torch.Tensor, pool: str) -> torch.Tensor:
    """[B, D], L2-normalised: the pooled output after the ViT's final norm."""
    tokens = model.forward_features(images)  # [B, T, D], normed
    if pool == "avg":
        pooled = tokens[:, model.num_prefix_tokens :].mean(1)  # [B, D]
    else:
        pooled = model.forward_head(tokens, pre_logits=True)  # [B, D]: the class token
    return F.normalize(pooled.float(), dim=-1)


def text_embeddings(tower: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """[B, D], L2-normalised: ``encode_text`` of tokenized captions [B, L]."""
    return F.normalize(tower.encode_text(tokens).float(), dim=-1)


def clip_loss(
    images: torch.Tensor, texts: torch.Tensor, logit_scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP's symmetric InfoNCE: the mean of image->text and text->image cross-entropy, the matching
    pair the target; and the logits [B, B] (row: image, column: caption)."""
    logits = logit_scale.exp() * images @ texts.T  # [B, B]
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2, logits


def first_captions(batch: Batch) -> list[str]:
    """Each sample's first caption line (the synthetic set has one per image; "" where a txt is empty)."""
    return [lines[0] if lines else "" for lines in batch.captions]


def retrieval_accuracy(logits: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
    """Image->text top-1 over the batch (a 0-dim tensor on the logits' device, no host sync): the
    caption ranked first is the image's own, or has the same words (two images may share a caption)."""
    ids = torch.tensor([captions.index(c) for c in captions], device=logits.device)  # [B]: same words, same id
    return (ids[logits.argmax(1)] == ids).float().mean()


def check_widths(model: nn.Module, tower: nn.Module, tokenizer: Callable, backbone: str) -> int:
    """The shared embedding width; a ValueError when the towers' widths differ."""
    with torch.no_grad():
        device = next(tower.parameters()).device
        text_width = int(tower.encode_text(tokenizer([""]).to(device)).shape[-1])
    image_width = int(model.num_features)
    if text_width != image_width:
        raise ValueError(
            f"{backbone}: the image tower's width ({image_width}) and its text tower's embedding width "
            f"({text_width}) differ; contrastive training compares them directly (no projection)"
        )
    return image_width


def optimizer_of(modules: Sequence[nn.Module], cfg: ContrastiveConfig) -> torch.optim.Optimizer:
    """AdamW; open_clip's rule for weight decay: none on parameters under 2 dims (gains, biases, the logit scale)."""
    params = [p for m in modules for p in m.parameters()]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},  # logit_scale is 0-dim
    ]
    # fused: one pass over the text tower's token embedding (49408 x width, most of its parameters):
    # on a CPU the default per-op AdamW spent more time on it than the forward and backward together
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=True)


def save_towers(model: nn.Module, tower: nn.Module, out_image: Path, out_text: Path) -> None:
    save_weights(model, out_image)  # timm keys, no classifier
    save_weights(tower, out_text)  # open_clip keys of the text side and logit_scale


def contrastive(
    cfg: ContrastiveConfig, train: Path, image_weights: Path, out_image: Path, out_text: Path, device: torch.device
) -> dict:
    """Train both towers on ``train``'s captions (the first line of each sample's), save them to
    ``out_image`` and ``out_text``; the per-epoch mean loss and in-batch retrieval accuracy."""
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.backbone, image_weights).to(device)
    tower, tokenizer = load_text_tower(cfg.backbone, "random")
    tower = tower.to(device)
    width = check_widths(model, tower, tokenizer, cfg.backbone)
    image = image_config(model)
    # a set without txt is refused here, by the loader, in one line that names the folder
    loader = train_loader(
        train, image, device, batch_size=cfg.batch_size, seed=cfg.seed, workers=cfg.workers, captions=True
    )
    optimizer = optimizer_of([model, tower], cfg)
    total, update, losses, accuracies = cfg.epochs * len(loader), 0, [], []
    schedule = OptimConfig(lr=cfg.lr, min_lr_ratio=0.0, warmup_updates=cfg.warmup_updates)  # cosine to 0
    model.train()
    tower.train()
    progress = Progress(total, 0, "contrastive (captions)", unit="updates", rate_unit="it/s")
    try:
        for epoch in range(cfg.epochs):
            loader.set_epoch(epoch)
            running, correct = torch.zeros((), device=device), torch.zeros((), device=device)
            for batch in loader:
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(schedule, update, total)
                captions = first_captions(batch)
                tokens = tokenizer(captions).to(device)  # [B, L]
                with autocast(device, cfg.precision):
                    images = image_embeddings(model, batch.images.to(device), cfg.pool)
                    texts = text_embeddings(tower, tokens)
                loss, logits = clip_loss(images, texts, tower.logit_scale)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    tower.logit_scale.clamp_(0, MAX_LOGIT_SCALE)  # as CLIP: after the step
                running += loss.detach()
                correct += retrieval_accuracy(logits.detach(), captions)
                update += 1
                progress.update(1)
            losses.append(float(running) / len(loader))
            accuracies.append(float(correct) / len(loader))
    finally:
        progress.close()
        loader.close()
    save_towers(model, tower, out_image, out_text)
    return {
        "loss_per_epoch": losses,
        "retrieval_per_epoch": accuracies,  # image->text top-1 within each training batch, mean over the epoch
        "chance": 1 / cfg.batch_size,
        "updates": update,
        "logit_scale": float(tower.logit_scale.detach().exp()),
        "embed_dim": width,
        "captions": "the first line of each sample's txt",
    }
