"""ADE20K sources on the real excerpts: SceneParsing (val, 3 images) and the full release (train, 3 images)."""

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import tyro
from PIL import Image

from fastloc.shard.errors import ConversionError, SampleError
from fastloc.shard.sources.ade20k import Ade20kConfig, Ade20kSource

FULL_STEMS = ["ADE_train_00016869", "ADE_train_00016900", "ADE_train_00016964"]


@pytest.fixture(scope="module")
def sp_root(fixtures) -> Path:
    return fixtures / "ade20k-sceneparsing3"


@pytest.fixture(scope="module")
def full_root(fixtures) -> Path:
    return fixtures / "ade20k-full3" / "ADE20K_2021_17_01"


@pytest.fixture(scope="module")
def full_samples(full_root):
    """The three full-release samples, loaded once (their seg PNGs are 2200 px wide)."""
    source = Ade20kSource(full_root, split="train")
    return source, {item.key: (item, source.load(item)) for item in source.items()}


def link_tree(src: Path, dst: Path) -> None:
    """Mirror src under dst: real folders, symlinked files."""
    for dirpath, _, filenames in os.walk(src):
        out = dst / Path(dirpath).relative_to(src)
        out.mkdir(parents=True, exist_ok=True)
        for name in filenames:
            (out / name).symlink_to(Path(dirpath) / name)


def street(root: Path) -> Path:
    return root / "images" / "ADE" / "training" / "urban" / "street"


def replace_file(path: Path, data: bytes) -> None:
    path.unlink()
    path.write_bytes(data)


# ---- SceneParsing ----


def test_sceneparsing_labels_and_classes(sp_root):
    source = Ade20kConfig(root=sp_root, split="val").source()
    assert source.layout == "sceneparsing"
    info = source.info()
    assert info.dataset == "ade20k" and info.split == "val" and info.has_label
    assert info.num_classes == 151
    assert info.classes[0] == "other" and info.classes[1] == "wall"
    assert info.classes[2] == "building;edifice" and info.classes[150] == "flag"
    assert info.label_encoding["space"] == "ade20k-sceneparsing-151"
    assert info.label_encoding["unlabeled"] == 0

    items = source.items()
    assert [i.key for i in items] == ["ADE_val_00000001", "ADE_val_00000002", "ADE_val_00000003"]
    for item in items:
        image = sp_root / "images" / "validation" / f"{item.key}.jpg"
        png = sp_root / "annotations" / "validation" / f"{item.key}.png"
        assert item.size == image.stat().st_size + png.stat().st_size
        assert pickle.loads(pickle.dumps(item)) == item
        sample = source.load(item)
        assert sample.key == item.key and sample.source == str(image)
        assert sample.jpg == image.read_bytes()
        expected = np.asarray(Image.open(png))
        assert sample.label.dtype == np.uint8 and sample.label.shape == expected.shape
        np.testing.assert_array_equal(sample.label, expected)
        assert sample.label.max() < info.num_classes
    assert source.load(items[0]).meta == {"scene": "abbey"}  # from sceneCategories.txt


def test_sceneparsing_missing_split_or_class_table(sp_root, tmp_path):
    with pytest.raises(ConversionError, match="training"):
        Ade20kSource(sp_root, split="train").items()  # the excerpt has validation only

    link_tree(sp_root, tmp_path / "ade")
    (tmp_path / "ade" / "objectInfo150.csv").unlink()
    with pytest.raises(ConversionError, match="objectInfo150.csv"):
        Ade20kSource(tmp_path / "ade", split="val").info()

    header = "Idx,Ratio,Train,Val,Stuff,Name\n"
    (tmp_path / "ade" / "objectInfo150.csv").write_text(header + "1,0.1,1,1,1,wall\n3,0.1,1,1,1,sky\n")
    with pytest.raises(ConversionError, match="objectInfo150.csv.*gaps"):
        Ade20kSource(tmp_path / "ade", split="val").info()

    (tmp_path / "ade" / "objectInfo150.csv").write_text("Index;Name\n1;wall\n")
    with pytest.raises(ConversionError, match="Idx and Name"):
        Ade20kSource(tmp_path / "ade", split="val").info()


