"""Pascal Context (PC60 / PC59) in the layout mmseg's tools/dataset_converters/pascal_context.py
writes: VOC 2010 images with 60-class label PNGs (0 = background), stored as they are. Layout and
label values: shards/README.md ("What each converter writes").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fastloc.cli import flowing_help
from fastloc.shard.config import ConvertConfig
from fastloc.shard.encode import MAX_PIXELS_DEFAULT
from fastloc.shard.errors import ConversionError
from fastloc.shard.sources.voc import ListedSource

# index = label value: mmseg's converter maps the Detail API's category ids through their sorted
# `_mapping`, so 1..59 follow the ascending Detail ids, which is alphabetical order; mmseg's
# PascalContextDataset (1.x METAINFO) names them so (its first 0.x version had another order)
CONTEXT_CLASSES = [
    "background",
    "aeroplane",
    "bag",
    "bed",
    "bedclothes",
    "bench",
    "bicycle",
    "bird",
    "boat",
    "book",
    "bottle",
    "building",
    "bus",
    "cabinet",
    "car",
    "cat",
    "ceiling",
    "chair",
    "cloth",
    "computer",
    "cow",
    "cup",
    "curtain",
    "dog",
    "door",
    "fence",
    "floor",
    "flower",
    "food",
    "grass",
    "ground",
    "horse",
    "keyboard",
    "light",
    "motorbike",
    "mountain",
    "mouse",
    "person",
    "plate",
    "platform",
    "pottedplant",
    "road",
    "rock",
    "sheep",
    "shelves",
    "sidewalk",
    "sign",
    "sky",
    "snow",
    "sofa",
    "table",
    "track",
    "train",
    "tree",
    "truck",
    "tvmonitor",
    "wall",
    "water",
    "window",
    "wood",
]
LABEL_RULE = (
    "label = PNG value: 0 background, 1-59 the Pascal Context classes (mmseg's sorted Detail category ids); "
    "255 = void, kept as 255, to be ignored (mmseg's converter writes none). PC60 scores all 60 classes; "
    "PC59 scores 1-59 with 0 ignored (mmseg reduce_zero_label)"
)
LIST_DIR = Path("ImageSets") / "SegmentationContext"


@flowing_help
@dataclass(frozen=True, kw_only=True)
class ContextConfig(ConvertConfig):
    """Convert Pascal Context as mmseg prepares it (the PC60 and PC59 benchmarks of SCLIP, NACLIP
    and ClearCLIP): VOC 2010 images with 60 classes, 0 background and 1-59 the context classes,
    stored as they are (PC59 is the same set scored with 0 ignored); a void value 255 is kept and
    recorded as 'ignore' in the manifest."""

    root: Path
    """VOC 2010 root (VOCdevkit/VOC2010), holding JPEGImages/, SegmentationClassContext/ (uint8
    label PNGs, written by mmseg's tools/dataset_converters/pascal_context.py) and
    ImageSets/SegmentationContext/."""

    split: Literal["train", "val"] = "val"
    """Split to convert: train (4,998 images) or val (5,105), listed in
    ImageSets/SegmentationContext/{split}.txt."""

    def source(self) -> ContextSource:
        return ContextSource(root=self.root, split=self.split, max_pixels=self.max_pixels)


class ContextSource(ListedSource):
    """Reads Pascal Context samples of one split; see the module docstring."""

    DATASET = "context"
    CLASSES = CONTEXT_CLASSES
    SPACE = "pascal-context-60"
    RULE = LABEL_RULE
    ALLOWED = "Pascal Context classes (0-59, or 255 = void)"
    LAYOUT = "Pascal Context"
    ROOT_NAME = "VOC2010"

    def __init__(self, root: Path, split: Literal["train", "val"] = "val", max_pixels: int | None = MAX_PIXELS_DEFAULT):
        if split not in ("train", "val"):
            raise ConversionError(f"unknown Pascal Context split {split!r}: expected one of ['train', 'val']")
        self._open(root, split, max_pixels)
        note = "; the label PNGs mmseg's tools/dataset_converters/pascal_context.py writes from trainval_merged.json"
        self._check(self.root / "SegmentationClassContext", self.root / LIST_DIR / f"{split}.txt", note)
