"""Leopart's and NeCo's multi-crop views (2 global + 4 local crops per image), read once and cut on the device.

The reference (MkuuWaUjinga/leopart @ 7835701, src/leopart_transforms.py; NeCo's neco_transforms.py
is a copy) decodes every image and cuts each view with PIL on the host. Here the loader (DALI or the
torch twin) delivers one view per sample, the whole image squashed to the loader's L x L (the
"base", as ``recipes.Square``); each sample's crops and photometric numbers are drawn from
``sample_rng`` (both loaders and a resumed run draw the same) and travel as ``Batch.params``;
``cut_views`` makes every view of a batch on the device in a few batched ops.

Departures from the reference's PIL pipeline (each changes pixels, not the distribution of crops):
- a view is resampled from the squashed base by ``roi_align`` (bilinear; a downscale averages
  ceil(box / size) samples per output pixel) instead of PIL's antialiased resize of the source
  crop, and its outer half pixel reads the base just outside the box (PIL's crop stops at it);
- the colour jitter runs in float, without PIL's uint8 rounding after each op (its hue in
  torchvision's float HSV, not PIL's uint8 HSV);
- the blur is a true Gaussian (torchvision's kernel over 3 sigma_max) instead of PIL's
  box-approximated ``GaussianBlur``;
- the draws come from numpy generators, every box first, then each view's photometric numbers
  (the reference interleaves them per view, from torch's and Python's global generators);
- views are normalized with the loader's mean and std (the reference: ImageNet's);
- the overlap rule gives up with an error after ``MAX_TRIES`` draws of one crop (the reference
  would loop for ever).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torchvision.ops import roi_align

from fastloc.data.photometric import blur_kernel_size, colour_jitter, gaussian_blur, greyscale
from fastloc.data.recipes import Recipe, Square, rrc_box

RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's default aspect ratio range (the reference keeps it)
JITTER_P = 0.8  # RandomApply([ColorJitter], p=0.8)   leopart_transforms.py:63
BLUR_P = 0.5  # RandomApply([GaussianBlur], p=0.5)     leopart_transforms.py:66
MAX_TRIES = 10_000  # draws of one crop before the overlap rule gives up

# The layout of ``MultiCrop.params``: [B, V, PARAMS] float32, per view
BOX = slice(0, 4)  # x1, y1, x2, y2: the crop in [0, 1] of the source width and height
JITTER = 4  # 1.0: the colour jitter applies
FACTORS = slice(5, 9)  # brightness, contrast, saturation factors and the hue shift
ORDER = slice(9, 13)  # the jitter's op order: per slot an op id (0 brightness, 1 contrast, 2 saturation, 3 hue)
GREY = 13  # 1.0: greyscale
BLUR = 14  # 1.0: Gaussian blur
SIGMA = 15  # the blur's sigma in view pixels
PARAMS = 16


@dataclass(frozen=True)
class MultiCropDraw:
    """One sample's draws: the crops in source pixels and every view's row of ``params``."""

    boxes: tuple[tuple[int, int, int, int], ...]  # per view (top, left, height, width)
    params: np.ndarray  # [V, PARAMS] float32


def intersects(box: tuple[int, int, int, int], others: list[tuple[int, int, int, int]], threshold: int) -> bool:
    """The reference's test (leopart_transforms.py:93-106): the intersection area with each of
    ``others`` exceeds ``threshold``, computed in float32 as the reference's tensors are."""
    top, left, h, w = box
    for o_top, o_left, o_h, o_w in others:
        iw = max(min(left + w, o_left + o_w) - max(left, o_left), 0)
        ih = max(min(top + h, o_top + o_h) - max(top, o_top), 0)
        if not np.float32(iw) * np.float32(ih) > np.float32(threshold):
            return False
    return True


