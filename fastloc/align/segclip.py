"""SegCLIP (ICML 2023; OTHER-METHODS.md section 2; ArrowLuo/SegCLIP @ df09ba2) as an objective.

The timm CLIP ViT runs its first blocks on the patch tokens (class token dropped), the group module
gathers them into learnable centres, the last blocks run on the groups, and the image embedding is
the projection of the normed max over groups. Per image: ITC against the paired text tower's
caption embedding + the superpixel KL of the hard assignments + the masked reconstruction of a
second, 75%-masked pass through the same blocks and group module (``segclip_ops``), weights 1.

Learning rates as the reference's: new parts (group module, the blocks on groups, the final norm,
the projection, the MAE parts) at ``--optim.head-lr``; the CLIP-pretrained rest of both towers at
``--optim.lr``; patch embedding, class and positional embeddings, the pre-norm and the text token
and positional embeddings never updated. Named departures (defaults are the reference's unless
said): per-patch segment = the mode (``segment_rule mean`` is the reference's int(mean)); the
cross-attention reads each image's own keys (``mixed_keys`` is the reference under torch 1.8);
the MAE branch is chosen by an argument, not by the token count; the projection's bias (timm's
head has one) is held at 0; logit_scale is clamped at ln 100 before each optimizer step (the
reference: after it) and the forward clamps exp(logit_scale) at 100 as the reference's.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from fastloc.align.contrastive import MAX_LOGIT_SCALE, CaptionConfig, CaptionObjective
from fastloc.align.objective import Inputs
from fastloc.align.segclip_ops import (
    GroupModule,
    MaeDecoder,
    Reconstruct,
    gumbel_noise,
    itc_losses,
    mae_losses,
    patch_segments,
    restore_order,
    superpixel_kl,
    visible_count,
)
from fastloc.cli import BadValue, flowing_help, require
from fastloc.data.batch import Batch
from fastloc.data.recipes import CenterCrop, Rrc
from fastloc.data.superpixels import Felzenszwalb
from fastloc.models.registry import create_model, image_config
from fastloc.models.text import load_text_tower


@flowing_help
@dataclass(frozen=True, kw_only=True)
class SegclipConfig(CaptionConfig):
    """SegCLIP's knobs; the defaults are the reference's (main_task_align.py, README command)."""

    centres: int = 8
    """Learnable group centres."""

    cross_blocks: int = 2
    """Cross-attention blocks of the group module."""

    group_blocks: int = 2
    """The backbone's final blocks that run on the group tokens (ViT-B: blocks 10-11)."""

    mask_ratio: float = 0.75
    """Fraction of the (class + patch) tokens the MAE branch masks (the class token is always kept)."""

    decoder_depth: int = 3
    """Blocks of the MAE decoder (width half the backbone's)."""

    decoder_heads: int = 8
    """Heads of the MAE decoder."""

    itc_weight: float = 1.0
    """Weight of the image-text contrastive loss."""

    kl_weight: float = 1.0
    """Weight of the superpixel KL loss."""

    mae_weight: float = 1.0
    """Weight of the masked reconstruction loss (0: no MAE branch is built)."""

    max_words: int = 32
    """Caption tokens with the start and end tokens (longer captions are cut, as the reference's)."""

    superpixels: Felzenszwalb = field(default_factory=Felzenszwalb)
    """The host stage's Felzenszwalb segmentation of each image (the reference's offline one)."""

    segment_rule: Literal["mode", "mean"] = "mode"
    """A patch's segment: the most frequent id, or the reference's int(mean of ids) (a quirk)."""

    max_segments: int = 1024
    """Segment ids at or above this share one id in the per-patch pooling (its count table's width)."""

    mixed_keys: bool = False
    """The reference's cross-attention under torch 1.8, whose keys mix the batch's images (a bug)."""

    def validate(self) -> None:
        require(self.centres >= 2, "--method.centres", self.centres, "must be at least 2")
        require(self.cross_blocks >= 1, "--method.cross-blocks", self.cross_blocks, "must be at least 1")
        require(self.group_blocks >= 0, "--method.group-blocks", self.group_blocks, "must be 0 or more")
        require(0 < self.mask_ratio < 1, "--method.mask-ratio", self.mask_ratio, "must be in (0, 1)")
        require(self.decoder_depth >= 1, "--method.decoder-depth", self.decoder_depth, "must be at least 1")
        require(self.decoder_heads >= 1, "--method.decoder-heads", self.decoder_heads, "must be at least 1")
        for flag, w in (("itc", self.itc_weight), ("kl", self.kl_weight), ("mae", self.mae_weight)):
            require(w >= 0, f"--method.{flag}-weight", w, "must be 0 or more")
        require(self.max_words >= 3, "--method.max-words", self.max_words, "must be at least 3")
        require(self.max_segments >= 2, "--method.max-segments", self.max_segments, "must be at least 2")


