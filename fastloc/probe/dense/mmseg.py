"""dinov3-ade20k's training samples: the reference's mmseg-style pipeline, per sample, from the shards.

facebookresearch/dinov3 dinov3/eval/segmentation/transforms.py (``make_segmentation_train_transforms``
as configs/config-ade20k-linear-training.yaml sets it: img_size 512, ratio range (0.5, 2.0), crop
512, flip 0.5, reduce_zero_label): the short side resized to int(512 x U(0.5, 2)) (FixedSideResize:
image PIL bilinear, label torch nearest), label 0 void (here LabelSpace: VOID is its 255), a crop
with cat_max_ratio 0.75 (RandomCropWithLabel: 10 checks, then the 11th draw kept unchecked, as
mmseg's loop), flip, PhotoMetricDistortion (brightness, contrast, saturation, hue; each p 0.5),
normalize, padding to the crop (image 0, label void). All randomness comes from ``sample_rng(seed, epoch, g)`` and the
epoch order from ``EpochPlan``: a seed gives one run, whatever the number of workers.

dinov3's code departs from DINOv2's mmseg config (Resize img_scale (2048, 512), mmseg's
PhotoMetricDistortion), and is followed here: no 2048 cap on the long side (equal wherever the long
side stays under 4x the short one), labels resized by torch's nearest (floor(i x in / out)), not
PIL's; saturation and hue by torchvision's adjust_saturation (a blend with the grey image) and
adjust_hue with a factor U(-0.5, 0.5) of the whole hue circle, not OpenCV HSV with a hue delta of 18
of 180. Differences from dinov3: the base short side is --short-side (the reference's train and
eval img_size, both 512); the draws come from sample_rng, not np.random seeded per worker; a sample
that does not decode is replaced by the next of the epoch's order (the reference stops).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import functional as Fv

from fastloc.data.batch import Batch
from fastloc.data.order import EpochPlan, candidates
from fastloc.data.shards import ShardError, ShardSet
from fastloc.data.transforms import normalize, sample_rng
from fastloc.probe.dense.data import VOID, LabelSpace
from fastloc.probe.dense.slide import read_sample, short_side_size

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


def resize_pair(image: Image.Image, label: torch.Tensor, size: tuple[int, int]) -> tuple[Image.Image, torch.Tensor]:
    """Image PIL bilinear (torchvision Resize on PIL), label [H, W] int64 by F.interpolate nearest
    (torchvision Resize on the Mask tensor: float32, index floor(i x in / out)) to size (h, w)."""
    h, w = size
    if (h, w) == (image.height, image.width):
        return image, label
    image = image.resize((w, h), Image.Resampling.BILINEAR)
    label = F.interpolate(label[None, None].float(), size=(h, w), mode="nearest")[0, 0].long()
    return image, label


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


def pad_pair(image: torch.Tensor, label: torch.Tensor, crop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PadTensor at the bottom and right to crop x crop: the normalized image with 0, the label with VOID."""
    h, w = label.shape
    pad = (0, crop - w, 0, crop - h)
    return F.pad(image, pad, value=0.0), F.pad(label, pad, value=VOID)


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


# --------------------------------------------------------------------------- one sample


def augment(
    image: Image.Image, label: torch.Tensor, rng: np.random.Generator, short_side: int, crop: int, mean, std
) -> tuple[torch.Tensor, torch.Tensor]:
    """(PIL RGB, label [H, W] int64 with VOID) -> (image [3, crop, crop] float32, label [crop, crop]
    int64 with VOID): resize, crop, flip, photometric distortion, normalize, pad."""
    ratio = rng.uniform(*RATIO_RANGE)  # np.random.random_sample() x (max - min) + min
    image, label = resize_pair(image, label, train_size(image.height, image.width, short_side, ratio))
    top, left = choose_crop(rng, label, crop)
    pixels = np.asarray(image)[top : top + crop, left : left + crop]  # [h, w, 3] uint8
    label = label[top : top + crop, left : left + crop]
    if rng.random() < FLIP_P:  # MaybeApplyImageLabel(hflip): np.random.rand() < 0.5
        pixels, label = pixels[:, ::-1], label.flip(-1)
    pixels = photometric(np.ascontiguousarray(pixels), draw_photometric(rng))
    chw = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))
    return pad_pair(normalize(chw[None], mean, std)[0], label.contiguous(), crop)


class TrainSamples(Dataset):
    """A split's training samples: item (epoch, position in the plan's share) -> (image [3, crop,
    crop] float32, label [crop, crop] int64 with VOID, valid, sample index). A sample that does not
    read is replaced by the next one of the share (valid False)."""

    def __init__(self, shards: ShardSet, plan: EpochPlan, labels: LabelSpace, short_side: int, crop: int, mean, std):
        self.shards, self.plan, self.labels = shards, plan, labels
        self.short_side, self.crop, self.mean, self.std = short_side, crop, tuple(mean), tuple(std)

    def __len__(self) -> int:
        return self.shards.num_samples

    def sample(self, epoch: int, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, stored = read_sample(self.shards, g)
        label = self.labels.map(torch.from_numpy(stored.astype(np.int64)))  # reduce_zero_label, VOID
        rng = sample_rng(self.plan.seed, epoch, g)
        return augment(image, label, rng, self.short_side, self.crop, self.mean, self.std)

    def __getitem__(self, item: tuple[int, int]):
        epoch, position = item
        share, _ = self.plan.share(epoch)
        for k in candidates(len(share), position):
            try:
                return (*self.sample(epoch, int(share[k])), k == position, int(share[k]))
            except ShardError as exc:
                error = exc
        raise ShardError(f"{self.shards.root}: no sample of epoch {epoch} reads ({error})")


class EpochBatches:
    """The batch sampler: batch b of the current epoch is [(epoch, p) for p in the plan's positions(b)]."""

    def __init__(self, plan: EpochPlan):
        self.plan, self.epoch = plan, 0

    def __len__(self) -> int:
        return len(self.plan)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for b in range(len(self.plan)):
            yield [(self.epoch, p) for p in self.plan.positions(b)]


def collate(samples) -> Batch:
    images, labels, valid, index = zip(*samples)
    return Batch(
        images=torch.stack(images),  # [B, 3, crop, crop]
        labels=torch.stack(labels),  # [B, crop, crop]
        valid=torch.tensor(valid),
        index=torch.tensor(index, dtype=torch.int64),
    )


class TrainLoader:
    """Epochs of full, shuffled batches (EpochPlan's order, drop_last); each iteration is the next epoch."""

    def __init__(self, samples: TrainSamples, workers: int):
        self.batches = EpochBatches(samples.plan)
        self.loader = DataLoader(
            samples, batch_sampler=self.batches, num_workers=workers, collate_fn=collate, persistent_workers=workers > 0
        )
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Batch]:
        self.batches.epoch = self.epoch  # read by the sampler in this process, as the workers are fed
        yield from self.loader
        self.epoch += 1

    def close(self) -> None:
        self.loader = None  # drops the workers


def train_loader(
    shards: ShardSet, labels: LabelSpace, batch: int, seed: int, short_side: int, crop: int, mean, std, workers: int
) -> TrainLoader:
    """dinov3-ade20k's training batches: Batch(images [B, 3, crop, crop], labels [B, crop, crop] with VOID)."""
    plan = EpochPlan(num_samples=shards.num_samples, batch_size=batch, seed=seed, shuffle=True, drop_last=True)
    return TrainLoader(TrainSamples(shards, plan, labels, short_side, crop, mean, std), workers)