@dataclass(frozen=True, kw_only=True)
class MultiCrop(Recipe):
    """Leopart's LeopartTransforms (and NeCo's): per kind of crop (global, local) a count of
    RandomResizedCrops at a size, every crop overlapping every global one, each view jittered,
    greyed and blurred at random. The loader delivers the base (the whole image, squashed to its
    size, which the consumer picks larger than the global crops, e.g. twice); ``cut_views`` (or
    ``cut``) makes the views from it and ``Batch.params`` on the device. No label maps."""

    sizes: tuple[int, ...] = (224, 96)
    """Output side of each kind of crop: global first (NeCo's locals: 98)."""

    counts: tuple[int, ...] = (2, 4)
    """Crops of each kind."""

    scales: tuple[tuple[float, float], ...] = ((0.25, 1.0), (0.05, 0.25))
    """Each kind's range of the crop's area fraction (RandomResizedCrop's scale)."""

    min_intersection: float = 0.01
    """A crop's intersection with each global crop exceeds this fraction of the image (twice it between globals)."""

    jitter: float = 1.0
    """Colour jitter strength s: ColorJitter(0.8 s, 0.8 s, 0.8 s, 0.2 s), applied with p 0.8."""

    grey_p: float = 0.2
    """Probability of greyscale."""

    blur: float = 1.0
    """Blur strength b: a Gaussian of sigma U[0.1 b, 2 b], applied with p 0.5."""

    views_per_sample: ClassVar[int] = 1  # the base; the crops are cut from it on the device

    def __post_init__(self):
        check_multicrop(self)

    # ------------------------------------------------------------ what the views are

    @property
    def view_sizes(self) -> tuple[int, ...]:
        """The side of each view, in view order (the globals first)."""
        return tuple(size for size, n in zip(self.sizes, self.counts) for _ in range(n))

    @property
    def sigma_max(self) -> float:
        return 2.0 * self.blur

    # ------------------------------------------------------------ the host's draws

    def draw(self, rng: np.random.Generator, h: int, w: int) -> MultiCropDraw:
        """Every crop (``crop_boxes``), then per view 11 numbers, always all drawn: the jitter's gate,
        its op order (a permutation) and four factors, the greyscale gate, the blur's gate and sigma."""
        boxes = self.crop_boxes(rng, h, w)
        rows = np.zeros((len(boxes), PARAMS), np.float32)
        for row, (top, left, ch, cw) in zip(rows, boxes):
            row[BOX] = (left / w, top / h, (left + cw) / w, (top + ch) / h)
            row[JITTER:] = self.photometric(rng)
        rows.flags.writeable = False
        return MultiCropDraw(tuple(boxes), rows)

    def crop_boxes(self, rng: np.random.Generator, h: int, w: int) -> list[tuple[int, int, int, int]]:
        """(top, left, height, width) per view: RandomResizedCrop's parameters (``rrc_box``) and the
        reference's overlap rule (leopart_transforms.py:86-109): crop i > 0 is drawn again until its
        intersection with each global crop drawn so far exceeds int(w h min_intersection), twice
        that for a global crop."""
        kinds = [scale for scale, n in zip(self.scales, self.counts) for _ in range(n)]
        n_global = self.counts[0]
        boxes: list[tuple[int, int, int, int]] = []
        for i, scale in enumerate(kinds):
            box = rrc_box(rng, h, w, scale, RATIO)
            if i > 0:
                threshold = int((w * h) * self.min_intersection) * (2 if i < n_global else 1)
                tries = 1
                while not intersects(box, boxes[:n_global], threshold):
                    if tries == MAX_TRIES:
                        raise RuntimeError(
                            f"MultiCrop: crop {i} of a {w}x{h} image met no overlap > {threshold} px in {tries} draws"
                        )
                    box, tries = rrc_box(rng, h, w, scale, RATIO), tries + 1
            boxes.append(box)
        return boxes

    def photometric(self, rng: np.random.Generator) -> np.ndarray:
        """[11]: jitter gate, four factors, op order, grey gate, blur gate, sigma (the layout from
        JITTER on). The gates follow torchvision: RandomApply applies when u <= p, RandomGrayscale
        when u < p; a jitter or blur of strength 0 is off (torchvision's ColorJitter(0) is the identity)."""
        jitter_u = rng.random()
        order = rng.permutation(4)  # ColorJitter.get_params: torch.randperm(4)
        u = rng.random(4)
        s = self.jitter
        low = np.array([max(0.0, 1 - 0.8 * s)] * 3 + [-0.2 * s])  # _check_input's ranges (brightness: clipped at 0)
        high = np.array([1 + 0.8 * s] * 3 + [0.2 * s])
        grey_u, blur_u, sigma_u = rng.random(3)
        jitter_on = s > 0 and jitter_u <= JITTER_P
        blur_on = self.blur > 0 and blur_u <= BLUR_P
        sigma = 0.1 * self.blur + (2.0 * self.blur - 0.1 * self.blur) * sigma_u  # random.uniform(0.1 b, 2 b)
        return np.array([jitter_on, *(low + (high - low) * u), *order, grey_u < self.grey_p, blur_on, sigma])

    def params(self, draws: list[MultiCropDraw]) -> np.ndarray:
        """[B, V, PARAMS] float32: the layout above (BOX, JITTER, FACTORS, ORDER, GREY, BLUR, SIGMA)."""
        return np.stack([d.params for d in draws])

    # ------------------------------------------------------------ the base the loader delivers

    def window(self, h, w, size, draw):
        return Square().window(h, w, size, None)

    def image(self, image, size, draw):
        return Square().image(image, size, None)

    def label(self, label, size, draw):
        raise ValueError("MultiCrop makes no label maps: load its shards with LoaderConfig(labels=False)")

    # ------------------------------------------------------------ the device's views

    def cut(self, base: torch.Tensor, params: torch.Tensor, mean, std) -> list[torch.Tensor]:
        """``cut_views`` with this recipe's view sizes and blur."""
        return cut_views(base, params, self.view_sizes, mean, std, sigma_max=self.sigma_max)


