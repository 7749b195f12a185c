"""The geometry of the recipes (``recipes.py``), applied identically to an image and its label map.

Per recipe: the draws (from ``sample_rng``: independent of rank and worker), label maps as index
gathers equal to ``PIL.Image.resize(NEAREST)``, the torch twin's pixels with PIL (timm's and
Patch-Seg's pipelines bit for bit) and the same geometry as a ``Window`` for DALI's tensor resize.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of sample ``index`` (global) in ``epoch``: independent of rank and worker."""
    return np.random.default_rng([seed, epoch, index])


def caption_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The caption draw of sample ``index`` in ``epoch``: a stream apart from the recipe's, so a
    recipe's draws do not change with captions."""
    return np.random.default_rng([seed, epoch, index, 1])


def pil_filter(name: str) -> Image.Resampling:
    """'bilinear', 'bicubic', 'nearest', 'lanczos', ... as PIL's resampling filter."""
    return Image.Resampling[name.upper()]


# ---------------------------------------------------------------- geometry


def largest_center_square(h: int, w: int) -> tuple[int, int, int]:
    """(top, left, side) of the largest centred square: side m = min(h, w), floor offsets."""
    m = min(h, w)
    return (h - m) // 2, (w - m) // 2, m


def rkrc_size(h: int, w: int, size: int, f_h: float = 1.0, f_w: float = 1.0) -> tuple[int, int]:
    """timm ``ResizeKeepRatio`` (longest=0): shorter side to ``size``, then the factors.

    r = min(h / S, w / S); (round(h * f_h / r), round(w * f_w / r)), in this operation order.
    """
    ratio = min(h / size, w / size)
    return max(1, round(h * f_h / ratio)), max(1, round(w * f_w / ratio))


@dataclass(frozen=True)
class CropPad:
    """timm ``center_crop_or_pad``: reflect-pad short sides, then crop ``size`` at (top, left)."""

    pad_top: int
    pad_bottom: int
    pad_left: int
    pad_right: int
    top: int  # crop offset in the padded image
    left: int


def center_crop_or_pad(h: int, w: int, size: int) -> CropPad:
    """A side d = S - side > 0 short is padded floor(d/2) before, ceil(d/2) after; the crop sits
    at round((padded - S) / 2) (half to even)."""
    dh, dw = max(size - h, 0), max(size - w, 0)
    ph, pw = h + dh, w + dw  # padded size
    return CropPad(dh // 2, (dh + 1) // 2, dw // 2, (dw + 1) // 2, round((ph - size) / 2.0), round((pw - size) / 2.0))


def center_crop_size(h: int, w: int, size: int, crop_pct: float) -> tuple[int, int]:
    """timm's eval Resize(floor(S / crop_pct)): the short side to that, the long side
    int(short_target * long / short) (torchvision's rule); (resized height, resized width)."""
    target = math.floor(size / crop_pct)
    if w <= h:
        return (h, w) if w == target else (int(target * h / w), target)
    return (h, w) if h == target else (target, int(target * w / h))


@functools.lru_cache(maxsize=4096)
def _nearest_table(n_in: int, n_out: int) -> np.ndarray:
    a = n_in / n_out
    steps = np.full(n_out, a)
    steps[0] = a * 0.5
    coords = np.add.accumulate(steps)  # sequential float64 sums, as PIL's loop: x0 = a/2, x += a
    table = np.minimum(coords.astype(np.int64), n_in - 1)  # truncation; the clip never binds in practice
    table.flags.writeable = False
    return table


def pil_nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """[n_out] int64 source index of each output pixel of PIL's NEAREST resize along one axis."""
    return _nearest_table(int(n_in), int(n_out))


def resize_label(label: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """[out_h, out_w] = PIL NEAREST resize of [H, W] ``label``, any integer dtype."""
    h, w = label.shape
    if (h, w) == (out_h, out_w):
        return label
    return label[pil_nearest_indices(h, out_h)[:, None], pil_nearest_indices(w, out_w)[None, :]]


# ---------------------------------------------------------------- label maps (index gathers)


def crop_axis(n_in: int, n_out: int, size: int) -> np.ndarray:
    """[size] source index per output pixel along one axis: PIL-nearest resize n_in -> n_out, then
    timm's centre crop (at round((n_out - size) / 2)) or reflect pad (floor(d/2) before)."""
    table = pil_nearest_indices(n_in, n_out)
    if n_out >= size:
        offset = round((n_out - size) / 2.0)  # half to even, as timm
        return table[offset : offset + size]
    short = size - n_out
    return table[np.pad(np.arange(n_out), (short // 2, short - short // 2), mode="reflect")]


def gather(label: np.ndarray, rows: np.ndarray, cols: np.ndarray, flip: bool) -> np.ndarray:
    return np.ascontiguousarray(label[rows[:, None], (cols[::-1] if flip else cols)[None, :]])


# ---------------------------------------------------------------- image pixels (PIL)


def image_tensor(pixels: np.ndarray, flip: bool) -> torch.Tensor:
    """[S, S, 3] uint8 -> [3, S, S] uint8, flipped left-right."""
    pixels = pixels[:, ::-1] if flip else pixels
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


# ---------------------------------------------------------------- the same geometry for a tensor resize (DALI)


@dataclass(frozen=True)
class Window:
    """An image recipe as a crop and one tensor resize: the integer ``crop`` (top, left, height,
    width) is cut out first (rrc, eval: torchvision and Patch-Seg crop, then resize), then its
    ``box`` (y0, x0, y1, x1, relative to the crop) is resized to ``out`` (h, w), reflect-padded
    by ``pad`` (top, bottom, left, right) to S x S and flipped.

    For rkrc the crop is the whole image and the box the part of the resized image that survives
    timm's centre crop, in source coordinates: resizing it equals resizing everything and
    cropping (timm's order), to the rounding of a fractional box."""

    crop: tuple[int, int, int, int]
    box: tuple[float, float, float, float]
    out: tuple[int, int]
    pad: tuple[int, int, int, int]
    interpolation: str
    flip: bool


def window_resized(h: int, w: int, resized: tuple[int, int], size: int, interpolation: str, flip: bool) -> Window:
    """Resize the whole image to ``resized``, then timm's centre crop or reflect pad to S."""
    axes = []
    for n_in, n in zip((h, w), resized):
        if n >= size:
            offset = round((n - size) / 2.0)
            axes.append((n_in / n * offset, n_in / n * (offset + size), size, 0, 0))
        else:
            short = size - n
            axes.append((0.0, float(n_in), n, short // 2, short - short // 2))
    (y0, y1, kh, pt, pb), (x0, x1, kw, pl, pr) = axes
    return Window((0, 0, h, w), (y0, x0, y1, x1), (kh, kw), (pt, pb, pl, pr), interpolation, flip)


def window_whole(crop: tuple[int, int, int, int], size: int, interpolation: str, flip: bool) -> Window:
    box = (0.0, 0.0, float(crop[2]), float(crop[3]))
    return Window(crop, box, (size, size), (0, 0, 0, 0), interpolation, flip)


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """[B, 3, H, W] uint8 -> float32 (x - 255 mean) / (255 std): timm's prefetcher's formula, the
    masking kernel's (one definition, ``normalization_coefficients``), bit for bit."""
    from fastloc.kernels.patch_mask import normalization_coefficients

    offset, denom = normalization_coefficients(mean, std, torch.uint8)
    return (images.to(torch.float32) - offset.view(1, 3, 1, 1)) / denom.view(1, 3, 1, 1)
