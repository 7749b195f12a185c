"""ImageNet source on the real excerpt (41 JPEGs named <wnid>_<name>.JPEG, one grayscale), laid out
as class folders and as one tar per class; and class selection (the built-in ImageNet-100 list,
--only-listed) on a tiny tree of generated JPEGs."""

import fnmatch
import io
import json
import os
import pickle
import tarfile
from pathlib import Path

import pytest
import tomllib
import tyro
from PIL import Image

from fastloc.shard.__main__ import main
from fastloc.shard.errors import ConversionError, SampleError
from fastloc.shard.sources.imagenet import (
    BUILTIN_CLASS_LISTS,
    ImagenetConfig,
    ImagenetSource,
    read_class_list,
    resolve_class_list,
)


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
    assert "--only-listed" in text and "imagenet100" in text


# ---- class selection: the built-in ImageNet-100 list and --only-listed ----

# Transcribed from MkuuWaUjinga/leopart@7835701338d477c70d581c0a10e594257dcac198
# data/imagenet/imagenet100.txt, lines 1-100 (in order; the file is byte-identical to
# HobbitLong/CMC@bc687a26de7ae350d98f671d25d164b65336b8c2 imagenet100.txt).
LEOPART_IMAGENET100_TXT = """
n02869837 n01749939 n02488291 n02107142 n13037406 n02091831 n04517823 n04589890 n03062245 n01773797
n01735189 n07831146 n07753275 n03085013 n04485082 n02105505 n01983481 n02788148 n03530642 n04435653
n02086910 n02859443 n13040303 n03594734 n02085620 n02099849 n01558993 n04493381 n02109047 n04111531
n02877765 n04429376 n02009229 n01978455 n02106550 n01820546 n01692333 n07714571 n02974003 n02114855
n03785016 n03764736 n03775546 n02087046 n07836838 n04099969 n04592741 n03891251 n02701002 n03379051
n02259212 n07715103 n03947888 n04026417 n02326432 n03637318 n01980166 n02113799 n02086240 n03903868
n02483362 n04127249 n02089973 n03017168 n02093428 n02804414 n02396427 n04418357 n02172182 n01729322
n02113978 n03787032 n02089867 n02119022 n03777754 n04238763 n02231487 n03032252 n02138441 n02104029
n03837869 n03494278 n04136333 n03794056 n03492542 n02018207 n04067472 n03930630 n03584829 n02123045
n04229816 n02100583 n03642806 n04336792 n03259280 n02116738 n02108089 n03424325 n01855672 n02090622
"""
LEOPART_IMAGENET100 = LEOPART_IMAGENET100_TXT.split()

LISTED = ["n02090622", "n02869837", "n01749939"]  # IN-100 indices 99, 0, 1
UNLISTED = ["n01440764", "n01443537"]  # ImageNet-1k classes outside IN-100


def make_tree(root: Path, wnids: list[str], per_class: int = 2) -> Path:
    """SRC/<wnid>/<wnid>_<i>.JPEG: tiny generated JPEGs, a colour per class."""
    for c, wnid in enumerate(wnids):
        (root / wnid).mkdir(parents=True)
        for i in range(per_class):
            buf = io.BytesIO()
            Image.new("RGB", (24, 16), (40 * c, 255 - 40 * c, 60 * i)).save(buf, "JPEG")
            (root / wnid / f"{wnid}_{i}.JPEG").write_bytes(buf.getvalue())
    return root


