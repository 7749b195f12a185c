"""Soft-capped attention: logits = cap * tanh((q k^T / sqrt(d)) / cap) before the softmax.

MaskEmbed's student (the reference's ``svit``, MASKEMBED.md section 4) caps the *scaled* logits
at 30. ``SoftCapAttention`` wraps a timm ``Attention`` (same parameters, same state-dict names) and
computes it fused on the GPU (FlexAttention with a tanh ``score_mod``) or materialized, exactly,
on the CPU (``softcap_attention``, the spec). ``cap=None`` is plain attention (SDPA).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from timm.layers import Attention
from torch import nn


def softcap_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cap: float) -> torch.Tensor:
    """[B, H, N, d] each -> [B, H, N, d]: softmax(cap * tanh(q k^T d^-1/2 / cap)) v, materialized."""
    logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # [B, H, N, N], the reference's order
    return (cap * torch.tanh(logits / cap)).softmax(dim=-1) @ v


@functools.cache
def _flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)  # eager flex_attention is a slow reference


def flex_softcap_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cap: float) -> torch.Tensor:
    """The same function through FlexAttention (fused; the score it passes is already scaled)."""

    def score_mod(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)

    return _flex()(q, k, v, score_mod=score_mod)


class SoftCapAttention(nn.Module):
    """A timm ``Attention`` with soft-capped logits (its parameters, reused; no dropout)."""

    def __init__(self, attn: Attention, cap: float | None = 30.0, fused: bool | None = None):
        super().__init__()
        if attn.attn_drop.p or attn.proj_drop.p:
            raise ValueError("SoftCapAttention has no dropout; the reference's student uses none")
        self.num_heads, self.head_dim, self.attn_dim = attn.num_heads, attn.head_dim, attn.attn_dim
        self.qkv, self.q_norm, self.k_norm, self.norm, self.proj = (
            attn.qkv,
            attn.q_norm,
            attn.k_norm,
            attn.norm,
            attn.proj,
        )
        self.gate = getattr(attn, "gate", None)
        self.cap = cap
        self.fused = fused  # None: fused on CUDA, materialized elsewhere

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("SoftCapAttention takes no attention mask")
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, H, N, d] each
        q, k = self.q_norm(q), self.k_norm(k)
        if self.cap is None:
            out = F.scaled_dot_product_attention(q, k, v)
        elif self.fused if self.fused is not None else x.is_cuda:
            out = flex_softcap_attention(q, k, v, self.cap)
        else:
            out = softcap_attention(q, k, v, self.cap)
        out = self.norm(out.transpose(1, 2).reshape(B, N, self.attn_dim))
        if gate is not None:
            out = out * gate
        return self.proj(out)


def soft_cap(model: nn.Module, cap: float | None = 30.0, fused: bool | None = None) -> int:
    """Replace every timm ``Attention`` in ``model.blocks`` by ``SoftCapAttention``; how many."""
    count = 0
    for block in model.blocks:
        if type(block.attn) is Attention:
            block.attn = SoftCapAttention(block.attn, cap, fused)
            count += 1
    return count
