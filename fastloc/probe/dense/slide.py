"""Full-resolution sliding-window scoring, as DINOv2/v3's ADE20k evaluation (mmseg's slide mode).

Each evaluation sample is read straight from the shards (no square resize, no feature cache):
the image is resized, aspect kept, to a short side (dinov3 FixedSideResize, PIL bilinear), cut
into crop x crop windows placed by mmseg's ``slide_inference`` formula, the windows of one image
run as one batch, their logits averaged where they overlap, resized bilinearly to the label's
original size and scored there. Difference from the reference: a window smaller than the crop
(only when the short side is below the crop) is zero-padded to the crop, because the frozen
backbone has one input size, and its logits are cropped back; the reference runs it unpadded.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fastloc.data.samples import decode_image, decode_label
from fastloc.data.shards import ShardError, ShardSet
from fastloc.data.transforms import normalize
from fastloc.probe.dense.data import VOID, LabelSpace
from fastloc.probe.dense.metrics import SegCounts
from fastloc.progress import Progress

Box = tuple[int, int, int, int]  # (y1, y2, x1, x2), end-exclusive


def window_boxes(height: int, width: int, crop: int, stride: int) -> list[Box]:
    """mmseg's slide_inference windows over an H x W image, row by row: grids = max(H - crop +
    stride - 1, 0) // stride + 1 per axis; y2 = min(y1 + crop, H), then y1 = max(y2 - crop, 0)
    (the last window is pulled back inside the image)."""
    if crop < 1 or stride < 1:
        raise ValueError(f"crop {crop} and stride {stride} must be at least 1")
    rows = max(height - crop + stride - 1, 0) // stride + 1
    cols = max(width - crop + stride - 1, 0) // stride + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + crop, height), min(c * stride + crop, width)
            boxes.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    return boxes


def short_side_size(height: int, width: int, short: int) -> tuple[int, int]:
    """(h, w) with the short side ``short`` and the long side int(short * long / short_in + 0.5),
    as dinov3's FixedSideResize (a square image: both ``short``)."""
    if height > width:
        return int(short * height / width + 0.5), short
    return short, int(short * width / height + 0.5)


def resize_short_side(image: Image.Image, short: int) -> Image.Image:
    """PIL bilinear (antialiased) to ``short_side_size`` (torchvision Resize on PIL)."""
    h, w = short_side_size(image.height, image.width, short)
    return image.resize((w, h), Image.Resampling.BILINEAR)


def read_sample(shards: ShardSet, g: int) -> tuple[Image.Image, np.ndarray]:
    """Sample ``g`` as stored: (RGB image, label map [H, W] uint8 or uint16 at the image's size)."""
    shard, key, data = shards.read(g, ("jpg", "seg.png"))
    try:
        image, label = decode_image(data["jpg"]), decode_label(data["seg.png"])
    except Exception as exc:
        raise ShardError(f"{shard}: sample {key} does not decode ({exc}); the evaluation counts every sample") from None
    if label.shape != (image.height, image.width):
        raise ShardError(f"{shard}: sample {key}: label {label.shape} and image {image.height}x{image.width} differ")
    return image, label


def image_tensor(image: Image.Image, mean, std) -> torch.Tensor:
    """PIL RGB -> [1, 3, H, W] float32, normalized as the loaders do."""
    pixels = torch.from_numpy(np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1)))
    return normalize(pixels[None], mean, std)


def slide_logits(image: torch.Tensor, predict: Callable[[torch.Tensor], torch.Tensor], crop: int, stride: int):
    """image [1, 3, H, W] -> logits [1, C, H, W] float32: ``predict`` maps windows [n, 3, crop, crop]
    to logits [n, C, crop, crop]; all windows of the image go in one batch; every pixel's logits
    are the mean over the windows that cover it."""
    _, _, h, w = image.shape
    boxes = window_boxes(h, w, crop, stride)
    windows = torch.stack(
        [F.pad(image[0, :, y1:y2, x1:x2], (0, crop - (x2 - x1), 0, crop - (y2 - y1))) for y1, y2, x1, x2 in boxes]
    )  # [n, 3, crop, crop], zero-padded at the bottom and right where the image is smaller
    logits = predict(windows).float()  # [n, C, crop, crop]
    total = logits.new_zeros((logits.shape[1], h, w))
    count = logits.new_zeros((1, h, w))
    for (y1, y2, x1, x2), window in zip(boxes, logits):
        total[:, y1:y2, x1:x2] += window[:, : y2 - y1, : x2 - x1]
        count[:, y1:y2, x1:x2] += 1
    return (total / count)[None]


def score_split(
    shards: ShardSet,
    predict: Callable[[torch.Tensor], torch.Tensor],
    labels: LabelSpace,
    mean,
    std,
    short_side: int,
    crop: int,
    stride: int,
    device: torch.device,
    progress: bool = True,
) -> SegCounts:
    """Every sample of the split slid over at full resolution; the counts stay on the device."""
    counts = SegCounts(labels.num_classes, device, ignore=VOID)
    bar = Progress(shards.num_samples, 0, f"slide {shards.manifest['split']}", enabled=progress, unit="images")
    try:
        for g in range(shards.num_samples):
            image, label = read_sample(shards, g)
            x = image_tensor(resize_short_side(image, short_side), mean, std).to(device, non_blocking=True)
            logits = slide_logits(x, predict, crop, stride)
            logits = F.interpolate(logits, size=label.shape, mode="bilinear", align_corners=False)  # [1, C, H0, W0]
            target = labels.map(torch.from_numpy(label.astype(np.int64)).to(device, non_blocking=True))
            counts.update(logits[0].argmax(0), target)
            bar.update(1)
    finally:
        bar.close()
    return counts
