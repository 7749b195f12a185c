"""ImageNet source on the real excerpt (41 JPEGs named <wnid>_<name>.JPEG, one grayscale), laid out
as class folders and as one tar per class."""

import os
import pickle
import tarfile
from pathlib import Path

import pytest
import tyro

from fastloc.shard.errors import ConversionError, SampleError
from fastloc.shard.sources.imagenet import ImagenetConfig, ImagenetSource


@pytest.fixture(scope="module")
def sample_files(fixtures) -> list[Path]:
    files = sorted((fixtures / "imagenet-sample").glob("*.JPEG"))
    assert len(files) == 41
    return files


def wnid_of(path: Path) -> str:
    return path.name.split("_", 1)[0]


def make_folders(files: list[Path], root: Path) -> Path:
    for f in files:
        (root / wnid_of(f)).mkdir(parents=True, exist_ok=True)
        (root / wnid_of(f) / f.name).symlink_to(f)
    return root


def make_tars(files: list[Path], root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    by_class: dict[str, list[Path]] = {}
    for f in files:
        by_class.setdefault(wnid_of(f), []).append(f)
    for wnid, members in by_class.items():
        with tarfile.open(root / f"{wnid}.tar", "w") as tar:
            for f in members:
                tar.add(f, arcname=f.name)
    return root


def loaded(source: ImagenetSource) -> list[tuple[str, int, bytes, str]]:
    out = []
    for item in source.items():
        sample = source.load(item)
        assert sample.key == item.key and sample.label is None and sample.pixels is None
        assert item.size == len(sample.jpg)
        out.append((sample.key, sample.cls, sample.jpg, sample.meta["wnid"]))
    return out


def test_folders_and_tars_give_the_same_samples(sample_files, tmp_path):
    folders = ImagenetConfig(src=make_folders(sample_files, tmp_path / "folders")).source()
    tars = ImagenetConfig(src=make_tars(sample_files, tmp_path / "tars"), split="val").source()
    assert folders.layout == "folders" and tars.layout == "tars"

    a, b = loaded(folders), loaded(tars)
    assert a == b and len(a) == 41
    wnids = sorted({wnid_of(f) for f in sample_files})
    by_key = {f.stem: f for f in sample_files}
    for key, cls, data, wnid in a:
        assert data == by_key[key].read_bytes()  # raw bytes, incl. the grayscale n02096051_Airedale
        assert wnid == wnid_of(by_key[key]) and cls == wnids.index(wnid)
    assert [k for k, *_ in a] == sorted(by_key)  # class order, then file name

    info = tars.info()
    assert info.dataset == "imagenet" and info.split == "val" and info.source == str(tmp_path / "tars")
    assert info.classes == wnids and info.has_cls and not info.has_label and info.label_encoding == {}
    assert info.extra["cls"] == "ASCII decimal class index into classes"
    assert info.extra["wnids"] == wnids and info.extra["names"] == [None] * len(wnids)
    assert info.unreachable == []

    item = tars.items()[0]
    assert pickle.loads(pickle.dumps(item)) == item
    sample = tars.load(item)
    assert sample.source == f"{tmp_path / 'tars' / (wnid_of(sample_files[0]) + '.tar')}::{sample_files[0].name}"
    first = tmp_path / "folders" / wnid_of(sample_files[0]) / sample_files[0].name
    assert folders.load(folders.items()[0]).source == str(first)


def test_keys_get_the_wnid_prefix_and_images_are_filtered(sample_files, tmp_path):
    f = sample_files[0]
    wnid = wnid_of(f)
    root = tmp_path / "src"
    (root / wnid).mkdir(parents=True)
    (root / wnid / "1.JPEG").symlink_to(f)
    (root / wnid / "2.v2.png").symlink_to(f)  # any image suffix; the writer re-encodes non-JPEGs
    (root / wnid / "notes.txt").write_text("not an image")
    (root / wnid / "sub").mkdir()
    source = ImagenetSource(root)
    assert [i.key for i in source.items()] == [f"{wnid}_1", f"{wnid}_2_v2"]

    (root / wnid / "1.jpg").symlink_to(f)
    with pytest.raises(ConversionError, match=f"duplicate sample key '{wnid}_1'"):
        ImagenetSource(root).items()

    tars = tmp_path / "tars"
    tars.mkdir()
    with tarfile.open(tars / f"{wnid}.tar", "w") as tar:
        tar.add(f, arcname=f"{wnid}/7.JPEG")
        tar.add(f, arcname="readme.txt")
    items = ImagenetSource(tars).items()
    assert [i.key for i in items] == [f"{wnid}_7"]


def test_class_list_order_and_names(sample_files, tmp_path):
    src = make_folders(sample_files, tmp_path / "folders")
    wnids = sorted({wnid_of(f) for f in sample_files})
    listed = list(reversed(wnids)) + ["n99999999"]  # an extra class without images is fine
    lines = [f"{w} name of {w}" if i % 2 == 0 else w for i, w in enumerate(listed)]
    class_list = tmp_path / "classes.txt"
    class_list.write_text("\n".join(lines[:3]) + "\n\n   \n" + "\n".join(lines[3:]) + "\n")

    source = ImagenetConfig(src=src, class_list=class_list).source()
    info = source.info()
    assert info.classes == listed and info.extra["wnids"] == listed
    assert info.extra["names"][0] == f"name of {listed[0]}" and info.extra["names"][1] is None
    for _key, cls, _, wnid in loaded(source):
        assert listed[cls] == wnid

    class_list.write_text("\n".join(wnids[1:]) + "\n")
    with pytest.raises(ConversionError, match=f"not in the class list .*{wnids[0]}"):
        ImagenetSource(src, class_list=class_list).items()

    class_list.write_text("\n".join(wnids + [wnids[3]]) + "\n")
    with pytest.raises(ConversionError, match=f"classes.txt:{len(wnids) + 1}: duplicate class '{wnids[3]}'"):
        ImagenetSource(src, class_list=class_list).info()

    with pytest.raises(ConversionError, match="absent.txt"):
        ImagenetSource(src, class_list=tmp_path / "absent.txt").info()


def test_auto_layout_detection(sample_files, tmp_path):
    src = make_folders(sample_files[:2], tmp_path / "src")
    assert ImagenetSource(src).layout == "folders"
    make_tars(sample_files[2:4], src)
    with pytest.raises(ConversionError, match="both class folders .* and .tar files"):
        ImagenetSource(src)
    assert ImagenetSource(src, layout="tars").info().num_classes == 2  # an explicit layout decides

    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="no class folders"):
        ImagenetConfig(src=tmp_path / "empty").source()
    with pytest.raises(ConversionError, match="not found"):
        ImagenetConfig(src=tmp_path / "absent").source()
    with pytest.raises(ConversionError, match="no class tars"):
        ImagenetSource(make_folders(sample_files[:1], tmp_path / "only-folders"), layout="tars").info()


