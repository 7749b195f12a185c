"""Cityscapes fine annotations (train, val) in the layout mmseg's CityscapesDataset reads: 19 train
ids and 255 (ignore) from ``*_gtFine_labelTrainIds.png``, or mapped from the official
``*_gtFine_labelIds.png`` where the former is missing. Layout and label values: shards/README.md
("What each converter writes").
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from fastloc.cli import flowing_help
from fastloc.shard.config import ConvertConfig
from fastloc.shard.encode import MAX_PIXELS_DEFAULT
from fastloc.shard.errors import ConversionError, SampleError
from fastloc.shard.sources.base import Item, Sample, SourceInfo, sanitize_key
from fastloc.shard.sources.files import (
    check_label_values,
    check_unique_keys,
    file_size,
    map_label_values,
    read_bytes,
    read_label_png,
    walk_files,
)

# (name, id, trainId) of cityscapesscripts/helpers/labels.py (mcordts/cityscapesScripts, `labels`);
# trainId 255 = ignored in evaluation; id -1 (license plate) is never drawn into a label image
LABELS = (
    ("unlabeled", 0, 255),
    ("ego vehicle", 1, 255),
    ("rectification border", 2, 255),
    ("out of roi", 3, 255),
    ("static", 4, 255),
    ("dynamic", 5, 255),
    ("ground", 6, 255),
    ("road", 7, 0),
    ("sidewalk", 8, 1),
    ("parking", 9, 255),
    ("rail track", 10, 255),
    ("building", 11, 2),
    ("wall", 12, 3),
    ("fence", 13, 4),
    ("guard rail", 14, 255),
    ("bridge", 15, 255),
    ("tunnel", 16, 255),
    ("pole", 17, 5),
    ("polegroup", 18, 255),
    ("traffic light", 19, 6),
    ("traffic sign", 20, 7),
    ("vegetation", 21, 8),
    ("terrain", 22, 9),
    ("sky", 23, 10),
    ("person", 24, 11),
    ("rider", 25, 12),
    ("car", 26, 13),
    ("truck", 27, 14),
    ("bus", 28, 15),
    ("caravan", 29, 255),
    ("trailer", 30, 255),
    ("train", 31, 16),
    ("motorcycle", 32, 17),
    ("bicycle", 33, 18),
    ("license plate", -1, -1),
)
IGNORE = 255
# index = trainId
CITYSCAPES_CLASSES = [name for train_id in range(19) for name, _, t in LABELS if t == train_id]
# labelIds PNG value -> trainId; -1 for values no label has
TRAIN_ID_OF = np.full(256, -1, np.int16)
for _name, _id, _train_id in LABELS:
    if _id >= 0:
        TRAIN_ID_OF[_id] = _train_id

SPLITS = ("train", "val")
IMAGE_SUFFIX = "_leftImg8bit.png"
TRAIN_IDS_SUFFIX = "_gtFine_labelTrainIds.png"
LABEL_IDS_SUFFIX = "_gtFine_labelIds.png"
LABEL_RULE = (
    "label = the trainId of cityscapesscripts' labels table (0-18, the 19 evaluated classes; 255 = ignore, kept "
    "as 255): the value of *_gtFine_labelTrainIds.png, or where that file is missing, the trainId of the labelId "
    "in *_gtFine_labelIds.png (0-33)"
)


@flowing_help
@dataclass(frozen=True, kw_only=True)
class CityscapesConfig(ConvertConfig):
    """Convert Cityscapes fine annotations (gtFine) as mmseg reads them: 19 classes by trainId, 255 =
    ignore (kept as 255 and recorded as 'ignore' in the manifest). Labels come from
    *_gtFine_labelTrainIds.png (what mmseg's tools/dataset_converters/cityscapes.py writes), else
    from the official *_gtFine_labelIds.png mapped through cityscapesscripts' labels table. The PNG
    images are stored re-encoded as baseline JPEG (--reencode-quality), as fastloc stores every
    image that is not a usable JPEG."""

    root: Path
    """Cityscapes root, holding leftImg8bit/{train,val}/<city>/*_leftImg8bit.png and
    gtFine/{train,val}/<city>/*_gtFine_labelTrainIds.png (or *_gtFine_labelIds.png)."""

    split: Literal["train", "val"] = "val"
    """Split to convert: train (2,975 images) or val (500)."""

    def source(self) -> CityscapesSource:
        return CityscapesSource(root=self.root, split=self.split, max_pixels=self.max_pixels)


class CityscapesSource:
    """Reads Cityscapes samples of one split; see the module docstring."""

    def __init__(self, root: Path, split: Literal["train", "val"] = "val", max_pixels: int | None = MAX_PIXELS_DEFAULT):
        if split not in SPLITS:
            raise ConversionError(f"unknown Cityscapes split {split!r}: expected one of {list(SPLITS)}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise ConversionError(f"{self.root}: Cityscapes root not found")
        self.split = split
        self.max_pixels = max_pixels
        self.image_dir = self.root / "leftImg8bit" / split
        self.label_dir = self.root / "gtFine" / split
        for folder in (self.image_dir, self.label_dir):
            if not folder.is_dir():
                hint = ""
                for child in ("cityscapes", "leftImg8bit_trainvaltest", "gtFine_trainvaltest"):
                    if (self.root / child / folder.parent.name).is_dir():
                        hint = f" (did you mean {self.root / child}?)"
                raise ConversionError(f"{folder}: folder not found (Cityscapes layout, split {split}){hint}")
        self._items: list[Item] | None = None
        self._unlisted: list[tuple[str, str]] = []  # (path, reason) of what listing could not use
        self._info: SourceInfo | None = None

    # ---- the Source protocol ----

    def info(self) -> SourceInfo:
        if self._info is None:
            items = self.items()
            from_ids = sum(item.ref[1].endswith(LABEL_IDS_SUFFIX) for item in items)
            inputs = {"images": os.path.abspath(self.image_dir), "labels": os.path.abspath(self.label_dir)}
            self._info = SourceInfo(
                dataset="cityscapes",
                split=self.split,
                source=os.path.abspath(self.root),
                classes=list(CITYSCAPES_CLASSES),
                has_label=True,
                label_encoding={"space": "cityscapes-19", "unlabeled": None, "ignore": IGNORE, "rule": LABEL_RULE},
                extra={
                    "inputs": inputs,
                    "listed": len(items),
                    "labels_from": {"labelTrainIds": len(items) - from_ids, "labelIds": from_ids},
                },
                unreachable=list(self._unlisted),
                inputs=(os.path.abspath(self.root), *inputs.values()),
            )
        return self._info

    def items(self) -> list[Item]:
        if self._items is None:
            # folder links are followed, each real folder once: a link loop is reported, not walked forever
            paths, problems = walk_files(self.image_dir, lambda name: name.endswith(IMAGE_SUFFIX))
            self._unlisted.extend(problems)
            if not paths:
                raise ConversionError(f"{self.image_dir}: no *{IMAGE_SUFFIX} images")
            items = []
            for image in sorted(paths, key=lambda p: os.path.basename(p)):
                name = os.path.basename(image)[: -len(IMAGE_SUFFIX)]
                city = os.path.relpath(os.path.dirname(image), self.image_dir)
                label = str(self.label_dir / city / f"{name}{TRAIN_IDS_SUFFIX}")
                official = str(self.label_dir / city / f"{name}{LABEL_IDS_SUFFIX}")
                if not os.path.exists(label) and os.path.exists(official):
                    label = official
                # a missing label stays in the plan: load() reports it
                size = file_size(image) + file_size(label)
                items.append(Item(key=sanitize_key(name), size=size, ref=(image, label, city.replace(os.sep, "/"))))
            check_unique_keys(items, lambda item: item.ref[0])
            self._items = items
        return self._items

    def load(self, item: Item) -> Sample:
        image, label_path, city = item.ref
        png = read_bytes(image, what="image")  # a PNG: the writer re-encodes it as a baseline JPEG
        if not label_path.endswith(LABEL_IDS_SUFFIX) and not os.path.lexists(label_path):
            official = os.path.basename(label_path)[: -len(TRAIN_IDS_SUFFIX)] + LABEL_IDS_SUFFIX
            raise SampleError(label_path, f"label PNG not found (nor {official})")
        values = read_label_png(label_path, ("L", "P"), "8-bit grayscale", self.max_pixels)
        if label_path.endswith(LABEL_IDS_SUFFIX):
            label = map_label_values(values, TRAIN_ID_OF, label_path, "Cityscapes labelIds (0-33)")
        else:
            check_label_values(
                values, len(CITYSCAPES_CLASSES), IGNORE, label_path, "Cityscapes trainIds (0-18, or 255 = ignore)"
            )
            label = values.astype(np.uint8, copy=False)
        return Sample(key=item.key, source=image, jpg=png, label=label, label_source=label_path, meta={"city": city})
