"""Pascal VOC 2012 (train, val and the SBD-augmented trainaug) on a small layout built in tmp_path,
and on a real VOC excerpt when the shared fixtures hold one (a voc* folder).

The label PNGs of the built layout are written as VOC ships them: SegmentationClass as palette
("P") PNGs with the VOC colour map, SegmentationClassAug as grayscale ("L") PNGs, both with a
border of 255 (void) around each object. The palette colours differ from the indices (class 1 is
dark red), so a converter that read colours instead of indices would be caught.
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from dense_data import voc_palette
from PIL import Image

from fastloc.shard.__main__ import main
from fastloc.shard.convert import convert
from fastloc.shard.errors import ConversionError, SampleError
from fastloc.shard.manifest import read_manifest
from fastloc.shard.sources.voc import VocConfig, VocSource
from fastloc.shard.tario import iter_samples
from fastloc.shard.verify import verify

# written out here, not imported: the test states the class table independently
NAMES = (  # noqa: SIM905 (one string reads as the table it is)
    "background aeroplane bicycle bird boat bottle bus car cat chair cow diningtable dog horse motorbike "
    "person pottedplant sheep sofa train tvmonitor"
).split()
TRAIN = ["2007_000032", "2007_000039", "2008_000008"]
VAL = ["2007_000033", "2011_003271"]
AUG_ONLY = ["2008_000002", "2010_005000"]  # SBD images outside the official segmentation set
TRAINAUG = sorted(TRAIN + AUG_ONLY)
LISTED = {"train": TRAIN, "val": VAL, "trainaug": TRAINAUG}
FAST = dict(processes=1, shard_samples=2, progress=False, fsync=False)


def label_map(n: int, classes: tuple[int, int], void: bool) -> np.ndarray:
    """[H, W] uint8: background, two objects, each with a 2-pixel void (255) border when ``void``."""
    h, w = 32 + 4 * n, 40 + 2 * n
    label = np.zeros((h, w), np.uint8)
    for (top, left, bottom, right), c in zip([(4, 4, 20, 18), (10, 22, 28, 36)], classes):
        if void:
            label[top - 2 : bottom + 2, left - 2 : right + 2] = 255
        label[top:bottom, left:right] = c
    return label


def save_png(label: np.ndarray, path: Path, mode: str) -> None:
    image = Image.fromarray(label)  # mode "L"
    if mode == "P":
        image.putpalette(voc_palette())  # makes it a palette image with the same indices
    image.save(path)
    with Image.open(path) as check:
        assert check.mode == mode
        np.testing.assert_array_equal(np.asarray(check), label)


def jpeg(path: Path, width: int, height: int, seed: int) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG", quality=90)


def make_voc(root: Path, void: bool = True, aug: bool = True) -> dict[str, dict[str, np.ndarray]]:
    """A VOC2012 root with train, val and (``aug``) trainaug; returns {split: {id: expected label}}."""
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True)
    expected: dict[str, dict[str, np.ndarray]] = {"train": {}, "val": {}, "trainaug": {}}
    for n, image_id in enumerate(TRAIN + VAL + AUG_ONLY):
        official = (n % 20 + 1, (7 * n) % 20 + 1)
        label = label_map(n, official, void)
        jpeg(root / "JPEGImages" / f"{image_id}.jpg", label.shape[1], label.shape[0], seed=n)
        if image_id in TRAIN + VAL:
            save_png(label, root / "SegmentationClass" / f"{image_id}.png", "P")
            expected["train" if image_id in TRAIN else "val"][image_id] = label
        if aug and image_id in TRAINAUG:
            # other classes than the official PNG: trainaug must read SegmentationClassAug
            aug_label = label_map(n, (20 - n % 20, 0), void)
            (root / "SegmentationClassAug").mkdir(exist_ok=True)
            save_png(aug_label, root / "SegmentationClassAug" / f"{image_id}.png", "L")
            expected["trainaug"][image_id] = aug_label
    lists = root / "ImageSets" / "Segmentation"
    (lists / "train.txt").write_text("".join(f"{i}\n" for i in TRAIN))
    (lists / "val.txt").write_text("".join(f"{i}\n" for i in VAL))
    if aug:
        (lists / "trainaug.txt").write_text("".join(f"{i}\n" for i in TRAINAUG))
    return expected


def cli(capsys, *argv) -> tuple[int, str, str]:
    """``python -m fastloc.shard ARGV`` in-process: (exit status, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if not p.is_dir()) if path.exists() else []


