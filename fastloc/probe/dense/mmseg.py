"""dinov3-ade20k's training recipe: the reference's mmseg-style pipeline (dinov3
eval/segmentation/transforms.py, make_segmentation_train_transforms) as a ``Recipe`` of the loaders.

Its draws come from ``sample_rng`` and look at the label map (the cat_max_ratio crop), and its
photometric distortion is torchvision's on the host: DALI cannot run it, so the loaders run it in
the torch twin (``Recipe.dali`` False). What it takes from dinov3's code rather than DINOv2's mmseg
config, and where it departs from both, is ``describe()`` and ``DIFFERENCES``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import functional as Fv

from fastloc.data.recipes import Recipe, View
from fastloc.probe.dense.data import VOID, LabelSpace
from fastloc.probe.dense.slide import short_side_size

RATIO_RANGE = (0.5, 2.0)  # config-ade20k-linear-training.yaml transforms.train.random_img_size_ratio_range
CAT_MAX_RATIO = 0.75  # transforms.py RandomCropWithLabel(cat_max_ratio=0.75)
CROP_CHECKS = 10  # RandomCropWithLabel.forward: ``for _ in range(10)``
FLIP_P = 0.5  # config transforms.train.flip_prob
# transforms.py PhotoMetricDistortion's defaults (make_segmentation_train_transforms passes none)
BRIGHTNESS_DELTA, CONTRAST_RANGE, SATURATION_RANGE, HUE_RANGE = 32, (0.5, 1.5), (0.5, 1.5), (-0.5, 0.5)

DIFFERENCES = (  # from dinov3's transforms.py, for the protocol dict
    "train_augmentation: draws from sample_rng(seed, epoch, sample) (the reference: np.random seeded per worker)",
    "train_augmentation: a sample that does not decode is replaced by the next of the epoch (the reference stops)",
    "train_augmentation: the base short side is --short-side, the evaluation's (the reference: both img_size 512)",
)


def describe(short_side: int, crop: int) -> dict:
    """The pipeline and its constants, for the protocol dict."""
    return {
        "source": "dinov3 eval/segmentation/transforms.py make_segmentation_train_transforms",
        "resize": f"short side int({short_side} x U{RATIO_RANGE}), long side int(x + 0.5), aspect kept; "
        "image PIL bilinear, labels torch nearest; no long-side cap",
        "labels": "reduce_zero_label before the crop: 0 and void ignored",
        "crop": f"{crop} x {crop}, cat_max_ratio {CAT_MAX_RATIO} over non-void pixels, {CROP_CHECKS} checks, "
        "then the 11th draw unchecked",
        "flip": FLIP_P,
        "photometric": f"brightness +U(-{BRIGHTNESS_DELTA}, {BRIGHTNESS_DELTA}), contrast x U{CONTRAST_RANGE} "
        f"(before or after, mode 0.5), torchvision adjust_saturation U{SATURATION_RANGE}, adjust_hue "
        f"U{HUE_RANGE}; each p 0.5",
        "pad": f"bottom/right to {crop}: image 0 after normalization, labels void",
        "not_dinov2_mmseg": "dinov3's code, not DINOv2's mmseg config: no 2048 long-side cap, torch-nearest "
        "labels, torchvision saturation (grey blend) and hue (U(-0.5, 0.5) of the circle, not OpenCV HSV +-18/180)",
    }


# --------------------------------------------------------------------------- geometry


def train_size(height: int, width: int, short_side: int, ratio: float) -> tuple[int, int]:
    """FixedSideResize with a random ratio: the short side int(short_side x ratio), the long side
    int(short x long / short_in + 0.5); (h, w)."""
    return short_side_size(height, width, int(short_side * ratio))


def resize_label(label: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Label [H, W] int64 by F.interpolate nearest (torchvision Resize on the Mask tensor: float32,
    index floor(i x in / out)) to size (h, w); the image goes by PIL bilinear (``Mmseg.image``)."""
    if tuple(size) == tuple(label.shape):
        return label
    return F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].long()


def crop_ok(label: torch.Tensor, max_ratio: float = CAT_MAX_RATIO) -> bool:
    """mmseg's test: more than one non-void class, the largest under ``max_ratio`` of the non-void pixels."""
    _, counts = torch.unique(label[label != VOID], return_counts=True)
    return len(counts) > 1 and float(counts.max()) / float(counts.sum()) < max_ratio


def draw_offset(rng: np.random.Generator, height: int, width: int, crop: int) -> tuple[int, int]:
    """get_crop_bbox: (top, left), each uniform in [0, max(side - crop, 0)]."""
    return int(rng.integers(0, max(height - crop, 0) + 1)), int(rng.integers(0, max(width - crop, 0) + 1))


def choose_crop(rng: np.random.Generator, label: torch.Tensor, crop: int) -> tuple[int, int]:
    """RandomCropWithLabel: a first offset, then up to 10 checks, each failed one replaced by a new
    draw; after 10 failures the 11th draw is kept unchecked (the reference's loop)."""
    h, w = label.shape
    offset = draw_offset(rng, h, w, crop)
    for _ in range(CROP_CHECKS):
        if crop_ok(label[offset[0] : offset[0] + crop, offset[1] : offset[1] + crop]):
            break
        offset = draw_offset(rng, h, w, crop)
    return offset


# --------------------------------------------------------------------------- PhotoMetricDistortion


