"""Loader options: the shard set, the transform recipe, the order, the device."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fastloc.shard.encode import MAX_PIXELS_DEFAULT

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True, kw_only=True)
class TrainRecipe:
    """MaskEmbed's augmentation (timm ``rkrc``, MASKEMBED.md section 9), or RandomResizedCrop.

    rkrc, for an H x W image and target size S: r = min(H, W) / S; with probability ``zoom_p``
    f = 1 / sqrt(u), u ~ U(scale), else f = 1; with probability ``aspect_p`` s = sqrt(exp(U(ln
    ratio))), f_h = f / s, f_w = f * s, else f_h = f_w = f; resize to (round(H f_h / r),
    round(W f_w / r)) with bilinear or bicubic drawn uniformly per image (labels: nearest); centre
    crop to S x S at offset round((size - S) / 2), reflect-padding a side shorter than S by
    floor(d/2) before and ceil(d/2) after; horizontal flip with probability ``flip_p``.
    """

    kind: Literal["rkrc", "rrc"] = "rkrc"
    """rkrc = MaskEmbed's centred resize-keep-ratio crop; rrc = torchvision RandomResizedCrop."""

    scale: tuple[float, float] = (0.08, 1.0)
    """rkrc: range of u (zoom f = 1/sqrt(u)); rrc: range of the crop's area fraction."""

    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """rkrc: range of the aspect jitter r (log-uniform; s = sqrt(r)); rrc: aspect ratio range."""

    zoom_p: float = 0.5
    """rkrc: probability of the random zoom."""

    aspect_p: float = 0.5
    """rkrc: probability of the aspect jitter."""

    flip_p: float = 0.5
    """Probability of a horizontal flip."""

    interpolations: tuple[str, ...] = ("bilinear", "bicubic")
    """Image interpolations, one drawn uniformly per image (label maps always use nearest)."""


@dataclass(frozen=True, kw_only=True)
class EvalRecipe:
    """Patch-Seg's deterministic preprocessing: the largest centre square (left = (W - m) // 2,
    top = (H - m) // 2, m = min(H, W)), resized to S x S: bilinear with antialias for the image,
    nearest for the label map."""


@dataclass(frozen=True, kw_only=True)
class CenterCropRecipe:
    """timm's eval transform (MaskEmbed's validation and sigma): resize the short side to
    floor(S / crop_pct) with ``interpolation`` (torchvision's Resize: the long side truncated),
    then centre-crop S x S at round((side - S) / 2) (half to even). Labels: nearest."""

    crop_pct: float = 0.875
    """The backbone's crop_pct (timm's pretrained_cfg), in (0, 1]."""

    interpolation: str = "bicubic"
    """The backbone's interpolation (timm's pretrained_cfg)."""


@dataclass(frozen=True, kw_only=True)
class LoaderConfig:
    """What to read and how: one split of a shard set, batched and transformed."""

    shards: Path
    """The split folder (holding manifest.json), e.g. shards/synthetic/train."""

    batch_size: int = 64
    """Samples per batch (per rank)."""

    size: int = 224
    """Output side S in pixels."""

    recipe: Literal["train", "eval", "center-crop", "square"] = "train"
    """train = MaskEmbed augmentation (random); eval = Patch-Seg centre square; center-crop = timm's
    eval transform (MaskEmbed validation); square = the whole image resized to S x S, its aspect
    ratio not kept (Leopart's and Hummingbird's evaluations). The last three are deterministic."""

    train: TrainRecipe = field(default_factory=TrainRecipe)
    """Parameters of the train recipe."""

    center_crop: CenterCropRecipe = field(default_factory=CenterCropRecipe)
    """Parameters of the center-crop recipe."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    """The backbone's normalization mean (in [0, 1] units)."""

    std: tuple[float, float, float] = IMAGENET_STD
    """The backbone's normalization std (in [0, 1] units)."""

    normalize: bool = True
    """Normalize to float32; False leaves uint8 images for the fused masking kernel."""

    labels: bool = True
    """Decode `seg.png` into Batch.labels when the shards have label maps."""

    shuffle: bool = True
    """Shuffle samples; the order depends only on (seed, epoch)."""

    seed: int = 0
    """Seed of the order and of the train recipe's random parameters."""

    rank: int = 0
    """This process's rank (its share of every epoch)."""

    world_size: int = 1
    """Number of ranks sharing every epoch."""

    drop_last: bool = True
    """Training: each rank's last incomplete batch is dropped. False (evaluation): the epoch is
    cycled to fill every batch on every rank, the repeats marked not valid, so each sample counts once."""

    device: Literal["auto", "gpu", "cpu"] = "auto"
    """gpu = DALI on the GPU; cpu = the torch twin (PIL in DataLoader workers); auto = gpu when CUDA is present."""

    workers: int = 4
    """Host worker processes that read, check and label the samples (and, in the torch loader, decode them)."""

    threads: int = 4
    """DALI CPU threads (the DALI loader's CPU operators and nvJPEG's host-side decoding)."""

    max_pixels: int = MAX_PIXELS_DEFAULT
    """A sample whose JPEG header claims more pixels than this is replaced as unusable."""