def shard_samples(split_dir: Path) -> dict[str, int]:
    """key -> cls of every sample in the split's tars."""
    out = {}
    for tar_path in sorted(split_dir.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                if ext == "cls":
                    out[key] = int(tar.extractfile(member).read())
    return out


def test_packaged_imagenet100_is_leopart_list():
    assert len(LEOPART_IMAGENET100) == 100 == len(set(LEOPART_IMAGENET100))
    path, name = resolve_class_list("imagenet100")
    assert name == "imagenet100" and path.name == "imagenet100.txt" and path.is_file()
    wnids, names = read_class_list(path)
    assert wnids == LEOPART_IMAGENET100 and names == [None] * 100
    assert path.read_text().startswith("# ImageNet-100: CMC's")  # the header comment cites the source

    # a non-editable install carries it: pyproject's package-data covers every built-in list
    repo = Path(__file__).resolve().parents[1]
    data = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    for file in BUILTIN_CLASS_LISTS.values():
        assert any(fnmatch.fnmatch(file, pattern) for pattern in data["fastloc.shard.sources"])


def test_builtin_imagenet100_selects_and_names_the_output(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no file called imagenet100 here: the name means the built-in list
    src = make_tree(tmp_path / "in1k" / "val", LISTED + UNLISTED)
    args = ["imagenet", "--src", src, "--split", "val", "--class-list", "imagenet100", "--out", "shards"]
    code = main([str(a) for a in [*args, "--processes", "1", "--no-progress"]])
    out, err = capsys.readouterr()
    assert code == 0, err

    split_dir = tmp_path / "shards" / "imagenet100" / "val"  # the output folder takes the list's name
    manifest = json.loads((split_dir / "manifest.json").read_text())
    assert manifest["dataset"] == "imagenet100" and manifest["classes"] == LEOPART_IMAGENET100
    samples = shard_samples(split_dir)
    assert sorted(samples) == sorted(f"{w}_{i}" for w in LISTED for i in range(2))  # only the listed classes
    assert {key: LEOPART_IMAGENET100[cls] for key, cls in samples.items()} == {k: k[:9] for k in samples}
    assert sorted(set(samples.values())) == [0, 1, 99]  # cls = position in the list

    source = manifest["source"]
    assert source["class_list"] == "imagenet100" and source["skipped_classes"] == UNLISTED
    assert source["missing_classes"] == [w for w in LEOPART_IMAGENET100 if w not in LISTED]
    assert manifest["report"]["skipped"] == 0  # classes skipped by choice are not failed samples
    notes = [line for line in out.splitlines() if "not in the class list" in line]
    assert len(notes) == 1 and "2 classes not in the class list imagenet100 skipped" in notes[0]
    assert UNLISTED[0] in notes[0]

    # --name still wins over the list's name
    code = main([str(a) for a in [*args, "--name", "in100", "--processes", "1", "--no-progress"]])
    assert code == 0 and (tmp_path / "shards" / "in100" / "val" / "manifest.json").is_file()


def test_builtin_list_skips_unlisted_tars_unread_and_refuses_no_match(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = tmp_path / "tars"
    src.mkdir()
    with tarfile.open(src / f"{LISTED[0]}.tar", "w") as tar:
        buf = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buf, "JPEG")
        member = tarfile.TarInfo("a.JPEG")
        member.size = len(buf.getvalue())
        tar.addfile(member, io.BytesIO(buf.getvalue()))
    (src / f"{UNLISTED[0]}.tar").write_bytes(b"not a tar")  # skipped unread: no error
    source = ImagenetSource(src, class_list="imagenet100")
    assert [(i.key, i.ref[-1]) for i in source.items()] == [(f"{LISTED[0]}_a", 99)]
    assert source.info().dataset == "imagenet100"

    other = make_tree(tmp_path / "other", UNLISTED, per_class=1)
    with pytest.raises(ConversionError, match="none of the 2 classes found in .* is in the class list imagenet100"):
        ImagenetSource(other, class_list="imagenet100").info()


def test_user_list_needs_only_listed_to_select(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = make_tree(tmp_path / "src", LISTED + UNLISTED, per_class=1)
    mine = tmp_path / "mine.txt"
    mine.write_text(f"# my classes\n{UNLISTED[1]} tench-like\n{LISTED[2]}\n")
    with pytest.raises(ConversionError, match=r"3 classes .* not in the class list .*mine.txt.*--only-listed"):
        ImagenetSource(src, class_list=mine).info()
    code = main(["imagenet", "--src", str(src), "--class-list", str(mine), "--out", "shards", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: 3 classes found in")

    code = main(["imagenet", "--src", str(src), "--only-listed", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err == "error: --only-listed needs --class-list (the classes to convert)\n"

    source = ImagenetConfig(src=src, class_list=mine, only_listed=True).source()
    info = source.info()
    assert info.dataset == "imagenet" and info.classes == [UNLISTED[1], LISTED[2]]
    assert info.extra["names"] == ["tench-like", None]
    assert info.extra["skipped_classes"] == sorted([LISTED[0], LISTED[1], UNLISTED[0]])
    assert info.extra["class_list"] == str(mine) and info.extra["missing_classes"] == []
    assert [(s[0], s[1]) for s in loaded(source)] == [(f"{UNLISTED[1]}_0", 0), (f"{LISTED[2]}_0", 1)]

    # a user's file called imagenet100 is theirs, with the user's rule (every class listed)
    (tmp_path / "imagenet100").write_text(f"{LISTED[0]}\n")
    assert resolve_class_list("imagenet100") == (Path("imagenet100"), None)
    with pytest.raises(ConversionError, match="4 classes found .* not in the class list imagenet100"):
        ImagenetSource(src, class_list="imagenet100").info()