def check_multicrop(recipe: MultiCrop) -> None:
    """One ValueError naming the field for a setting the reference refuses or that cannot be drawn."""

    def bad(field: str, rule: str) -> ValueError:
        return ValueError(f"MultiCrop.{field} {rule}, got {getattr(recipe, field)!r}")

    kinds = len(recipe.sizes)
    if kinds == 0 or len(recipe.counts) != kinds or len(recipe.scales) != kinds:
        raise ValueError(
            f"MultiCrop: sizes, counts and scales need one entry per kind of crop (global first), got "
            f"{len(recipe.sizes)}, {len(recipe.counts)} and {len(recipe.scales)}"
        )
    if not all(isinstance(s, int) and s > 0 for s in recipe.sizes):
        raise bad("sizes", "must be positive integers")
    if not all(isinstance(n, int) and n > 0 for n in recipe.counts):
        raise bad("counts", "must be positive integers")
    if not all(len(s) == 2 and 0 < s[0] <= s[1] <= 1 for s in recipe.scales):
        raise bad("scales", "must be (low, high) area fractions with 0 < low <= high <= 1")
    if not 0 < recipe.min_intersection < 1:
        raise bad("min_intersection", "must be in (0, 1)")
    needs = [recipe.min_intersection * (2 if k == 0 else 1) for k in range(kinds)]
    for k, (need, (_, high), n) in enumerate(zip(needs, recipe.scales, recipe.counts)):
        if (k > 0 or n > 1) and high <= need:
            raise bad("scales", f"[{k}][1] must exceed the overlap the crops need ({need:g} of the image)")
    if not 0 <= recipe.jitter <= 2.5:
        raise bad("jitter", "must be in [0, 2.5] (the hue shift 0.2 x jitter is at most 0.5)")
    if not 0 <= recipe.grey_p <= 1:
        raise bad("grey_p", "must be in [0, 1]")
    if not 0 <= recipe.blur < float("inf"):
        raise bad("blur", "must be a finite number >= 0")


# ---------------------------------------------------------------- on the device


def view_boxes(params: torch.Tensor) -> torch.Tensor:
    """[B, V, PARAMS] -> [B, V, 4]: each view's (x1, y1, x2, y2) in [0, 1] of the source width and height."""
    return params[..., BOX]


def cut_views(
    base: torch.Tensor,
    params: torch.Tensor,
    sizes: tuple[int, ...],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    *,
    sigma_max: float = 2.0,
) -> list[torch.Tensor]:
    """The views of a batch: ``base`` [B, 3, L, L] uint8 (the loader's images, normalize=False),
    ``params`` [B, V, PARAMS] (``Batch.params``), ``sizes`` one side per view -> V tensors
    [B, 3, s_v, s_v] float32 normalized with ``mean`` and ``std``. Per view: crop and resize in one
    ``roi_align`` (aligned, adaptive sampling), colour jitter, greyscale, Gaussian blur (a kernel
    fixed per view size, ``blur_kernel_size(sigma_max, s)``), normalize. Views of one size are
    made together."""
    if base.dtype != torch.uint8 or base.ndim != 4 or base.shape[1] != 3 or base.shape[2] != base.shape[3]:
        raise ValueError(f"cut_views: base must be [B, 3, L, L] uint8, got {tuple(base.shape)} {base.dtype}")
    if params.ndim != 3 or params.shape[0] != base.shape[0] or params.shape[2] != PARAMS:
        raise ValueError(
            f"cut_views: params must be [B={base.shape[0]}, V, {PARAMS}] (MultiCrop.params), got {tuple(params.shape)}"
        )
    if len(sizes) != params.shape[1]:
        raise ValueError(f"cut_views: {len(sizes)} sizes for {params.shape[1]} views")
    b, side = base.shape[0], base.shape[2]
    pixels = base.float() / 255.0  # [B, 3, L, L]
    params = params.to(pixels.device, torch.float32)
    shift, scale = (torch.tensor(v, dtype=torch.float32).to(pixels.device, non_blocking=True) for v in (mean, std))
    shift, scale = shift.view(1, 3, 1, 1), scale.view(1, 3, 1, 1)
    views: list[torch.Tensor | None] = [None] * len(sizes)
    for size in sorted(set(sizes)):
        ids = [v for v, s in enumerate(sizes) if s == size]
        n = len(ids)
        p = params[:, ids].reshape(b * n, PARAMS)  # [B n, P], sample-major
        owner = torch.arange(b, device=pixels.device, dtype=torch.float32).repeat_interleave(n)
        rois = torch.cat([owner[:, None], p[:, BOX] * side], dim=1)  # [B n, 5]: (sample, x1, y1, x2, y2)
        x = roi_align(pixels, rois, (size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        x = photometric(x, p, blur_kernel_size(sigma_max, size))
        x = ((x - shift) / scale).view(b, n, 3, size, size)
        for j, v in enumerate(ids):
            views[v] = x[:, j]
    return views


def photometric(images: torch.Tensor, p: torch.Tensor, kernel: int) -> torch.Tensor:
    """[N, 3, s, s] in [0, 1] and their params rows [N, PARAMS] -> jittered, greyed, blurred (the reference's order)."""
    images = colour_jitter(images, p[:, JITTER] > 0.5, p[:, FACTORS], p[:, ORDER].round().long())
    images = greyscale(images, p[:, GREY] > 0.5)
    return gaussian_blur(images, p[:, SIGMA], p[:, BLUR] > 0.5, kernel)
