"""MaskEmbed's decoder (MASKEMBED.md section 5): predicts the teacher's masked-view output.

The student's tokens, repeated per mask and multiplied by the mask (prefix tokens always zeroed,
no mask token), plus a learned positional embedding, go through 2 timm ``Block``s (the student's
head count, qkv bias, qk norm, MLP type and activation, its reset norm's type and eps; LayerScale
1e-6; MLP ratio 4), a LayerNorm and a Linear: what the reference's train.py builds.
"""

from __future__ import annotations

import functools

import torch
from timm.layers import Mlp
from timm.models.vision_transformer import Block
from torch import nn

from fastloc.models.encoders import RESET_NORM_EPS, reset_norm_eps


class Decoder(nn.Module):
    def __init__(
        self,
        tokens: int,
        dim: int,
        num_heads: int,
        prefix_tokens: int,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        norm_eps: float = RESET_NORM_EPS,
        act_layer: type[nn.Module] = nn.GELU,
        mlp_layer: type[nn.Module] = Mlp,
        depth: int = 2,
        mlp_ratio: float = 4.0,
        init_values: float = 1e-6,
    ):
        super().__init__()
        self.prefix_tokens = prefix_tokens
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)  # [1, T, D]
        norm = norm_layer if norm_layer is nn.Identity else functools.partial(norm_layer, eps=norm_eps)
        self.blocks = nn.Sequential(
            *(
                Block(
                    dim,
                    num_heads,
                    mlp_ratio,
                    qkv_bias=qkv_bias,
                    qk_norm=qk_norm,
                    init_values=init_values,
                    norm_layer=norm,
                    act_layer=act_layer,
                    mlp_layer=mlp_layer,
                )
                for _ in range(depth)
            )
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, dim)

    def forward(self, tokens: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """tokens [B, T, D] and keep-masks [B, M, N] -> predictions [B * M, T, D], rows b * M + m."""
        B, M, _ = masks.shape
        keep = torch.cat([masks.new_zeros(B, M, self.prefix_tokens), masks], dim=2)  # [B, M, T]: prefix -> 0
        x = tokens.unsqueeze(1) * keep.unsqueeze(-1).to(tokens.dtype)  # [B, M, T, D]
        x = x.flatten(0, 1) + self.pos_embed  # [B * M, T, D]
        return self.head(self.norm(self.blocks(x)))

    @classmethod
    def for_student(cls, student_model: nn.Module, dim: int, tokens: int, **overrides) -> Decoder:
        """A decoder whose blocks take the student's head count, qkv bias, qk norm, MLP type (EVA02:
        SwiGLU), act and norm types, and its reset norm's eps (scripts/train.py 349-370)."""
        first = student_model.blocks[0]
        attn = first.attn
        qkv = getattr(attn, "qkv", None)
        defaults = {
            "num_heads": attn.num_heads,
            "qkv_bias": (qkv is not None and qkv.bias is not None) or getattr(attn, "q_bias", None) is not None,
            "qk_norm": not isinstance(getattr(attn, "q_norm", nn.Identity()), nn.Identity),
            "norm_layer": type(student_model.norm),
            "norm_eps": reset_norm_eps(student_model),
            "act_layer": type(getattr(first.mlp, "act", nn.GELU())),
            "mlp_layer": type(first.mlp),
        }
        args = {**defaults, **{k: v for k, v in overrides.items() if v is not None}}
        return cls(tokens, dim, prefix_tokens=student_model.num_prefix_tokens, **args)
