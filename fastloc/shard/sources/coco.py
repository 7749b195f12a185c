"""COCO 2017: images with COCO-Stuff (stuffthingmaps or instances + stuff JSON), COCO-Object or
panoptic label maps, and captions.

The layouts, the five label sources and the JSON paint rule (``PAINT_RULE``) are in
shards/README.md ("What each converter writes"). Annotation files are read once, in the parent,
and kept per image as compact JSON bytes, so forked workers touch only the images they read.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import numpy as np

from fastloc.cli import flowing_help
from fastloc.shard.config import ConvertConfig
from fastloc.shard.encode import label_dtype
from fastloc.shard.errors import ConversionError, SampleError
from fastloc.shard.jsonfile import read_json_object
from fastloc.shard.sources.base import Item, Sample, SourceInfo, sanitize_key
from fastloc.shard.sources.files import (
    check_label_values,
    file_size,
    map_label_values,
    read_bytes,
    read_label_png,
)

# COCO-Stuff's official label list (cocostuff labels.txt; the same table as Patch-Seg's
# `coco_index_to_class`): 0 unlabeled, 1..91 things by COCO category id (the 11 ids COCO never
# uses keep their slots and names), 92..182 the 91 stuff classes.
COCO_STUFF_CLASSES: tuple[str, ...] = (
    "unlabeled",
    # things 1..91
    "person",
    "bicycle",
    "car",
    "motorcycle",
    "airplane",
    "bus",
    "train",
    "truck",
    "boat",
    "traffic light",
    "fire hydrant",
    "street sign",
    "stop sign",
    "parking meter",
    "bench",
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "hat",
    "backpack",
    "umbrella",
    "shoe",
    "eye glasses",
    "handbag",
    "tie",
    "suitcase",
    "frisbee",
    "skis",
    "snowboard",
    "sports ball",
    "kite",
    "baseball bat",
    "baseball glove",
    "skateboard",
    "surfboard",
    "tennis racket",
    "bottle",
    "plate",
    "wine glass",
    "cup",
    "fork",
    "knife",
    "spoon",
    "bowl",
    "banana",
    "apple",
    "sandwich",
    "orange",
    "broccoli",
    "carrot",
    "hot dog",
    "pizza",
    "donut",
    "cake",
    "chair",
    "couch",
    "potted plant",
    "bed",
    "mirror",
    "dining table",
    "window",
    "desk",
    "toilet",
    "door",
    "tv",
    "laptop",
    "mouse",
    "remote",
    "keyboard",
    "cell phone",
    "microwave",
    "oven",
    "toaster",
    "sink",
    "refrigerator",
    "blender",
    "book",
    "clock",
    "vase",
    "scissors",
    "teddy bear",
    "hair drier",
    "toothbrush",
    "hair brush",
    # stuff 92..182
    "banner",
    "blanket",
    "branch",
    "bridge",
    "building-other",
    "bush",
    "cabinet",
    "cage",
    "cardboard",
    "carpet",
    "ceiling-other",
    "ceiling-tile",
    "cloth",
    "clothes",
    "clouds",
    "counter",
    "cupboard",
    "curtain",
    "desk-stuff",
    "dirt",
    "door-stuff",
    "fence",
    "floor-marble",
    "floor-other",
    "floor-stone",
    "floor-tile",
    "floor-wood",
    "flower",
    "fog",
    "food-other",
    "fruit",
    "furniture-other",
    "grass",
    "gravel",
    "ground-other",
    "hill",
    "house",
    "leaves",
    "light",
    "mat",
    "metal",
    "mirror-stuff",
    "moss",
    "mountain",
    "mud",
    "napkin",
    "net",
    "paper",
    "pavement",
    "pillow",
    "plant-other",
    "plastic",
    "platform",
    "playingfield",
    "railing",
    "railroad",
    "river",
    "road",
    "rock",
    "roof",
    "rug",
    "salad",
    "sand",
    "sea",
    "shelf",
    "sky-other",
    "skyscraper",
    "snow",
    "solid-other",
    "stairs",
    "stone",
    "straw",
    "structural-other",
    "table",
    "tent",
    "textile-other",
    "towel",
    "tree",
    "vegetable",
    "wall-brick",
    "wall-concrete",
    "wall-other",
    "wall-panel",
    "wall-stone",
    "wall-tile",
    "wall-wood",
    "water-other",
    "waterdrops",
    "window-blind",
    "window-other",
    "wood",
)
assert len(COCO_STUFF_CLASSES) == 183
THING_IDS = range(1, 92)  # COCO category ids of things (80 used + 11 unused)
STUFF_IDS = range(92, 183)  # COCO-Stuff stuff ids
STUFF_OTHER_ID = 183  # stuff_*.json's "other": the thing pixels; never painted
UNUSED_THING_IDS = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91)

STUFFTHINGMAPS_RULE = "label = (png + 1) % 256"
PAINT_RULE = (
    "start from 0 at the JSON's height x width; paint stuff annotations (category 92..182) in "
    "ascending annotation id, skipping stuff category 183 'other' (its pixels stay 0 unless a "
    "thing covers them); then paint thing annotations (category 1..91): crowd regions first, "
    "then non-crowd, each group in descending 'area' with ties by ascending annotation id; "
    "later paint wins (masks decoded with pycocotools from polygons / RLE / crowd RLE)"
)
PANOPTIC_RULE = "segment id = R + 256*G + 256^2*B -> category -> contiguous index 1..{n} in category-id order; VOID = 0"

# COCO-Object (GroupViT, TCL, SCLIP, NACLIP, ClearCLIP): 0 background, 1..80 the COCO thing classes
# in category-id order, made from the stuffthingmaps as GroupViT's convert_dataset/
# convert_coco_object.py makes *_instanceTrainIds.png (shards/README.md)
COCO_OBJECT_CLASSES: tuple[str, ...] = (
    "background",
    *(COCO_STUFF_CLASSES[i] for i in THING_IDS if i not in UNUSED_THING_IDS),
)
assert len(COCO_OBJECT_CLASSES) == 81
# stuffthingmaps PNG value (COCO id - 1; 255 unlabeled) -> COCO-Object label; -1 for values no
# COCO category has (the unused thing ids, 182..254)
OBJECT_OF = np.full(256, -1, np.int16)
OBJECT_OF[[i - 1 for i in THING_IDS if i not in UNUSED_THING_IDS]] = np.arange(1, 81)
OBJECT_OF[[i - 1 for i in STUFF_IDS]] = 0
OBJECT_OF[255] = 0
OBJECT_RULE = (
    "stuffthingmaps PNG value v (COCO id - 1): the 80 thing ids (v <= 89) -> 1..80 in COCO category order; "
    "stuff (91..181) and unlabeled (255) -> 0 background (GroupViT convert_coco_object.py); "
    "*_instanceTrainIds.png (that script's output) read as they are"
)
INSTANCE_TRAIN_IDS = "_instanceTrainIds.png"

LabelMode = Literal["stuffthingmaps", "object", "json", "panoptic", "none"]


@flowing_help
@dataclass(frozen=True, kw_only=True)
class CocoConfig(ConvertConfig):
    """COCO 2017 (official layout): images with COCO-Stuff label maps (183 classes, from the
    stuffthingmaps PNGs or painted from the instance + stuff JSON), COCO-Object label maps
    (81 classes, from the stuffthingmaps), panoptic label maps (133 classes), or no labels;
    optionally all captions of each image as `txt`."""

    root: Path
    """COCO 2017 root in the official layout: train2017/, val2017/, annotations/ (the Patch-Seg
    layout images/{split}2017 + annotations/{split}2017/*.png is found too)."""

    split: Literal["train", "val"] = "train"
    """Which split to convert: images come from ROOT/{split}2017/*.jpg."""

    labels: LabelMode = "stuffthingmaps"
    """Label maps: 'stuffthingmaps' = COCO-Stuff PNGs mapped as Patch-Seg does, (png + 1) % 256
    (183 classes: 0 unlabeled, 1-91 things by COCO id, 92-182 stuff); 'object' = COCO-Object from the
    same PNGs, as GroupViT builds it (81 classes: 0 background = stuff and unlabeled, 1-80 the COCO
    thing classes in category order; an image's <stem>_instanceTrainIds.png, the harness's prepared
    file, is read as it is where <stem>.png is absent); 'json' = the same 183-class
    space painted from instances_*.json (+ stuff_*.json when present) with pycocotools;
    'panoptic' = panoptic PNGs + JSON mapped to 0 = VOID, 1-133 = categories in id order;
    'none' = images only."""

    captions: bool = False
    """Store all captions of each image (captions_{split}2017.json) as `txt`, one per line
    (empty when the image has none)."""

    images: Path | None = None
    """Image folder (default: ROOT/{split}2017, else ROOT/images/{split}2017)."""

    stuffthingmaps: Path | None = None
    """COCO-Stuff label PNG folder for --labels stuffthingmaps or object (default: the first that exists of
    ROOT/stuffthingmaps/{split}2017 and ROOT/annotations/{split}2017, the Patch-Seg layout)."""

    instances_json: Path | None = None
    """Instance annotations for --labels json (default: ROOT/annotations/instances_{split}2017.json)."""

    stuff_json: Path | None = None
    """Stuff annotations for --labels json (default: ROOT/annotations/stuff_{split}2017.json;
    when the default file is absent, only things are painted)."""

    panoptic_json: Path | None = None
    """Panoptic annotations for --labels panoptic (default: ROOT/annotations/panoptic_{split}2017.json)."""

    panoptic_pngs: Path | None = None
    """Panoptic PNG folder for --labels panoptic (default: ROOT/annotations/panoptic_{split}2017/)."""

    captions_json: Path | None = None
    """Captions for --captions (default: ROOT/annotations/captions_{split}2017.json)."""

    def source(self) -> CocoSource:
        """The COCO source these options describe (nothing is read until info()/items())."""
        return CocoSource(self)


@dataclass(frozen=True)
class _Paths:
    """Input paths after defaults, checked to exist where the mode needs them."""

    images: Path
    label_dir: Path | None  # stuffthingmaps or panoptic PNG folder
    instances_json: Path | None
    stuff_json: Path | None  # None in json mode = things only
    panoptic_json: Path | None
    captions_json: Path | None


class CocoSource:
    """Reads COCO 2017 one image at a time (see the module docstring for the label rules)."""

    def __init__(self, config: CocoConfig):
        self.config = config
        self._paths: _Paths | None = None
        self._prepared = False
        # json mode: file name -> (image id, height, width, packed annotations, problem or None)
        # panoptic mode: file name stem -> (image id | None, height | None, width | None,
        #                                   png file name, packed segments_info)
        self._index: dict[str, tuple] = {}
        self._panoptic_lut: dict[int, int] = {}  # COCO category id -> contiguous index
        self._panoptic_cats: list[tuple[int, str]] = []  # (id, name) sorted by id
        self._captions: dict[str, str] = {}  # image file name -> txt
        self._caption_ids: dict[str, int] = {}  # image file name -> image id
        self._json_files: list[str] = []  # the label JSON file(s), named in errors
        self._json_categories: list[set[int]] = []  # json mode: category ids each file lists
        self._unreachable: list[tuple[str, str]] = []  # annotations no listed image owns

    # ------------------------------------------------------------------ protocol

    def info(self) -> SourceInfo:
        self._prepare()
        cfg, paths = self.config, self._paths
        assert paths is not None
        inputs = {k: os.path.abspath(v) for k, v in vars(paths).items() if v is not None}
        extra: dict[str, Any] = {"labels": cfg.labels, "inputs": inputs}
        if cfg.labels in ("stuffthingmaps", "json"):
            encoding: dict[str, Any] = {"space": "coco-stuff-183", "unlabeled": 0, "from": cfg.labels}
            if cfg.labels == "stuffthingmaps":
                encoding["rule"] = STUFFTHINGMAPS_RULE
            else:
                encoding["rule"] = PAINT_RULE
                encoding["stuff"] = paths.stuff_json is not None
            classes: list[str | None] = list(COCO_STUFF_CLASSES)
            extra["unused_thing_ids"] = list(UNUSED_THING_IDS)
            dataset = "coco"
        elif cfg.labels == "object":
            encoding = {"space": "coco-object-81", "unlabeled": None, "from": "stuffthingmaps", "rule": OBJECT_RULE}
            classes = list(COCO_OBJECT_CLASSES)
            extra["category_ids"] = [0] + [i for i in THING_IDS if i not in UNUSED_THING_IDS]
            dataset = "coco-object"
        elif cfg.labels == "panoptic":
            n = len(self._panoptic_cats)
            encoding = {
                "space": f"coco-panoptic-{n}",
                "unlabeled": 0,
                "from": "panoptic",
                "rule": PANOPTIC_RULE.format(n=n),
            }
            classes = ["unlabeled"] + [name for _, name in self._panoptic_cats]
            extra["category_ids"] = [0] + [cid for cid, _ in self._panoptic_cats]
            dataset = "coco-panoptic"
        else:
            encoding, classes, dataset = {}, [], "coco"
        return SourceInfo(
            dataset=dataset,
            split=cfg.split,
            source=os.path.abspath(cfg.root),
            classes=classes,
            has_label=cfg.labels != "none",
            has_txt=cfg.captions,
            label_encoding=encoding,
            extra=extra,
            unreachable=list(self._unreachable),
            inputs=(os.path.abspath(cfg.root), *inputs.values()),
        )

    def items(self) -> list[Item]:
        self._prepare()
        assert self._paths is not None
        folder = self._paths.images
        try:
            files = sorted((p for p in folder.iterdir() if p.suffix == ".jpg"), key=lambda p: p.name)
        except OSError as e:
            raise ConversionError(f"{folder}: cannot list the image folder: {e}") from e
        if not files:
            raise ConversionError(f"{folder}: no .jpg images found")
        items: list[Item] = []
        seen: dict[str, str] = {}
        for image in files:
            key = sanitize_key(image.stem)
            if key in seen:
                raise ConversionError(f"{folder}: {seen[key]} and {image.name} give the same sample key {key!r}")
            seen[key] = image.name
            label = self._label_path(image)
            size = file_size(image) + (file_size(label) if label is not None else 0)
            items.append(Item(key=key, size=size, ref=(str(image), str(label) if label else None)))
        return items

    def load(self, item: Item) -> Sample:
        self._prepare()
        image_str, label_str = item.ref
        image = Path(image_str)
        sample = Sample(key=item.key, source=image_str, jpg=read_bytes(image, "image"))
        image_id: int | None = None
        mode = self.config.labels
        if mode in ("stuffthingmaps", "object", "panoptic"):
            sample.label_source = label_str
        if mode == "stuffthingmaps":
            sample.label = self._load_stuffthingmap(Path(label_str))
        elif mode == "object":
            sample.label = self._load_object(label_str)
        elif mode == "json":
            sample.label, image_id = self._paint_json(image)
        elif mode == "panoptic":
            sample.label, image_id = self._load_panoptic(image, Path(label_str))
        if self.config.captions:
            sample.txt = self._captions.get(image.name, "")
            caption_id = self._caption_ids.get(image.name)
            if image_id is None:
                image_id = caption_id
            elif caption_id is not None and caption_id != image_id:
                raise SampleError(
                    str(self._paths.captions_json),
                    f"{image.name} is image id {caption_id} there but {image_id} in {self._json_files[0]}",
                )
        if image_id is None and image.stem.isdigit():
            image_id = int(image.stem)  # COCO file names are zero-padded image ids
        if image_id is not None:
            sample.meta["image_id"] = image_id
        return sample

    # ------------------------------------------------------------------ set-up

    def _prepare(self) -> None:
        """Resolve and check the paths and read the annotation files the mode needs (once)."""
        if self._prepared:
            return
        self._paths = paths = self._resolve_paths()
        if paths.instances_json is not None:
            self._index_json(paths.instances_json, paths.stuff_json)
        if paths.panoptic_json is not None:
            self._index_panoptic(paths.panoptic_json)
        if paths.captions_json is not None:
            self._index_captions(paths.captions_json)
        self._prepared = True

    def _resolve_paths(self) -> _Paths:
        cfg, root, split = self.config, self.config.root, f"{self.config.split}2017"
        ann = root / "annotations"
        if cfg.labels not in ("stuffthingmaps", "object", "json", "panoptic", "none"):
            raise ConversionError(f"unknown label source {cfg.labels!r}")
        if not root.is_dir():
            raise ConversionError(f"{root}: COCO root folder not found")

        images = _pick_dir("image folder", cfg.images, [root / split, root / "images" / split])
        label_dir = instances = stuff = panoptic = captions = None
        if cfg.labels in ("stuffthingmaps", "object"):
            try:
                label_dir = _pick_dir(
                    "stuffthingmaps folder", cfg.stuffthingmaps, [root / "stuffthingmaps" / split, ann / split]
                )
            except ConversionError as e:
                if cfg.labels == "object":
                    raise ConversionError(
                        f"{e} (--labels object reads the COCO-Stuff label PNGs of stuffthingmaps_trainval2017.zip, "
                        "or the <stem>_instanceTrainIds.png GroupViT's convert_coco_object.py writes beside them)"
                    ) from None
                raise ConversionError(
                    f"{e} (the COCO-Stuff label PNGs of stuffthingmaps_trainval2017.zip, the default --labels); "
                    "without them use --labels json (the same 183 classes painted from "
                    f"annotations/instances_{split}.json and stuff_{split}.json), --labels panoptic "
                    f"(annotations/panoptic_{split}.json and its PNGs) or --labels none"
                ) from None
        elif cfg.labels == "json":
            instances = _need_file("instance annotations", cfg.instances_json or ann / f"instances_{split}.json")
            if cfg.stuff_json is not None:
                stuff = _need_file("stuff annotations", cfg.stuff_json)
            elif (ann / f"stuff_{split}.json").is_file():
                stuff = ann / f"stuff_{split}.json"
        elif cfg.labels == "panoptic":
            panoptic = _need_file("panoptic annotations", cfg.panoptic_json or ann / f"panoptic_{split}.json")
            label_dir = _pick_dir("panoptic PNG folder", cfg.panoptic_pngs, [ann / f"panoptic_{split}"])
        if cfg.captions:
            captions = _need_file("captions", cfg.captions_json or ann / f"captions_{split}.json")
        return _Paths(images, label_dir, instances, stuff, panoptic, captions)

    def _label_path(self, image: Path) -> Path | None:
        paths = self._paths
        assert paths is not None
        if self.config.labels == "stuffthingmaps":
            assert paths.label_dir is not None
            return paths.label_dir / f"{image.stem}.png"
        if self.config.labels == "object":
            assert paths.label_dir is not None
            png, prepared = paths.label_dir / f"{image.stem}.png", paths.label_dir / f"{image.stem}{INSTANCE_TRAIN_IDS}"
            return prepared if not os.path.lexists(png) and os.path.lexists(prepared) else png
        if self.config.labels == "panoptic":
            assert paths.label_dir is not None
            entry = self._index.get(image.stem)
            return paths.label_dir / (entry[3] if entry else f"{image.stem}.png")
        return None

    def _index_json(self, instances_path: Path, stuff_path: Path | None) -> None:
        """Group the instance (+ stuff) annotations per image file name, packed as JSON bytes."""
        files = [(instances_path, THING_IDS, "thing")]
        if stuff_path is not None:
            files.append((stuff_path, range(92, 184), "stuff"))
        self._json_files = [str(path) for path, _, _ in files]
        images: dict[str, list] = {}  # file name -> [image id, h, w, [[file index, ann], ...], problem]
        for which, (path, allowed, kind) in enumerate(files):
            data = _read_json(path, ("images", "annotations", "categories"))
            self._json_categories.append(_check_categories(path, data["categories"], allowed, kind))
            by_id: dict[int, list] = {}  # this file's image id -> entry
            entries = _image_entries(path, data["images"])
            listed = {image_id for image_id, _, _, _ in entries}
            for image_id, name, h, w in entries:
                entry = images.get(name)
                if which == 0:
                    entry = images[name] = [image_id, h, w, [], None]
                elif entry is None:
                    continue  # only in the stuff file: the instances file decides what is converted
                elif (entry[0], entry[1], entry[2]) != (image_id, h, w) and entry[4] is None:
                    entry[4] = (
                        f"{path} lists it as id {image_id}, {h}x{w} but {instances_path} as "
                        f"id {entry[0]}, {entry[1]}x{entry[2]}"
                    )
                by_id[image_id] = entry
            if which == 1:
                in_stuff = {id(e) for e in by_id.values()}
                for entry in images.values():
                    if id(entry) not in in_stuff and entry[4] is None:
                        entry[4] = f"not listed in {path}"
            orphans = []
            for i, ann in enumerate(data["annotations"]):
                if not isinstance(ann, dict) or not isinstance(ann.get("image_id"), int):
                    raise ConversionError(f"{path}: annotations[{i}] has no integer 'image_id'")
                entry = by_id.get(ann["image_id"])
                if entry is not None:
                    entry[3].append([which, ann])
                elif ann["image_id"] not in listed:
                    orphans.append(ann["image_id"])
            self._report_orphans(path, orphans)
            del data, by_id
        self._index = {
            name: (e[0], e[1], e[2], json.dumps(e[3], separators=(",", ":")).encode(), e[4])
            for name, e in images.items()
        }

    def _report_orphans(self, path: Path, image_ids: list[int]) -> None:
        """Annotations whose image the file does not list cannot be used: say so in the report."""
        if image_ids:
            shown = ", ".join(map(str, sorted(set(image_ids))[:5])) + (", ..." if len(set(image_ids)) > 5 else "")
            count = f"{len(image_ids)} annotation{'s' * (len(image_ids) != 1)}"
            self._unreachable.append((str(path), f"{count} of image ids not in its 'images' list ({shown}): not used"))

    def _index_panoptic(self, path: Path) -> None:
        data = _read_json(path, ("images", "annotations", "categories"))
        cats: dict[int, str] = {}
        for i, c in enumerate(data["categories"]):
            if not isinstance(c, dict) or not isinstance(c.get("id"), int) or not isinstance(c.get("name"), str):
                raise ConversionError(f"{path}: categories[{i}] needs an integer 'id' and a string 'name'")
            if c["id"] in cats:
                raise ConversionError(f"{path}: category id {c['id']} is listed twice")
            cats[c["id"]] = c["name"]
        if not cats:
            raise ConversionError(f"{path}: 'categories' is empty")
        self._panoptic_cats = sorted(cats.items())
        self._panoptic_lut = {cid: i + 1 for i, (cid, _) in enumerate(self._panoptic_cats)}
        images = {image_id: (name, h, w) for image_id, name, h, w in _image_entries(path, data["images"])}
        index: dict[str, tuple] = {}
        first_for_image: dict[int, int] = {}  # image id -> index of its annotation
        first_for_png: dict[str, int] = {}  # PNG name -> index of its annotation
        orphans = []
        for i, ann in enumerate(data["annotations"]):
            if (
                not isinstance(ann, dict)
                or not isinstance(ann.get("image_id"), int)
                or not isinstance(ann.get("file_name"), str)
                or not isinstance(ann.get("segments_info"), list)
            ):
                raise ConversionError(
                    f"{path}: annotations[{i}] needs an integer 'image_id', a string 'file_name' "
                    "and a list 'segments_info'"
                )
            png = PurePosixPath(ann["file_name"]).name
            image_id = ann["image_id"]
            if image_id in first_for_image:
                raise ConversionError(
                    f"{path}: annotations[{first_for_image[image_id]}] and annotations[{i}] are both for "
                    f"image id {image_id}: its segments could not be told apart"
                )
            if png in first_for_png:
                raise ConversionError(
                    f"{path}: annotations[{first_for_png[png]}] and annotations[{i}] both name the PNG {png}"
                )
            first_for_image[image_id], first_for_png[png] = i, i
            if image_id not in images:
                orphans.append(image_id)
                continue
            segments = json.dumps(ann["segments_info"], separators=(",", ":")).encode()
            name, h, w = images[image_id]
            index[PurePosixPath(name).stem] = (image_id, h, w, png, segments)
        self._report_orphans(path, orphans)
        self._index = index
        self._json_files = [str(path)]

    def _index_captions(self, path: Path) -> None:
        data = _read_json(path, ("images", "annotations"))
        names = {image_id: name for image_id, name, _, _ in _image_entries(path, data["images"])}
        per_image: dict[int, list[tuple[int, str]]] = {}
        orphans = []
        for i, ann in enumerate(data["annotations"]):
            if (
                not isinstance(ann, dict)
                or not isinstance(ann.get("image_id"), int)
                or not isinstance(ann.get("caption"), str)
            ):
                raise ConversionError(f"{path}: annotations[{i}] needs an integer 'image_id' and a string 'caption'")
            if ann["image_id"] not in names:
                orphans.append(ann["image_id"])
                continue
            ann_id = ann.get("id") if isinstance(ann.get("id"), int) else i
            per_image.setdefault(ann["image_id"], []).append((ann_id, ann["caption"]))
        self._report_orphans(path, orphans)
        self._caption_ids = {name: image_id for image_id, name in names.items()}
        self._captions = {
            names[image_id]: "\n".join(" ".join(c.splitlines()).strip() for _, c in sorted(caps))
            for image_id, caps in per_image.items()
        }

    # ------------------------------------------------------------------ label readers

    def _load_stuffthingmap(self, png: Path) -> np.ndarray:
        values = read_label_png(png, ("L", "P"), "a single-channel 8-bit PNG", self.config.max_pixels)
        label = (values.astype(np.int64) + 1) % 256
        bad = np.unique(label[label >= len(COCO_STUFF_CLASSES)])
        if bad.size:
            raise SampleError(
                str(png),
                f"PNG values {[int(v) - 1 for v in bad[:8]]} map outside the 183-class COCO-Stuff space "
                f"({STUFFTHINGMAPS_RULE}; valid PNG values are 0..181 and 255)",
            )
        return label.astype(np.uint8)

    def _load_object(self, png: str) -> np.ndarray:
        values = read_label_png(png, ("L", "P"), "a single-channel 8-bit PNG", self.config.max_pixels)
        if png.endswith(INSTANCE_TRAIN_IDS):  # already mapped
            check_label_values(values, len(COCO_OBJECT_CLASSES), None, png, "COCO-Object classes (0-80)")
            return values.astype(np.uint8, copy=False)
        allowed = "COCO-Stuff ids of the stuffthingmaps (0..181 but the 11 unused thing ids, and 255)"
        return map_label_values(values, OBJECT_OF, png, allowed)

    def _paint_json(self, image: Path) -> tuple[np.ndarray, int]:
        entry = self._index.get(image.name)
        if entry is None:
            raise SampleError(str(image), f"image not listed in {self._json_files[0]}")
        image_id, h, w, packed, problem = entry
        if problem is not None:
            raise SampleError(str(image), problem)
        if h * w > self.config.max_pixels:  # the label map would be as large as the JSON says
            raise SampleError(
                self._json_files[0],
                f"{image.name} is {w}x{h} = {w * h / 1e6:.1f} Mpixels there, over the limit of "
                f"{self.config.max_pixels / 1e6:.1f} Mpixels (--max-pixels {self.config.max_pixels})",
            )
        stuff, things = [], []
        for which, ann in json.loads(packed):
            where = f"annotation {ann.get('id')!r} of {image.name}"
            path = self._json_files[which]
            ann["_file"] = which  # which JSON to name in errors
            cat = ann.get("category_id")
            if not isinstance(cat, int) or not isinstance(ann.get("id"), int) or "segmentation" not in ann:
                raise SampleError(path, f"{where} needs an integer 'id', 'category_id' and a 'segmentation'")
            if cat in STUFF_IDS:
                stuff.append(ann)
            elif cat in THING_IDS:
                area, crowd = ann.get("area"), ann.get("iscrowd")
                if isinstance(area, bool) or not isinstance(area, (int, float)) or crowd not in (0, 1):
                    raise SampleError(path, f"{where} needs a numeric 'area' and 'iscrowd' 0 or 1")
                things.append(ann)
            elif cat != STUFF_OTHER_ID:
                raise SampleError(path, f"{where}: category {cat} is not in the COCO-Stuff 183-class space")
            if cat not in self._json_categories[which]:
                raise SampleError(path, f"{where}: category {cat} is not listed in the file's 'categories'")
        stuff.sort(key=lambda a: a["id"])
        things.sort(key=lambda a: (0 if a["iscrowd"] else 1, -float(a["area"]), a["id"]))
        label = np.zeros((h, w), np.uint8)
        for ann in stuff + things:
            try:
                mask = _decode_segmentation(ann["segmentation"], h, w)
            except (ValueError, TypeError, KeyError, IndexError, OverflowError) as e:
                raise SampleError(
                    self._json_files[ann["_file"]],
                    f"annotation {ann['id']} of {image.name}: bad segmentation ({e})",
                ) from e
            label[mask] = ann["category_id"]
        return label, image_id

    def _load_panoptic(self, image: Path, png: Path) -> tuple[np.ndarray, int]:
        entry = self._index.get(image.stem)
        if entry is None:
            raise SampleError(str(image), f"image has no annotation in {self._json_files[0]}")
        image_id, h, w, _, packed = entry
        rgb = read_label_png(png, ("RGB",), "an RGB PNG", self.config.max_pixels)
        if h is not None and rgb.shape[:2] != (h, w):
            raise SampleError(str(png), f"PNG is {rgb.shape[0]}x{rgb.shape[1]} but {self._json_files[0]} says {h}x{w}")
        rgb = rgb.astype(np.uint32)
        ids = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]  # [H, W] segment ids
        segments: dict[int, int] = {}
        for seg in json.loads(packed):
            ok = isinstance(seg, dict) and isinstance(seg.get("id"), int)
            if not ok or not isinstance(seg.get("category_id"), int):
                raise SampleError(
                    self._json_files[0],
                    f"segments_info of {image.name} has an entry without integer 'id'/'category_id'",
                )
            if seg["category_id"] not in self._panoptic_lut:
                raise SampleError(
                    self._json_files[0],
                    f"segment {seg['id']} of {image.name}: category {seg['category_id']} is not in 'categories'",
                )
            if seg["id"] in segments or seg["id"] == 0:
                what = "is listed twice" if seg["id"] in segments else "is 0, the id of VOID pixels"
                raise SampleError(
                    self._json_files[0], f"segment id {seg['id']} in the segments_info of {image.name} {what}"
                )
            segments[seg["id"]] = self._panoptic_lut[seg["category_id"]]
        segments[0] = 0  # VOID
        present, inverse = np.unique(ids, return_inverse=True)
        unknown = [int(s) for s in present if int(s) not in segments]
        if unknown:
            raise SampleError(str(png), f"segment ids {unknown[:8]} are not in the segments_info of {image.name}")
        lut = np.array([segments[int(s)] for s in present], label_dtype(len(self._panoptic_cats) + 1))
        return lut[inverse.reshape(ids.shape)], image_id


# ---------------------------------------------------------------------- helpers


def _pick_dir(what: str, given: Path | None, defaults: list[Path]) -> Path:
    if given is not None:
        if not given.is_dir():
            raise ConversionError(f"{given}: {what} not found")
        return given
    for candidate in defaults:
        if candidate.is_dir():
            return candidate
    raise ConversionError(f"{what} not found: looked for {' and '.join(str(p) for p in defaults)}")


def _need_file(what: str, path: Path) -> Path:
    if not path.is_file():
        raise ConversionError(f"{path}: {what} file not found")
    return path


def _read_json(path: Path, keys: tuple[str, ...]) -> dict:
    """A COCO annotation file with the given top-level lists, or ConversionError."""
    data = read_json_object(path, "annotation file", keys)
    for k in keys:
        if not isinstance(data[k], list):
            raise ConversionError(f"{path}: {k!r} is a {type(data[k]).__name__}, expected a list")
    return data


def _image_entries(path: Path, images: list) -> list[tuple[int, str, int, int]]:
    """(id, file name, height, width) of each entry of a JSON 'images' list."""
    out = []
    by_id: dict[int, int] = {}  # image id -> its index in the list
    by_name: dict[str, int] = {}  # file name -> its index in the list
    for i, im in enumerate(images):
        ok = isinstance(im, dict) and isinstance(im.get("id"), int) and isinstance(im.get("file_name"), str)
        ok = ok and all(isinstance(im.get(k), int) and im[k] > 0 for k in ("height", "width"))
        if not ok:
            raise ConversionError(
                f"{path}: images[{i}] needs an integer 'id', a string 'file_name' and positive "
                "integer 'height' and 'width'"
            )
        name = PurePosixPath(im["file_name"]).name
        # one id for two images would give one image's annotations to the other
        if im["id"] in by_id:
            raise ConversionError(
                f"{path}: image id {im['id']} is listed twice (images[{by_id[im['id']]}] and images[{i}]): "
                "its annotations cannot be told apart"
            )
        if name in by_name:
            raise ConversionError(f"{path}: image {name} is listed twice (images[{by_name[name]}] and images[{i}])")
        by_id[im["id"]], by_name[name] = i, i
        out.append((im["id"], name, im["height"], im["width"]))
    return out


def _check_categories(path: Path, categories: list, allowed: range, kind: str) -> set[int]:
    """The JSON's categories must be COCO-Stuff's (ids and names), or the labels mean something else;
    returns the ids listed."""
    problems = []
    listed: set[int] = set()
    for i, c in enumerate(categories):
        if not isinstance(c, dict) or not isinstance(c.get("id"), int) or not isinstance(c.get("name"), str):
            raise ConversionError(f"{path}: categories[{i}] needs an integer 'id' and a string 'name'")
        cid, name = c["id"], c["name"]
        if cid in listed:
            raise ConversionError(f"{path}: category id {cid} is listed twice")
        listed.add(cid)
        expected = "other" if cid == STUFF_OTHER_ID else COCO_STUFF_CLASSES[cid] if cid in allowed else None
        if cid not in allowed:
            problems.append(f"id {cid} ({name!r}) is not a {kind} id")
        elif name != expected:
            problems.append(f"id {cid} is {name!r}, COCO-Stuff calls it {expected!r}")
    if problems:
        raise ConversionError(f"{path}: categories disagree with COCO-Stuff's: " + "; ".join(problems[:10]))
    return listed


def _rle_string_counts(s: str) -> list[int]:
    """Decode COCO's compressed RLE string (pycocotools' rleFrString), so its run lengths can be
    checked before the C decoder, which trusts them, writes the mask."""
    counts: list[int] = []
    p, n = 0, len(s)
    while p < n:
        x = k = 0
        more = True
        while more:
            if p >= n:
                raise ValueError("compressed RLE string ends inside a number")
            c = ord(s[p]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"invalid character {s[p]!r} in compressed RLE")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def _check_counts(counts: list, h: int, w: int) -> None:
    if any(not isinstance(c, int) or c < 0 for c in counts):
        raise ValueError("RLE run lengths must be non-negative integers")
    if sum(counts) != h * w:
        raise ValueError(f"RLE run lengths sum to {sum(counts)}, not {h}x{w} = {h * w}")


def _decode_segmentation(segm: Any, h: int, w: int) -> np.ndarray:
    """A COCO segmentation (polygons, uncompressed or compressed RLE) as an [h, w] bool mask,
    decoded with pycocotools as COCO.annToMask does."""
    from pycocotools import mask as mask_utils

    if isinstance(segm, list):  # polygons: one object may have several parts
        if not segm:
            return np.zeros((h, w), bool)
        if not all(isinstance(poly, list) and len(poly) % 2 == 0 for poly in segm):
            raise ValueError("polygons must be lists of x, y pairs")
        # parts with fewer than 3 points have no area (and pycocotools would read a 4-number
        # part as a box): drop them, as detectron2 does
        segm = [poly for poly in segm if len(poly) >= 6]
        if not segm:
            return np.zeros((h, w), bool)
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, h, w))
    elif isinstance(segm, dict):
        size, counts = segm.get("size"), segm.get("counts")
        if not isinstance(size, list) or [int(v) for v in size] != [h, w]:
            raise ValueError(f"RLE size {size} differs from the image size [{h}, {w}]")
        if isinstance(counts, list):  # uncompressed RLE (crowd regions)
            _check_counts(counts, h, w)
            rle = mask_utils.frPyObjects(segm, h, w)
        elif isinstance(counts, (str, bytes)):
            text = counts.decode("ascii") if isinstance(counts, bytes) else counts
            _check_counts(_rle_string_counts(text), h, w)
            rle = {"size": [h, w], "counts": text.encode("ascii")}
        else:
            raise ValueError("RLE 'counts' must be a list or a string")
    else:
        raise ValueError(f"segmentation is a {type(segm).__name__}, expected polygons or RLE")
    with warnings.catch_warnings():
        # pycocotools' Cython masks lack numpy 2's __array__(copy=...): harmless, noisy
        warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
        return mask_utils.decode(rle).astype(bool)
