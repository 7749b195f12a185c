"""The recipe seam (DESIGN.md "Recipes"): what a loader does to each sample, as one frozen object.

A recipe draws its parameters from ``sample_rng(seed, epoch, index)``, says which ``Window`` of the
image each view reads (what the DALI graph consumes) and transforms the label map and, in the torch
twin, the image; the loaders call it and never ask which recipe it is. The geometry lives in
``transforms.py``; a protocol's own recipe (dinov3's mmseg pipeline) lives beside its protocol.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from fastloc.data.transforms import (
    Window,
    center_crop_or_pad,
    center_crop_size,
    crop_axis,
    gather,
    image_tensor,
    largest_center_square,
    pil_filter,
    pil_nearest_indices,
    resize_label,
    rkrc_size,
    window_resized,
    window_whole,
)

INTERPOLATIONS = {"nearest": 0, "bilinear": 1, "bicubic": 2, "lanczos": 3}  # DALI's DALIInterpType values


@dataclass(frozen=True)
class View:
    """One view of a sample: the window DALI reads (None: a host-only recipe), the final label map
    ([s, s], None without labels) and the draw the image transform needs."""

    window: Window | None
    label: np.ndarray | None
    draw: Any = None

    @property
    def box(self) -> tuple[float, float, float, float]:
        """(top, left, bottom, right) of the source image the view shows, in source pixels."""
        top, left = self.window.crop[:2]
        y0, x0, y1, x1 = self.window.box
        return top + y0, left + x0, top + y1, left + x1


class Recipe:
    """The interface. A one-view recipe implements ``draw`` (from the sample's generator), ``window``,
    ``label`` ([H, W] -> [s, s], PIL-nearest index gathers) and ``image``;
    a recipe with another shape (several views, a draw that looks at the label map) overrides
    ``views``. ``dali`` False: the DALI graph cannot make its pixels, the torch twin runs it."""

    views_per_sample: ClassVar[int] = 1
    dali: ClassVar[bool] = True

    def views(self, rng: np.random.Generator, h: int, w: int, size: int, label: np.ndarray | None) -> tuple[View, ...]:
        draw = self.draw(rng, h, w)
        return (View(self.window(h, w, size, draw), None if label is None else self.label(label, size, draw), draw),)

    def draw(self, rng: np.random.Generator, h: int, w: int) -> Any:
        return None  # a deterministic recipe draws nothing

    def window(self, h: int, w: int, size: int, draw: Any) -> Window:
        raise NotImplementedError

    def label(self, label: np.ndarray, size: int, draw: Any) -> np.ndarray:
        raise NotImplementedError

    def image(self, image: Image.Image, size: int, draw: Any) -> torch.Tensor:
        """[3, s, s] uint8: the torch twin's pixels of a view (PIL, the reference pipelines bit for bit)."""
        raise NotImplementedError

    def finish(self, images: torch.Tensor, draws: list[Any]) -> torch.Tensor:
        """The batch's first views as both loaders deliver them ([B, 3, S, S], on the loader's
        device, normalized or uint8) and their draws -> the same: a step neither PIL nor the DALI
        graph makes (mmseg's padding, Hummingbird's colour jitter). No host sync."""
        return images

    def params(self, draws: list[Any]) -> np.ndarray | None:
        """The batch's first views' draws as numbers, [B, ...] float32 (``Batch.params``), for a
        consumer that cuts views on the device (multi-crop); None: the recipe has none."""
        return None


def check_interpolations(names: tuple[str, ...]) -> None:
    unknown = [n for n in names if n not in INTERPOLATIONS]
    if unknown or not names:
        raise ValueError(f"unknown interpolations {unknown or names}; choose from {sorted(INTERPOLATIONS)}")


@dataclass(frozen=True)
class RkrcDraw:
    f_h: float  # height factor (zoom / aspect)
    f_w: float  # width factor (zoom * aspect)
    interpolation: str
    flip: bool


@dataclass(frozen=True)
class RrcDraw:
    top: int  # crop box in the source image
    left: int
    height: int
    width: int
    interpolation: str
    flip: bool


def _pick(names: tuple[str, ...], u: float) -> str:
    return names[min(int(u * len(names)), len(names) - 1)]


@dataclass(frozen=True, kw_only=True)
class Rkrc(Recipe):
    """MaskEmbed's augmentation: timm's rkrc (MASKEMBED.md section 9), random."""

    scale: tuple[float, float] = (0.08, 1.0)
    """Range of u (zoom f = 1/sqrt(u))."""

    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """Range of the aspect jitter r (log-uniform; s = sqrt(r))."""

    zoom_p: float = 0.5
    """Probability of the random zoom."""

    aspect_p: float = 0.5
    """Probability of the aspect jitter."""

    flip_p: float = 0.5
    """Probability of a horizontal flip."""

    interpolations: tuple[str, ...] = ("bilinear", "bicubic")
    """Image interpolations, one drawn uniformly per image (label maps always use nearest)."""

    def __post_init__(self):
        check_interpolations(self.interpolations)

    def draw(self, rng, h, w) -> RkrcDraw:
        """Six uniforms, always all drawn: zoom gate, zoom u, aspect gate, aspect u, interpolation, flip."""
        zoom_gate, zoom_u, aspect_gate, aspect_u, pick_u, flip_u = rng.random(6).tolist()
        f = 1.0
        if zoom_gate < self.zoom_p:
            lo, hi = self.scale
            f = 1.0 / math.sqrt(lo + (hi - lo) * zoom_u)
        f_h = f_w = f
        if aspect_gate < self.aspect_p:
            lo, hi = math.log(self.ratio[0]), math.log(self.ratio[1])
            s = math.sqrt(math.exp(lo + (hi - lo) * aspect_u))
            f_h, f_w = f / s, f * s
        return RkrcDraw(f_h, f_w, _pick(self.interpolations, pick_u), flip_u < self.flip_p)

    def window(self, h, w, size, draw):
        return window_resized(h, w, rkrc_size(h, w, size, draw.f_h, draw.f_w), size, draw.interpolation, draw.flip)

    def label(self, label, size, draw):
        h, w = label.shape
        rh, rw = rkrc_size(h, w, size, draw.f_h, draw.f_w)
        return gather(label, crop_axis(h, rh, size), crop_axis(w, rw, size), draw.flip)

    def image(self, image, size, draw):
        """ResizeKeepRatio, CenterCropOrPad(reflect), flip."""
        rh, rw = rkrc_size(image.height, image.width, size, draw.f_h, draw.f_w)
        pixels = np.asarray(image.resize((rw, rh), pil_filter(draw.interpolation)))  # [rh, rw, 3]
        cp = center_crop_or_pad(rh, rw, size)
        if cp.pad_top or cp.pad_bottom or cp.pad_left or cp.pad_right:
            pad = ((cp.pad_top, cp.pad_bottom), (cp.pad_left, cp.pad_right), (0, 0))
            pixels = np.pad(pixels, pad, mode="reflect")
        return image_tensor(pixels[cp.top : cp.top + size, cp.left : cp.left + size], draw.flip)


def rrc_box(
    rng: np.random.Generator, h: int, w: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
    """``RandomResizedCrop.get_params`` (10 tries, then the centre fallback) on a numpy generator:
    per try two uniforms (area fraction, log aspect) and, on success, two integers (top, left).
    (top, left, height, width) in source pixels."""
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        area_u, ratio_u = rng.random(2).tolist()
        target = h * w * (scale[0] + (scale[1] - scale[0]) * area_u)
        aspect = math.exp(log_lo + (log_hi - log_lo) * ratio_u)
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    in_ratio = w / h  # centre crop at the nearest allowed aspect ratio
    if in_ratio < min(ratio):
        cw, ch = w, round(w / min(ratio))
    elif in_ratio > max(ratio):
        cw, ch = round(h * max(ratio)), h
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


@dataclass(frozen=True, kw_only=True)
class Rrc(Recipe):
    """torchvision's RandomResizedCrop and a flip, random."""

    scale: tuple[float, float] = (0.08, 1.0)
    """Range of the crop's area fraction."""

    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """Aspect ratio range."""

    flip_p: float = 0.5
    """Probability of a horizontal flip."""

    interpolations: tuple[str, ...] = ("bilinear", "bicubic")
    """Image interpolations, one drawn uniformly per image (label maps always use nearest)."""

    def __post_init__(self):
        check_interpolations(self.interpolations)

    def draw(self, rng, h, w) -> RrcDraw:
        """``rrc_box`` (RandomResizedCrop.get_params), then two uniforms (interpolation, flip)."""
        box = rrc_box(rng, h, w, self.scale, self.ratio)
        pick_u, flip_u = rng.random(2).tolist()
        return RrcDraw(*box, _pick(self.interpolations, pick_u), flip_u < self.flip_p)

    def window(self, h, w, size, draw):
        return window_whole((draw.top, draw.left, draw.height, draw.width), size, draw.interpolation, draw.flip)

    def label(self, label, size, draw):
        rows = draw.top + pil_nearest_indices(draw.height, size)
        cols = draw.left + pil_nearest_indices(draw.width, size)
        return gather(label, rows, cols, draw.flip)

    def image(self, image, size, draw):
        """``resized_crop`` on PIL (crop, then resize to S x S), then the flip."""
        box = (draw.left, draw.top, draw.left + draw.width, draw.top + draw.height)
        pixels = np.asarray(image.crop(box).resize((size, size), pil_filter(draw.interpolation)))
        return image_tensor(pixels, draw.flip)


@dataclass(frozen=True, kw_only=True)
class CentreSquare(Recipe):
    """Patch-Seg's evaluation (PATCHSEG.md section 2): the largest centre square (floor offsets),
    PIL bilinear (antialiased) to S x S."""

    def window(self, h, w, size, draw):
        top, left, m = largest_center_square(h, w)
        return window_whole((top, left, m, m), size, "bilinear", False)

    def label(self, label, size, draw):
        top, left, m = largest_center_square(*label.shape)
        index = pil_nearest_indices(m, size)
        return gather(label, top + index, left + index, False)

    def image(self, image, size, draw):
        top, left, m = largest_center_square(image.height, image.width)
        box = (left, top, left + m, top + m)
        return image_tensor(np.asarray(image.crop(box).resize((size, size), Image.Resampling.BILINEAR)), False)


@dataclass(frozen=True, kw_only=True)
class CenterCrop(Recipe):
    """timm's eval transform (MaskEmbed's validation): Resize(floor(S / crop_pct)), CenterCrop(S)."""

    crop_pct: float = 0.875
    """The backbone's crop_pct (timm's pretrained_cfg), in (0, 1]."""

    interpolation: str = "bicubic"
    """The backbone's interpolation (timm's pretrained_cfg)."""

    def __post_init__(self):
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        check_interpolations((self.interpolation,))

    def window(self, h, w, size, draw):
        return window_resized(h, w, center_crop_size(h, w, size, self.crop_pct), size, self.interpolation, False)

    def label(self, label, size, draw):
        h, w = label.shape
        rh, rw = center_crop_size(h, w, size, self.crop_pct)
        return gather(label, crop_axis(h, rh, size), crop_axis(w, rw, size), False)

    def image(self, image, size, draw):
        rh, rw = center_crop_size(image.height, image.width, size, self.crop_pct)
        if (rh, rw) != (image.height, image.width):
            image = image.resize((rw, rh), pil_filter(self.interpolation))
        top, left = round((rh - size) / 2.0), round((rw - size) / 2.0)
        return image_tensor(np.asarray(image.crop((left, top, left + size, top + size))), False)


@dataclass(frozen=True, kw_only=True)
class Square(Recipe):
    """The dense evaluations' input (Leopart, Hummingbird): the whole image to S x S, its aspect
    ratio not kept (torchvision ``Resize((S, S))``: PIL bilinear, labels PIL nearest)."""

    def window(self, h, w, size, draw):
        return window_whole((0, 0, h, w), size, "bilinear", False)

    def label(self, label, size, draw):
        return resize_label(label, size, size)

    def image(self, image, size, draw):
        return image_tensor(np.asarray(image.resize((size, size), Image.Resampling.BILINEAR)), False)


RECIPES: dict[str, type[Recipe]] = {
    "rkrc": Rkrc,
    "rrc": Rrc,
    "eval": CentreSquare,
    "center-crop": CenterCrop,
    "square": Square,
}