class Trainable(nn.Module):
    """Both towers and the new parts: the module DDP wraps. One call computes every loss term that
    needs a parameter, so every trainable parameter is used in every step."""

    def __init__(self, cfg: SegclipConfig, vit: nn.Module, text: nn.Module):
        super().__init__()
        depth, dim = len(vit.blocks), vit.num_features
        require(cfg.group_blocks < depth, "--method.group-blocks", cfg.group_blocks, f"must be below the depth {depth}")
        heads = vit.blocks[0].attn.num_heads
        if dim % heads:
            raise BadValue(f"--method.backbone {cfg.backbone}: width {dim} does not split into {heads} heads")
        self.proj = vit.head  # the CLIP projection (timm's head); its bias is held at 0
        vit.reset_classifier(0)
        self.vit, self.text, self.split = vit, text, depth - cfg.group_blocks
        self.group = GroupModule(dim, cfg.centres, heads, cfg.cross_blocks)
        self.mae = cfg.mae_weight > 0
        if self.mae:
            image = image_config(vit)
            self.reconstruct = Reconstruct(cfg.centres)
            self.mae_blocks = new_blocks(vit.blocks[self.split :])
            self.decoder = MaeDecoder(
                dim, image.grid, image.patch_size, depth=cfg.decoder_depth, heads=cfg.decoder_heads
            )
        self.mixed_keys = cfg.mixed_keys

    def patch_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images [B, 3, S, S] -> [B, N, D]: patch embedding, positions, pre-norm; the
        class token's row is left out (the reference drops it before the blocks)."""
        vit = self.vit
        x = vit.patch_embed(images)
        pos = vit.pos_embed if vit.no_embed_class else vit.pos_embed[:, vit.num_prefix_tokens :]
        return vit.norm_pre(vit.pos_drop(x + pos))

    def forward(self, images, tokens, noise, segments, order=None, mae_noise=None):
        """-> (image embeddings [B, E], text embeddings [B, E], logit_scale, KL [B], MAE [B] or None).
        Gumbel noise is used only in training."""
        train = self.training
        x = self.patch_tokens(images)
        blocks = self.vit.blocks
        groups, hard, _ = self.group(blocks[: self.split](x), noise if train else None, self.mixed_keys)
        pooled = blocks[self.split :](groups).max(dim=1).values  # [B, D]
        embedding = self.proj(self.vit.norm(pooled))
        texts = self.text.encode_text(tokens)
        kl = superpixel_kl(hard, segments)
        mae = None
        if self.mae:
            visible = mae_noise.shape[2]
            kept = torch.gather(x, 1, order[:, :visible].unsqueeze(-1).expand(-1, -1, x.shape[2]))
            g, a, _ = self.group(blocks[: self.split](kept), mae_noise if train else None, self.mixed_keys)
            rebuilt = self.mae_blocks(self.reconstruct(g, a))  # [B, K, D]
            hidden = torch.cat([rebuilt.mean(1, keepdim=True), rebuilt], dim=1)
            pred = self.decoder(hidden, restore_order(order))
            mae = mae_losses(pred, images, order, visible, self.decoder.patch)
        return embedding, texts, self.text.logit_scale, kl, mae

    @torch.no_grad()
    def readout(self, images: torch.Tensor):
        """The zero-shot rule's inputs (no noise): image embeddings [B, E], group embeddings [B, M, E]
        (each group token after the blocks on groups, the final norm and the projection: the
        reference's ``patch_features[:, 1:]``) and soft assignments softmax(A) [B, M, N]."""
        x = self.patch_tokens(images)
        groups, _, soft = self.group(self.vit.blocks[: self.split](x), None, self.mixed_keys)
        groups = self.vit.blocks[self.split :](groups)
        normed = self.vit.norm(torch.cat([groups.max(dim=1, keepdim=True).values, groups], dim=1))
        out = self.proj(normed)
        return out[:, 0], out[:, 1:], soft