def read_back(split_dir: Path) -> dict[str, dict[str, bytes]]:
    """key -> {ext: bytes} of every sample in the manifest's tars."""
    manifest = read_manifest(split_dir)
    samples = {}
    for shard in manifest["shards"]:
        for key, members in iter_samples(split_dir / shard["tar"]):
            samples[key] = {ext: data for ext, _, data in members}
    assert len(samples) == manifest["num_samples"]
    return samples


def verify_and_inspect(capsys, split_dir: Path, sheet: Path) -> None:
    """``verify`` passes on the split; ``inspect`` summarises it and draws its contact sheet."""
    manifest = read_manifest(split_dir)
    code, stdout, stderr = cli(capsys, "verify", split_dir, "--processes", 1)
    assert code == 0 and "OK" in stdout and f"{manifest['num_samples']} sample" in stdout, stderr
    code, stdout, stderr = cli(capsys, "inspect", split_dir, "--samples", manifest["num_samples"], "--sheet", sheet)
    assert code == 0 and f"dataset {manifest['dataset']} / split {manifest['split']}" in stdout, stderr
    assert sheet.is_file()


def png_values(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        assert image.mode == "L"  # the shards store plain single-channel PNGs
        return np.asarray(image)


# ---- the source ----


@pytest.mark.parametrize("split", ["train", "val", "trainaug"])
def test_source_reads_class_ids_and_keeps_void(tmp_path, split):
    root = tmp_path / "VOC2012"
    expected = make_voc(root)[split]
    source = VocConfig(root=root, split=split).source()
    info = source.info()
    assert info.dataset == "voc" and info.split == split and info.has_label
    assert info.classes == NAMES and info.num_classes == 21
    assert info.label_encoding["ignore"] == 255 and info.label_encoding["space"] == "voc2012-21"
    labels = "SegmentationClassAug" if split == "trainaug" else "SegmentationClass"
    assert info.extra["inputs"]["labels"] == str(root / labels)

    items = source.items()
    assert [item.key for item in items] == LISTED[split]  # the list file's order
    for item in items:
        image, png = root / "JPEGImages" / f"{item.key}.jpg", root / labels / f"{item.key}.png"
        assert item.size == image.stat().st_size + png.stat().st_size
        assert pickle.loads(pickle.dumps(item)) == item
        sample = source.load(item)
        assert sample.source == str(image) and sample.label_source == str(png)
        assert sample.jpg == image.read_bytes()
        assert sample.label.dtype == np.uint8
        np.testing.assert_array_equal(sample.label, expected[item.key])  # palette indices, 255 kept
        assert 255 in sample.label


def test_bad_label_values_name_the_file(tmp_path):
    root = tmp_path / "VOC2012"
    expected = make_voc(root)
    for split, folder, mode in [("val", "SegmentationClass", "P"), ("trainaug", "SegmentationClassAug", "L")]:
        image_id = next(iter(expected[split]))
        label = expected[split][image_id].copy()
        label[0, :3] = [22, 21, 254]
        png = root / folder / f"{image_id}.png"
        save_png(label, png, mode)
        source = VocSource(root, split=split)
        item = next(i for i in source.items() if i.key == image_id)
        with pytest.raises(SampleError) as err:
            source.load(item)
        assert err.value.path == str(png)
        assert "21, 22, 254" in err.value.reason and "not VOC classes" in err.value.reason
        assert "\n" not in str(err.value)

    png = root / "SegmentationClass" / f"{VAL[1]}.png"
    Image.new("RGB", (4, 4)).save(png)  # a colour rendering instead of the class ids
    source = VocSource(root, split="val")
    with pytest.raises(SampleError, match="mode RGB, expected 8-bit palette or grayscale") as err:
        source.load(source.items()[1])
    assert err.value.path == str(png)


# ---- conversion, end to end ----


@pytest.mark.parametrize("split", ["train", "val", "trainaug"])
def test_convert_verify_and_read_back(tmp_path, split):
    """Objects without void borders: what the writer stores today (see the void test below)."""
    root, out = tmp_path / "VOC2012", tmp_path / "out"
    expected = make_voc(root, void=False)[split]
    manifest = convert(VocConfig(root=root, split=split, out=out, **FAST))
    split_dir = out / "voc" / split
    result = verify(split_dir)
    assert result.ok, result.problems
    assert manifest["dataset"] == "voc" and manifest["split"] == split
    assert manifest["classes"] == NAMES and manifest["num_classes"] == 21
    assert manifest["keys"] == ["jpg", "seg.png", "json"]
    label = manifest["label"]
    assert label["dtype"] == "uint8" and label["ignore"] == 255 and "255" in label["rule"]
    assert manifest["report"]["skipped"] == 0 and manifest["report"]["reencoded"] == 0

    samples = read_back(split_dir)
    assert sorted(samples) == sorted(expected)
    for key, sample in samples.items():
        np.testing.assert_array_equal(png_values(sample["seg.png"]), expected[key])
        image = root / "JPEGImages" / f"{key}.jpg"
        assert sample["jpg"] == image.read_bytes()  # passed through untouched
        meta = json.loads(sample["json"])
        assert meta["source"] == str(image) and meta["reencoded"] is None


@pytest.mark.parametrize("split", ["val", "trainaug"])
def test_void_255_is_stored_as_255(tmp_path, split):
    root, out = tmp_path / "VOC2012", tmp_path / "out"
    expected = make_voc(root)[split]
    manifest = convert(VocConfig(root=root, split=split, out=out, **FAST))
    assert manifest["report"]["skipped"] == 0
    split_dir = out / "voc" / split
    assert verify(split_dir).ok
    for key, sample in read_back(split_dir).items():
        np.testing.assert_array_equal(png_values(sample["seg.png"]), expected[key])


# ---- bad input through the command line ----


def test_bad_samples_are_skipped_naming_the_file(tmp_path, capsys):
    root, out = tmp_path / "VOC2012", tmp_path / "out"
    make_voc(root, void=False, aug=False)
    value_22 = root / "SegmentationClass" / f"{TRAIN[1]}.png"
    with Image.open(value_22) as im:
        label = np.asarray(im).copy()
    label[3:5, 3:5] = 22
    save_png(label, value_22, "P")
    no_label = root / "SegmentationClass" / f"{TRAIN[2]}.png"
    no_label.unlink()
    no_image = root / "JPEGImages" / "2012_000099.jpg"  # listed, label present, image missing
    Image.new("P", (40, 32)).save(root / "SegmentationClass" / "2012_000099.png")
    with open(root / "ImageSets" / "Segmentation" / "train.txt", "a") as f:
        f.write("2012_000099\n")

    args = ["voc", "--root", root, "--split", "train", "--no-progress", "--processes", 1, "--no-fsync"]
    code, stdout, stderr = cli(capsys, *args, "--out", out)
    assert code == 0, stderr
    assert "Traceback" not in stderr
    manifest = read_manifest(out / "voc" / "train")
    assert manifest["num_samples"] == 1 and manifest["report"]["skipped"] == 3
    skipped = {e["path"]: e["reason"] for e in manifest["report"]["skipped_samples"]}
    assert set(skipped) == {str(value_22), str(no_label), str(no_image)}
    assert "22" in skipped[str(value_22)] and "not VOC classes" in skipped[str(value_22)]
    assert "label PNG not found" in skipped[str(no_label)]
    assert "image not found" in skipped[str(no_image)]
    for path, reason in skipped.items():
        assert "\n" not in reason and f"skipped {path}: {reason}" in stdout

    # --strict: one line naming the file, and nothing left behind
    code, _, stderr = cli(capsys, *args, "--out", tmp_path / "strict", "--strict")
    assert code == 2 and stderr.startswith("error: --strict: ") and stderr.count("\n") == 1, stderr
    assert any(path in stderr for path in skipped), stderr
    assert files_under(tmp_path / "strict") == []


def test_trainaug_without_its_files_is_a_clean_error(tmp_path, capsys):
    root, out = tmp_path / "VOC2012", tmp_path / "out"
    make_voc(root, aug=False)
    mine = out / "voc" / "notes.txt"  # the user's file in the output tree: never touched
    mine.parent.mkdir(parents=True)
    mine.write_text("mine")

    def error(*extra) -> str:
        code, _, stderr = cli(capsys, "voc", "--root", root, "--out", out, "--no-progress", *extra)
        assert code == 2 and stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
        assert "Traceback" not in stderr and files_under(out) == [mine] and mine.read_text() == "mine"
        return stderr

    stderr = error("--split", "trainaug")
    assert "--split trainaug needs the SBD-augmented label PNGs" in stderr
    assert str(root / "SegmentationClassAug") in stderr and "--aug-labels" in stderr

    (root / "SegmentationClassAug").mkdir()
    stderr = error("--split", "trainaug")
    assert "needs its id list" in stderr and "--aug-list" in stderr
    lists = root / "ImageSets" / "Segmentation"
    assert str(lists / "trainaug.txt") in stderr and str(lists / "train_aug.txt") in stderr

    elsewhere = tmp_path / "SegmentationClassAug"
    stderr = error("--split", "trainaug", "--aug-labels", elsewhere)
    assert stderr.startswith(f"error: {elsewhere}: --aug-labels folder not found")
    stderr = error("--split", "val", "--aug-list", lists / "val.txt")
    assert "--aug-list is for --split trainaug only" in stderr


def test_layout_and_list_problems_are_clean_errors(tmp_path, capsys):
    devkit = tmp_path / "VOCdevkit"
    root = devkit / "VOC2012"
    make_voc(root)
    with pytest.raises(ConversionError, match="did you mean .*VOCdevkit/VOC2012"):
        VocSource(devkit)
    with pytest.raises(ConversionError, match="VOC root not found"):
        VocSource(tmp_path / "absent")
    code, _, stderr = cli(capsys, "voc", "--root", tmp_path / "absent", "--out", tmp_path / "out", "--no-progress")
    assert code == 2 and stderr == f"error: {tmp_path / 'absent'}: VOC root not found\n"
    assert files_under(tmp_path / "out") == []

    lists = root / "ImageSets" / "Segmentation"
    (lists / "val.txt").unlink()
    with pytest.raises(ConversionError, match=f"{lists / 'val.txt'}: split list not found"):
        VocSource(root, split="val")

    for text, says in [
        ("2007_000032\n\n2007_000039\n2007_000032\n", r"train\.txt:4: id 2007_000032 listed twice \(first on line 1\)"),
        ("2007_000032\n../../etc/passwd\n", r"train\.txt:2: '\.\./\.\./etc/passwd' is not an image id"),
        ("2007_000032 a b\n", r"train\.txt:1: expected an image id"),
        ("/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000039.png\n", "name different ids"),
        ("\n \n", r"train\.txt: no image ids listed"),
    ]:
        (lists / "train.txt").write_text(text)
        with pytest.raises(ConversionError, match=says):
            VocSource(root).items()

    (root / "SegmentationClass").rename(root / "elsewhere")
    with pytest.raises(ConversionError, match="SegmentationClass: folder not found"):
        VocSource(root)


def test_trainaug_list_names_and_deeplab_pairs(tmp_path):
    root = tmp_path / "VOC2012"
    make_voc(root)
    lists = root / "ImageSets" / "Segmentation"
    (lists / "trainaug.txt").rename(lists / "train_aug.txt")
    source = VocSource(root, split="trainaug")
    assert source.list_path == lists / "train_aug.txt"
    assert [item.key for item in source.items()] == TRAINAUG

    pairs = tmp_path / "deeplab_train_aug.txt"
    pairs.write_text("".join(f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png\r\n" for i in TRAINAUG))
    source = VocConfig(root=root, split="trainaug", aug_list=pairs).source()
    assert [item.key for item in source.items()] == TRAINAUG
    assert source.info().extra["inputs"]["list"] == str(pairs)
    assert str(pairs) in source.info().inputs


def test_help_reads_well(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as exit_info:
        main(["voc", "--help"])
    assert exit_info.value.code in (0, None)
    text = " ".join(capsys.readouterr().out.split())
    for words in [
        "Convert Pascal VOC 2012 semantic segmentation",
        "--aug-labels",
        "default: ROOT/SegmentationClassAug",
        "--aug-list",
        "trainaug.txt, else train_aug.txt",
        "{train,val,trainaug}",
        "kept as 255",
    ]:
        assert words in text, words


# ---- real VOC samples ----


def test_real_voc_samples(fixtures):
    folders = sorted(p for p in fixtures.iterdir() if p.is_dir() and p.name.lower().startswith("voc"))
    if not folders:
        pytest.skip(f"no VOC excerpt in {fixtures} (a folder named voc*, holding a VOC2012 root)")
    roots = [r for f in folders for r in (f, f / "VOC2012", f / "VOCdevkit" / "VOC2012") if (r / "JPEGImages").is_dir()]
    assert roots, f"{folders}: no VOC2012 root (JPEGImages/) found in them"
    checked = 0
    for root in roots:
        lists = root / "ImageSets" / "Segmentation"
        splits = [s for s in ("train", "val") if (lists / f"{s}.txt").is_file()]
        if (root / "SegmentationClassAug").is_dir() and any(
            (lists / n).is_file() for n in ("trainaug.txt", "train_aug.txt")
        ):
            splits.append("trainaug")
        for split in splits:
            source = VocSource(root, split=split)
            assert source.info().classes == NAMES
            for item in source.items():
                image, png = item.ref
                if not Path(image).is_file() or not Path(png).is_file():
                    continue  # an excerpt may list more ids than it ships
                sample = source.load(item)
                with Image.open(png) as im:
                    if split != "trainaug":
                        assert im.mode == "P", f"{png}: official VOC labels are palette PNGs"
                    expected = np.asarray(im)  # palette indices for "P", gray values for "L"
                np.testing.assert_array_equal(sample.label, expected)
                assert set(np.unique(sample.label).tolist()) <= set(range(21)) | {255}
                assert sample.jpg == Path(image).read_bytes()
                checked += 1
    assert checked, f"{roots}: no listed sample with both image and label"


def test_the_contact_sheet_draws_void_white_and_never_as_a_class():
    """inspect's tiles: VOC's 255 blended white, not clamped into the last class (tvmonitor's colour)."""
    from fastloc.shard.inspect import TILE, _tile, class_colors

    label = np.zeros((TILE, TILE), np.uint8)
    label[:, : TILE // 2] = 255  # void on the left half, class 1 on the right
    label[:, TILE // 2 :] = 1
    image, png = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (TILE, TILE), "black").save(image, format="JPEG")
    Image.fromarray(label).save(png, format="PNG")
    colors = class_colors(21)
    tile = np.asarray(_tile("k", {"jpg": image.getvalue(), "seg.png": png.getvalue()}, NAMES, colors, None, 255))
    void, cat = tile[TILE // 2, TILE // 4].astype(int), tile[TILE // 2, 3 * TILE // 4].astype(int)
    assert np.abs(void - 127).max() <= 3  # half black image, half white
    assert np.abs(cat - colors[1] // 2).max() <= 3 and np.abs(void - colors[20] // 2).max() > 20
