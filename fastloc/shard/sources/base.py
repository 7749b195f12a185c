"""The contract between a dataset source and the shard writer.

A source knows its on-disk layout and class space; the writer knows the shard format.

- ``info()`` describes the dataset (class names, label encoding) for the manifest. It may read
  annotation files and raises ``ConversionError`` when the layout is unusable.
- ``items()`` lists every sample as a cheap, picklable ``Item`` in a deterministic order.
- ``load(item)`` reads one sample into a ``Sample``; it raises ``SampleError`` (never anything
  else) for bad data, naming the offending file.

The writer then decides JPEG pass-through or re-encoding, checks that the label map matches the
image size and the class space, and encodes the label PNG. Sources never write files.
Sources are handed to worker processes (fork), so keep heavy state in attributes built by
``info()``/``items()`` in the parent, not rebuilt per sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class Item:
    """One sample to convert, before it is read."""

    key: str  # sample key inside the split: unique, no dots (WebDataset splits at the first dot)
    size: int  # bytes of the source files (image + label): used for the byte-size shard target
    ref: Any  # picklable, source-specific handle (paths, ids, tar offsets, ...)


@dataclass
class Sample:
    """One sample as read from the source, ready for the writer."""

    key: str
    source: str  # path shown in reports (the image file, or tar::member)
    jpg: bytes | None = None  # source image bytes, passed through when they are a usable JPEG
    pixels: np.ndarray | None = None  # [H, W, 3] uint8, for sources that generate images
    label: np.ndarray | None = None  # [H, W] integer class ids in the source's class space
    label_source: str | None = None  # the label file, named when the label map is rejected
    cls: int | None = None  # image-level class index
    txt: str | None = None  # caption text
    meta: dict[str, Any] = field(default_factory=dict)  # extra per-sample metadata (json key)


@dataclass(frozen=True)
class SourceInfo:
    """What the manifest says about a dataset."""

    dataset: str  # default dataset name (the folder under the output root)
    split: str
    source: str  # the input path, absolute (or a description, for generated data)
    classes: list[str | None]  # class names; index = label value or `cls`; None = unnamed
    has_label: bool = False  # samples carry `seg.png`
    has_cls: bool = False  # samples carry `cls`
    has_txt: bool = False  # samples carry `txt`
    label_encoding: dict[str, Any] = field(default_factory=dict)  # how label values were made
    extra: dict[str, Any] = field(default_factory=dict)  # anything else worth recording
    # (path, reason) for data found while listing that cannot be reached, e.g. the unreadable
    # tail of a truncated tar: reported with the skipped samples, never dropped silently
    unreachable: list[tuple[str, str]] = field(default_factory=list)
    # every folder and file the conversion reads (absolute paths): the output must not overlap them
    inputs: tuple[str, ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.classes)


class Source(Protocol):
    def info(self) -> SourceInfo: ...

    def items(self) -> list[Item]: ...

    def load(self, item: Item) -> Sample: ...


def sanitize_key(stem: str) -> str:
    """A WebDataset key from a file stem: dots would split the key, slashes make folders."""
    return stem.replace(".", "_").replace("/", "_").replace(" ", "_")
