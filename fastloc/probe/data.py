"""The probe's data: the train and validation splits of a shard set, checked, and their classes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fastloc.data.shards import ShardSet, open_shards

TRAIN_SPLITS = ("train", "training")
VAL_SPLITS = ("val", "validation")


@dataclass(frozen=True)
class ProbeData:
    train: ShardSet
    val: ShardSet

    @property
    def dataset(self) -> str:
        return self.val.manifest["dataset"]

    @property
    def num_classes(self) -> int:
        return int(self.val.manifest["num_classes"])

    @property
    def classes(self) -> list[str | None]:
        return list(self.val.manifest["classes"])

    @property
    def groups(self) -> dict[str, list[int]]:
        return class_groups(self.val.manifest)


def split_folder(root: Path, given: str, defaults: tuple[str, ...], role: str) -> Path:
    """The folder of a split under ``root``: ``given``, else the first of ``defaults`` that holds a
    manifest (FileNotFoundError naming what was looked for)."""
    names = (given,) if given else defaults
    for name in names:
        if (root / name / "manifest.json").is_file():
            return root / name
    flag = "--train-split" if role == "training" else "--val-split"
    raise FileNotFoundError(
        f"{root}: no {role} split (looked for {' or '.join(f'{n}/manifest.json' for n in names)}); "
        f"convert one with python -m fastloc.shard, or name its folder with {flag}"
    )


def open_data(root: Path, train_split: str = "", val_split: str = "") -> ProbeData:
    """Both splits, with label maps and one class table (ShardError / ValueError otherwise)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such shard set (python -m fastloc.shard converts one)")
    train = open_shards(split_folder(root, train_split, TRAIN_SPLITS, "training"))
    val = open_shards(split_folder(root, val_split, VAL_SPLITS, "validation"))
    for split in (train, val):
        check_labelled(split)
    check_same_classes(train, val)
    return ProbeData(train, val)


def check_labelled(split: ShardSet) -> None:
    """ValueError unless the split's samples carry label maps."""
    if "seg.png" not in split.manifest["keys"]:
        raise ValueError(
            f"{split.root}: its samples have no label maps (seg.png; members {split.manifest['keys']}), and "
            "every reduction and dense protocol is made from them"
        )


def check_same_classes(train: ShardSet, val: ShardSet) -> None:
    """ValueError unless the two splits share one class table."""
    if train.manifest["num_classes"] != val.manifest["num_classes"] or (
        train.manifest["classes"] != val.manifest["classes"]
    ):
        raise ValueError(
            f"{train.root} and {val.root} have different class tables "
            f"({train.manifest['num_classes']} and {val.manifest['num_classes']} classes)"
        )


def class_groups(manifest: dict) -> dict[str, list[int]]:
    """Named groups of classes for stratified recall: COCO-Stuff things (1-91) and stuff (92-182);
    the synthetic set's textures (region classes but background) and shapes (object classes)."""
    label = manifest.get("label") or {}
    if label.get("space") == "coco-stuff-183":
        return {"things": list(range(1, 92)), "stuff": list(range(92, 183))}
    source = manifest.get("source") or {}
    if manifest.get("dataset") == "synthetic" and "object_classes" in source:
        return {
            "texture": [c for c in source["region_classes"] if c != 0],
            "shape": list(source["object_classes"]),
        }
    return {}
