"""The torch twin of the DALI loader: PIL decoding and transforms in DataLoader workers.

It yields the same ``Batch`` contract as the DALI pipeline (same per-epoch counts, batching,
state format and skip rule from ``order.py``; the same geometry from ``transforms.py``), on the
CPU, so the whole data path runs in tests and on machines without a GPU. Its order (a global
permutation per epoch, ``order.py``) differs from DALI's streaming reader's.

How it runs: ``order.EpochPlan`` lists this rank's batches of the epoch (global sample indices)
from the saved position on; a ``DataLoader`` with ``cfg.workers`` workers takes them as its
``batch_sampler``, each worker reads the samples of a batch by index (positioned reads at the
``.idx`` offsets, see ``order.py`` for why not ``webdataset`` streaming), decodes them with PIL,
applies the recipe with each sample's own generator and collates the batch. The DataLoader
returns batches in sampler order, so the output does not depend on the number of workers.

Typical use (a trainer)::

    loader = TorchLoader(cfg)
    loader.load_state_dict(ckpt["loader"])          # optional: resume mid-epoch
    for epoch in range(loader.epoch, epochs):
        loader.set_epoch(epoch)                     # keeps the position when it is the restored epoch
        for batch in loader:                        # iterate to the end: the state then moves on
            ...
            ckpt["loader"] = loader.state_dict()    # the next batch after a restore is the next one here
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from fastloc.data.batch import Batch
from fastloc.data.config import LoaderConfig
from fastloc.data.order import (
    EpochLoader,
    EpochPlan,
    LoaderState,
    ShardSet,
    open_shards,
    warn_skipped,
)  # fmt: skip
from fastloc.data.transforms import apply_eval, normalize, sample_rng, train_transform
from fastloc.shard.encode import decode_label


@dataclass(frozen=True)
class Decoded:
    key: str
    image: torch.Tensor  # [3, S, S] uint8
    label: torch.Tensor | None  # [S, S] int64
    cls: int | None


@dataclass(frozen=True)
class Skipped:
    shard: str  # tar name
    key: str
    reason: str


def decode_image(data: bytes) -> Image.Image:
    """A JPEG member as a PIL RGB image (grayscale is replicated); raises on undecodable bytes."""
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")  # convert() loads the whole image: truncation raises here


class EpochSamples(Dataset):
    """Global sample index -> ``Decoded`` (transformed) or ``Skipped`` (did not decode)."""

    def __init__(self, shards: ShardSet, cfg: LoaderConfig, epoch: int, labels: bool, cls: bool):
        self.shards, self.cfg, self.epoch = shards, cfg, epoch
        self.exts = ("jpg",) + (("seg.png",) if labels else ()) + (("cls",) if cls else ())
        manifest = shards.manifest
        self.label_dtype = np.dtype(manifest["label"]["dtype"]) if labels else None
        self.num_classes = int(manifest["num_classes"])

    def __len__(self) -> int:
        return self.shards.num_samples

    def __getitem__(self, g: int) -> Decoded | Skipped:
        shard, key, data = self.shards.read(int(g), self.exts)  # ShardError (structural) propagates
        try:
            image = decode_image(data["jpg"])
        except Exception as exc:  # noqa: BLE001  (PIL raises many types)
            return Skipped(shard, key, f"jpg does not decode: {exc}")
        label = cls = None
        if "seg.png" in data:
            try:
                label = decode_label(data["seg.png"])  # [H, W] uint8 or uint16, lossless
            except Exception as exc:  # noqa: BLE001
                return Skipped(shard, key, f"seg.png does not decode: {exc}")
            if label.dtype != self.label_dtype or label.shape != (image.height, image.width):
                return Skipped(shard, key, f"seg.png is {label.dtype} {label.shape[1]}x{label.shape[0]}, "
                               f"expected {self.label_dtype} {image.width}x{image.height}")  # fmt: skip
        if "cls" in data:
            text = data["cls"].decode("ascii", "replace").strip()
            if not text.isdigit() or int(text) >= self.num_classes:
                return Skipped(shard, key, f"cls {text!r} is not a class index")
            cls = int(text)
        size = self.cfg.size
        if self.cfg.recipe == "eval":
            image_t, label_t = apply_eval(image, label, size)
        else:
            rng = sample_rng(self.cfg.seed, self.epoch, int(g))
            image_t, label_t = train_transform(image, label, size, self.cfg.train, rng)
        return Decoded(key, image_t, label_t, cls)


def collate(items: list[Decoded | Skipped], norm: tuple | None) -> tuple[Batch | None, list[Skipped]]:
    """Stack the decoded samples of one batch (skipped ones left out); None when none decoded."""
    good = [x for x in items if isinstance(x, Decoded)]
    skipped = [x for x in items if isinstance(x, Skipped)]
    if not good:
        return None, skipped
    images = torch.stack([x.image for x in good])  # [B, 3, S, S] uint8
    if norm is not None:
        images = normalize(images, *norm)  # [B, 3, S, S] float32
    labels = None if good[0].label is None else torch.stack([x.label for x in good])  # [B, S, S] int64
    cls = None if good[0].cls is None else torch.tensor([x.cls for x in good], dtype=torch.int64)  # [B]
    return Batch(images=images, labels=labels, cls=cls, keys=[x.key for x in good]), skipped


class TorchLoader(EpochLoader):
    """One epoch of ``Batch``es per iteration, for this rank; resumable with ``state_dict``."""

    def __init__(self, cfg: LoaderConfig):
        if cfg.recipe not in ("train", "eval"):
            raise ValueError(f"unknown recipe {cfg.recipe!r}")
        self.cfg = cfg
        self.shards = open_shards(cfg.shards)  # ShardError now for missing or truncated shards
        manifest = self.shards.manifest
        self.has_labels = bool(cfg.labels and manifest.get("label") and "seg.png" in manifest["keys"])
        self.has_cls = bool(manifest.get("cls") and "cls" in manifest["keys"])
        self.plan = EpochPlan(num_samples=self.shards.num_samples, batch_size=cfg.batch_size, seed=cfg.seed,
                              shuffle=cfg.shuffle, rank=cfg.rank, world_size=cfg.world_size, drop_last=cfg.drop_last)  # fmt: skip
        self.state = LoaderState()
        self.skipped = 0  # skip events (a bad sample counts again in every epoch that reads it)
        self.skipped_samples: dict[tuple[str, str], str] = {}  # (shard, key) -> reason, each warned once

    def __iter__(self) -> Iterator[Batch]:
        cfg, epoch = self.cfg, self.state.epoch
        batches = [b.tolist() for b in self.plan.batches(epoch, self.state.position)]
        if batches:
            dataset = EpochSamples(self.shards, cfg, epoch, self.has_labels, self.has_cls)
            norm = (cfg.mean, cfg.std) if cfg.normalize else None
            loader = DataLoader(dataset, batch_sampler=batches, num_workers=cfg.workers,
                                collate_fn=partial(collate, norm=norm))  # fmt: skip
            for batch, skipped in loader:
                self.state.position += 1  # counted when handed over: a checkpoint taken now resumes after it
                self._note(skipped)
                if batch is not None:
                    yield batch
        self.state = LoaderState(epoch + 1, 0)

    def _note(self, skipped: list[Skipped]) -> None:
        for s in skipped:
            self.skipped += 1
            if (s.shard, s.key) not in self.skipped_samples:
                self.skipped_samples[(s.shard, s.key)] = s.reason
                warn_skipped(s.shard, s.key, s.reason)