def new_blocks(blocks: nn.Sequential) -> nn.Sequential:
    """Fresh blocks of the backbone's kind (the reference's ``layers_mae2``): Linear weights
    N(0, 0.02) and zero biases (its ``init_weights``), the fused qkv Xavier-uniform (as
    ``nn.MultiheadAttention``'s in_proj), norms 1 and 0."""
    fresh = copy.deepcopy(blocks)
    for name, module in fresh.named_modules():
        if isinstance(module, nn.Linear):
            (nn.init.xavier_uniform_ if name.endswith("qkv") else lambda w: nn.init.normal_(w, std=0.02))(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    return fresh.requires_grad_(True)


# trainable parameters never updated (the reference's freeze list), and the bias-free projection
FROZEN = ("vit.patch_embed.", "vit.cls_token", "vit.pos_embed", "vit.norm_pre.", "vit.reg_token", "proj.bias")
FROZEN_TEXT = ("text.token_embedding.", "text.positional_embedding")


class Segclip(CaptionObjective):
    def __init__(self, cfg: SegclipConfig):
        super().__init__()
        text, self.tokenizer = load_text_tower(cfg.backbone, cfg.tower_weights())
        width = int(text.text_projection.shape[-1]) if isinstance(text.text_projection, torch.Tensor) else None
        if width is None:
            width = int(text.text_projection.out_features)
        vit = create_model(cfg.backbone, cfg.weights, num_classes=width)
        self.cfg, self.image = cfg, image_config(vit)
        self.trainable = Trainable(cfg, vit, text.train())
        with torch.no_grad():
            if self.trainable.proj.bias is not None:
                self.trainable.proj.bias.zero_()
        for name, param in self.trainable.named_parameters():
            if name.startswith(FROZEN + FROZEN_TEXT):
                param.requires_grad_(False)
        grid = self.image.grid
        self.visible = visible_count(grid * grid, cfg.mask_ratio)

    # ------------------------------------------------------------ inputs

    def inputs(self) -> tuple[Inputs, Inputs]:
        """RandomResizedCrop(scale 0.5-1, bicubic, no flip) for training; Resize(short side, bicubic)
        + CenterCrop for validation (the reference's eval transform); captions and superpixels both."""
        size, spx = self.image.size, self.cfg.superpixels
        train = Rrc(scale=(0.5, 1.0), flip_p=0.0, interpolations=("bicubic",))
        val = CenterCrop(crop_pct=1.0, interpolation="bicubic")
        return Inputs(train, size, captions=True, superpixels=spx), Inputs(val, size, captions=True, superpixels=spx)

    def sample(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        """Gumbel noise [B, M, N] of the full pass; with MAE, the patches' shuffle [B, N] (the first
        ``visible`` kept) and the masked pass's Gumbel noise [B, M, K]."""
        M, N = self.cfg.centres, self.image.grid**2
        noise = gumbel_noise((batch, M, N), generator)
        if not self.trainable.mae:
            return (noise,)
        order = torch.rand(batch, N, generator=generator, device=generator.device).argsort(dim=1)
        return noise, order, gumbel_noise((batch, M, self.visible), generator)

    def step_sample(self, batch: Batch, sample: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """The sample with each image's tokenized caption [B, L] and its patches' segment ids [B, N]."""
        if batch.captions is None or batch.labels is None:
            raise ValueError("SegCLIP needs each batch's captions and superpixels (Inputs(captions, superpixels))")
        device = batch.images.device
        tokens = self.tokenize([lines[0] for lines in batch.captions]).to(device)
        segments = patch_segments(batch.labels, self.image.patch_size, self.cfg.segment_rule, self.cfg.max_segments)
        return (*sample, tokens, segments.to(device))

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """[B, L] at the tower's context length; a caption cut at ``max_words`` tokens (with the start
        and end tokens) as the reference's loader cuts it; the rest padded (causal: no effect)."""
        context = int(self.trainable.text.positional_embedding.shape[0])
        cut = self.tokenizer(captions, context_length=min(self.cfg.max_words, context))
        out = torch.zeros(len(captions), context, dtype=cut.dtype)
        out[:, : cut.shape[1]] = cut
        return out

    # ------------------------------------------------------------ the loss

    def losses(self, images: torch.Tensor, sample: tuple[torch.Tensor, ...], model: nn.Module | None = None):
        *drawn, tokens, segments = sample
        noise, order, mae_noise = (drawn + [None, None])[:3]
        mean = images.new_tensor(self.image.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = images.new_tensor(self.image.std, dtype=torch.float32).view(1, 3, 1, 1)
        x = (images.float() / 255 - mean) / std
        net = self.trainable if model is None else model
        embedding, texts, scale, kl, mae = net(x, tokens, noise, segments, order, mae_noise)
        cfg = self.cfg
        out = cfg.itc_weight * itc_losses(embedding, texts, scale) + cfg.kl_weight * kl
        return out if mae is None else out + cfg.mae_weight * mae

    @torch.no_grad()
    def before_update(self, step: int, total: int) -> None:
        self.trainable.text.logit_scale.clamp_(max=MAX_LOGIT_SCALE)

    # ------------------------------------------------------------ optimizer, export, FLOPs

    def is_head(self, name: str) -> bool:
        """The reference's 4e-3 parts: group module, blocks on groups, final norm, projection, MAE."""
        if name.startswith(("group.", "reconstruct.", "mae_blocks.", "decoder.", "proj.", "vit.norm.")):
            return True
        if name.startswith("vit.blocks."):
            return int(name.split(".")[2]) >= self.trainable.split
        return False

    def encoder(self) -> nn.Module:
        return self.trainable.vit

    def export_parts(self, encoder: Path, source: dict) -> list[Path]:
        """What the zero-shot rule reads beside the encoder (ENCODER.segclip.safetensors): the group
        module, the projection and the trained text tower."""
        from fastloc.probe.zeroshot.segclip import save_parts

        return [save_parts(self, encoder.with_name(f"{encoder.stem}.segclip.safetensors"), source)]

    def example(self, batch: int) -> tuple[torch.Tensor, Any]:
        size, N = self.image.size, self.image.grid**2
        tokens = self.tokenize([""] * batch)
        drawn = self.sample(batch, torch.Generator())
        return torch.zeros(batch, 3, size, size, dtype=torch.uint8), (*drawn, tokens, torch.zeros(batch, N).long())
