"""Cityscapes fine annotations on a small layout built in tmp_path: leftImg8bit PNG images and
gtFine label PNGs, *_gtFine_labelTrainIds.png (mmseg's prepared files) for most samples and only the
official *_gtFine_labelIds.png for one, whose labels must come out as the trainIds
cityscapesscripts' table gives. Conversion, verify and inspect end to end.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_source_voc import cli, files_under, png_values, read_back, verify_and_inspect

from fastloc.shard.errors import ConversionError, SampleError
from fastloc.shard.manifest import read_manifest
from fastloc.shard.sources.cityscapes import CityscapesConfig, CityscapesSource

# written out here, not imported: the 19 evaluated classes in trainId order
NAMES = [
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
]
# labelId -> trainId of cityscapesscripts/helpers/labels.py, as pairs for the evaluated classes;
# every other id 0..33 is 255
EVALUATED = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12}
EVALUATED |= {26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
SAMPLES = {  # name -> city
    "aachen_000000_000019": "aachen",
    "aachen_000001_000019": "aachen",
    "bremen_000000_000019": "bremen",
}
OFFICIAL_ONLY = "bremen_000000_000019"  # labelIds only: mapped by the converter
FAST = ["--no-progress", "--processes", 1, "--no-fsync"]


def train_ids(label_ids: np.ndarray) -> np.ndarray:
    return np.vectorize(lambda v: EVALUATED.get(int(v), 255), otypes=[np.uint8])(label_ids)


def make_cityscapes(root: Path, split: str = "val") -> dict[str, np.ndarray]:
    """A Cityscapes root with one split; returns {name: expected trainIds}."""
    expected = {}
    for n, (name, city) in enumerate(SAMPLES.items()):
        h, w = 16 + 2 * n, 36 + 2 * n
        rng = np.random.default_rng(n)
        label_ids = rng.integers(0, 34, (h, w)).astype(np.uint8)  # every labelId, void ones included
        label_ids[0, :34] = np.arange(34)
        (root / "leftImg8bit" / split / city).mkdir(parents=True, exist_ok=True)
        (root / "gtFine" / split / city).mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png")
        gt = root / "gtFine" / split / city
        Image.fromarray(label_ids).save(gt / f"{name}_gtFine_labelIds.png")
        expected[name] = train_ids(label_ids)
        if name != OFFICIAL_ONLY:
            Image.fromarray(expected[name]).save(gt / f"{name}_gtFine_labelTrainIds.png")
        (gt / f"{name}_gtFine_color.png").write_bytes(b"not read")
    return expected


def test_class_table():
    from fastloc.shard.sources.cityscapes import CITYSCAPES_CLASSES, TRAIN_ID_OF

    assert CITYSCAPES_CLASSES == NAMES
    assert [int(TRAIN_ID_OF[i]) for i in range(34)] == [EVALUATED.get(i, 255) for i in range(34)]
    assert (TRAIN_ID_OF[34:] == -1).all()


@pytest.mark.parametrize("split", ["train", "val"])
def test_source_reads_train_ids_and_maps_label_ids(tmp_path, split):
    root = tmp_path / "cityscapes"
    expected = make_cityscapes(root, split)
    source = CityscapesConfig(root=root, split=split).source()
    info = source.info()
    assert info.dataset == "cityscapes" and info.split == split and info.classes == NAMES
    assert info.label_encoding["ignore"] == 255 and info.label_encoding["space"] == "cityscapes-19"
    assert info.extra["labels_from"] == {"labelTrainIds": 2, "labelIds": 1}
    items = source.items()
    assert [item.key for item in items] == sorted(SAMPLES)
    for item in items:
        sample = source.load(item)
        city = SAMPLES[item.key]
        assert sample.source == str(root / "leftImg8bit" / split / city / f"{item.key}_leftImg8bit.png")
        kind = "labelIds" if item.key == OFFICIAL_ONLY else "labelTrainIds"
        assert sample.label_source == str(root / "gtFine" / split / city / f"{item.key}_gtFine_{kind}.png")
        assert sample.meta == {"city": city} and sample.label.dtype == np.uint8
        np.testing.assert_array_equal(sample.label, expected[item.key])


def test_convert_verify_inspect_and_read_back(tmp_path, capsys):
    root, out = tmp_path / "cityscapes", tmp_path / "out"
    expected = make_cityscapes(root)
    code, _stdout, stderr = cli(capsys, "cityscapes", "--root", root, "--out", out, *FAST)
    assert code == 0, stderr
    split_dir = out / "cityscapes" / "val"
    manifest = read_manifest(split_dir)
    assert manifest["dataset"] == "cityscapes" and manifest["classes"] == NAMES and manifest["num_classes"] == 19
    assert manifest["label"]["ignore"] == 255 and manifest["label"]["dtype"] == "uint8"
    # the PNG images are re-encoded as baseline JPEG, as every image that is not a usable JPEG
    report = manifest["report"]
    assert report["skipped"] == 0 and report["reencoded_by_reason"] == {"PNG data named as JPEG": 3}
    samples = read_back(split_dir)
    assert sorted(samples) == sorted(SAMPLES)
    for key, sample in samples.items():
        np.testing.assert_array_equal(png_values(sample["seg.png"]), expected[key])
        with Image.open(io.BytesIO(sample["jpg"])) as image:
            assert image.format == "JPEG" and image.size == expected[key].shape[::-1]
        assert json.loads(sample["json"])["city"] == SAMPLES[key]

    verify_and_inspect(capsys, split_dir, tmp_path / "sheet.png")


def test_bad_samples_are_skipped_naming_the_file(tmp_path, capsys):
    root, out = tmp_path / "cityscapes", tmp_path / "out"
    expected = make_cityscapes(root)
    names = sorted(SAMPLES)
    gt = root / "gtFine" / "val"
    good = "aachen_000002_000019"  # a copy of the first sample, left intact
    for folder, suffix in ((root / "leftImg8bit" / "val", "_leftImg8bit.png"), (gt, "_gtFine_labelTrainIds.png")):
        (folder / "aachen" / f"{good}{suffix}").write_bytes((folder / "aachen" / f"{names[0]}{suffix}").read_bytes())
    outside = gt / "aachen" / f"{names[0]}_gtFine_labelTrainIds.png"
    label = expected[names[0]].copy()
    label[1, :2] = [19, 254]
    Image.fromarray(label).save(outside)
    mismatch = gt / "aachen" / f"{names[1]}_gtFine_labelTrainIds.png"
    Image.fromarray(expected[names[1]][:, :-1]).save(mismatch)
    official = gt / "bremen" / f"{OFFICIAL_ONLY}_gtFine_labelIds.png"
    with Image.open(official) as image:
        label_ids = np.asarray(image).copy()
    label_ids[2, 3] = 34
    Image.fromarray(label_ids).save(official)

    source = CityscapesSource(root)
    items = {item.key: item for item in source.items()}
    reasons = {}
    for key in (names[0], OFFICIAL_ONLY):
        with pytest.raises(SampleError) as err:
            source.load(items[key])
        reasons[err.value.path] = err.value.reason
    assert source.load(items[names[1]]).label.shape[1] == 37  # the writer compares it with the image
    assert reasons == {
        str(outside): "label values 19, 254 are not Cityscapes trainIds (0-18, or 255 = ignore)",
        str(official): "label values 34 are not Cityscapes labelIds (0-33)",
    }

    code, stdout, stderr = cli(capsys, "cityscapes", "--root", root, "--out", out, *FAST)
    assert code == 0, stderr
    manifest = read_manifest(out / "cityscapes" / "val")
    assert manifest["num_samples"] == 1 and manifest["report"]["skipped"] == 3
    skipped = {e["path"]: e["reason"] for e in manifest["report"]["skipped_samples"]}
    assert set(skipped) == {str(outside), str(mismatch), str(official)}
    assert "label map is 37x18 but the image is 38x18" in skipped[str(mismatch)]
    for path, reason in skipped.items():
        assert "\n" not in reason and f"skipped {path}: {reason}" in stdout


def test_missing_label_names_both_files(tmp_path):
    root = tmp_path / "cityscapes"
    make_cityscapes(root)
    gt = root / "gtFine" / "val" / "bremen"
    (gt / f"{OFFICIAL_ONLY}_gtFine_labelIds.png").unlink()
    source = CityscapesSource(root)
    with pytest.raises(SampleError) as err:
        source.load(source.items()[-1])
    assert err.value.path == str(gt / f"{OFFICIAL_ONLY}_gtFine_labelTrainIds.png")
    assert err.value.reason == f"label PNG not found (nor {OFFICIAL_ONLY}_gtFine_labelIds.png)"


def test_layout_problems_are_one_line_errors(tmp_path, capsys):
    root, out = tmp_path / "data", tmp_path / "out"
    make_cityscapes(root / "cityscapes")

    def error(at: Path, *extra) -> str:
        code, _, stderr = cli(capsys, "cityscapes", "--root", at, "--out", out, "--no-progress", *extra)
        assert code == 2 and stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
        assert "Traceback" not in stderr and files_under(out) == []
        return stderr

    assert error(tmp_path / "absent") == f"error: {tmp_path / 'absent'}: Cityscapes root not found\n"
    stderr = error(root)
    assert "leftImg8bit/val: folder not found" in stderr and f"did you mean {root / 'cityscapes'}?" in stderr
    root = root / "cityscapes"
    assert "leftImg8bit/train: folder not found (Cityscapes layout, split train)" in error(root, "--split", "train")
    (root / "gtFine" / "val").rename(root / "gtFine" / "elsewhere")
    assert "gtFine/val: folder not found (Cityscapes layout, split val)" in error(root)
    (root / "gtFine" / "elsewhere").rename(root / "gtFine" / "val")
    for path in (root / "leftImg8bit" / "val").rglob("*.png"):
        path.rename(path.with_suffix(".jpg"))
    assert "no *_leftImg8bit.png images" in error(root)
    with pytest.raises(ConversionError, match="unknown Cityscapes split"):
        CityscapesSource(root, split="test")


def test_help_reads_well(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit):
        cli(capsys, "cityscapes", "--help")
    text = " ".join(capsys.readouterr().out.split())
    for words in ["Convert Cityscapes fine annotations", "*_gtFine_labelIds.png", "{train,val}", "--reencode-quality"]:
        assert words in text, words