def test_truncated_tar_member_is_a_sample_error(sample_files, tmp_path):
    root = make_tars([f for f in sample_files if f.name.startswith("n01728")], tmp_path / "tars")
    tar = root / "n01728572.tar"
    with tarfile.open(tar, "a") as t:  # a second member, then cut the tar inside its data
        t.add(sample_files[0], arcname="n01728572_second.JPEG")
    with tarfile.open(tar) as t:
        second = t.getmember("n01728572_second.JPEG")
    os.truncate(tar, second.offset_data + 100)

    source = ImagenetSource(root)
    info = source.info()
    assert [path for path, _ in info.unreachable] == [str(tar)]
    items = {i.key: i for i in source.items()}
    assert (
        source.load(items["n01728572_thunder_snake"]).jpg
        == (sample_files[0].parent / "n01728572_thunder_snake.JPEG").read_bytes()
    )
    with pytest.raises(SampleError) as err:
        source.load(items["n01728572_second"])
    assert err.value.path == f"{tar}::n01728572_second.JPEG" and "truncated" in err.value.reason

    os.truncate(tar, second.offset + 100)  # now inside the second member's header: tarfile stops quietly
    source = ImagenetSource(root)
    assert [i.key for i in source.items() if i.key.startswith("n01728572")] == ["n01728572_thunder_snake"]
    assert "no end-of-archive block" in dict(source.info().unreachable)[str(tar)]


def test_unreadable_tars_and_empty_files(sample_files, tmp_path):
    root = tmp_path / "tars"
    root.mkdir()
    with tarfile.open(root / "n01514668.tar", "w:gz") as t:  # compressed: cannot be read at offsets
        t.add(sample_files[0], arcname="a.JPEG")
    with pytest.raises(ConversionError, match="n01514668.tar.*uncompressed"):
        ImagenetSource(root).items()
    (root / "n01514668.tar").write_bytes(b"")
    with pytest.raises(ConversionError, match="n01514668.tar"):
        ImagenetSource(root).items()

    src = tmp_path / "folders"
    (src / "n01514668").mkdir(parents=True)
    (src / "n01514668" / "empty.JPEG").write_bytes(b"")
    source = ImagenetSource(src)
    with pytest.raises(SampleError, match="empty") as err:
        source.load(source.items()[0])
    assert err.value.path == str(src / "n01514668" / "empty.JPEG")
    (src / "n01514668" / "empty.JPEG").unlink()
    with pytest.raises(SampleError, match="not found"):
        source.load(source.items()[0])


def test_config_cli(tmp_path, capsys):
    config = tyro.cli(ImagenetConfig, args=["--src", str(tmp_path), "--split", "val", "--layout", "tars"])
    assert config.src == tmp_path and config.split == "val" and config.class_list is None
    with pytest.raises(SystemExit):
        tyro.cli(ImagenetConfig, args=["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "one wnid per line" in text and "SRC/<wnid>.tar" in text
