"""Pascal VOC 2012 semantic segmentation (train, val) and the SBD-augmented ``trainaug`` split;
palette indices stored as they are, 255 (void) kept and named in the manifest. Layouts and label
values: shards/README.md ("What each converter writes").
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

import numpy as np

from fastloc.cli import flowing_help
from fastloc.shard.config import ConvertConfig
from fastloc.shard.encode import MAX_PIXELS_DEFAULT
from fastloc.shard.errors import ConversionError
from fastloc.shard.sources.base import Item, Sample, SourceInfo, sanitize_key
from fastloc.shard.sources.files import (
    check_label_values,
    check_unique_keys,
    file_size,
    read_bytes,
    read_label_png,
)

# index = label value
VOC_CLASSES = [
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
]
VOID = 255  # object borders and difficult regions: not a class, ignored
SPLITS = ("train", "val", "trainaug")
AUG_LIST_NAMES = ("trainaug.txt", "train_aug.txt")
LABEL_RULE = (
    "label = PNG value (the palette index of SegmentationClass PNGs, the gray value of SegmentationClassAug "
    "PNGs): 0 background, 1-20 the VOC object classes; 255 = void (object borders, difficult regions), "
    "kept as 255, to be ignored"
)


@flowing_help
@dataclass(frozen=True, kw_only=True)
class VocConfig(ConvertConfig):
    """Convert Pascal VOC 2012 semantic segmentation: train or val of the official release, or the
    SBD-augmented trainaug split (10,582 images). 21 classes (0 background, 1-20 objects); the void
    value 255 of object borders is kept as 255 and recorded as 'ignore' in the manifest."""

    root: Path
    """VOC 2012 root (VOCdevkit/VOC2012), holding JPEGImages/, SegmentationClass/ and
    ImageSets/Segmentation/."""

    split: Literal["train", "val", "trainaug"] = "train"
    """Split to convert: train (1,464 images) or val (1,449), listed in
    ImageSets/Segmentation/{split}.txt with labels from SegmentationClass/; or trainaug (10,582
    images, SBD-augmented), listed in --aug-list with labels from --aug-labels."""

    aug_labels: Path | None = None
    """--split trainaug only: folder of the SBD-augmented label PNGs, grayscale with values 0-20 and
    255 (default: ROOT/SegmentationClassAug)."""

    aug_list: Path | None = None
    """--split trainaug only: its list of image ids, one per line, or DeepLab's '<image path> <label
    path>' pairs (default: ROOT/ImageSets/Segmentation/trainaug.txt, else train_aug.txt)."""

    def source(self) -> VocSource:
        return VocSource(
            root=self.root,
            split=self.split,
            aug_labels=self.aug_labels,
            aug_list=self.aug_list,
            max_pixels=self.max_pixels,
        )

    def validate(self) -> None:
        super().validate()
        for flag, value in (("--aug-labels", self.aug_labels), ("--aug-list", self.aug_list)):
            if value is not None and self.split != "trainaug":
                raise ConversionError(f"{flag} is for --split trainaug only (this is --split {self.split})")


