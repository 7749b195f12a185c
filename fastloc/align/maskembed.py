"""MaskEmbed (locality alignment), as the reference trains it (MASKEMBED.md sections 1-7).

A frozen teacher (the backbone minus its last block) sees each image under M masks (a uniform
mask, its complement, the full image: one call of the masking kernel); the trainable student
sees the full image once, a zero-initialized head maps its tokens to the teacher's width, and a
light decoder predicts each masked view's teacher output from the student's tokens times the
mask. The loss compares them (MSE of sigma-scaled targets by default).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fastloc.align.gram import Anchor, gram_loss
from fastloc.align.masks import MaskConfig, sample_masks
from fastloc.align.objective import Objective, ObjectiveConfig, rebuilt
from fastloc.cli import flowing_help, require
from fastloc.data.batch import Batch
from fastloc.kernels.patch_mask import patch_mask
from fastloc.models.decoder import Decoder
from fastloc.models.encoders import Student, build_teacher
from fastloc.models.registry import backbone, create_model, image_config


@flowing_help
@dataclass(frozen=True, kw_only=True)
class MaskEmbedConfig(ObjectiveConfig):
    """The method's knobs; the defaults are the reference's."""

    skip_blocks: int = 1
    """Blocks removed from the end of the teacher (its final norm is kept)."""

    soft_cap: float | None = 30.0
    """Cap of the student's attention logits, cap * tanh(logit / cap); None turns it off (the
    registry's plain students, EVA02 and BEiT, never have it)."""

    loss: Literal["mse", "cosine", "l1", "masked_mse", "unmasked_mse"] = "mse"
    """mse over all masks, tokens and features (targets scaled by 1/sigma); the others use unscaled targets."""

    masks: MaskConfig = field(default_factory=MaskConfig)
    """The teacher's masked views."""

    decoder_depth: int = 2
    """Transformer blocks in the decoder."""

    target: Literal["tokens", "pooled"] = "tokens"
    """tokens: every output token of the teacher; pooled: only its pooled output (the class token
    after the final norm), predicted from the decoder's first token: the reference's prefix_only
    ablation (its -cls config), which needs skip_blocks 0 and a class-token backbone."""

    gram_weight: float = 0.0
    """Weight of DINOv3's Gram anchoring of the student's patch tokens (after its final norm) to
    the frozen start model's on the same image (0: off)."""

    def validate(self) -> None:
        require(self.gram_weight >= 0, "--method.gram-weight", self.gram_weight, "must be 0 (off) or more")
        require(self.skip_blocks >= 0, "--method.skip-blocks", self.skip_blocks, "must be 0 or more")
        require(self.decoder_depth >= 1, "--method.decoder-depth", self.decoder_depth, "must be at least 1")
        cap = self.soft_cap
        require(cap is None or cap > 0, "--method.soft-cap", cap, "must be above 0 (or None: off)")
        self.masks.validate()


class TargetNet(nn.Module):
    """The frozen target network (the backbone less ``skip_blocks`` blocks, its final norm kept) as
    the loss reads it: views [B * M, 3, S, S] -> tokens [B * M, T, D], or the pooled outputs
    [B * M, 1, D]. The config rebuilds it exactly, so it is in no checkpoint (``rebuilt``)."""

    def __init__(self, model: nn.Module, skip_blocks: int, pooled: bool):
        super().__init__()
        self.model, self.pooled = rebuilt(build_teacher(model, skip_blocks)), pooled

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        tokens = self.model.forward_features(views)
        return self.model.forward_head(tokens, pre_logits=True).unsqueeze(1) if self.pooled else tokens


class Trainable(nn.Module):
    """Student and decoder: the part DDP wraps. (full images [B, 3, S, S], masks [B, M, N]) ->
    predictions [B * M, T, D_teacher], and with ``tokens`` also the student's output tokens
    [B, T, D] (after its final norm; the Gram anchor's input)."""

    def __init__(self, student: Student, decoder: Decoder):
        super().__init__()
        self.student, self.decoder = student, decoder

    def forward(self, images: torch.Tensor, masks: torch.Tensor, tokens: bool = False):
        if not tokens:
            return self.decoder(self.student(images), masks)
        out = self.student.encoder.forward_features(images)
        return self.decoder(self.student.project(out), masks), out


