"""PACL's pieces (OTHER-METHODS.md section 3; arXiv 2212.04994): the vision embedder on the patch
tokens, the patch-text compatibility, the patch weights, the pooled image-text scores and the
symmetric InfoNCE over them, per image.

The paper pools every image with every text of the batch (its weights depend on the text), so the
scores cost B x T x patches x width; ``pair_scores`` computes them in chunks of texts, each chunk
recomputed in the backward (activation checkpointing), so what is held at once is one chunk's
[B, chunk, patches] weights and [B, chunk, width] pooled embeddings, never B x T of them.
``own_scores`` is the public reimplementations' form (NMS05 ``model/pacl.py``): each image pooled
with its own caption only, then scored against every text.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

Weighting = Literal["softmax", "sigmoid"]

SIGMOID_SHARPNESS = 10.0  # NMS05's sigmoid(10 * cos) (model/pacl.py, patch_alignment)


class Embedder(nn.Module):
    """e_v: a linear map plus a 2-layer MLP, added (the paper's "linear + 2-layer MLP residual":
    1.05 M parameters at 768 -> 512). ReLU as the paper's reproduction reads it; NMS05 uses GELU."""

    def __init__(self, width: int, dim: int, activation: Literal["relu", "gelu"] = "relu"):
        super().__init__()
        self.linear = nn.Linear(width, dim)
        act = nn.ReLU() if activation == "relu" else nn.GELU()
        self.mlp = nn.Sequential(nn.Linear(width, dim), act, nn.Linear(dim, dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.linear(tokens) + self.mlp(tokens)  # [B, P, width] -> [B, P, dim]


def compatibility(patches: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    """cos(v_p, t): patch embeddings [B, P, d] and text embeddings [T, d] -> [B, T, P]."""
    return torch.einsum("bpd,td->btp", F.normalize(patches, dim=-1), F.normalize(texts, dim=-1))


def patch_weights(scores: torch.Tensor, weighting: Weighting) -> torch.Tensor:
    """Weights over the patches (the last dim) of compatibilities: the paper's softmax, or NMS05's
    sigmoid(10 * cos) (unnormalized; the cosine that follows ignores the scale)."""
    if weighting == "softmax":
        return scores.softmax(dim=-1)
    if weighting == "sigmoid":
        return torch.sigmoid(scores * SIGMOID_SHARPNESS)
    raise ValueError(f"unknown weighting {weighting!r} (softmax or sigmoid)")


def _chunk_scores(patches: torch.Tensor, unit: torch.Tensor, texts: torch.Tensor, weighting: Weighting):
    """One chunk of ``pair_scores``: [B, P, d] raw and unit patches, [c, d] unit texts -> [B, c]."""
    a = patch_weights(torch.einsum("bpd,cd->bcp", unit, texts), weighting)  # [B, c, P]
    pooled = torch.bmm(a.to(patches.dtype), patches)  # [B, c, d]: z of each (image, text) pair
    return (F.normalize(pooled, dim=-1) * texts).sum(-1)  # [B, c]


def pair_scores(patches: torch.Tensor, texts: torch.Tensor, weighting: Weighting, chunk: int) -> torch.Tensor:
    """phi(x_i, y_j) = cos(z_ij, t_j), z_ij = sum_p a_ijp v_ip with a_ij the weights of image i's
    patches for text j (the paper): patches [B, P, d] (the embedder's, unnormalized), texts [T, d]
    -> [B, T]. ``chunk`` texts at a time; with more than one chunk, each is recomputed in the
    backward (one chunk's intermediates held at a time, for about a third more time)."""
    unit, texts = F.normalize(patches, dim=-1), F.normalize(texts, dim=-1)
    recompute = torch.is_grad_enabled() and patches.requires_grad and texts.shape[0] > chunk
    parts = []
    for start in range(0, texts.shape[0], chunk):
        part = texts[start : start + chunk]
        if recompute:
            parts.append(checkpoint(_chunk_scores, patches, unit, part, weighting, use_reentrant=False))
        else:
            parts.append(_chunk_scores(patches, unit, part, weighting))
    return torch.cat(parts, dim=1)


def own_scores(patches: torch.Tensor, own: torch.Tensor, texts: torch.Tensor, weighting: Weighting) -> torch.Tensor:
    """NMS05's form: image i pooled with its own caption's weights only (``own`` [B, d]), then
    cos(z_i, t_j) for every text [T, d] -> [B, T]. A leakier objective than the paper's: the
    negatives never re-weight the patches."""
    a = patch_weights(torch.einsum("bpd,bd->bp", F.normalize(patches, dim=-1), F.normalize(own, dim=-1)), weighting)
    pooled = torch.einsum("bp,bpd->bd", a.to(patches.dtype), patches)  # [B, d]
    return F.normalize(pooled, dim=-1) @ F.normalize(texts, dim=-1).T


def infonce_losses(full: torch.Tensor, offset: int, count: int) -> torch.Tensor:
    """Symmetric InfoNCE per image: ``full`` [N, N] scaled logits of every image (rows) against
    every text (columns) of the global batch, the pair (i, i) the match; the losses [count] of
    images offset .. offset + count: (CE of its row + CE of its text's column) / 2, whose mean
    over the global batch is CLIP's loss."""
    index = torch.arange(offset, offset + count, device=full.device)
    rows = F.cross_entropy(full[index].float(), index, reduction="none")
    columns = F.cross_entropy(full[:, index].T.float(), index, reduction="none")
    return (rows + columns) / 2


def logit_scale_init(temperature: float) -> float:
    """ln(1 / tau): CLIP's parameterization of a learnable temperature."""
    return math.log(1.0 / temperature)
