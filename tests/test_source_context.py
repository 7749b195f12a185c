"""Pascal Context on a small layout built in tmp_path, as mmseg's pascal_context.py converter leaves
it: VOC2010/JPEGImages, SegmentationClassContext (uint8 PNGs 0..59) and
ImageSets/SegmentationContext/{train,val}.txt. Conversion, verify and inspect end to end.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_source_voc import cli, files_under, jpeg, png_values, read_back, verify_and_inspect

from fastloc.shard.errors import ConversionError, SampleError
from fastloc.shard.manifest import read_manifest
from fastloc.shard.sources.context import ContextConfig, ContextSource

# written out here, not imported: mmseg 1.x PascalContextDataset.METAINFO['classes'] (label order)
NAMES = (  # noqa: SIM905 (one string reads as the table it is)
    "background aeroplane bag bed bedclothes bench bicycle bird boat book bottle building bus cabinet car cat "
    "ceiling chair cloth computer cow cup curtain dog door fence floor flower food grass ground horse keyboard "
    "light motorbike mountain mouse person plate platform pottedplant road rock sheep shelves sidewalk sign sky "
    "snow sofa table track train tree truck tvmonitor wall water window wood"
).split()
TRAIN = ["2008_000002", "2008_000003"]
VAL = ["2008_000008", "2010_005000", "2008_000019"]  # list order, not sorted


def label_map(n: int) -> np.ndarray:
    """[H, W] uint8 holding background, two context classes and the last class (59, wood)."""
    h, w = 24 + 2 * n, 30 + 2 * n
    label = np.zeros((h, w), np.uint8)
    label[2:12, 2:14] = 1 + (11 * n) % 58
    label[12:, 10:] = 59 - n
    label[-3:, :4] = 59
    return label


def make_context(root: Path) -> dict[str, dict[str, np.ndarray]]:
    """A VOC2010 root with Pascal Context labels; returns {split: {id: expected label}}."""
    lists = root / "ImageSets" / "SegmentationContext"
    for folder in ("JPEGImages", "SegmentationClassContext", lists):
        (root / folder).mkdir(parents=True, exist_ok=True)
    expected: dict[str, dict[str, np.ndarray]] = {"train": {}, "val": {}}
    for n, image_id in enumerate(TRAIN + VAL):
        label = label_map(n)
        jpeg(root / "JPEGImages" / f"{image_id}.jpg", label.shape[1], label.shape[0], seed=n)
        # mmseg saves Image.fromarray(uint8): a grayscale PNG; a palette one must read the same
        image = Image.fromarray(label)
        if n % 2:
            image = image.convert("P")
        image.save(root / "SegmentationClassContext" / f"{image_id}.png")
        expected["train" if image_id in TRAIN else "val"][image_id] = label
    (lists / "train.txt").write_text("".join(f"{i}\n" for i in TRAIN))
    (lists / "val.txt").write_text("".join(f"{i}\n" for i in VAL))
    return expected


def test_class_table_is_the_mmseg_one():
    from fastloc.shard.sources.context import CONTEXT_CLASSES

    assert CONTEXT_CLASSES == NAMES and len(NAMES) == 60
    # 1..59 in the order of their Detail category ids, which mmseg's converter sorts: alphabetical
    assert NAMES[1:] == sorted(NAMES[1:])


@pytest.mark.parametrize("split", ["train", "val"])
def test_source_reads_labels_as_they_are(tmp_path, split):
    root = tmp_path / "VOC2010"
    expected = make_context(root)[split]
    source = ContextConfig(root=root, split=split).source()
    info = source.info()
    assert info.dataset == "context" and info.split == split and info.has_label
    assert info.classes == NAMES and info.num_classes == 60
    assert info.label_encoding["ignore"] == 255 and info.label_encoding["space"] == "pascal-context-60"
    assert info.extra["inputs"]["labels"] == str(root / "SegmentationClassContext")
    items = source.items()
    assert [item.key for item in items] == (TRAIN if split == "train" else VAL)  # the list's order
    for item in items:
        assert pickle.loads(pickle.dumps(item)) == item
        sample = source.load(item)
        assert sample.source == str(root / "JPEGImages" / f"{item.key}.jpg")
        assert sample.label_source == str(root / "SegmentationClassContext" / f"{item.key}.png")
        assert sample.label.dtype == np.uint8
        np.testing.assert_array_equal(sample.label, expected[item.key])


def test_convert_verify_inspect_and_read_back(tmp_path, capsys):
    root, out = tmp_path / "VOC2010", tmp_path / "out"
    expected = make_context(root)["val"]
    void = root / "SegmentationClassContext" / f"{VAL[0]}.png"
    with_void = expected[VAL[0]].copy()
    with_void[0, :] = 255  # void, should a label file hold it: kept
    Image.fromarray(with_void).save(void)
    expected[VAL[0]] = with_void

    code, _stdout, stderr = cli(
        capsys, "context", "--root", root, "--out", out, "--no-progress", "--processes", 1, "--no-fsync"
    )
    assert code == 0, stderr
    split_dir = out / "context" / "val"
    manifest = read_manifest(split_dir)
    assert manifest["dataset"] == "context" and manifest["classes"] == NAMES and manifest["num_classes"] == 60
    assert manifest["label"]["ignore"] == 255 and manifest["label"]["dtype"] == "uint8"
    assert manifest["report"]["skipped"] == 0 and manifest["report"]["reencoded"] == 0
    samples = read_back(split_dir)
    assert sorted(samples) == sorted(VAL)
    for key, sample in samples.items():
        np.testing.assert_array_equal(png_values(sample["seg.png"]), expected[key])
        assert sample["jpg"] == (root / "JPEGImages" / f"{key}.jpg").read_bytes()  # passed through

    verify_and_inspect(capsys, split_dir, tmp_path / "sheet.png")


def test_bad_samples_are_skipped_naming_the_file(tmp_path, capsys):
    root, out = tmp_path / "VOC2010", tmp_path / "out"
    expected = make_context(root)["val"]
    labels = root / "SegmentationClassContext"
    outside = labels / f"{VAL[0]}.png"
    label = expected[VAL[0]].copy()
    label[0, :2] = [60, 254]
    Image.fromarray(label).save(outside)
    mismatch = labels / f"{VAL[1]}.png"
    Image.fromarray(expected[VAL[1]][:-1]).save(mismatch)  # one row short of the image

    source = ContextSource(root, split="val")
    with pytest.raises(SampleError) as err:
        source.load(source.items()[0])
    assert err.value.path == str(outside)
    assert err.value.reason == "label values 60, 254 are not Pascal Context classes (0-59, or 255 = void)"

    args = ["context", "--root", root, "--out", out, "--no-progress", "--processes", 1, "--no-fsync"]
    code, stdout, stderr = cli(capsys, *args)
    assert code == 0, stderr
    manifest = read_manifest(out / "context" / "val")
    assert manifest["num_samples"] == 1
    skipped = {e["path"]: e["reason"] for e in manifest["report"]["skipped_samples"]}
    assert set(skipped) == {str(outside), str(mismatch)}
    assert "60, 254" in skipped[str(outside)]
    assert "label map is" in skipped[str(mismatch)] and "but the image is" in skipped[str(mismatch)]
    for path, reason in skipped.items():
        assert "\n" not in reason and f"skipped {path}: {reason}" in stdout
    meta = json.loads(read_back(out / "context" / "val")[VAL[2]]["json"])
    assert meta["key"] == VAL[2]


def test_layout_problems_are_one_line_errors(tmp_path, capsys):
    devkit = tmp_path / "VOCdevkit"
    root = devkit / "VOC2010"
    make_context(root)
    out = tmp_path / "out"

    def error(at: Path, *extra) -> str:
        code, _, stderr = cli(capsys, "context", "--root", at, "--out", out, "--no-progress", *extra)
        assert code == 2 and stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
        assert "Traceback" not in stderr and files_under(out) == []
        return stderr

    assert error(tmp_path / "absent") == f"error: {tmp_path / 'absent'}: Pascal Context root not found\n"
    assert f"did you mean {root}?" in error(devkit)
    lists = root / "ImageSets" / "SegmentationContext"
    (lists / "train.txt").unlink()
    assert f"{lists / 'train.txt'}: split list not found" in error(root, "--split", "train")
    (lists / "val.txt").write_text("2008_000008\n2008_000008\n")
    assert "val.txt:2: id 2008_000008 listed twice" in error(root)
    (root / "SegmentationClassContext").rename(root / "elsewhere")
    stderr = error(root)
    assert "SegmentationClassContext: folder not found" in stderr and "pascal_context.py" in stderr
    with pytest.raises(ConversionError, match="unknown Pascal Context split"):
        ContextSource(root, split="test")


def test_help_reads_well(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as exit_info:
        cli(capsys, "context", "--help")
    assert exit_info.value.code in (0, None)
    text = " ".join(capsys.readouterr().out.split())
    for words in ["Convert Pascal Context as mmseg prepares it", "SegmentationClassContext/", "{train,val}", "PC59"]:
        assert words in text, words
