"""Patch-Seg's output heads (PATCHSEG.md sections 4-5): features [B, T, D] -> logits [B, N, C].

Each head selects its own tokens from the backbone's output, so the training loop never asks
which head it runs: ``transformer`` and the intervention heads read all tokens, ``linear`` and
``mlp`` the patch tokens (or, for global-union, the mean of the prefix tokens). Global-union
heads return one "patch" per image, [B, 1, C].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from timm.layers import Mlp
from timm.models.vision_transformer import Block
from torch import nn


@dataclass(frozen=True)
class HeadShape:
    """What a head is built for: the backbone's token layout and width, and the class count."""

    dim: int  # D
    num_heads: int  # the backbone's attention heads (the transformer heads use the same)
    prefix: int  # P: class and register tokens before the patches
    patches: int  # N = g * g
    classes: int  # C
    reduction: str  # union, majority or global-union

    @property
    def tokens(self) -> int:
        return self.prefix + self.patches


def prefix_mean(x: torch.Tensor, prefix: int) -> torch.Tensor:
    """[B, T, D] -> [B, 1, D]: the mean of the prefix tokens, or of all tokens when there is none."""
    return (x[:, :prefix] if prefix else x).mean(1, keepdim=True)


def _blocks(dim: int, num_heads: int, layers: int) -> nn.Sequential:
    # The original's blocks (patchseg/model.py 50-64, 121-135): MLP ratio 4, no qkv bias, LayerScale 0.01,
    # GELU, no dropout, and torch's LayerNorm passed explicitly: eps 1e-5, where timm's default
    # norm (timm >= 1.0.16) has eps 1e-6.
    def block() -> Block:
        return Block(
            dim,
            num_heads,
            mlp_ratio=4.0,
            qkv_bias=False,
            qk_norm=False,
            init_values=0.01,
            norm_layer=nn.LayerNorm,
            act_layer=nn.GELU,
            mlp_layer=Mlp,
        )

    return nn.Sequential(*(block() for _ in range(layers)))


class TransformerHead(nn.Module):
    """pos_embed (N(0, 0.02^2), added before norm_pre) -> LayerNorm -> blocks -> LayerNorm -> Linear."""

    def __init__(self, shape: HeadShape, layers: int = 2):
        super().__init__()
        self.prefix, self.global_ = shape.prefix, shape.reduction == "global-union"
        self.pos_embed = nn.Parameter(torch.randn(1, shape.tokens, shape.dim) * 0.02)
        self.norm_pre = nn.LayerNorm(shape.dim)
        self.blocks = _blocks(shape.dim, shape.num_heads, layers)
        self.norm = nn.LayerNorm(shape.dim)
        self.head = nn.Linear(shape.dim, shape.classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D]
        x = self.head(self.norm(self.blocks(self.norm_pre(x + self.pos_embed))))  # [B, T, C]
        if self.global_:
            return prefix_mean(x, self.prefix)  # [B, 1, C]
        return x[:, self.prefix :]  # [B, N, C]


class InterventionHead(nn.Module):
    """N learned latent tokens (N(0, 0.02^2)) appended to the input, no positional embedding; the
    latents' outputs are the per-patch logits. ``transformer-cls`` feeds only the prefix mean (how
    much the CLS token alone knows of where things are), ``transformer-separate`` all tokens."""

    def __init__(self, shape: HeadShape, layers: int = 2, cls_only: bool = True):
        super().__init__()
        if shape.reduction != "union":
            raise ValueError(f"the intervention heads are defined for the union reduction only, not {shape.reduction}")
        self.prefix, self.cls_only = shape.prefix, cls_only
        self.latents = nn.Parameter(torch.randn(1, shape.patches, shape.dim) * 0.02)
        self.norm_pre = nn.LayerNorm(shape.dim)
        self.blocks = _blocks(shape.dim, shape.num_heads, layers)
        self.norm = nn.LayerNorm(shape.dim)
        self.head = nn.Linear(shape.dim, shape.classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D]
        if self.cls_only:
            x = prefix_mean(x, self.prefix)  # [B, 1, D]
        n = self.latents.shape[1]
        x = torch.cat([x, self.latents.expand(x.shape[0], -1, -1)], dim=1)
        return self.head(self.norm(self.blocks(self.norm_pre(x))))[:, -n:]  # [B, N, C]


class TokenHead(nn.Module):
    """A per-token ``linear`` or ``mlp`` head on the patch tokens (global-union: on the prefix mean)."""

    def __init__(self, shape: HeadShape, hidden: int | None):
        super().__init__()
        self.prefix, self.global_ = shape.prefix, shape.reduction == "global-union"
        if hidden is None:
            self.net = nn.Linear(shape.dim, shape.classes)
        else:
            self.net = nn.Sequential(nn.Linear(shape.dim, hidden), nn.GELU(), nn.Linear(hidden, shape.classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D]
        x = prefix_mean(x, self.prefix) if self.global_ else x[:, self.prefix :]
        return self.net(x)  # [B, N or 1, C]


# name -> builder(shape, layers, hidden)
HEADS: dict[str, Callable[[HeadShape, int, int], nn.Module]] = {
    "transformer": lambda shape, layers, hidden: TransformerHead(shape, layers),
    "transformer-cls": lambda shape, layers, hidden: InterventionHead(shape, layers, cls_only=True),
    "transformer-separate": lambda shape, layers, hidden: InterventionHead(shape, layers, cls_only=False),
    "mlp": lambda shape, layers, hidden: TokenHead(shape, hidden),
    "linear": lambda shape, layers, hidden: TokenHead(shape, None),
}


def build_head(name: str, shape: HeadShape, layers: int = 2, hidden: int = 1024) -> nn.Module:
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; the heads are {', '.join(HEADS)}")
    return HEADS[name](shape, layers, hidden)
