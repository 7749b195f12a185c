"""The recipes (MaskEmbed's rkrc or RandomResizedCrop for training; Patch-Seg's centre square,
timm's centre crop and the dense evaluations' whole-image square for evaluation), applied
identically to an image and its label map.

Each recipe comes in parts, so that both loaders share all but the image resampling:

1. **Draws** (``draw_rkrc``, ``draw_rrc``): one sample's random parameters, from
   ``sample_rng(seed, epoch, g)`` (g = global sample index): independent of rank and worker.
2. **Geometry** (``rkrc_size``, ``center_crop_or_pad``, ``largest_center_square``,
   ``pil_nearest_indices``): integer arithmetic, rounded half to even as timm does.
3. **Label maps** (``label_rkrc``, ``label_rrc``, ``label_eval``): index gathers that equal
   ``PIL.Image.resize(NEAREST)`` exactly (PIL accumulates the source coordinate in float64, so
   ``floor((i + 0.5) * a)`` and torch's ``nearest-exact`` differ from it at ties, e.g. 36 -> 33),
   then crop, reflect pad (edge not repeated) and flip. Both loaders use these.
4. **Image pixels**: PIL for the torch twin (``image_rkrc``, ``image_rrc``, ``image_eval``:
   the reference pipelines, timm's and Patch-Seg's, on PIL images, bit for bit), or a
   ``Window`` (crop, box, size, pads, flip) that DALI's tensor resize applies on the GPU, within
   a few grey levels of PIL.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from fastloc.data.config import TrainRecipe


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of sample ``index`` (global) in ``epoch``: independent of rank and worker."""
    return np.random.default_rng([seed, epoch, index])


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


# ---------------------------------------------------------------- draws


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


def draw_rkrc(rng: np.random.Generator, recipe: TrainRecipe) -> RkrcDraw:
    """Six uniforms, always all drawn: zoom gate, zoom u, aspect gate, aspect u, interpolation, flip.

    f = 1 / sqrt(U(scale)) with probability zoom_p, else 1; s = sqrt(exp(U(ln ratio))) with
    probability aspect_p, f_h = f / s, f_w = f * s; else f_h = f_w = f (MASKEMBED.md section 9).
    """
    zoom_gate, zoom_u, aspect_gate, aspect_u, pick_u, flip_u = rng.random(6).tolist()
    f = 1.0
    if zoom_gate < recipe.zoom_p:
        lo, hi = recipe.scale
        f = 1.0 / math.sqrt(lo + (hi - lo) * zoom_u)
    f_h = f_w = f
    if aspect_gate < recipe.aspect_p:
        lo, hi = math.log(recipe.ratio[0]), math.log(recipe.ratio[1])
        s = math.sqrt(math.exp(lo + (hi - lo) * aspect_u))
        f_h, f_w = f / s, f * s
    return RkrcDraw(f_h, f_w, _pick(recipe.interpolations, pick_u), flip_u < recipe.flip_p)


