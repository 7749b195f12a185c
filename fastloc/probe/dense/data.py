"""The dense protocols' inputs: the opened run (``open_run``: checks, device, splits, label space,
the backbone at the protocol's size), the feature cache of an evaluation split, and the live
loaders of augmented training images.

The evaluation split goes through the ``square`` recipe (the whole image resized to S x S, as
Leopart's and Hummingbird's evaluations do) once per backbone, split and size; its patch tokens
and its label maps at S x S are cached (``fastloc.probe.cache``) and read back by every protocol.
Labels become int64 with -1 for void (the manifest's ``ignore`` value, and 0 under
``zero_is_ignore``), so that classes and void never collide, whatever the dtype.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fastloc.data.config import SOLO, LoaderConfig
from fastloc.data.loader import make_loader
from fastloc.data.recipes import Recipe, Square
from fastloc.data.shards import ShardSet, open_shards
from fastloc.models.registry import ImageConfig, fingerprint, image_config
from fastloc.probe.backbone import load_backbone
from fastloc.probe.cache import (
    CachedSplit,
    build_from_loader,
    cache_key,
    cache_path,
    feature_storage,
    image_key,
    reuse_or_build,
)
from fastloc.probe.data import VAL_SPLITS, check_labelled, check_same_classes, split_folder
from fastloc.probe.dense.config import DenseConfig
from fastloc.probe.report import checked_folders
from fastloc.probe.run import eval_recipe, feature_dtype, frozen_encoder, seed_everything
from fastloc.runtime import setup

VOID = -1  # the void label inside the dense protocols


@dataclass(frozen=True)
class LabelSpace:
    """The classes a protocol scores, and how a split's stored labels map onto them."""

    names: list[str | None]
    ignore: int | None  # the manifest's void value (VOC: 255), or None
    zero_is_ignore: bool

    @classmethod
    def of(cls, data: DenseData, zero_is_ignore: bool) -> LabelSpace:
        label = data.val.manifest.get("label") or {}
        names = list(data.classes)
        if zero_is_ignore:
            names = names[1:]
        if not names:
            raise ValueError(f"{data.val.root}: no classes left to score")
        return cls(names, label.get("ignore"), zero_is_ignore)

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def map(self, labels: torch.Tensor) -> torch.Tensor:
        """Stored labels (any integer dtype) -> int64 class ids, VOID for void."""
        labels = labels.long()
        void = labels == self.ignore if self.ignore is not None else torch.zeros_like(labels, dtype=torch.bool)
        if self.zero_is_ignore:
            void |= labels == 0
            labels = labels - 1
        return torch.where(void, torch.full_like(labels, VOID), labels)


@dataclass
class Backbone:
    """The frozen backbone at the protocol's input size."""

    model: torch.nn.Module
    image: ImageConfig
    digest: str

    @property
    def dim(self) -> int:
        return int(self.model.num_features)


def dense_backbone(cfg: DenseConfig, device: torch.device) -> Backbone:
    """``cfg.backbone`` frozen, its position embedding resampled to ``cfg.image_size`` (timm's
    ``set_input_size``); the size must be a multiple of the patch size."""
    model = load_backbone(cfg.backbone, cfg.weights, cfg.skip_blocks)
    patch = image_config(model).patch_size
    if cfg.image_size < patch or cfg.image_size % patch:
        raise ValueError(
            f"{cfg.SIZE_FLAG} {cfg.image_size}: must be a positive multiple of {cfg.backbone}'s patch {patch}"
        )
    if image_config(model).size != cfg.image_size:
        model.set_input_size(img_size=cfg.image_size)
    model = model.to(device).eval().requires_grad_(False)
    return Backbone(model, image_config(model), fingerprint(model))


@dataclass
class DenseRun:
    """An opened protocol run: its device, splits, label space and frozen backbone, and the
    seconds of each stage it timed (result.json's timings)."""

    device: torch.device
    data: DenseData
    labels: LabelSpace
    backbone: Backbone
    timings: dict[str, float] = field(default_factory=dict)  # seconds by stage (fastloc.probe.run.timed)


def open_run(cfg: DenseConfig) -> DenseRun:
    """Every check before a protocol's work, in order: option values, one process and its device
    (everything seeded from ``cfg.seed``), the output folders, the data, the run directory and the
    results CSV; then the label space and the backbone at the protocol's size. A refused run leaves
    nothing behind. A protocol's work is one device's (its global batch, its k-means, its bank), so
    under torchrun it refuses before any process group is made."""
    from fastloc.probe.dense import report

    cfg.validate()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(
            f"python -m fastloc.probe {cfg.protocol_name()} runs in one process: start it without torchrun"
        )
    device = setup(cfg.device, flag="--device").device
    seed_everything(cfg.seed)
    with checked_folders(*cfg.folders()):
        data = open_dense_data(cfg)
        report.check_outputs(cfg, data.dataset)
    return DenseRun(device, data, LabelSpace.of(data, cfg.zero_is_ignore), dense_backbone(cfg, device))