class ListedSource:
    """A VOC-style layout: ids listed in a text file, ``ROOT/JPEGImages/<id>.jpg`` with
    ``label_dir/<id>.png`` (8-bit; the value is the class, VOID kept). VOC and Pascal Context set
    the class attributes and, in ``__init__``, call ``_open`` and ``_check``."""

    DATASET: str
    CLASSES: list[str]
    SPACE: str  # the manifest's label space
    RULE: str  # how label values were made
    ALLOWED: str  # what label values are valid, named when a label map is rejected
    LAYOUT: str  # the layout's name in errors
    ROOT_NAME: str  # the root's folder name, suggested when ROOT is a folder above it

    def _open(self, root: Path, split: str, max_pixels: int | None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise ConversionError(f"{self.root}: {self.LAYOUT} root not found")
        self.split = split
        self.max_pixels = max_pixels
        self.image_dir = self.root / "JPEGImages"
        if not self.image_dir.is_dir():
            hint = ""
            for child in (Path(self.ROOT_NAME), Path("VOCdevkit") / self.ROOT_NAME):
                if (self.root / child / "JPEGImages").is_dir():
                    hint = f" (did you mean {self.root / child}?)"
            raise ConversionError(f"{self.image_dir}: folder not found ({self.LAYOUT} layout){hint}")
        self._items: list[Item] | None = None
        self._info: SourceInfo | None = None

    def _check(self, label_dir: Path, list_path: Path, note: str = "") -> None:
        """Use these labels and this list; ``note`` says where the labels come from."""
        self.label_dir, self.list_path = label_dir, list_path
        if not label_dir.is_dir():
            raise ConversionError(f"{label_dir}: folder not found ({self.LAYOUT} layout, split {self.split}{note})")
        if not list_path.is_file():
            raise ConversionError(f"{list_path}: split list not found ({self.LAYOUT} layout, split {self.split})")

    # ---- the Source protocol ----

    def info(self) -> SourceInfo:
        if self._info is None:
            items = self.items()
            inputs = {
                "images": os.path.abspath(self.image_dir),
                "labels": os.path.abspath(self.label_dir),
                "list": os.path.abspath(self.list_path),
            }
            self._info = SourceInfo(
                dataset=self.DATASET,
                split=self.split,
                source=os.path.abspath(self.root),
                classes=list(self.CLASSES),
                has_label=True,
                label_encoding={"space": self.SPACE, "unlabeled": None, "ignore": VOID, "rule": self.RULE},
                extra={"inputs": inputs, "listed": len(items)},
                inputs=(os.path.abspath(self.root), *inputs.values()),
            )
        return self._info

    def items(self) -> list[Item]:
        if self._items is None:
            items = []
            for image_id in read_id_list(self.list_path):
                image = str(self.image_dir / f"{image_id}.jpg")
                label = str(self.label_dir / f"{image_id}.png")
                # a listed image or label that is missing stays in the plan: load() reports it
                items.append(
                    Item(key=sanitize_key(image_id), size=file_size(image) + file_size(label), ref=(image, label))
                )
            check_unique_keys(items, lambda item: item.ref[0])
            self._items = items
        return self._items

    def load(self, item: Item) -> Sample:
        image, label_path = item.ref
        jpg = read_bytes(image, what="image")
        # np.asarray of a palette ("P") image gives its palette indices: the class ids
        label = read_label_png(label_path, ("P", "L"), "8-bit palette or grayscale", self.max_pixels)
        check_label_values(label, len(self.CLASSES), VOID, label_path, self.ALLOWED)
        return Sample(
            key=item.key, source=image, jpg=jpg, label=label.astype(np.uint8, copy=False), label_source=label_path
        )


class VocSource(ListedSource):
    """Reads VOC 2012 samples of one split; see the module docstring."""

    DATASET = "voc"
    CLASSES = VOC_CLASSES
    SPACE = "voc2012-21"
    RULE = LABEL_RULE
    ALLOWED = "VOC classes (0-20, or 255 = void)"
    LAYOUT = "VOC"
    ROOT_NAME = "VOC2012"

    def __init__(
        self,
        root: Path,
        split: Literal["train", "val", "trainaug"] = "train",
        aug_labels: Path | None = None,
        aug_list: Path | None = None,
        max_pixels: int | None = MAX_PIXELS_DEFAULT,
    ):
        if split not in SPLITS:
            raise ConversionError(f"unknown VOC split {split!r}: expected one of {list(SPLITS)}")
        self._open(root, split, max_pixels)
        segmentation = self.root / "ImageSets" / "Segmentation"
        if split == "trainaug":
            self.label_dir = find_aug_labels(self.root, aug_labels)
            self.list_path = find_aug_list(segmentation, aug_list)
        else:
            self._check(self.root / "SegmentationClass", segmentation / f"{split}.txt")


# ---- layout helpers (each names what is missing and where) ----


def find_aug_labels(root: Path, given: Path | None) -> Path:
    """The SegmentationClassAug folder of --split trainaug."""
    if given is not None:
        if not Path(given).is_dir():
            raise ConversionError(f"{given}: --aug-labels folder not found (the SBD-augmented label PNGs)")
        return Path(given)
    default = root / "SegmentationClassAug"
    if not default.is_dir():
        raise ConversionError(
            f"--split trainaug needs the SBD-augmented label PNGs: {default} not found "
            "(unpack SegmentationClassAug there, or give its folder with --aug-labels)"
        )
    return default


def find_aug_list(segmentation: Path, given: Path | None) -> Path:
    """The id list of --split trainaug: --aug-list, else trainaug.txt or train_aug.txt."""
    if given is not None:
        if not Path(given).is_file():
            raise ConversionError(f"{given}: --aug-list file not found (the trainaug id list)")
        return Path(given)
    candidates = [segmentation / name for name in AUG_LIST_NAMES]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConversionError(
        f"--split trainaug needs its id list: looked for {' and '.join(map(str, candidates))} "
        "(give the list file with --aug-list)"
    )


def read_id_list(path: Path) -> list[str]:
    """The image ids of a VOC list file, in file order: one id per line, or DeepLab's
    '<image path> <label path>' pairs, whose id is the image's file stem."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: cannot read the id list: {getattr(e, 'strerror', None) or e}") from None
    ids: list[str] = []
    first: dict[str, int] = {}  # id -> the line that listed it
    for line_no, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) == 1:
            image_id = fields[0]
        elif len(fields) == 2:
            image_id, label_id = (PurePosixPath(f).stem for f in fields)
            if image_id != label_id:
                raise ConversionError(f"{path}:{line_no}: image {fields[0]} and label {fields[1]} name different ids")
        else:
            raise ConversionError(f"{path}:{line_no}: expected an image id (or '<image> <label>' paths), got {line!r}")
        if image_id in (".", "..") or any(c in image_id for c in "/\\\0"):
            raise ConversionError(f"{path}:{line_no}: {image_id!r} is not an image id (a file name without folders)")
        if image_id in first:
            raise ConversionError(f"{path}:{line_no}: id {image_id} listed twice (first on line {first[image_id]})")
        first[image_id] = line_no
        ids.append(image_id)
    if not ids:
        raise ConversionError(f"{path}: no image ids listed")
    return ids