def test_sceneparsing_bad_label_files(sp_root, tmp_path):
    root = tmp_path / "ade"
    link_tree(sp_root, root)
    labels = root / "annotations" / "validation"
    (labels / "ADE_val_00000001.png").unlink()
    replace_file(labels / "ADE_val_00000002.png", b"")
    rgb = tmp_path / "rgb.png"
    Image.new("RGB", (400, 300)).save(rgb)
    replace_file(labels / "ADE_val_00000003.png", rgb.read_bytes())

    source = Ade20kSource(root, split="val")
    items = source.items()
    assert len(items) == 3  # listing never fails on a bad sample
    reasons = {}
    for item in items:
        with pytest.raises(SampleError) as err:
            source.load(item)
        assert err.value.path == str(labels / f"{item.key}.png")
        reasons[item.key] = err.value.reason
    assert "not found" in reasons["ADE_val_00000001"]
    assert "empty" in reasons["ADE_val_00000002"]
    assert "single-channel" in reasons["ADE_val_00000003"]


# ---- layout detection ----


def test_auto_layout_detection(sp_root, full_root, tmp_path):
    assert Ade20kConfig(root=sp_root).source().layout == "sceneparsing"
    assert Ade20kConfig(root=full_root).source().layout == "full"
    with pytest.raises(ConversionError, match="did you mean .*ADE20K_2021_17_01"):
        Ade20kConfig(root=full_root.parent).source()
    with pytest.raises(ConversionError, match=str(tmp_path)):
        Ade20kConfig(root=tmp_path).source()
    with pytest.raises(ConversionError, match="not found"):
        Ade20kConfig(root=tmp_path / "absent").source()
    with pytest.raises(ConversionError, match="validation"):
        Ade20kSource(full_root, split="val").items()  # the excerpt has training only


