"""DINOv3's Gram anchoring term (NECO-AND-GRAM.md B1, B5): the MSE between the Gram matrices of the
student's and an anchor's L2-normalised patch tokens, image by image.

Faithful to facebookresearch/dinov3 @ 6876159 dinov3/loss/gram_loss.py (``GramLoss.forward`` as the
released configs use it: ``normalized: true``, ``img_level: true``, ``remove_neg: false``;
tests/test_neco_ops.py compares with a transcription), returning per-image values whose mean is
``GramLoss``'s scalar. fp32 whatever the autocast, as the reference's casts. The anchor is not
detached (nor is it in the reference): produce it under ``no_grad``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastloc.runtime import full_precision


def gram_loss(student: Tensor, anchor: Tensor, remove_negative: bool = False) -> Tensor:
    """Per-image mean over the P x P entries of (X̂_s X̂_sᵀ - X̂_a X̂_aᵀ)², X̂ = L2-normalised fp32 tokens.

    student, anchor [B, P, D] (the same pixels' patch tokens). remove_negative: clamp both Gram
    matrices at 0 first (the reference's ``remove_neg``; off in every released config). Returns [B].
    """
    if student.ndim != 3 or student.shape != anchor.shape:
        raise ValueError(
            f"gram_loss: student and anchor must be [B, P, D] of one shape, "
            f"got {tuple(student.shape)} and {tuple(anchor.shape)}"
        )
    with full_precision(student.device):
        grams = []
        for tokens in (student, anchor):
            unit = F.normalize(tokens.float(), dim=-1)  # gram_loss.py 50-55, 65-66
            gram = torch.bmm(unit, unit.transpose(1, 2))  # [B, P, P]
            grams.append(gram.clamp_min(0) if remove_negative else gram)  # 75-77: negatives set to 0
        return (grams[0] - grams[1]).square().mean((1, 2))


class Anchor(nn.Module):
    """The frozen start model the Gram term anchors to (NECO-AND-GRAM.md B5): its output tokens
    after the final norm, [B, 3, S, S] -> [B, T, D]. The objective builds it from the start
    weights, frozen (``rebuilt``: the config rebuilds it, no checkpoint holds it)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        return self.model.forward_features(images)
