"""The frozen teacher and the trainable student of MaskEmbed (MASKEMBED.md sections 1 and 4).

Both are built from one timm backbone and know nothing of masks, data or training:

- ``build_teacher``: the backbone minus its last ``skip_blocks`` blocks, final norm kept, frozen
  and in eval mode; its ``forward_features`` (all tokens) is the target.
- ``Student``: the backbone with soft-capped attention (the reference's ``svit``), its final
  norm(s) re-created (weight 1, bias 0, the eps of ``reset_norm_eps``), pooling removed, and a
  zero-initialized ``Linear(D, D_teacher)`` head on every token. It runs once per image, on the
  unmasked image.
"""

from __future__ import annotations

import inspect

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from fastloc.models.attention import soft_cap

RESET_NORM_EPS = 1e-5  # the ViT family's reset eps; per backbone: reset_norm_eps(model)


def reset_norm_eps(model: nn.Module) -> float:
    """The eps of the norms the reference re-creates for this backbone (the student's final norm
    and fc_norm, and its decoder's block norms): ``type(norm)(D)``, the norm class's default eps.

    The class depends on the timm version. Under timm 1.0.8, the reference's, a ViT's LayerNorm
    was ``partial(nn.LayerNorm, eps=1e-6)``, so ``type()`` gave torch's LayerNorm: eps 1e-5. EVA02
    and BEiT use timm's LayerNorm, whose default is 1e-6. timm >= 1.0.16 builds ViTs with timm's
    LayerNorm too, so the family, not today's class, decides: 1e-5 for a ViT's LayerNorm, the
    class default otherwise (timm 1.0.8 vision_transformer.py 491, eva.py 382, beit.py 293)."""
    norm = model.norm if not isinstance(model.norm, nn.Identity) else getattr(model, "fc_norm", nn.Identity())
    if isinstance(model, VisionTransformer) and isinstance(norm, nn.LayerNorm):
        return RESET_NORM_EPS
    if isinstance(norm, nn.Identity):
        return RESET_NORM_EPS  # no norm to re-create; the decoder then uses Identity too
    eps = inspect.signature(type(norm)).parameters.get("eps")
    return float(eps.default) if eps is not None else float(norm.eps)


def build_teacher(model: nn.Module, skip_blocks: int = 1) -> nn.Module:
    """The target network: blocks[:-skip_blocks] (final norm kept), frozen, eval."""
    depth = len(model.blocks)
    if not 0 <= skip_blocks < depth:
        raise ValueError(f"skip_blocks must be in [0, {depth}) for a {depth}-block backbone, got {skip_blocks}")
    if skip_blocks:
        model.blocks = model.blocks[: depth - skip_blocks]
    return model.requires_grad_(False).eval()


def _fresh_norm(norm: nn.Module, dim: int, eps: float) -> nn.Module:
    if isinstance(norm, nn.Identity):
        return norm
    fresh = type(norm)(dim, eps=eps)
    nn.init.ones_(fresh.weight)
    if getattr(fresh, "bias", None) is not None:
        nn.init.zeros_(fresh.bias)
    return fresh


class Student(nn.Module):
    """``head(fc_norm(norm(blocks(x))))``: [B, 3, S, S] -> [B, T, out_dim]."""

    def __init__(self, model: nn.Module, out_dim: int, cap: float | None = 30.0, fused: bool | None = None):
        super().__init__()
        if cap is not None and soft_cap(model, cap, fused) != len(model.blocks):
            raise ValueError(f"{type(model).__name__}: soft-capped attention needs timm Attention in every block")
        dim, eps = model.num_features, reset_norm_eps(model)
        model.norm = _fresh_norm(model.norm, dim, eps)
        model.fc_norm = _fresh_norm(getattr(model, "fc_norm", nn.Identity()), dim, eps)
        for pooling in ("attn_pool", "head"):  # never used: all tokens come out
            if hasattr(model, pooling):
                setattr(model, pooling, None if pooling == "attn_pool" else nn.Identity())
        self.encoder = model
        self.head = nn.Linear(dim, out_dim)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.project(self.encoder.forward_features(images))  # [B, T, D], after the re-created norm

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """The encoder's output tokens [B, T, D] -> [B, T, out_dim]."""
        return self.head(self.encoder.fc_norm(tokens))
