"""The harness's prediction for one image (ZEROSHOT-SEG.md sections 2-3): pixels -> cosine logits -> class map.

The normalised image at its original size is resized to the benchmark's short side as mmseg's
``Resize(scale=(2048, s), keep_ratio=True)`` sizes it (mmcv ``rescale_size``), bilinearly; read out
either whole (NACLIP's VOC) or in mmseg's sliding windows (``window_boxes``), every window's dense
tokens against the query embeddings giving cosine logits on its patch grid, resized bilinearly to the
window and averaged where windows overlap (a count map); resized bilinearly to the original size,
refined by PAMR where the settings say so, then decide.py's rule. As NACLIP's ``predict``,
``forward_slide`` and ``forward_feature`` (naclip.py:54-137 @ 0cac3a6).

Differences from the reference: mmcv resizes the uint8 image with cv2 (INTER_LINEAR, half-pixel
centres, no antialias) before normalising; here the normalised float image is resized by
``F.interpolate`` (bilinear, align_corners=False, no antialias), the same sampling without the uint8
rounding. Logits are accumulated in float32 (the reference: in the text tower's dtype, fp16 on GPU).
NACLIP skips PAMR for an image where it runs out of memory (naclip.py:131-135); here the error surfaces.
A side that is not a multiple of the patch loses its last pixels to the patch grid, as the reference's
strided convolution drops them, and the grid's logits are resized to the whole window. Only NACLIP's
lines are checked (tests/test_zeroshot_segment.py); ClearCLIP instead pads such a window to a multiple
of 16 (ZEROSHOT-SEG.md section 2), which is not done here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastloc.probe.dense.slide import window_boxes
from fastloc.probe.zeroshot.decide import Settings, decide
from fastloc.probe.zeroshot.pamr import pamr
from fastloc.probe.zeroshot.readout import NACLIP_STD, Readout, check, dense_tokens

LONG_SIDE = 2048  # the long side's cap in every config's Resize(scale=(2048, s), keep_ratio=True)


def resized_size(height: int, width: int, short_side: int, long_side: int = LONG_SIDE) -> tuple[int, int]:
    """(h, w) of mmseg's ``Resize(scale=(long_side, short_side), keep_ratio=True)``: mmcv ``rescale_size``,
    factor min(long / max(h, w), short / min(h, w)), each side int(side * factor + 0.5)."""
    if min(height, width, short_side, long_side) < 1:
        raise ValueError(f"image {height}x{width} and scale ({long_side}, {short_side}) must be positive")
    factor = min(max(long_side, short_side) / max(height, width), min(long_side, short_side) / min(height, width))
    return int(height * float(factor) + 0.5), int(width * float(factor) + 0.5)


def resize(image: torch.Tensor, short_side: int, long_side: int = LONG_SIDE) -> torch.Tensor:
    """The normalised image [3, H, W] at ``resized_size``, bilinear (align_corners=False, no antialias)."""
    size = resized_size(*image.shape[-2:], short_side, long_side)
    if size == tuple(image.shape[-2:]):
        return image
    return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]


def _check_inputs(image: torch.Tensor, embeddings: torch.Tensor) -> None:
    if image.dim() != 3 or image.shape[0] != 3 or not image.dtype.is_floating_point or min(image.shape[1:]) < 1:
        raise ValueError(f"image must be one normalised float image [3, H, W], got {image.dtype} {tuple(image.shape)}")
    if embeddings.dim() != 2 or embeddings.shape[0] < 1 or not embeddings.dtype.is_floating_point:
        raise ValueError(
            f"embeddings must be float query embeddings [Q, D], got {embeddings.dtype} {tuple(embeddings.shape)}"
        )


@torch.no_grad()
def window_logits(
    model: nn.Module,
    image: torch.Tensor,
    embeddings: torch.Tensor,
    window: tuple[int, int] | None,
    readout: Readout = "naclip",
    std: float = NACLIP_STD,
) -> torch.Tensor:
    """Cosine logits [Q, h, w] float32 at the image's own size: ``image`` [3, h, w] (normalised, already
    resized) read out whole (``window`` None) or in mmseg's (crop, stride) windows, each window's logits
    on its patch grid resized bilinearly to the window, summed in the reference's window order and
    divided by the count map (naclip.py:71-108). Windows of one size run as one batch."""
    _check_inputs(image, embeddings)
    check(model, readout, image.new_empty(1, 3, 0, 0))  # the model and readout, before any work
    ph, pw = model.patch_embed.patch_size
    h, w = image.shape[-2:]
    boxes = [(0, h, 0, w)] if window is None else window_boxes(h, w, *window)
    if min(min(y2 - y1, x2 - x1) for y1, y2, x1, x2 in boxes) < max(ph, pw):
        raise ValueError(f"windows of {h}x{w} image (window {window}) are smaller than the patch {(ph, pw)}")
    queries = embeddings.to(device=image.device, dtype=torch.float32)
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else image.dtype

    groups: dict[tuple[int, int], list[int]] = {}
    for i, (y1, y2, x1, x2) in enumerate(boxes):
        groups.setdefault((y2 - y1, x2 - x1), []).append(i)
    logits: list[torch.Tensor | None] = [None] * len(boxes)
    for (wh, ww), members in groups.items():
        gh, gw = wh // ph, ww // pw  # the patch grid: trailing pixels dropped, as a strided convolution does
        starts = [boxes[i][::2] for i in members]  # (y1, x1)
        crops = torch.stack([image[:, y : y + gh * ph, x : x + gw * pw] for y, x in starts])
        tokens = dense_tokens(model, crops.to(dtype), readout, std)  # [n, gh, gw, D], L2-normalised
        if tokens.shape[-1] != queries.shape[-1]:
            raise ValueError(
                f"embeddings {tuple(embeddings.shape)} have width {queries.shape[-1]}; "
                f"the tokens have {tokens.shape[-1]}"
            )
        cosine = (tokens.float() @ queries.T).permute(0, 3, 1, 2)  # [n, Q, gh, gw]
        cosine = F.interpolate(cosine, size=(wh, ww), mode="bilinear", align_corners=False)
        for i, out in zip(members, cosine):
            logits[i] = out

    total = queries.new_zeros((queries.shape[0], h, w))
    count = queries.new_zeros((1, h, w))
    for (y1, y2, x1, x2), out in zip(boxes, logits):
        total[:, y1:y2, x1:x2] += out
        count[:, y1:y2, x1:x2] += 1
    return total / count


@torch.no_grad()
def segment_logits(
    model: nn.Module,
    image: torch.Tensor,
    embeddings: torch.Tensor,
    settings: Settings,
    readout: Readout = "naclip",
    std: float = NACLIP_STD,
) -> torch.Tensor:
    """Cosine logits [Q, H, W] float32 at the original size of ``image`` [3, H, W] (normalised): resized
    to ``settings.short_side``, read out (``window_logits``, whole or ``settings.window``), resized back
    bilinearly, and PAMR-refined with the resized image where ``settings.pamr`` (naclip.py:121-132)."""
    _check_inputs(image, embeddings)
    resized = resize(image, settings.short_side)
    logits = window_logits(model, resized, embeddings, settings.window, readout, std)
    if logits.shape[-2:] != image.shape[-2:]:
        logits = F.interpolate(logits[None], size=image.shape[-2:], mode="bilinear", align_corners=False)[0]
    if settings.pamr:
        logits = pamr(resized.float(), logits)  # the resized image, brought back to the original size
    return logits


@torch.no_grad()
def segment(
    model: nn.Module,
    image: torch.Tensor,
    embeddings: torch.Tensor,
    query_class: torch.Tensor | Sequence[int],
    settings: Settings,
    readout: Readout = "naclip",
    num_classes: int | None = None,
    std: float = NACLIP_STD,
) -> torch.Tensor:
    """Class map [H, W] int64, on the image's device, of ``image`` [3, H, W] (normalised, original size;
    on the model's device): ``segment_logits`` then decide.py's rule with the settings' scale, background
    threshold and area rule. ``embeddings`` [Q, D] (L2-normalised queries, D the tokens' width) and
    ``query_class`` [Q] (each query's class, on the host) as ``class_embeddings`` returns them."""
    logits = segment_logits(model, image, embeddings, settings, readout, std)
    return decide(logits, query_class, settings.logit_scale, settings.prob_thd, num_classes, settings.area_thd)
