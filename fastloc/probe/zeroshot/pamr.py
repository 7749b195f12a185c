"""PAMR, pixel-adaptive mask refinement (Araslanov & Roth 2020), as NACLIP applies it (ZEROSHOT-SEG.md section 3
step 4): 10 iterations over dilations (8, 16), on the normalised image at the logits' (original) size, to the
cosine logits before the softmax (naclip.py:129-132, pamr.py @ 0cac3a6). The same function as the reference
module, batched, without its [B, C, 8 * dilations, H, W] neighbour tensor (NACLIP skips PAMR where that
runs out of memory); neighbours are replicate-padded shifted views, not convolutions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

ITERATIONS = 10  # NACLIP's pamr_steps (naclip.py:21, eval.py:54-57)
DILATIONS = (8, 16)  # NACLIP's pamr_stride (naclip.py:21)


def _shifted(x: torch.Tensor, dilations: Sequence[int], centre: bool) -> list[torch.Tensor]:
    """The 3 x 3 neighbours at each dilation of every pixel of x [N, C, H, W], replicate-padded, as views
    [N, C, H, W] in the reference's kernel order (row by row, the centre only with ``centre``)."""
    h, w = x.shape[-2:]
    out = []
    for d in dilations:
        padded = F.pad(x, (d, d, d, d), mode="replicate")
        out += [
            padded[..., a * d : a * d + h, b * d : b * d + w]
            for a in range(3)
            for b in range(3)
            if centre or (a, b) != (1, 1)
        ]
    return out


def pamr_weights(image: torch.Tensor, dilations: Sequence[int] = DILATIONS) -> torch.Tensor:
    """Image [B, K, H, W] -> affinities [B, 8 * len(dilations), H, W], a softmax over the neighbours of
    mean_k -|x_k - neighbour_k| / (1e-8 + 0.1 * std_k), std over each pixel's 3 x 3 windows at all dilations."""
    std = torch.stack(_shifted(image, dilations, centre=True), 2).std(2)  # [B, K, H, W]
    diff = torch.stack([(image - n).abs() for n in _shifted(image, dilations, centre=False)], 2)
    return (-diff / (1e-8 + 0.1 * std[:, :, None])).mean(1).softmax(1)


def pamr(
    image: torch.Tensor,
    logits: torch.Tensor,
    iterations: int = ITERATIONS,
    dilations: Sequence[int] = DILATIONS,
) -> torch.Tensor:
    """Refined logits, shaped and typed as ``logits`` [B, Q, H, W] (or [Q, H, W]); computed in float32.
    ``image`` [B, K, h, w] (or [K, h, w]), normalised, is first resized bilinearly to H x W (align_corners=False,
    naclip.py:130); each iteration replaces every logit by the affinity-weighted sum of its neighbours'."""
    if image.dim() != logits.dim() or logits.dim() not in (3, 4) or image.shape[:-3] != logits.shape[:-3]:
        raise ValueError(
            f"image {tuple(image.shape)} and logits {tuple(logits.shape)} must be [K, h, w] and [Q, H, W], or"
            " [B, K, h, w] and [B, Q, H, W] with the same B"
        )
    if iterations < 0 or not dilations or any(int(d) != d or d < 1 for d in dilations):
        raise ValueError(f"iterations {iterations} must be >= 0 and dilations {tuple(dilations)} positive integers")
    single = logits.dim() == 3
    x, mask = (image[None], logits[None]) if single else (image, logits)
    x, mask = x.float(), mask.float()
    if x.shape[-2:] != mask.shape[-2:]:
        x = F.interpolate(x, size=mask.shape[-2:], mode="bilinear", align_corners=False)
    weights = pamr_weights(x, dilations)  # [B, P, H, W]
    for _ in range(iterations):
        out = torch.zeros_like(mask)
        for p, neighbour in enumerate(_shifted(mask, dilations, centre=False)):
            out.addcmul_(neighbour, weights[:, p : p + 1])
        mask = out
    return (mask[0] if single else mask).to(logits.dtype)