def test_config_cli_and_help(full_root, capsys):
    config = tyro.cli(Ade20kConfig, args=["--root", str(full_root), "--split", "train", "--layout", "full"])
    assert config.num_classes == 3689 and config.index_pkl is None
    assert isinstance(config.source(), Ade20kSource)
    with pytest.raises(SystemExit):
        tyro.cli(Ade20kConfig, args=["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "3,688" in text and "runs code" in text and "ADEChallengeData2016" in text


# ---- full release ----


def test_full_labels_match_independent_decode(full_root, full_samples):
    source, samples = full_samples
    assert sorted(samples) == FULL_STEMS
    info = source.info()
    assert info.dataset == "ade20k-full" and info.has_label
    assert info.num_classes == 3689 and info.classes[0] == "unlabeled"
    assert info.label_encoding["space"] == "ade20k-full-3689"
    assert [i.key for i in source.items()] == FULL_STEMS
    for stem, (item, sample) in samples.items():
        folder = street(full_root)
        jpg, seg = folder / f"{stem}.jpg", folder / f"{stem}_seg.png"
        assert item.size == jpg.stat().st_size + seg.stat().st_size
        assert pickle.loads(pickle.dumps(item)) == item
        assert sample.jpg == (folder / f"{stem}.jpg").read_bytes()
        rgb = np.asarray(Image.open(folder / f"{stem}_seg.png")).astype(np.int64)
        expected = (rgb[..., 0] // 10) * 256 + rgb[..., 1]
        assert sample.label.dtype == np.uint16
        np.testing.assert_array_equal(sample.label, expected)
        assert sample.meta == {"scene": ["outdoor", "urban", "street"], "folder": "urban/street"}

        objects = json.loads((folder / f"{stem}.json").read_text())["annotation"]["object"]
        names = {o["name_ndx"]: o["name"] for o in objects}
        present = [int(c) for c in np.unique(expected) if c != 0]
        assert len(present) > 5
        for c in present:
            assert info.classes[c] == names[c]
    assert info.classes[401] == "car, auto, automobile, machine, motorcar"
    assert info.classes[1] is None  # not shown by these three images


def test_full_bad_samples(full_root, tmp_path):
    root = tmp_path / "ADE20K_2021_17_01"
    link_tree(full_root, root)
    folder = street(root)
    # 16869: the JSON no longer lists its car (401), which the seg map still shows
    doc = json.loads((folder / "ADE_train_00016869.json").read_text())
    doc["annotation"]["object"] = [o for o in doc["annotation"]["object"] if o["name_ndx"] != 401]
    replace_file(folder / "ADE_train_00016869.json", json.dumps(doc).encode())
    # 16900: a JSON cut short
    replace_file(folder / "ADE_train_00016900.json", (folder / "ADE_train_00016900.json").read_bytes()[:500])
    # 16964: a grayscale seg map
    Image.new("L", (8, 8)).save(tmp_path / "gray.png")
    replace_file(folder / "ADE_train_00016964_seg.png", (tmp_path / "gray.png").read_bytes())

    source = Ade20kSource(root, split="train")
    info = source.info()  # the unreadable JSON is skipped here and reported by load()
    assert info.extra["unreadable_json"] == 1
    items = {i.key: i for i in source.items()}

    with pytest.raises(SampleError) as err:
        source.load(items["ADE_train_00016869"])
    assert err.value.path == str(folder / "ADE_train_00016869_seg.png")
    assert "401" in err.value.reason and "ADE_train_00016869.json" in err.value.reason

    with pytest.raises(SampleError) as err:
        source.load(items["ADE_train_00016900"])
    assert err.value.path == str(folder / "ADE_train_00016900.json") and "JSON" in err.value.reason

    with pytest.raises(SampleError) as err:
        source.load(items["ADE_train_00016964"])
    assert err.value.path == str(folder / "ADE_train_00016964_seg.png") and "RGB" in err.value.reason

    # missing, empty and undecodable seg maps; a JSON of the wrong shape
    (folder / "ADE_train_00016964_seg.png").unlink()
    with pytest.raises(SampleError, match="not found"):
        source.load(items["ADE_train_00016964"])
    (folder / "ADE_train_00016964_seg.png").write_bytes(b"")
    with pytest.raises(SampleError, match="empty"):
        source.load(items["ADE_train_00016964"])
    replace_file(folder / "ADE_train_00016964_seg.png", b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(SampleError, match="decode"):
        source.load(items["ADE_train_00016964"])
    replace_file(folder / "ADE_train_00016900.json", b'{"annotation": {"object": [{"name": "x"}]}}')
    with pytest.raises(SampleError, match="name_ndx"):
        source.load(items["ADE_train_00016900"])


def test_full_conflicting_names_and_class_space(full_root, tmp_path):
    with pytest.raises(ConversionError, match="outside the class space of 100"):
        Ade20kSource(full_root, split="train", num_classes=100).info()

    root = tmp_path / "ADE20K_2021_17_01"
    link_tree(full_root, root)
    path = street(root) / "ADE_train_00016964.json"
    doc = json.loads(path.read_text())
    for obj in doc["annotation"]["object"]:
        if obj["name_ndx"] == 401:
            obj["name"] = "automobile"
    replace_file(path, json.dumps(doc).encode())
    with pytest.raises(ConversionError, match=r"class 401.*ADE_train_00016869\.json.*ADE_train_00016964\.json"):
        Ade20kSource(root, split="train").info()


def test_full_duplicate_keys(full_root, tmp_path):
    root = tmp_path / "ADE20K_2021_17_01"
    link_tree(full_root, root)
    other = root / "images" / "ADE" / "training" / "urban" / "alley"
    other.mkdir()
    shutil.copy(street(root) / "ADE_train_00016900.jpg", other)
    with pytest.raises(ConversionError, match="duplicate sample key 'ADE_train_00016900'"):
        Ade20kSource(root, split="train").items()


def test_full_index_pkl_names_unseen_classes(full_root, tmp_path):
    seen = Ade20kSource(full_root, split="train").info().classes
    objectnames = [seen[k] if seen[k] is not None else f"class {k}" for k in range(1, 3689)]
    pkl = tmp_path / "index_ade20k.pkl"
    pkl.write_bytes(pickle.dumps({"objectnames": objectnames, "filename": ["x.jpg"]}))

    info = Ade20kSource(full_root, split="train", index_pkl=pkl).info()
    assert info.classes[0] == "unlabeled" and info.num_classes == 3689
    assert info.classes[1] == "class 1" and info.classes[3688] == "class 3688"  # 1-based
    assert info.classes[401] == "car, auto, automobile, machine, motorcar"
    assert None not in info.classes

    objectnames[400] = "not a car"  # id 401
    pkl.write_bytes(pickle.dumps({"objectnames": objectnames}))
    with pytest.raises(ConversionError, match="class 401.*index_ade20k.pkl"):
        Ade20kSource(full_root, split="train", index_pkl=pkl).info()

    pkl.write_bytes(pickle.dumps({"objectnames": ["x"] * 3689}))
    with pytest.raises(ConversionError, match="num-classes"):
        Ade20kSource(full_root, split="train", index_pkl=pkl).info()

    pkl.write_bytes(b"not a pickle")
    with pytest.raises(ConversionError, match="index_ade20k.pkl"):
        Ade20kSource(full_root, split="train", index_pkl=pkl).info()
    with pytest.raises(ConversionError, match="not found"):
        Ade20kSource(full_root, split="train", index_pkl=tmp_path / "absent.pkl").info()
