"""Loader options: the shard set, the recipe, the order, which loader. Where it runs (rank, world
size) comes from the runtime: ``make_loader(cfg, placement)``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fastloc.data.recipes import Recipe, Rkrc
from fastloc.data.superpixels import Felzenszwalb
from fastloc.shard.encode import MAX_PIXELS_DEFAULT

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True, kw_only=True)
class LoaderConfig:
    """What to read and how: one split of a shard set, batched and transformed."""

    shards: Path
    """The split folder (holding manifest.json), e.g. shards/synthetic/train."""

    batch_size: int = 64
    """Samples per batch (per rank)."""

    size: int = 224
    """Output side S in pixels."""

    recipe: Recipe = field(default_factory=Rkrc)
    """What is done to each sample (``recipes.py``): MaskEmbed's rkrc by default."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    """The backbone's normalization mean (in [0, 1] units)."""

    std: tuple[float, float, float] = IMAGENET_STD
    """The backbone's normalization std (in [0, 1] units)."""

    normalize: bool = True
    """Normalize to float32; False leaves uint8 images for the fused masking kernel."""

    labels: bool = True
    """Decode `seg.png` into Batch.labels when the shards have label maps."""

    captions: bool = False
    """Read each sample's captions (its `txt`, one a line) into Batch.captions; the shards must
    have them (``python -m fastloc.shard coco --captions``)."""

    one_caption: bool = False
    """With captions: each sample's Batch.captions entry is one line, drawn per (seed, epoch,
    sample) on the host (a resumed epoch draws the same); a sample without a caption is replaced."""

    superpixels: Felzenszwalb | None = None
    """Batch.labels holds each sample's Felzenszwalb segment ids (``superpixels.py``) instead of
    its label map, cropped as the image; the host stage decodes the JPEG for them (SegCLIP)."""

    shuffle: bool = True
    """Shuffle samples; the order depends only on (seed, epoch)."""

    seed: int = 0
    """Seed of the order and of the train recipe's random parameters."""

    drop_last: bool = True
    """Training: each rank's last incomplete batch is dropped. False (evaluation): the epoch is
    cycled to fill every batch on every rank, the repeats marked not valid, so each sample counts once."""

    loader: Literal["auto", "gpu", "cpu"] = "auto"
    """gpu = DALI on the GPU; cpu = the torch twin (PIL in DataLoader workers); auto = gpu when CUDA is
    present. A recipe DALI cannot run (``Recipe.dali`` False) takes the torch twin."""

    workers: int = 4
    """Host worker processes that read, check and label the samples (and, in the torch loader, decode them)."""

    threads: int = 4
    """DALI CPU threads (the DALI loader's CPU operators and nvJPEG's host-side decoding)."""

    max_pixels: int = MAX_PIXELS_DEFAULT
    """A sample whose JPEG header claims more pixels than this is replaced as unusable."""


@dataclass(frozen=True, kw_only=True)
class Placement:
    """Where a loader runs: this process's share of every epoch. ``fastloc.runtime.Runtime`` is one."""

    rank: int = 0
    world_size: int = 1


SOLO = Placement()  # one process
