"""ADE20K: the SceneParsing benchmark (ADEChallengeData2016, 151 ids) and the full ADE20K_2021_17_01
release (3,688 classes, uint16 label maps). Layouts and label encodings: shards/README.md ("What
each converter writes"); ``index_ade20k.pkl`` is read only on request, because unpickling runs code.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fastloc.cli import flowing_help
from fastloc.shard.config import ConvertConfig, require
from fastloc.shard.encode import MAX_PIXELS_DEFAULT
from fastloc.shard.errors import ConversionError, SampleError
from fastloc.shard.sources.base import Item, Sample, SourceInfo, sanitize_key
from fastloc.shard.sources.files import (
    check_unique_keys,
    file_size,
    read_bytes,
    read_label_png,
    scan_folder,
    walk_files,
)

SPLIT_DIRS = {"train": "training", "val": "validation"}
IMAGE_SUFFIXES = (".jpg", ".jpeg")
FULL_NUM_CLASSES = 3689  # 0 = unlabeled + the 3,688 named classes of ADE20K_2021_17_01


@flowing_help
@dataclass(frozen=True, kw_only=True)
class Ade20kConfig(ConvertConfig):
    """Convert ADE20K: the SceneParsing benchmark (ADEChallengeData2016, what Patch-Seg uses:
    150 classes plus 0 = other, uint8 labels) or the full ADE20K_2021_17_01 release (3,688 classes
    named from the per-image JSON files, uint16 labels)."""

    root: Path
    """Dataset root: the ADEChallengeData2016 folder (holding images/, annotations/ and
    objectInfo150.csv) or the ADE20K_2021_17_01 folder (holding images/ADE/)."""

    split: Literal["train", "val"] = "train"
    """Split to convert: train (the 'training' folders) or val (the 'validation' folders)."""

    layout: Literal["auto", "sceneparsing", "full"] = "auto"
    """Dataset layout. auto: ROOT/images/ADE/ means the full release, ROOT/annotations/ means
    SceneParsing."""

    num_classes: int = FULL_NUM_CLASSES
    """Full release only: size of the class space (2 to 65536), 0 (unlabeled) plus the 3,688 named
    classes of ADE20K_2021_17_01. Raise it for a release with more classes; every name_ndx must lie
    below it."""

    index_pkl: Path | None = None
    """Full release only: also read class names from index_ade20k.pkl (its 'objectnames', 1-based),
    naming the classes that no image of the split shows. This unpickles the file, which runs code:
    only for a file you trust."""

    def source(self) -> Ade20kSource:
        return Ade20kSource(
            root=self.root,
            split=self.split,
            layout=self.layout,
            num_classes=self.num_classes,
            index_pkl=self.index_pkl,
            max_pixels=self.max_pixels,
        )

    def validate(self) -> None:
        super().validate()
        require(2 <= self.num_classes <= 65536, "--num-classes", self.num_classes, "must be 2 to 65536 (uint16 labels)")


def detect_layout(root: Path) -> Literal["sceneparsing", "full"]:
    """The layout of an ADE20K root: full when images/ADE/ exists, SceneParsing when annotations/ does."""
    if (root / "images" / "ADE").is_dir():
        return "full"
    if (root / "annotations").is_dir():
        return "sceneparsing"
    hint = ""
    for child in ("ADEChallengeData2016", "ADE20K_2021_17_01"):
        if (root / child).is_dir():
            hint = f" (did you mean {root / child}?)"
    raise ConversionError(
        f"{root}: not an ADE20K root: neither images/ADE/ (full release) nor annotations/ (SceneParsing) found{hint}"
    )


class Ade20kSource:
    """Reads ADE20K samples in either layout; see the module docstring."""

    def __init__(
        self,
        root: Path,
        split: Literal["train", "val"] = "train",
        layout: Literal["auto", "sceneparsing", "full"] = "auto",
        num_classes: int = FULL_NUM_CLASSES,
        index_pkl: Path | None = None,
        max_pixels: int | None = MAX_PIXELS_DEFAULT,
    ):
        if split not in SPLIT_DIRS:
            raise ConversionError(f"unknown ADE20K split {split!r}: expected one of {sorted(SPLIT_DIRS)}")
        if layout not in ("auto", "sceneparsing", "full"):
            raise ConversionError(f"unknown ADE20K layout {layout!r}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise ConversionError(f"{self.root}: ADE20K root not found")
        self.split = split
        self.layout = detect_layout(self.root) if layout == "auto" else layout
        self.num_classes = num_classes
        self.index_pkl = None if index_pkl is None else Path(index_pkl)
        if self.layout == "full" and not 2 <= num_classes <= 65536:
            raise ConversionError(f"num_classes must be 2 to 65536, got {num_classes}")
        self.max_pixels = max_pixels
        self._items: list[Item] | None = None
        self._unlisted: list[tuple[str, str]] = []  # (path, reason) of what listing could not use
        self._info: SourceInfo | None = None

    # ---- the Source protocol ----

    def info(self) -> SourceInfo:
        if self._info is None:
            if self.layout == "sceneparsing":
                info = self._sceneparsing_info()
            else:
                info = self._full_info()
            self.items()  # listing records what it could not use
            inputs = [self.root] + ([self.index_pkl] if self.index_pkl is not None else [])
            self._info = dataclasses.replace(
                info, unreachable=list(self._unlisted), inputs=tuple(os.path.abspath(p) for p in inputs)
            )
        return self._info

    def items(self) -> list[Item]:
        if self._items is None:
            if self.layout == "sceneparsing":
                self._items = self._sceneparsing_items()
            else:
                self._items = self._full_items()
        return self._items

    def load(self, item: Item) -> Sample:
        if self.layout == "sceneparsing":
            return self._sceneparsing_load(item)
        return self._full_load(item)

    # ---- SceneParsing (ADEChallengeData2016) ----

    def _sceneparsing_info(self) -> SourceInfo:
        names = read_object_info(self.root / "objectInfo150.csv")
        space = f"ade20k-sceneparsing-{len(names) + 1}"
        return SourceInfo(
            dataset="ade20k",
            split=self.split,
            source=os.path.abspath(self.root),
            classes=["other", *names],
            has_label=True,
            label_encoding={"space": space, "unlabeled": 0, "rule": "label = png value"},
            extra={"layout": "sceneparsing", "class_table": "objectInfo150.csv"},
        )

    def _sceneparsing_items(self) -> list[Item]:
        sub = SPLIT_DIRS[self.split]
        image_dir = self.root / "images" / sub
        label_dir = self.root / "annotations" / sub
        for folder in (image_dir, label_dir):
            if not folder.is_dir():
                raise ConversionError(f"{folder}: folder not found (SceneParsing layout, split {self.split})")
        scenes = read_scene_categories(self.root / "sceneCategories.txt")
        try:
            entries = scan_folder(image_dir)
        except OSError as e:
            raise ConversionError(f"{image_dir}: cannot list the image folder: {e.strerror or e}") from None
        # a broken or looping link stays in the plan so that load() reports it
        images = [(e.name, e.path) for e in entries if e.name.lower().endswith(IMAGE_SUFFIXES) and e.kind != "dir"]
        if not images:
            raise ConversionError(f"{image_dir}: no .jpg images")
        items = []
        for name, path in images:
            stem = name.rsplit(".", 1)[0]
            label = str(label_dir / f"{stem}.png")
            size = file_size(path) + file_size(label)
            items.append(Item(key=sanitize_key(stem), size=size, ref=(path, label, scenes.get(stem))))
        check_unique_keys(items, lambda item: item.ref[0])
        return items

    def _sceneparsing_load(self, item: Item) -> Sample:
        image, label_path, scene = item.ref
        jpg = read_bytes(image)
        label = read_label_png(label_path, ("L", "P"), "8-bit single-channel", self.max_pixels)
        meta = {} if scene is None else {"scene": scene}
        return Sample(
            key=item.key,
            source=image,
            jpg=jpg,
            label=label.astype(np.uint8, copy=False),
            label_source=label_path,
            meta=meta,
        )

    # ---- Full release (ADE20K_2021_17_01) ----

    def _full_info(self) -> SourceInfo:
        classes: list[str | None] = [None] * self.num_classes
        classes[0] = "unlabeled"
        seen: dict[int, str] = {}  # name_ndx -> the JSON file that first named it
        unreadable = 0
        for item in self.items():
            json_path = item.ref[2]
            try:
                objects, _ = read_annotation(json_path)
            except SampleError:
                unreadable += 1  # load() reports it as a bad sample
                continue
            for ndx, name, _level in objects:
                if ndx >= self.num_classes:
                    raise ConversionError(
                        f"{json_path}: object {name!r} has name_ndx {ndx}, outside the class space of "
                        f"{self.num_classes} (raise --num-classes for a release with more classes)"
                    )
                if ndx not in seen:
                    seen[ndx] = json_path
                    classes[ndx] = name
                elif classes[ndx] != name:
                    raise ConversionError(
                        f"conflicting names for ADE class {ndx}: {classes[ndx]!r} in {seen[ndx]} "
                        f"and {name!r} in {json_path}"
                    )
        names_from = "per-image json"
        if self.index_pkl is not None:
            objectnames = read_index_objectnames(self.index_pkl)
            if len(objectnames) >= self.num_classes:
                raise ConversionError(
                    f"{self.index_pkl}: {len(objectnames)} objectnames do not fit a class space of "
                    f"{self.num_classes} (raise --num-classes to at least {len(objectnames) + 1})"
                )
            for k, name in enumerate(objectnames, start=1):
                if k in seen and classes[k] != name:
                    raise ConversionError(
                        f"conflicting names for ADE class {k}: {classes[k]!r} in {seen[k]} "
                        f"and {name!r} in {self.index_pkl}"
                    )
                classes[k] = name
            names_from = "per-image json + index_ade20k.pkl"
        return SourceInfo(
            dataset="ade20k-full",
            split=self.split,
            source=os.path.abspath(self.root),
            classes=classes,
            has_label=True,
            label_encoding={
                "space": f"ade20k-full-{self.num_classes}",
                "unlabeled": 0,
                "rule": "label = (R // 10) * 256 + G of _seg.png (ADE name_ndx, 1-based)",
            },
            extra={
                "layout": "full",
                "class_names_from": names_from,
                "named_in_split": len(seen),
                "unreadable_json": unreadable,
            },
        )

    def _full_items(self) -> list[Item]:
        split_dir = self.root / "images" / "ADE" / SPLIT_DIRS[self.split]
        if not split_dir.is_dir():
            raise ConversionError(f"{split_dir}: folder not found (full ADE20K layout, split {self.split})")
        # folder links are followed, each real folder once: a link loop is reported, not walked forever
        paths, problems = walk_files(split_dir, lambda name: name.lower().endswith(IMAGE_SUFFIXES))
        self._unlisted.extend(problems)
        found = [(os.path.relpath(path, split_dir), path) for path in paths]  # (relative, absolute)
        if not found:
            raise ConversionError(f"{split_dir}: no .jpg images")
        found.sort()
        items = []
        for rel, path in found:
            base = path.rsplit(".", 1)[0]
            stem = os.path.basename(base)
            seg, js = f"{base}_seg.png", f"{base}.json"
            folder = os.path.dirname(rel).replace(os.sep, "/")
            size = file_size(path) + file_size(seg)
            items.append(Item(key=sanitize_key(stem), size=size, ref=(path, seg, js, folder)))
        check_unique_keys(items, lambda item: item.ref[0])
        return items

    def _full_load(self, item: Item) -> Sample:
        image, seg_path, json_path, folder = item.ref
        jpg = read_bytes(image)
        objects, scene, named, size = read_annotation_with_image(json_path)
        if named is not None and named != os.path.basename(image):
            raise SampleError(json_path, f"annotation is for {named}, not {os.path.basename(image)}")
        rgb = read_label_png(seg_path, ("RGB",), "RGB (_seg.png)", self.max_pixels)
        if size is not None and rgb.shape[:2] != size:
            raise SampleError(
                seg_path,
                f"seg map is {rgb.shape[1]}x{rgb.shape[0]} but {os.path.basename(json_path)} gives imsize "
                f"{size[1]}x{size[0]}",
            )
        # [H, W] uint16: (R // 10) * 256 + G is at most 25 * 256 + 255 = 6655
        label = (rgb[..., 0] // 10).astype(np.uint16) * 256 + rgb[..., 1]
        present = np.flatnonzero(np.bincount(label.ravel()))
        whole = {ndx for ndx, _name, level in objects if level == 0}
        unlisted = [int(c) for c in present if c != 0 and int(c) not in whole]
        if unlisted:
            shown = ", ".join(map(str, unlisted[:10])) + (", ..." if len(unlisted) > 10 else "")
            raise SampleError(
                seg_path,
                f"classes {shown} in the seg map are not whole objects of {os.path.basename(json_path)}",
            )
        meta = {"scene": scene, "folder": folder}
        return Sample(key=item.key, source=image, jpg=jpg, label=label, label_source=seg_path, meta=meta)


# ---- file readers (each names the offending file in its errors) ----


def read_object_info(path: Path) -> list[str]:
    """Class names 1..N of SceneParsing's objectInfo150.csv, in Idx order."""
    if not path.is_file():
        raise ConversionError(f"{path}: SceneParsing class table not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
        rows = list(csv.DictReader(io.StringIO(text)))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ConversionError(f"{path}: cannot read the class table: {e}") from None
    names: dict[int, str] = {}
    for line, row in enumerate(rows, start=2):
        idx, name = row.get("Idx"), row.get("Name")
        if idx is None or name is None:
            raise ConversionError(f"{path}:{line}: expected columns Idx and Name")
        try:
            k = int(idx)
        except ValueError:
            raise ConversionError(f"{path}:{line}: Idx {idx!r} is not an integer") from None
        if k in names:
            raise ConversionError(f"{path}:{line}: Idx {k} listed twice")
        if not name.strip():
            raise ConversionError(f"{path}:{line}: class {k} has no name")
        names[k] = name.strip()
    if not names or sorted(names) != list(range(1, len(names) + 1)):
        raise ConversionError(f"{path}: Idx values must be 1..N without gaps")
    if len(names) > 255:
        raise ConversionError(f"{path}: {len(names)} classes do not fit uint8 labels")
    return [names[k] for k in range(1, len(names) + 1)]


def read_scene_categories(path: Path) -> dict[str, str]:
    """SceneParsing's optional sceneCategories.txt: image stem -> scene name."""
    if not path.is_file():
        return {}
    scenes = {}
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: cannot read: {e}") from None
    for line_no, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2:
            raise ConversionError(f"{path}:{line_no}: expected '<image stem> <scene>', got {line!r}")
        scenes[fields[0]] = fields[1]
    return scenes


def _read_annotation_doc(path: str) -> dict:
    raw = read_bytes(path, what="annotation JSON")
    try:
        try:
            doc = json.loads(raw)
        except UnicodeDecodeError:
            doc = json.loads(raw.decode("latin-1"))  # a few old annotation tools wrote latin-1
    except (ValueError, RecursionError) as e:
        raise SampleError(path, f"malformed JSON: {e}") from None
    ann = doc.get("annotation") if isinstance(doc, dict) else None
    if not isinstance(ann, dict) or not isinstance(ann.get("object"), list):
        raise SampleError(path, "malformed annotation: expected {'annotation': {'object': [...]}}")
    return ann


def read_annotation(path: str) -> tuple[list[tuple[int, str, int]], list[str]]:
    """A full-release per-image JSON: its objects as (name_ndx, name, part_level), and its scene."""
    objects, scene, _, _ = read_annotation_with_image(path)
    return objects, scene


def read_annotation_with_image(
    path: str,
) -> tuple[list[tuple[int, str, int]], list[str], str | None, tuple[int, int] | None]:
    """Objects and scene as ``read_annotation``, plus the image the JSON describes: its ``filename``
    and ``imsize`` as (height, width), each None when the JSON does not give it.

    One class index has one name within a file: a second name makes the file malformed.
    """
    ann = _read_annotation_doc(path)
    objects = []
    names: dict[int, str] = {}
    for i, obj in enumerate(ann["object"]):
        ndx = obj.get("name_ndx") if isinstance(obj, dict) else None
        name = obj.get("name") if isinstance(obj, dict) else None
        parts = obj.get("parts") if isinstance(obj, dict) else None
        level = parts.get("part_level") if isinstance(parts, dict) else None
        if not _is_int(ndx) or ndx < 1 or not isinstance(name, str) or not _is_int(level):
            raise SampleError(
                path,
                f"malformed annotation: object {i} needs an integer name_ndx >= 1, a name and parts.part_level",
            )
        if names.setdefault(ndx, name) != name:
            raise SampleError(path, f"malformed annotation: name_ndx {ndx} is both {names[ndx]!r} and {name!r}")
        objects.append((ndx, name, level))
    scene = ann.get("scene", [])
    if not isinstance(scene, list) or not all(isinstance(s, str) for s in scene):
        raise SampleError(path, "malformed annotation: 'scene' must be a list of strings")
    filename = ann.get("filename")
    if filename is not None and not isinstance(filename, str):
        raise SampleError(path, "malformed annotation: 'filename' must be a string")
    size = ann.get("imsize")
    if size is not None:
        if not isinstance(size, list) or len(size) < 2 or not all(_is_int(v) and v > 0 for v in size[:2]):
            raise SampleError(path, "malformed annotation: 'imsize' must be [height, width, ...]")
        size = (size[0], size[1])
    return objects, scene, filename, size


def read_index_objectnames(path: Path) -> list[str]:
    """``objectnames`` of index_ade20k.pkl (1-based: the name of class k is objectnames[k - 1]).

    Unpickling runs code from the file: only called when the user asks for it.
    """
    if not path.is_file():
        raise ConversionError(f"{path}: index pickle not found")
    try:
        with open(path, "rb") as f:
            index = pickle.load(f)
    except Exception as e:  # unpickling can raise anything
        raise ConversionError(f"{path}: cannot unpickle: {type(e).__name__}: {e}") from None
    names = index.get("objectnames") if isinstance(index, dict) else None
    if names is None or isinstance(names, str | bytes):
        raise ConversionError(f"{path}: no 'objectnames' list in the index")
    try:
        names = list(names)
    except TypeError:
        raise ConversionError(f"{path}: 'objectnames' is not a list") from None
    if not all(isinstance(n, str) for n in names):
        raise ConversionError(f"{path}: 'objectnames' must hold strings")
    return names


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
