"""Zero-shot readouts: a timm CLIP vision tower's patch tokens in its text tower's space.

The last block is run as one of the harness's variants (ZEROSHOT-SEG.md section 3): plain CLIP,
MaskCLIP's value path (as ClearCLIP runs it) or NACLIP's neighbourhood attention without residual
and MLP; then the final norm and CLIP's projection head, class token dropped, L2-normalised. An
aligned export's soft-capped attention (MaskEmbed's student) is read out too: its cap bounds NACLIP's
key-key logits as it bounded the logits it was trained with (a fastloc choice: the references know no cap).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models import get_pretrained_cfg
from timm.models.vision_transformer import Attention, VisionTransformer
from torch import nn

from fastloc.models.attention import SoftCapAttention
from fastloc.models.pairing import TEXT_TOWERS, TINY, NoTextTowerError
from fastloc.models.registry import backbone, create_model

Readout = Literal["clip", "maskclip", "naclip"]
READOUTS: tuple[str, ...] = get_args(Readout)
NACLIP_STD = 5.0  # NACLIP's Gaussian sigma, in patches (its --std default)


class ReadoutError(ValueError):
    """The backbone or the readout cannot give zero-shot tokens."""


def create_tower(name: str, weights: str | Path = "pretrained", **kwargs) -> nn.Module:
    """A registry backbone with its CLIP projection ``head`` kept, so ``head(norm(x))`` lands in the
    paired text tower's space. The registry's ``create_model`` builds ``num_classes=0`` (no head);
    here ``num_classes`` is the pretrained config's (512 for clip-vit-b), which keeps the hub's or
    a file's ``head`` weights. The tiny backbone has no head: its tiny text tower has its width."""
    if name not in TEXT_TOWERS and name != TINY:
        raise NoTextTowerError(f"{name}: no text tower is paired with it, so no zero-shot readout")
    num_classes = 0 if name == TINY else get_pretrained_cfg(backbone(name).timm_id).num_classes
    return create_model(name, weights, **{"num_classes": num_classes, **kwargs})


def dense_tokens(
    model: nn.Module, images: torch.Tensor, readout: Readout = "naclip", std: float = NACLIP_STD
) -> torch.Tensor:
    """L2-normalised patch tokens [B, h, w, D] of ``images`` [B, 3, H, W] (normalised, sides a
    multiple of the patch) under ``readout``. Other sizes than the model's resample its position
    embedding as the references do (``interpolate_pos_encoding``, bicubic, scale (n + 0.1) / n0)."""
    check(model, readout, images)
    patch = model.patch_embed.patch_size
    grid = images.shape[-2] // patch[0], images.shape[-1] // patch[1]  # (h, w), rows first
    x = model.patch_embed.proj(images).flatten(2).transpose(1, 2)  # [B, hw, C], row-major
    x = model.patch_embed.norm(x)
    x = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # [B, 1 + hw, C]
    x = x + position_embedding(model, grid).to(x.dtype)
    x = model.norm_pre(model.patch_drop(model.pos_drop(x)))
    x = model.blocks[:-1](x)
    block = model.blocks[-1]
    if readout == "clip":
        x = block(x)  # attention, residual and MLP
    else:
        x = attend(block.attn, block.norm1(x), readout, grid, std)  # no residual, no MLP
    x = model.head(model.fc_norm(model.norm(x[:, 1:])))  # as forward_head on tokens; [B, hw, D]
    return F.normalize(x, dim=-1).reshape(x.shape[0], *grid, x.shape[-1])


def attend(attn: Attention, x: torch.Tensor, readout: Readout, grid: tuple[int, int], std: float) -> torch.Tensor:
    """The last block's attention under ``readout`` on its normed input x [B, N, C] -> [B, N, C]."""
    B, N, _ = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)  # q, k, v in order
    k, v = qkv[1], qkv[2]  # [B, heads, N, d]; neither readout uses q
    if readout == "maskclip":
        out = v  # each token attends only to itself: the value path
    else:  # naclip: softmax(k k^T / sqrt(d) + omega)
        k = attn.k_norm(k)
        logits = (k @ k.transpose(-2, -1)) * attn.head_dim**-0.5  # [B, heads, N, N], NACLIP's order
        cap = getattr(attn, "cap", None)  # an aligned export's soft cap, as on the logits it was trained with
        if cap is not None:
            logits = cap * torch.tanh(logits / cap)
        logits = logits + neighbourhood(grid, std).to(k)
        out = logits.softmax(dim=-1) @ v
    out = out.transpose(1, 2).reshape(B, N, attn.attn_dim)
    return attn.proj(attn.norm(out))


@functools.lru_cache(maxsize=16)  # one per grid, as NACLIP caches it; callers must not write into it
def neighbourhood(grid: tuple[int, int], std: float) -> torch.Tensor:
    """NACLIP's omega [1 + hw, 1 + hw]: exp(-|p - p'|^2 / (2 std^2)) between patches (grid units,
    row-major), 0 in the class token's row and column."""
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    points = torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=1).float()  # [hw, 2]
    omega = torch.exp(-torch.cdist(points, points).square() / (2 * std**2))
    return F.pad(omega, (1, 0, 1, 0))


def position_embedding(model: VisionTransformer, grid: tuple[int, int]) -> torch.Tensor:
    """[1, 1 + hw, C]: the model's, or its patch part resampled to ``grid`` as NACLIP and ClearCLIP
    do (``clip/model.py:134-151``). Unlike them, a grid of the same count but other shape resamples."""
    native = tuple(model.patch_embed.grid_size)
    if tuple(grid) == native:
        return model.pos_embed
    cls, patches = model.pos_embed[:, :1], model.pos_embed[:, 1:]
    patches = patches.reshape(1, *native, -1).permute(0, 3, 1, 2)  # [1, C, h0, w0]
    scale = ((grid[0] + 0.1) / native[0], (grid[1] + 0.1) / native[1])
    patches = F.interpolate(patches, scale_factor=scale, mode="bicubic", align_corners=False)
    return torch.cat([cls, patches.flatten(2).transpose(1, 2)], dim=1)


def check(model: nn.Module, readout: str, images: torch.Tensor) -> None:
    """One clear line for what the readouts cannot serve."""
    name = type(model).__name__
    if readout not in READOUTS:
        raise ReadoutError(f"unknown readout {readout!r}; readouts: {', '.join(READOUTS)}")
    if not isinstance(model, VisionTransformer) or not isinstance(model.patch_embed, PatchEmbed):
        raise ReadoutError(f"{name}: zero-shot readouts need a timm VisionTransformer with a patch embedding")
    if model.cls_token is None or model.num_prefix_tokens != 1 or model.no_embed_class or model.pos_embed is None:
        raise ReadoutError(f"{name}: zero-shot readouts need one class token, no registers, a position embedding")
    attn = model.blocks[-1].attn
    if type(attn) not in (Attention, SoftCapAttention) or getattr(attn, "gate", None) is not None:
        raise ReadoutError(f"{name}: the last block's attention is not timm's plain Attention (or its soft cap)")
    patch = model.patch_embed.patch_size
    if images.ndim != 4 or images.shape[-2] % patch[0] or images.shape[-1] % patch[1]:
        raise ReadoutError(f"images {tuple(images.shape)}: [B, 3, H, W] with sides a multiple of the patch {patch}")
