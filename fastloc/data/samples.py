"""The host side of both loaders: one batch of the epoch order, read, checked, drawn and labelled.

``SampleReader.batch(t)`` builds global batch ``t`` of this rank: it reads each sample the order
names, checks it, asks the recipe for its views (draws, windows, label maps) and replaces a sample
that fails by the order's rule, its slot not valid. The torch twin also makes the pixels here
(``pixels=True``); the DALI loader takes the JPEG bytes and the windows. Either way the keys,
labels, classes, captions and valid flags come from this one function.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from fastloc.data.config import LoaderConfig
from fastloc.data.order import EpochPlan, candidates
from fastloc.data.recipes import INTERPOLATIONS, View
from fastloc.data.shards import ShardError, ShardSet
from fastloc.data.superpixels import superpixels
from fastloc.data.transforms import Window, caption_rng, normalize, sample_rng
from fastloc.shard.encode import decode_label, parse_jpeg_header


class SkippedSampleWarning(UserWarning):
    """A sample could not be used and was replaced; the message names shard, key and reason."""


@dataclass(frozen=True)
class Skipped:
    shard: str  # tar name
    key: str
    reason: str


@dataclass(frozen=True)
class Usable:
    """One usable sample, ready for the pixel stage."""

    g: int
    key: str
    jpg: bytes
    views: tuple[View, ...]  # the recipe's views: windows (DALI), label maps (the first's is the batch's), draws
    cls: int | None
    captions: tuple[str, ...] | None  # the lines of ``txt`` (``captions=True``)
    images: list[torch.Tensor] | None  # per view [3, s, s] uint8, final (pixels=True)


@dataclass
class HostBatch:
    """One batch as it leaves a worker. The large arrays are tensors (they travel through shared
    memory, one handle each); the small ones are numpy arrays, pickled with the rest."""

    t: int  # global batch number: epoch * batches per epoch + position
    keys: list[str]
    g: np.ndarray  # [B] int64: the sample used in each slot
    valid: np.ndarray  # [B] bool: False for a replacement or a repeat
    cls: np.ndarray | None  # [B] int64
    captions: tuple[tuple[str, ...], ...] | None  # [B] each sample's captions
    labels: torch.Tensor | None  # [B, S, S] int64 (wide_labels), else uint8 or int32
    images: torch.Tensor | None  # [B, 3, S, S] uint8 or float32: the first views (pixels=True)
    views: list[torch.Tensor] | None  # the further views, each [B, 3, s, s] (pixels=True, several views)
    boxes: np.ndarray | None  # [B, V, 4] float32: every view's box (several views), see ``View.box``
    draws: list  # [B] the first views' draws, for ``Recipe.finish``
    jpg: torch.Tensor | None  # [total bytes] uint8: the JPEGs back to back (pixels=False)
    jpg_ends: np.ndarray | None  # [B] int64: where each JPEG ends in ``jpg``
    windows: dict[str, np.ndarray] | None  # DALI's per-sample geometry (pixels=False), see ``window_arrays``
    skipped: list[Skipped]

    def jpegs(self) -> list[np.ndarray]:
        """[B] uint8 arrays: views into ``jpg``."""
        flat, ends = self.jpg.numpy(), self.jpg_ends.tolist()
        return [flat[a:b] for a, b in zip([0, *ends[:-1]], ends)]


def window_arrays(windows: list[Window]) -> dict[str, np.ndarray]:
    """The windows as DALI inputs: crop [B, 4] int32 (top, left, height, width), box [B, 4] and out
    [B, 2] float32 (y, x order), interpolation and flip [B] int32, and the reflect pads as slice
    arguments [B, 8] int32: per axis (y, x) the start and length of the mirrored head and tail
    (edge pixel not repeated; zero pads slice zero rows at 0: one graph for every sample)."""
    pads = []
    for w in windows:
        row = []
        for n, before, after in ((w.out[0], w.pad[0], w.pad[1]), (w.out[1], w.pad[2], w.pad[3])):
            row += [1 if before else 0, before, n - 1 - after if after else 0, after]
        pads.append(row)
    return {
        "crop": np.array([w.crop for w in windows], np.int32),
        "box": np.array([w.box for w in windows], np.float32),
        "out": np.array([w.out for w in windows], np.float32),
        "pads": np.array(pads, np.int32),
        "interp": np.array([INTERPOLATIONS[w.interpolation] for w in windows], np.int32),
        "flip": np.array([int(w.flip) for w in windows], np.int32),
    }


def decode_image(data: bytes) -> Image.Image:
    """A JPEG member as a PIL RGB image (grayscale is replicated); raises on undecodable bytes."""
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")  # convert() loads the whole image: truncation raises here


class SampleReader:
    """Everything a worker needs to build batches (picklable)."""

    def __init__(
        self,
        shards: ShardSet,
        cfg: LoaderConfig,
        plan: EpochPlan,
        labels: bool,
        cls: bool,
        pixels: bool,
        wide_labels: bool = True,
        txt: bool = False,
    ):
        self.shards, self.cfg, self.plan, self.pixels, self.wide_labels = shards, cfg, plan, pixels, wide_labels
        self.superpixels = cfg.superpixels  # segment ids, made here, in the label map's place
        labels = labels and self.superpixels is None
        self.exts = ("jpg",) + (("seg.png",) if labels else ()) + (("cls",) if cls else ()) + (("txt",) if txt else ())
        manifest = shards.manifest
        self.label_dtype = np.dtype(manifest["label"]["dtype"]) if labels else None
        if self.superpixels is not None:
            self.label_dtype = np.dtype(np.int32)
        self.num_classes = int(manifest["num_classes"])
        self.max_pixels = cfg.max_pixels

    # ------------------------------------------------------------ one sample

    def prepare(self, epoch: int, g: int) -> Usable | Skipped:
        """Read and check sample ``g``, draw its parameters, gather its label (and, with
        ``pixels``, decode and transform its image)."""
        shard, key, data = self.shards.read(g, self.exts)  # ShardError (structural) propagates
        checked = self._check(data)
        if isinstance(checked, str):
            return Skipped(shard, key, checked)
        height, width, label, cls, captions = checked
        if captions is not None and self.cfg.one_caption:
            if not captions:
                return Skipped(shard, key, "txt holds no caption")
            captions = (captions[caption_rng(self.cfg.seed, epoch, g).integers(len(captions))],)
        pil = None
        if self.pixels or self.superpixels is not None:
            try:
                pil = decode_image(data["jpg"])
            except Exception as exc:
                return Skipped(shard, key, f"jpg does not decode: {exc}")
        if self.superpixels is not None:
            label = superpixels(pil, self.superpixels)
        recipe, size = self.cfg.recipe, self.cfg.size
        views = recipe.views(sample_rng(self.cfg.seed, epoch, g), height, width, size, label)
        images = None if pil is None or not self.pixels else [recipe.image(pil, size, view.draw) for view in views]
        return Usable(g, key, data["jpg"], views, cls, captions, images)

    def _check(self, data: dict[str, bytes]) -> str | tuple[int, int, np.ndarray | None, int | None, tuple | None]:
        """(height, width, label [H, W] or None, cls or None, captions or None), or why the sample
        cannot be used."""
        try:
            header = parse_jpeg_header(data["jpg"])
        except ValueError as exc:
            return f"jpg does not decode: {exc}"
        height, width = header.height, header.width
        if height * width > self.max_pixels:
            return f"jpg is {width}x{height} = {width * height:,} pixels, over the limit of {self.max_pixels:,}"
        if height == 0 or width == 0:
            return f"jpg has an empty frame ({width}x{height})"
        label = cls = captions = None
        if "seg.png" in data:
            try:
                label = decode_label(data["seg.png"])  # [H, W] uint8 or uint16, lossless
            except Exception as exc:
                return f"seg.png does not decode: {exc}"
            if label.dtype != self.label_dtype or label.shape != (height, width):
                return (
                    f"seg.png is {label.dtype} {label.shape[1]}x{label.shape[0]}, "
                    f"expected {self.label_dtype} {width}x{height}"
                )
        if "cls" in data:
            text = data["cls"].decode("ascii", "replace").strip()
            if not text.isdigit() or int(text) >= self.num_classes:
                return f"cls {text!r} is not a class index"
            cls = int(text)
        if "txt" in data:
            try:
                text = data["txt"].decode("utf-8")
            except UnicodeDecodeError as exc:
                return f"txt is not UTF-8 text: {exc}"
            captions = tuple(line.strip() for line in text.splitlines() if line.strip())  # one caption a line
        return height, width, label, cls, captions

    # ------------------------------------------------------------ one batch

    def fill(self, epoch: int, position: int, bad: dict[int, str]) -> tuple[Usable, bool, list[Skipped]]:
        """The sample of share position ``position``, or its replacement: (sample, valid, skipped)."""
        share, valid = self.plan.share(epoch)
        skipped = []
        for pos in candidates(len(share), position):
            g = int(share[pos])
            if g in bad:  # known not to decode where the pixels are made (DALI)
                skipped.append(Skipped(*self.shards.name(g), bad[g]))
                continue
            sample = self.prepare(epoch, g)
            if isinstance(sample, Usable):
                return sample, bool(valid[position]) and pos == position, skipped
            skipped.append(sample)
        raise ShardError(
            f"{self.shards.root}: no usable sample in rank {self.plan.rank}'s share of epoch {epoch} "
            f"({len(share)} samples; first problem: {skipped[0].shard}:{skipped[0].key}: {skipped[0].reason})"
        )

    def batch(self, t: int, bad: dict[int, str] | None = None) -> HostBatch:
        """Global batch ``t`` of this rank."""
        epoch, position = divmod(t, len(self.plan))
        samples, valid, skipped = [], [], []
        for pos in self.plan.positions(position):
            sample, ok, missed = self.fill(epoch, pos, bad or {})
            samples.append(sample)
            valid.append(ok)
            skipped += missed
        return self._collate(t, samples, valid, skipped)

    def _pixels(self, images: list[torch.Tensor]) -> torch.Tensor:
        """One view of the batch: [B, 3, s, s] uint8, or float32 normalized."""
        stacked = torch.stack(images)
        return normalize(stacked, self.cfg.mean, self.cfg.std) if self.cfg.normalize else stacked

    def _collate(self, t: int, samples: list[Usable], valid: list[bool], skipped: list[Skipped]) -> HostBatch:
        labels = images = views = boxes = jpg = ends = windows = None
        if self.label_dtype is not None:
            stacked = np.stack([s.views[0].label for s in samples])  # [B, S, S]
            narrow = np.uint8 if stacked.dtype == np.uint8 else np.int32  # torch has no full uint16
            labels = torch.from_numpy(stacked.astype(np.int64 if self.wide_labels else narrow, copy=False))
        if self.pixels:
            images, *views = (self._pixels([s.images[v] for s in samples]) for v in range(len(samples[0].views)))
        else:
            jpg = torch.frombuffer(bytearray().join(s.jpg for s in samples), dtype=torch.uint8)  # one copy
            ends = np.cumsum([len(s.jpg) for s in samples], dtype=np.int64)
            windows = window_arrays([s.views[0].window for s in samples])
        if len(samples[0].views) > 1:
            boxes = np.array([[v.box for v in s.views] for s in samples], np.float32)
        cls = None if samples[0].cls is None else np.array([s.cls for s in samples], np.int64)
        captions = None if samples[0].captions is None else tuple(s.captions for s in samples)
        return HostBatch(
            t=t,
            keys=[s.key for s in samples],
            g=np.array([s.g for s in samples], np.int64),
            valid=np.array(valid, bool),
            cls=cls,
            captions=captions,
            labels=labels,
            images=images,
            views=views or None,
            boxes=boxes,
            draws=[s.views[0].draw for s in samples],
            jpg=jpg,
            jpg_ends=ends,
            windows=windows,
            skipped=skipped,
        )


@dataclass(frozen=True)
class HostFailure:
    """A structural error of the shards met in a worker, passed back as a value: the main process
    raises it as a plain ``ShardError`` (not wrapped in the worker's traceback)."""

    message: str

    def raise_(self):
        raise ShardError(self.message)


class HostBatches(torch.utils.data.Dataset):
    """Global batch number -> ``HostBatch`` (or ``HostFailure``): what the DataLoader workers run."""

    def __init__(self, reader: SampleReader):
        self.reader = reader

    def __getitem__(self, t: int) -> HostBatch | HostFailure:
        try:
            return self.reader.batch(int(t))
        except ShardError as exc:
            return HostFailure(str(exc))


def warn_skipped(skipped: Skipped, seen: dict[tuple[str, str], str]) -> None:
    """Warn once per sample (``seen`` remembers)."""
    if (skipped.shard, skipped.key) not in seen:
        seen[(skipped.shard, skipped.key)] = skipped.reason
        warnings.warn(
            f"{skipped.shard}: sample {skipped.key} replaced: {skipped.reason}", SkippedSampleWarning, stacklevel=4
        )


def identity(x: Any) -> Any:
    return x