def draw_rrc(rng: np.random.Generator, h: int, w: int, recipe: TrainRecipe) -> RrcDraw:
    """torchvision ``RandomResizedCrop.get_params`` (10 tries, then the centre fallback), drawn
    from ``rng``: per try two uniforms (area fraction, log aspect) and, on success, two integers
    (top, left); then two uniforms (interpolation, flip)."""
    area = h * w
    log_lo, log_hi = math.log(recipe.ratio[0]), math.log(recipe.ratio[1])
    box = None
    for _ in range(10):
        area_u, ratio_u = rng.random(2).tolist()
        target = area * (recipe.scale[0] + (recipe.scale[1] - recipe.scale[0]) * area_u)
        aspect = math.exp(log_lo + (log_hi - log_lo) * ratio_u)
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            box = (int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw)
            break
    if box is None:  # centre crop at the nearest allowed aspect ratio
        in_ratio = w / h
        if in_ratio < min(recipe.ratio):
            cw, ch = w, round(w / min(recipe.ratio))
        elif in_ratio > max(recipe.ratio):
            cw, ch = round(h * max(recipe.ratio)), h
        else:
            cw, ch = w, h
        box = ((h - ch) // 2, (w - cw) // 2, ch, cw)
    pick_u, flip_u = rng.random(2).tolist()
    return RrcDraw(*box, _pick(recipe.interpolations, pick_u), flip_u < recipe.flip_p)


# ---------------------------------------------------------------- label maps (index gathers)


def _axis(n_in: int, n_out: int, size: int) -> np.ndarray:
    """[size] source index per output pixel along one axis: PIL-nearest resize n_in -> n_out, then
    timm's centre crop (at round((n_out - size) / 2)) or reflect pad (floor(d/2) before)."""
    table = pil_nearest_indices(n_in, n_out)
    if n_out >= size:
        offset = round((n_out - size) / 2.0)  # half to even, as timm
        return table[offset : offset + size]
    short = size - n_out
    return table[np.pad(np.arange(n_out), (short // 2, short - short // 2), mode="reflect")]


def _gather(label: np.ndarray, rows: np.ndarray, cols: np.ndarray, flip: bool) -> np.ndarray:
    return np.ascontiguousarray(label[rows[:, None], (cols[::-1] if flip else cols)[None, :]])


def label_rkrc(label: np.ndarray, size: int, draw: RkrcDraw) -> np.ndarray:
    """[H, W] -> [S, S] (same dtype): timm rkrc with NEAREST, i.e. PIL's resize, crop or pad, flip."""
    h, w = label.shape
    rh, rw = rkrc_size(h, w, size, draw.f_h, draw.f_w)
    return _gather(label, _axis(h, rh, size), _axis(w, rw, size), draw.flip)


def label_rrc(label: np.ndarray, size: int, draw: RrcDraw) -> np.ndarray:
    """[H, W] -> [S, S]: torchvision ``resized_crop`` with NEAREST, then the flip."""
    rows = draw.top + pil_nearest_indices(draw.height, size)
    cols = draw.left + pil_nearest_indices(draw.width, size)
    return _gather(label, rows, cols, draw.flip)


def label_center_crop(label: np.ndarray, size: int, crop_pct: float) -> np.ndarray:
    """[H, W] -> [S, S]: timm's eval transform with NEAREST."""
    h, w = label.shape
    rh, rw = center_crop_size(h, w, size, crop_pct)
    return _gather(label, _axis(h, rh, size), _axis(w, rw, size), False)


def label_square(label: np.ndarray, size: int) -> np.ndarray:
    """[H, W] -> [S, S]: the whole map, PIL NEAREST (torchvision ``Resize((S, S))`` on a mask)."""
    return resize_label(label, size, size)


def label_eval(label: np.ndarray, size: int) -> np.ndarray:
    """[H, W] -> [S, S]: Patch-Seg's largest centre square, PIL NEAREST."""
    top, left, m = largest_center_square(*label.shape)
    index = pil_nearest_indices(m, size)
    return _gather(label, top + index, left + index, False)


# ---------------------------------------------------------------- image pixels (PIL)


def _image_tensor(pixels: np.ndarray, flip: bool) -> torch.Tensor:
    """[S, S, 3] uint8 -> [3, S, S] uint8, flipped left-right."""
    pixels = pixels[:, ::-1] if flip else pixels
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def image_rkrc(image: Image.Image, size: int, draw: RkrcDraw) -> torch.Tensor:
    """timm rkrc on a PIL RGB image: ResizeKeepRatio, CenterCropOrPad(reflect), flip -> [3, S, S] uint8."""
    rh, rw = rkrc_size(image.height, image.width, size, draw.f_h, draw.f_w)
    pixels = np.asarray(image.resize((rw, rh), pil_filter(draw.interpolation)))  # [rh, rw, 3]
    cp = center_crop_or_pad(rh, rw, size)
    if cp.pad_top or cp.pad_bottom or cp.pad_left or cp.pad_right:
        pad = ((cp.pad_top, cp.pad_bottom), (cp.pad_left, cp.pad_right), (0, 0))
        pixels = np.pad(pixels, pad, mode="reflect")
    return _image_tensor(pixels[cp.top : cp.top + size, cp.left : cp.left + size], draw.flip)


def image_rrc(image: Image.Image, size: int, draw: RrcDraw) -> torch.Tensor:
    """torchvision ``resized_crop`` on PIL (crop, then resize to S x S), then the flip."""
    box = (draw.left, draw.top, draw.left + draw.width, draw.top + draw.height)
    pixels = np.asarray(image.crop(box).resize((size, size), pil_filter(draw.interpolation)))
    return _image_tensor(pixels, draw.flip)


def image_center_crop(image: Image.Image, size: int, crop_pct: float, interpolation: str) -> torch.Tensor:
    """timm's eval transform on a PIL image: Resize(floor(S / crop_pct)), CenterCrop(S)."""
    rh, rw = center_crop_size(image.height, image.width, size, crop_pct)
    if (rh, rw) != (image.height, image.width):
        image = image.resize((rw, rh), pil_filter(interpolation))
    top, left = round((rh - size) / 2.0), round((rw - size) / 2.0)
    return _image_tensor(np.asarray(image.crop((left, top, left + size, top + size))), False)


def image_eval(image: Image.Image, size: int) -> torch.Tensor:
    """Patch-Seg (PATCHSEG.md section 2): largest centre square, PIL bilinear (antialiased) to S x S."""
    top, left, m = largest_center_square(image.height, image.width)
    box = (left, top, left + m, top + m)
    return _image_tensor(np.asarray(image.crop(box).resize((size, size), Image.Resampling.BILINEAR)), False)


def image_square(image: Image.Image, size: int) -> torch.Tensor:
    """The dense evaluations' input (Leopart, Hummingbird): the whole image, PIL bilinear
    (antialiased) to S x S, its aspect ratio not kept (torchvision ``Resize((S, S))`` on PIL)."""
    return _image_tensor(np.asarray(image.resize((size, size), Image.Resampling.BILINEAR)), False)


def _label_tensor(label: np.ndarray | None) -> torch.Tensor | None:
    return None if label is None else torch.from_numpy(label.astype(np.int64))


def apply_rkrc(image: Image.Image, label: np.ndarray | None, size: int, draw: RkrcDraw):
    """rkrc on an image and its label map: ([3, S, S] uint8, [S, S] int64 or None)."""
    return image_rkrc(image, size, draw), _label_tensor(None if label is None else label_rkrc(label, size, draw))


def apply_rrc(image: Image.Image, label: np.ndarray | None, size: int, draw: RrcDraw):
    """RandomResizedCrop on an image and its label map: ([3, S, S] uint8, [S, S] int64 or None)."""
    return image_rrc(image, size, draw), _label_tensor(None if label is None else label_rrc(label, size, draw))


def apply_eval(image: Image.Image, label: np.ndarray | None, size: int):
    """The eval recipe on an image and its label map: ([3, S, S] uint8, [S, S] int64 or None)."""
    return image_eval(image, size), _label_tensor(None if label is None else label_eval(label, size))


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


def window_rkrc(h: int, w: int, size: int, draw: RkrcDraw) -> Window:
    return _window_resized(h, w, rkrc_size(h, w, size, draw.f_h, draw.f_w), size, draw.interpolation, draw.flip)


def window_center_crop(h: int, w: int, size: int, crop_pct: float, interpolation: str) -> Window:
    return _window_resized(h, w, center_crop_size(h, w, size, crop_pct), size, interpolation, False)


def _window_resized(h: int, w: int, resized: tuple[int, int], size: int, interpolation: str, flip: bool) -> Window:
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


def _whole(crop: tuple[int, int, int, int], size: int, interpolation: str, flip: bool) -> Window:
    box = (0.0, 0.0, float(crop[2]), float(crop[3]))
    return Window(crop, box, (size, size), (0, 0, 0, 0), interpolation, flip)


def window_rrc(size: int, draw: RrcDraw) -> Window:
    return _whole((draw.top, draw.left, draw.height, draw.width), size, draw.interpolation, draw.flip)


def window_square(h: int, w: int, size: int) -> Window:
    return _whole((0, 0, h, w), size, "bilinear", False)


def window_eval(h: int, w: int, size: int) -> Window:
    top, left, m = largest_center_square(h, w)
    return _whole((top, left, m, m), size, "bilinear", False)


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """[B, 3, H, W] uint8 -> float32 (x - 255 mean) / (255 std): timm's prefetcher's formula, the
    masking kernel's (one definition, ``normalization_coefficients``), bit for bit."""
    from fastloc.kernels.patch_mask import normalization_coefficients

    offset, denom = normalization_coefficients(mean, std, torch.uint8)
    return (images.to(torch.float32) - offset.view(1, 3, 1, 1)) / denom.view(1, 3, 1, 1)