@dataclass(frozen=True)
class Photometric:
    """One sample's PhotoMetricDistortion draws; None: that step is skipped (its p = 0.5 gate)."""

    brightness: float | None  # delta added, U(-32, 32)
    contrast_first: bool  # mode == 1: contrast before saturation and hue, else after
    contrast: float | None  # alpha, U(0.5, 1.5)
    saturation: float | None  # adjust_saturation factor, U(0.5, 1.5)
    hue: float | None  # adjust_hue factor, U(-0.5, 0.5)


def draw_gated(rng: np.random.Generator, low: float, high: float) -> float | None:
    """``if np.random.randint(2): np.random.uniform(low, high)``."""
    return float(rng.uniform(low, high)) if rng.integers(2) else None


def draw_photometric(rng: np.random.Generator) -> Photometric:
    """The draws in the reference's order: brightness, mode, contrast (mode 1), saturation, hue,
    contrast (mode 0)."""
    brightness = draw_gated(rng, -BRIGHTNESS_DELTA, BRIGHTNESS_DELTA)
    first = bool(rng.integers(2))
    contrast = draw_gated(rng, *CONTRAST_RANGE) if first else None
    saturation, hue = draw_gated(rng, *SATURATION_RANGE), draw_gated(rng, *HUE_RANGE)
    if not first:
        contrast = draw_gated(rng, *CONTRAST_RANGE)
    return Photometric(brightness, first, contrast, saturation, hue)


def convert(pixels: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """PhotoMetricDistortion.convert: float32 x alpha + beta, clipped to [0, 255], truncated to uint8."""
    return np.clip(pixels.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def torchvision_op(pixels: np.ndarray, op, factor: float) -> np.ndarray:
    """A torchvision colour op on [H, W, 3] uint8, as the reference calls it (CHW uint8 tensor)."""
    return op(torch.tensor(pixels).permute(2, 0, 1), factor).permute(1, 2, 0).numpy()


def photometric(pixels: np.ndarray, draw: Photometric) -> np.ndarray:
    """[H, W, 3] uint8 -> [H, W, 3] uint8: PhotoMetricDistortion.forward with ``draw``."""
    if draw.brightness is not None:
        pixels = convert(pixels, beta=draw.brightness)
    if draw.contrast_first and draw.contrast is not None:
        pixels = convert(pixels, alpha=draw.contrast)
    if draw.saturation is not None:
        pixels = torchvision_op(pixels, Fv.adjust_saturation, draw.saturation)
    if draw.hue is not None:
        pixels = torchvision_op(pixels, Fv.adjust_hue, draw.hue)
    if not draw.contrast_first and draw.contrast is not None:
        pixels = convert(pixels, alpha=draw.contrast)
    return pixels


# --------------------------------------------------------------------------- the recipe


@dataclass(frozen=True)
class MmsegDraw:
    """One sample's draws: the resized size (h, w), the crop's offset, the flip, the photometric."""

    resized: tuple[int, int]
    top: int
    left: int
    flip: bool
    photometric: Photometric


@dataclass(frozen=True, kw_only=True)
class Mmseg(Recipe):
    """Resize (short side int(short_side x U(0.5, 2))), cat_max_ratio crop of the loader's size,
    flip, PhotoMetricDistortion, normalize, pad (image 0, label VOID). Labels come out mapped by
    ``labels`` (reduce_zero_label: VOID); the draws are the reference's, in its order."""

    dali = False  # torchvision's photometric distortion: the torch twin runs it
    labels: LabelSpace
    short_side: int

    def views(self, rng, h, w, size, label):
        label = self.labels.map(torch.from_numpy(label.astype(np.int64)))  # reduce_zero_label, VOID
        resized = train_size(h, w, self.short_side, rng.uniform(*RATIO_RANGE))  # ratio: random_sample() x span + min
        label = resize_label(label, resized)
        top, left = choose_crop(rng, label, size)
        label = label[top : top + size, left : left + size]
        flip = bool(rng.random() < FLIP_P)  # MaybeApplyImageLabel(hflip): np.random.rand() < 0.5
        label = label.flip(-1) if flip else label
        pad = (0, size - label.shape[1], 0, size - label.shape[0])
        draw = MmsegDraw(resized, top, left, flip, draw_photometric(rng))
        return (View(None, F.pad(label, pad, value=VOID).numpy(), draw),)

    def image(self, image, size, draw):
        """[3, size, size] uint8: resized, cropped, flipped, distorted; the padding is ``finish``'s."""
        h, w = draw.resized
        if (h, w) != (image.height, image.width):
            image = image.resize((w, h), Image.Resampling.BILINEAR)
        pixels = np.asarray(image)[draw.top : draw.top + size, draw.left : draw.left + size]  # [h, w, 3] uint8
        pixels = photometric(np.ascontiguousarray(pixels[:, ::-1] if draw.flip else pixels), draw.photometric)
        chw = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))
        return F.pad(chw, (0, size - chw.shape[2], 0, size - chw.shape[1]))

    def finish(self, images, draws):
        """PadTensor: the padding is 0 after normalization."""
        for image, draw in zip(images, draws):
            h, w = (min(n - o, image.shape[-1]) for n, o in zip(draw.resized, (draw.top, draw.left)))
            image[:, h:] = 0
            image[:, :, w:] = 0
        return images