def per_image_loss(kind: str, pred: torch.Tensor, target: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """[B * M, T, D] predictions and targets, [B, M, T] keep-masks with the prefix already padded
    (``prefix_keep``) -> [B] float32. masked_mse weighs tokens by 1 - keep, unmasked_mse by keep;
    both divide by every element, as the reference does."""
    B = keep.shape[0]
    diff = pred.float() - target.float()  # [B * M, T, D]
    if kind == "mse":
        per = diff.square().mean(dim=-1)
    elif kind == "l1":
        per = diff.abs().mean(dim=-1)
    elif kind == "cosine":
        per = 1.0 - F.cosine_similarity(pred.float(), target.float(), dim=-1)
    elif kind in ("masked_mse", "unmasked_mse"):
        weight = keep.flatten(0, 1).float()  # [B * M, T]
        per = diff.square().mean(dim=-1) * (1.0 - weight if kind == "masked_mse" else weight)
    else:
        raise ValueError(f"unknown loss {kind!r}")
    return per.view(B, -1).mean(dim=1)  # [B]: every image has the same M * T elements


def prefix_keep(kind: str) -> bool:
    """The keep value the prefix tokens are padded with in the masked losses, as the reference's
    training step pads them (scripts/train.py 907-918): 0 for masked_mse (weight 1 - 0) and 1 for
    unmasked_mse (weight 1), so both count the prefix. The other losses ignore the mask.

    Validation here uses the same losses. The reference's validation (train.py 1059-1070) pads
    masked_mse's prefix with 1 instead, leaving the prefix out: its validation masked_mse is
    fastloc's minus the prefix tokens' squared error over all M * T * D elements. unmasked_mse
    pads with 1 in both, so it is the same everywhere (MASKEMBED.md section 13, pitfall 7)."""
    return kind == "unmasked_mse"


class MaskEmbed(Objective):
    def __init__(self, cfg: MaskEmbedConfig):
        super().__init__()
        entry = backbone(cfg.backbone)
        model = create_model(cfg.backbone, cfg.weights)
        self.cfg, self.image = cfg, image_config(model)
        student_model = copy.deepcopy(model)  # the student starts from the teacher's weights
        self.anchor = rebuilt(Anchor(copy.deepcopy(model)).requires_grad_(False)) if cfg.gram_weight else None
        self.target_net = TargetNet(model, cfg.skip_blocks, cfg.target == "pooled")
        dim = self.teacher.num_features
        cap = cfg.soft_cap if entry.soft_cap else None
        student = Student(student_model, dim, cap)
        decoder = Decoder.for_student(
            student_model,
            dim,
            self.image.tokens,
            depth=cfg.decoder_depth,
            qkv_bias=entry.decoder_qkv_bias,
            qk_norm=entry.decoder_qk_norm,
        )
        self.trainable = Trainable(student, decoder)
        if cfg.target == "pooled":
            _check_pooled(cfg, model)
        self.register_buffer("scale", torch.ones(()))  # 1 / sigma for mse; 1 otherwise
        self.register_buffer("sigma", torch.zeros(()))  # 0 until calibrated

    @property
    def teacher(self) -> nn.Module:
        """The frozen timm backbone of ``target_net``."""
        return self.target_net.model

    # ------------------------------------------------------------ the views

    def views(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images [B, 3, S, S] and masks [B, M, N] -> the teacher's masked views [B * M, 3, S, S]
        and the student's normalized full images [B, 3, S, S], from one masking pass."""
        B, M, _ = masks.shape
        cfg = self.image
        null = self.cfg.masks.null
        rows = masks if null else torch.cat([masks, masks.new_ones(B, 1, masks.shape[2])], dim=1)
        out = patch_mask(images, rows, cfg.mean, cfg.std, cfg.patch_size, _autocast_dtype(images.device.type))
        out = out.view(B, rows.shape[1], 3, cfg.size, cfg.size)
        return out[:, :M].flatten(0, 1), out[:, -1]  # the all-ones row is the last

    def targets(self, views: torch.Tensor) -> torch.Tensor:
        """[B * M, T, D] teacher outputs, scaled."""
        with torch.no_grad():
            return self.target_net(views) * self.scale

    # ------------------------------------------------------------ the loss

    def sample(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """Keep-masks [B, M, N]."""
        return sample_masks(self.cfg.masks, batch, self.image.grid, generator)

    def losses(self, images: torch.Tensor, masks: torch.Tensor, model: nn.Module | None = None) -> torch.Tensor:
        views, full = self.views(images, masks)
        target = self.targets(views)
        gram = self.anchor is not None
        out = (self.trainable if model is None else model)(full, masks, tokens=gram)
        pred, tokens = out if gram else (out, None)
        if self.cfg.target == "pooled":
            pred = pred[:, :1]  # the decoder's class token predicts the pooled output
        losses = per_image_loss(self.cfg.loss, pred, target, self._keep(masks))
        if gram:
            prefix = self.image.prefix_tokens
            with torch.no_grad():
                anchor = self.anchor(full)
            losses = losses + self.cfg.gram_weight * gram_loss(tokens[:, prefix:], anchor[:, prefix:])
        return losses

    def _keep(self, masks: torch.Tensor) -> torch.Tensor:
        """[B, M, T]: the patch keep-masks after the prefix, padded with ``prefix_keep(loss)``."""
        B, M, _ = masks.shape
        prefix = masks.new_full((B, M, self.image.prefix_tokens), prefix_keep(self.cfg.loss))
        return torch.cat([prefix, masks], dim=2)

    # ------------------------------------------------------------ sigma

    @torch.no_grad()
    def calibrate(self, batches: Iterable[tuple[Batch, torch.Tensor]]) -> dict[str, float]:
        """sigma^2 = population variance of every element of the teacher's masked-view outputs over
        the (batch, masks) pairs (the validation split; the reference seeds each batch's masks by
        its index), merged exactly across batches and ranks. Sets ``scale`` to 1 / sigma for mse."""
        moments = None
        for batch, masks in batches:
            views, _ = self.views(batch.images, masks)
            out = self.target_net(views).double()  # [B * M, T or 1, D]
            if batch.valid is not None:  # repeats that fill the last batch do not count
                out = out[batch.valid.repeat_interleave(masks.shape[1])]
            moments = merge_moments(moments, batch_moments(out))
        if dist.is_available() and dist.is_initialized():
            moments = all_merge(moments)
        if moments is None or moments[0] == 0:
            raise ValueError("sigma needs at least one validation sample")
        sigma = math.sqrt(moments[2] / moments[0])
        self.sigma.fill_(sigma)
        if self.cfg.loss == "mse":
            self.scale.fill_(1.0 / sigma)
        return {"sigma": sigma}

    def encoder(self) -> nn.Module:
        return self.trainable.student.encoder

    def export_metadata(self) -> dict[str, float]:
        return {"sigma": float(self.sigma)}


def _check_pooled(cfg: MaskEmbedConfig, model: nn.Module) -> None:
    """The pooled target as the reference defines it: the whole teacher, a class token, a loss over all elements."""
    if cfg.skip_blocks:
        raise ValueError(f"--method.target pooled needs --method.skip-blocks 0 (got {cfg.skip_blocks})")
    if getattr(model, "global_pool", None) != "token" or not getattr(model, "num_prefix_tokens", 0):
        raise ValueError(f"--method.target pooled needs a backbone pooled by its class token ({cfg.backbone} is not)")
    if cfg.loss in ("masked_mse", "unmasked_mse"):
        raise ValueError(f"--method.loss {cfg.loss} weighs tokens by the mask; the pooled target has one token")


def _autocast_dtype(device_type: str) -> torch.dtype:
    """The views' dtype: autocast's when it is on (the teacher would cast them anyway), else float32."""
    try:
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else torch.float32
    except RuntimeError:  # a device type without autocast (meta, for counting FLOPs)
        return torch.float32


# ---------------------------------------------------------------- exact streaming variance


def batch_moments(x: torch.Tensor) -> tuple[float, float, float]:
    """(count, mean, sum of squared deviations) of all elements, in float64."""
    n = x.numel()
    if n == 0:
        return 0.0, 0.0, 0.0
    mean = x.mean()
    return float(n), float(mean), float((x - mean).square().sum())


def merge_moments(a: tuple[float, float, float] | None, b: tuple[float, float, float]) -> tuple[float, float, float]:
    """Chan et al.'s pairwise merge: exact for the union of the two samples."""
    if a is None or a[0] == 0:
        return b
    if b[0] == 0:
        return a
    n = a[0] + b[0]
    delta = b[1] - a[1]
    return n, a[1] + delta * b[0] / n, a[2] + b[2] + delta * delta * a[0] * b[0] / n


def all_merge(moments: tuple[float, float, float] | None) -> tuple[float, float, float]:
    """Merge every rank's moments (the same result on every rank)."""
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, moments or (0.0, 0.0, 0.0))
    merged = None
    for m in gathered:
        merged = merge_moments(merged, m)
    return merged