def patch_encoder(backbone: Backbone, precision: str, device: torch.device):
    """Images [B, 3, S, S] -> last-block patch tokens after the final norm [B, g * g, D] (the prefix
    tokens dropped), in the cache's dtype: Patch-Seg's frozen encoder, its prefix cut."""
    encode, prefix = frozen_encoder(backbone.model, precision, device), backbone.image.prefix_tokens
    return lambda images: encode(images)[:, prefix:]


def resize_nearest(maps: torch.Tensor, size: int) -> torch.Tensor:
    """[B, H, W] integer maps (labels with VOID, cluster ids) -> [B, size, size] int64 by
    F.interpolate mode="nearest" on floats (floor(i x in / out)), as Leopart resizes masks."""
    return F.interpolate(maps[:, None].float(), size=(size, size), mode="nearest")[:, 0].long()


def loader_config(split, image: ImageConfig, batch: int, cfg: DenseConfig, **kw) -> LoaderConfig:
    """A split in the ``square`` recipe, in order, every sample once (the evaluation's loader):
    Patch-Seg's eval loader with the whole image resized; ``kw`` overrides (a training recipe, shuffling)."""
    base = eval_recipe(split, image, batch)
    return replace(base, **{"recipe": Square(), "seed": cfg.seed, "loader": cfg.loader, "workers": cfg.workers, **kw})


def train_loader(split, image: ImageConfig, batch: int, cfg: DenseConfig, recipe: Recipe, **kw):
    """Augmented, shuffled training batches (labels included): the live loader, epoch by epoch."""
    return make_loader(loader_config(split, image, batch, cfg, recipe=recipe, shuffle=True, drop_last=True, **kw), SOLO)


def label_storage(split) -> np.dtype:
    """The numpy dtype that holds the split's stored labels (uint8, or int32 for wider ones)."""
    return np.dtype(np.uint8) if split.manifest["label"]["dtype"] == "uint8" else np.dtype(np.int32)


def eval_split(cfg: DenseConfig, split, backbone: Backbone, device: torch.device, main: bool = True) -> CachedSplit:
    """The split's cache of patch tokens [N, g * g, D] and square label maps [N, S, S]: reused when
    it is there, else built (every sample through the ``square`` recipe, in order)."""
    image = backbone.image
    dtype = str(feature_dtype(cfg.precision))[6:]
    key = cache_key(backbone.digest, split.manifest, image_key(image), cfg.skip_blocks, dtype)
    key["recipe"] = "square"
    key["arrays"] = "patch-tokens+labels"
    n, side, grid = split.num_samples, image.size, image.grid
    storage = label_storage(split)
    shapes = {"features": (n, grid * grid, backbone.dim), "labels": (n, side, side), "usable": (n,)}
    dtypes = {"features": feature_storage(cfg.precision), "labels": storage, "usable": np.bool_}

    def targets(labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"labels": labels.to(torch.uint8 if storage == np.uint8 else torch.int32)}

    def build() -> CachedSplit:
        loader = make_loader(loader_config(split, image, cfg.eval_batch_size, cfg), SOLO)
        encode = patch_encoder(backbone, cfg.precision, device)
        return build_from_loader(path, key, loader, encode, shapes, dtypes, targets, main)

    path = cache_path(cfg.cache_dir, key)
    return reuse_or_build(path, key, build, main, reuse=cfg.cache)


def eval_batches(
    cache: CachedSplit, batch: int, device: torch.device, labels: LabelSpace, drop_last: bool = False
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(patch tokens [B, g * g, D] float32, labels [B, S, S] int64 with VOID) of the usable
    samples in order; ``drop_last`` leaves out the last partial batch (Leopart's loader)."""
    rows = np.flatnonzero(np.asarray(cache.usable))
    count = len(rows) // batch if drop_last else math.ceil(len(rows) / batch)
    for b in range(count):
        index = rows[b * batch : (b + 1) * batch]
        features, stored = cache.rows(index)
        yield (
            features.to(device, non_blocking=True).float(),
            labels.map(stored["labels"].to(device, non_blocking=True)),
        )


@dataclass(frozen=True)
class DenseData:
    """A protocol's splits: the evaluation split, and the training split when it trains (None for
    overcluster, which needs none)."""

    val: ShardSet
    train: ShardSet | None

    @property
    def dataset(self) -> str:
        return self.val.manifest["dataset"]

    @property
    def classes(self) -> list[str | None]:
        return list(self.val.manifest["classes"])


def open_dense_data(cfg: DenseConfig) -> DenseData:
    """The evaluation split (--val-split, else val or validation) and, for a protocol that trains,
    its training split (--train-split, else the first of ``cfg.train_splits()`` there: Leopart and
    Hummingbird train on VOC's trainaug)."""
    train = cfg.train_splits()
    root = Path(cfg.data)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such shard set (python -m fastloc.shard converts one)")
    val = open_shards(split_folder(root, cfg.val_split, VAL_SPLITS, "validation"))
    check_labelled(val)
    if train is None:
        return DenseData(val, None)
    train_set = open_shards(split_folder(root, cfg.train_split, train, "training"))
    check_labelled(train_set)
    check_same_classes(train_set, val)
    return DenseData(val, train_set)
