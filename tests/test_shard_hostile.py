"""Hostile inputs through the real command line: nothing lost, nothing wrong, never a traceback.

Each test builds its input in tmp_path (symlinks to the real excerpts in ../shared/fixtures, or
files derived from them, or the synthetic set) and runs ``python -m fastloc.shard`` in-process
through ``main`` (or in a subprocess where a real process matters).
"""

import dataclasses
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastloc.shard.__main__ import main
from fastloc.shard.encode import MAX_PIXELS_CAP, MAX_PIXELS_DEFAULT
from fastloc.shard.manifest import read_manifest

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def cli(capsys, *argv) -> tuple[int, str, str]:
    """``python -m fastloc.shard ARGV`` in-process: (exit status, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if not p.is_dir()) if path.exists() else []


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (links not followed) with its bytes or link target."""
    out = {}
    for p in sorted(path.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(path))] = os.readlink(p).encode()
        elif p.is_file():
            out[str(p.relative_to(path))] = p.read_bytes()
    return out


def jpeg(size=(64, 48), color=(200, 40, 40)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="JPEG", quality=90)
    return out.getvalue()


def with_header_size(data: bytes, width: int, height: int) -> bytes:
    """The same baseline JPEG with other dimensions in its frame header (SOF0)."""
    sof = data.index(b"\xff\xc0")
    patched = bytearray(data)
    patched[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(patched)


def synthetic_args(out: Path, *extra) -> list:
    return [
        "synthetic",
        "--num-samples",
        12,
        "--shard-samples",
        4,
        "--min-size",
        48,
        "--max-size",
        64,
        "--processes",
        1,
        "--no-progress",
        "--out",
        out,
        *extra,
    ]


A, B = "n01514668", "n01518878"


def imagenet_folders(fixtures: Path, src: Path) -> Path:
    """SRC/<wnid>/ class folders holding real ImageNet JPEGs (symlinks)."""
    for wnid in (A, B):
        (src / wnid).mkdir(parents=True)
        for f in sorted((fixtures / "imagenet-sample").glob(f"{wnid}_*.JPEG")):
            (src / wnid / f.name).symlink_to(f)
    return src


def imagenet_tars(fixtures: Path, src: Path) -> Path:
    """SRC/<wnid>.tar class tars of real ImageNet JPEGs."""
    src.mkdir(parents=True)
    for wnid in (A, B):
        with tarfile.open(src / f"{wnid}.tar", "w") as tar:
            for f in sorted((fixtures / "imagenet-sample").glob(f"{wnid}_*.JPEG")):
                tar.add(f, arcname=f.name)
    return src


# ------------------------------------------------------------------ output overlapping the input


@pytest.mark.parametrize("layout", ["tars", "folders"])
def test_output_overlapping_the_input_is_refused_and_nothing_is_touched(fixtures, tmp_path, capsys, layout):
    data = tmp_path / "data"
    src = data / "imagenet" / "train"
    (imagenet_tars if layout == "tars" else imagenet_folders)(fixtures, src)
    (tmp_path / "link").symlink_to(data)
    before = snapshot(tmp_path)
    cases = [
        ["--src", src, "--out", data],  # the split folder IS the source
        ["--src", src, "--out", data, "--overwrite"],
        ["--src", tmp_path / "link/imagenet/train", "--out", data, "--overwrite"],  # the same, through a link
        ["--src", src, "--out", src / A],  # inside the source
        ["--src", src, "--out", tmp_path, "--name", "data", "--split", "imagenet"],  # holding the source
        ["--src", data, "--out", data / "imagenet", "--name", "train", "--overwrite"],  # inside, by --name
    ]
    for args in cases:
        code, out, err = cli(capsys, "imagenet", *args, "--no-progress")
        assert code == 2, (args, out, err)
        assert err.startswith("error: the output split folder") and "input" in err, err
        assert "--overwrite" not in err.split("input", 1)[1], f"suggests --overwrite: {err}"
        assert snapshot(tmp_path) == before, f"{args} changed files"


def test_overwrite_deletes_only_what_fastloc_wrote(tmp_path, capsys):
    split = tmp_path / "synthetic" / "train"
    code, _, err = cli(capsys, *synthetic_args(tmp_path))
    assert code == 0, err
    old_tars = sorted(p.name for p in split.glob("*.tar"))
    # the user's own files beside the shards: none of them follows the shard naming pattern
    user = {
        "notes.txt": b"mine",
        "synthetic-train-extra.idx": b"not a shard name",
        "synthetic-val-000000.idx": b"another split's name",
        ".hidden": b"x",
        "manifest.json.bak": b"{}",
        "sub/synthetic-train-000000.tar": b"in a subfolder",
    }
    for name, data in user.items():
        (split / name).parent.mkdir(parents=True, exist_ok=True)
        (split / name).write_bytes(data)
    (split / "synthetic-train-000009.tar.txt").write_text("look-alike")
    user["synthetic-train-000009.tar.txt"] = b"look-alike"

    # another conversion (other seed) of the same split: refused without --overwrite...
    code, _, err = cli(capsys, *synthetic_args(tmp_path, "--seed", 1, "--num-samples", 5))
    assert code == 2 and "--overwrite" in err
    # ...and with it, only the manifest and the old shards go
    code, _, err = cli(capsys, *synthetic_args(tmp_path, "--seed", 1, "--num-samples", 5, "--overwrite"))
    assert code == 0, err
    for name, data in user.items():
        assert (split / name).read_bytes() == data, f"{name} was changed or deleted"
    new_tars = sorted(p.name for p in split.glob("*.tar"))
    assert len(new_tars) == 2 < len(old_tars)
    assert read_manifest(split)["num_samples"] == 5
    assert not (split / ".fastloc-work").exists() and not (split / ".fastloc-lock").exists()


def test_tars_fastloc_did_not_write_are_never_deleted(tmp_path, capsys):
    split = tmp_path / "synthetic" / "train"
    split.mkdir(parents=True)
    (split / "n01440764.tar").write_bytes(b"a user's class tar")
    for extra in ([], ["--overwrite"]):
        code, _, err = cli(capsys, *synthetic_args(tmp_path, *extra))
        assert code == 2 and "n01440764.tar" in err and "does not write" in err, err
        assert (split / "n01440764.tar").read_bytes() == b"a user's class tar"
        assert sorted(p.name for p in split.iterdir()) == ["n01440764.tar"]


# ------------------------------------------------------------------ annotation JSON integrity


def coco_val4(fixtures: Path, root: Path, edit) -> Path:
    """ROOT/val2017 (the 4 real images) and an instances JSON edited by ``edit(data)``."""
    (root / "annotations").mkdir(parents=True)
    (root / "val2017").symlink_to(fixtures / "coco-val4" / "val2017")
    data = json.loads((fixtures / "coco-val4/annotations/instances_val2017.json").read_text())
    edit(data)
    (root / "annotations/instances_val2017.json").write_text(json.dumps(data))
    return root / "annotations/instances_val2017.json"


def coco_json_args(root: Path, out: Path, *extra) -> list:
    return [
        "coco",
        "--root",
        root,
        "--split",
        "val",
        "--labels",
        "json",
        "--out",
        out,
        "--no-progress",
        "--processes",
        1,
        *extra,
    ]


def _duplicate_id(data):
    data["images"][1]["id"] = data["images"][0]["id"]


def _duplicate_name(data):
    data["images"][1]["file_name"] = data["images"][0]["file_name"]


def _same_name_other_folder(data):
    data["images"][1]["file_name"] = "elsewhere/" + data["images"][0]["file_name"]


@pytest.mark.parametrize(
    "edit, says",
    [(_duplicate_id, "listed twice"), (_duplicate_name, "listed twice"), (_same_name_other_folder, "listed twice")],
    ids=["duplicate-image-id", "duplicate-file-name", "same-name-other-folder"],
)
def test_coco_json_with_ambiguous_images_is_an_error(fixtures, tmp_path, capsys, edit, says):
    instances = coco_val4(fixtures, tmp_path / "coco", edit)
    code, _, err = cli(capsys, *coco_json_args(tmp_path / "coco", tmp_path / "out"))
    assert code == 2, err
    assert err.startswith(f"error: {instances}") and says in err and "images[0]" in err and "images[1]" in err
    assert files_under(tmp_path / "out") == []


def test_coco_json_annotations_without_their_image_or_category_are_reported(fixtures, tmp_path, capsys):
    state = {}

    def edit(data):
        ids = sorted(im["id"] for im in data["images"])
        listed = {c["id"] for c in data["categories"]}
        state["unlisted"] = unlisted = next(c for c in range(1, 92) if c not in listed and c not in (12, 26))
        first = next(a for a in data["annotations"] if a["image_id"] == ids[0])
        first["category_id"] = unlisted  # a COCO thing id, but not in this file's categories
        state["victim"] = ids[0]
        orphan = dict(data["annotations"][-1], id=987654321, image_id=424242)  # no such image
        data["annotations"].append(orphan)

    instances = coco_val4(fixtures, tmp_path / "coco", edit)
    code, out, err = cli(capsys, *coco_json_args(tmp_path / "coco", tmp_path / "out"))
    assert code == 0, err
    manifest = read_manifest(tmp_path / "out/coco/val")
    report = manifest["report"]
    assert manifest["num_samples"] == 3 and report["skipped"] == 1
    (skipped,) = report["skipped_samples"]
    assert skipped["path"] == str(instances)
    assert str(state["unlisted"]) in skipped["reason"] and "categories" in skipped["reason"]
    assert f"{state['victim']:012d}.jpg" in skipped["reason"]
    (unreachable,) = report["unreachable"]
    assert unreachable["path"] == str(instances) and "424242" in unreachable["reason"]
    assert "1 annotation of image ids not in its 'images'" in unreachable["reason"]
    assert f"unreachable {instances}:" in out and f"skipped {instances}:" in out


def panoptic_layout(fixtures: Path, root: Path, edit) -> Path:
    sample = fixtures / "coco-panoptic2/sample_data"
    data = json.loads((sample / "panoptic_examples.json").read_text())
    data["categories"] = json.loads((fixtures / "coco-panoptic2/panoptic_coco_categories.json").read_text())
    edit(data)
    (root / "annotations/panoptic_val2017").mkdir(parents=True)
    (root / "val2017").mkdir()
    (root / "annotations/panoptic_val2017.json").write_text(json.dumps(data))
    for jpg in sorted((sample / "input_images").glob("*.jpg")):
        (root / "val2017" / jpg.name).symlink_to(jpg)
        png = f"{jpg.stem}.png"
        (root / "annotations/panoptic_val2017" / png).symlink_to(sample / "panoptic_examples" / png)
    return root / "annotations/panoptic_val2017.json"


def test_coco_panoptic_json_integrity(fixtures, tmp_path, capsys):
    def panoptic(name, edit, *extra):
        path = panoptic_layout(fixtures, tmp_path / name, edit)
        result = cli(
            capsys,
            "coco",
            "--root",
            tmp_path / name,
            "--split",
            "val",
            "--labels",
            "panoptic",
            "--out",
            tmp_path / f"out-{name}",
            "--no-progress",
            "--processes",
            1,
            *extra,
        )
        return path, result

    def two_for_one_image(data):
        data["annotations"][1]["image_id"] = data["annotations"][0]["image_id"]

    path, (code, _, err) = panoptic("twice", two_for_one_image)
    assert code == 2 and err.startswith(f"error: {path}") and "both for image id" in err, err

    def duplicate_image_id(data):
        data["images"][1]["id"] = data["images"][0]["id"]

    path, (code, _, err) = panoptic("dup-id", duplicate_image_id)
    assert code == 2 and "listed twice" in err, err

    def duplicate_segment(data):
        segments = data["annotations"][0]["segments_info"]
        segments[1] = dict(segments[1], id=segments[0]["id"])

    path, (code, _, err) = panoptic("dup-segment", duplicate_segment)
    assert code == 0, err
    report = read_manifest(tmp_path / "out-dup-segment/coco-panoptic/val")["report"]
    assert report["converted"] == 1 and report["skipped"] == 1
    assert "listed twice" in report["skipped_samples"][0]["reason"]

    def orphan_annotation(data):
        data["annotations"][0]["image_id"] = 999  # its image entry no longer matches
        data["images"] = [im for im in data["images"] if im["id"] != 999]

    path, (code, _, err) = panoptic("orphan", orphan_annotation)
    assert code == 0, err
    report = read_manifest(tmp_path / "out-orphan/coco-panoptic/val")["report"]
    assert report["converted"] == 1 and report["skipped"] == 1  # the image lost its annotation
    assert [u["path"] for u in report["unreachable"]] == [str(path)] and "999" in report["unreachable"][0]["reason"]


def test_coco_captions_json_integrity(fixtures, tmp_path, capsys):
    captions = json.loads((fixtures / "coco-excerpts/captions_val2017.json_samples.json").read_text())
    root = tmp_path / "coco"
    coco_val4(fixtures, root, lambda data: None)
    path = root / "annotations/captions_val2017.json"

    def run(edited):
        path.write_text(json.dumps(edited))
        return cli(
            capsys,
            "coco",
            "--root",
            root,
            "--split",
            "val",
            "--labels",
            "json",
            "--captions",
            "--out",
            tmp_path / "out",
            "--no-progress",
            "--processes",
            1,
            "--overwrite",
        )

    bad = json.loads(json.dumps(captions))
    bad["images"][1]["id"] = bad["images"][0]["id"]
    code, _, err = run(bad)
    assert code == 2 and err.startswith(f"error: {path}") and "listed twice" in err, err

    # the captions file calls 000000289393.jpg by another id than the instances file: skipped
    bad = json.loads(json.dumps(captions))
    entry = next(im for im in bad["images"] if im["file_name"] == "000000289393.jpg")
    entry["id"] = 7
    code, _, err = run(bad)
    assert code == 0, err
    report = read_manifest(tmp_path / "out/coco/val")["report"]
    assert report["skipped"] == 1 and report["skipped_samples"][0]["path"] == str(path)
    assert "289393" in report["skipped_samples"][0]["reason"] and "7" in report["skipped_samples"][0]["reason"]
    # the excerpt's captions of images it does not list are counted, not dropped silently
    assert any(u["path"] == str(path) and "not used" in u["reason"] for u in report["unreachable"])


def test_ade20k_json_that_describes_another_image_is_skipped(fixtures, tmp_path, capsys):
    full = fixtures / "ade20k-full3/ADE20K_2021_17_01"
    root = tmp_path / "ADE20K_2021_17_01"
    for dirpath, _, names in os.walk(full):
        target = root / Path(dirpath).relative_to(full)
        target.mkdir(parents=True, exist_ok=True)
        for name in names:
            (target / name).symlink_to(Path(dirpath) / name)
    street = root / "images/ADE/training/urban/street"

    def edit(stem, change):
        path = street / f"{stem}.json"
        doc = json.loads(path.read_bytes().decode("latin-1"))
        change(doc["annotation"])
        path.unlink()
        path.write_text(json.dumps(doc))
        return str(path)

    swapped = edit("ADE_train_00016869", lambda ann: ann.update(filename="ADE_train_00016900.jpg"))
    resized = edit("ADE_train_00016900", lambda ann: ann.update(imsize=[100, 200, 3]))
    code, _, err = cli(
        capsys,
        "ade20k",
        "--root",
        root,
        "--split",
        "train",
        "--out",
        tmp_path / "out",
        "--no-progress",
        "--processes",
        1,
    )
    assert code == 0, err
    report = read_manifest(tmp_path / "out/ade20k-full/train")["report"]
    skipped = {e["path"]: e["reason"] for e in report["skipped_samples"]}
    assert report["converted"] == 1 and len(skipped) == 2
    assert "ADE_train_00016900.jpg" in skipped[swapped] and "not ADE_train_00016869.jpg" in skipped[swapped]
    assert "100" in skipped[str(street / "ADE_train_00016900_seg.png")]
    assert resized  # the seg map is named: it is what disagrees with the JSON's imsize


# ------------------------------------------------------------------ nothing converted


def test_a_conversion_where_every_sample_fails_is_an_error(tmp_path, capsys):
    src = tmp_path / "src" / A
    src.mkdir(parents=True)
    (src / "a.JPEG").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (src / "b.JPEG").write_bytes(b"")
    (src / "c.JPEG").write_bytes(b"\xff\xd8\xff\xe0 truncated too")
    out = tmp_path / "out"
    for _ in range(2):  # and again: the rerun is not "already converted"
        code, stdout, err = cli(capsys, "imagenet", "--src", src.parent, "--out", out, "--no-progress")
        assert code == 2
        assert err.startswith("error:") and "no sample could be converted" in err and "3 planned samples" in err
        assert "truncated" in err  # why: the most common reason
        assert "skipped 3" in stdout and f"skipped {src / 'b.JPEG'}: " in stdout
        assert files_under(out) == [], "an empty result publishes nothing (no manifest)"


def test_verify_of_an_empty_set_is_not_ok(tmp_path, capsys):
    code, _, err = cli(capsys, *synthetic_args(tmp_path))
    assert code == 0, err
    split = tmp_path / "synthetic" / "train"
    manifest = json.loads((split / "manifest.json").read_text())
    manifest.update(shards=[], num_samples=0, num_shards=0)
    (split / "manifest.json").write_text(json.dumps(manifest))
    for tar in split.glob("*.tar"):
        tar.unlink()
    code, out, err = cli(capsys, "verify", split)
    assert code == 1 and "OK" not in out and "FAILED (1 problem)" in out
    assert "holds no samples" in err
    # and converting again over such a set is not "already converted"
    code, out, err = cli(capsys, *synthetic_args(tmp_path))
    assert code == 2 and "holds no samples" in err and "--overwrite" in err
    code, out, err = cli(capsys, *synthetic_args(tmp_path, "--overwrite"))
    assert code == 0 and read_manifest(split)["num_samples"] == 12


@pytest.mark.parametrize("name", ["../outside.tar", "/etc/passwd", "sub/x.tar", ".."])
def test_a_manifest_naming_files_outside_its_folder_is_refused(tmp_path, capsys, name):
    """verify, inspect and the loaders read only files of the split folder."""
    from fastloc.data.config import SOLO, LoaderConfig
    from fastloc.data.shards import ShardError
    from fastloc.data.torch_loader import TorchLoader

    code, _, err = cli(capsys, *synthetic_args(tmp_path))
    assert code == 0, err
    split = tmp_path / "synthetic" / "train"
    manifest = json.loads((split / "manifest.json").read_text())
    manifest["shards"][0]["tar"] = name
    (split / "manifest.json").write_text(json.dumps(manifest))
    for command in ("verify", "inspect"):
        code, _, err = cli(capsys, command, split)
        assert code == 2 and "not a file of the split folder" in err, (command, err)
    with pytest.raises(ShardError, match="not a file of the split folder"):
        TorchLoader(LoaderConfig(shards=split, batch_size=2, workers=0), SOLO)


# ------------------------------------------------------------------ symbolic link loops


def test_symlink_loops_in_class_folders_and_the_root_are_skipped_and_reported(fixtures, tmp_path, capsys):
    src = imagenet_folders(fixtures, tmp_path / "src")
    (src / A / "self.JPEG").symlink_to("self.JPEG")  # a file link to itself
    (src / A / "ping.JPEG").symlink_to("pong.JPEG")  # a two-link cycle
    (src / A / "pong.JPEG").symlink_to("ping.JPEG")
    (src / A / "dirloop").symlink_to(".")  # a folder that contains itself: not an image, ignored
    (src / B / "broken.JPEG").symlink_to("nowhere.JPEG")
    (src / "n99999999").symlink_to("n99999999")  # at the root: neither class folder nor tar
    (src / "n88888888").symlink_to("n77777777")
    (src / "n77777777").symlink_to("n88888888")
    good = len(list((fixtures / "imagenet-sample").glob(f"{A}_*.JPEG"))) + len(
        list((fixtures / "imagenet-sample").glob(f"{B}_*.JPEG"))
    )
    code, out, err = cli(capsys, "imagenet", "--src", src, "--out", tmp_path / "out", "--no-progress")
    assert code == 0, err
    manifest = read_manifest(tmp_path / "out/imagenet/train")
    report = manifest["report"]
    assert manifest["num_samples"] == good and manifest["classes"] == [A, B]
    skipped = {e["path"]: e["reason"] for e in report["skipped_samples"]}
    assert set(skipped) == {str(src / A / n) for n in ("self.JPEG", "ping.JPEG", "pong.JPEG")} | {
        str(src / B / "broken.JPEG")
    }
    assert all("symbolic link loop" in skipped[str(src / A / n)] for n in ("self.JPEG", "ping.JPEG", "pong.JPEG"))
    assert "broken symbolic link" in skipped[str(src / B / "broken.JPEG")]
    unreachable = {e["path"]: e["reason"] for e in report["unreachable"]}
    assert set(unreachable) == {str(src / n) for n in ("n99999999", "n88888888", "n77777777")}
    assert all("symbolic link loop" in r for r in unreachable.values())
    for path in list(skipped) + list(unreachable):
        assert path in out


def test_symlink_loops_in_ade20k_and_coco_folders(fixtures, tmp_path, capsys):
    full = fixtures / "ade20k-full3/ADE20K_2021_17_01"
    root = tmp_path / "ADE20K_2021_17_01"
    for dirpath, _, names in os.walk(full):
        target = root / Path(dirpath).relative_to(full)
        target.mkdir(parents=True, exist_ok=True)
        for name in names:
            (target / name).symlink_to(Path(dirpath) / name)
    urban = root / "images/ADE/training/urban"
    (urban / "street" / "back").symlink_to("..")  # a folder loop: walking it would never end
    (urban / "self").symlink_to("self")
    (urban / "street" / "ADE_train_99999999.jpg").symlink_to("ADE_train_99999999.jpg")
    code, _, err = cli(
        capsys,
        "ade20k",
        "--root",
        root,
        "--split",
        "train",
        "--out",
        tmp_path / "ade",
        "--no-progress",
        "--processes",
        1,
    )
    assert code == 0, err
    report = read_manifest(tmp_path / "ade/ade20k-full/train")["report"]
    assert report["converted"] == 3 and report["skipped"] == 1
    assert "symbolic link loop" in report["skipped_samples"][0]["reason"]
    unreachable = {e["path"]: e["reason"] for e in report["unreachable"]}
    assert str(urban / "self") in unreachable and str(urban / "street" / "back") in unreachable

    coco = tmp_path / "coco"
    (coco / "annotations").mkdir(parents=True)
    (coco / "val2017").mkdir()
    for jpg in (fixtures / "coco-val4/val2017").glob("*.jpg"):
        (coco / "val2017" / jpg.name).symlink_to(jpg)
    (coco / "val2017" / "000000000001.jpg").symlink_to("000000000001.jpg")
    code, _, err = cli(
        capsys,
        "coco",
        "--root",
        coco,
        "--split",
        "val",
        "--labels",
        "none",
        "--out",
        tmp_path / "c",
        "--no-progress",
        "--processes",
        1,
    )
    assert code == 0, err
    report = read_manifest(tmp_path / "c/coco/val")["report"]
    assert report["converted"] == 4 and report["skipped"] == 1
    assert "symbolic link loop" in report["skipped_samples"][0]["reason"]


# ------------------------------------------------------------------ the pixel limit


def test_absurd_image_dimensions_are_skipped_from_the_header(fixtures, tmp_path, capsys):
    src = tmp_path / "src"
    (src / A).mkdir(parents=True)
    real = min((fixtures / "imagenet-sample").glob(f"{A}_*.JPEG"))
    (src / A / real.name).symlink_to(real)
    small = jpeg()
    (src / A / f"{A}_huge.JPEG").write_bytes(with_header_size(small, 50000, 50000))
    (src / A / f"{A}_big.JPEG").write_bytes(with_header_size(small, 12000, 12000))
    png = io.BytesIO()
    Image.new("1", (9000, 9000)).save(png, format="PNG")  # 81 Mpixels in a few kB, named .JPEG
    (src / A / f"{A}_png.JPEG").write_bytes(png.getvalue())
    (src / A / f"{A}_edge.JPEG").write_bytes(with_header_size(small, 8000, 8000))  # exactly the limit: passes

    code, _, err = cli(
        capsys, "imagenet", "--src", src, "--out", tmp_path / "out", "--no-progress", "--check", "header"
    )
    assert code == 0, err
    report = read_manifest(tmp_path / "out/imagenet/train")["report"]
    skipped = {Path(e["path"]).name: e["reason"] for e in report["skipped_samples"]}
    assert set(skipped) == {f"{A}_huge.JPEG", f"{A}_big.JPEG", f"{A}_png.JPEG"}
    sizes = {f"{A}_huge.JPEG": "50000x50000", f"{A}_big.JPEG": "12000x12000", f"{A}_png.JPEG": "9000x9000"}
    for name, size in sizes.items():
        assert size in skipped[name] and "--max-pixels" in skipped[name], skipped[name]
    assert report["converted"] == 2 and MAX_PIXELS_DEFAULT >= 8000 * 8000

    # the limit is an option of every converter
    code, _, err = cli(
        capsys, "imagenet", "--src", src, "--out", tmp_path / "tight", "--no-progress", "--max-pixels", 200_000
    )
    assert code == 0, err
    report = read_manifest(tmp_path / "tight/imagenet/train")["report"]
    assert report["converted"] == 0 + 1 and report["skipped"] == 4  # only the 500x375 real image fits
    code, _, err = cli(capsys, *synthetic_args(tmp_path / "syn", "--max-pixels", 1000))
    assert code == 2 and "--max-size" in err and "--max-pixels" in err


def tampered_set(tmp_path: Path, capsys) -> tuple[Path, dict[str, str]]:
    """A synthetic set in which one jpg announces 50000x50000, one 12000x12000 and one is garbage."""
    code, _, err = cli(capsys, *synthetic_args(tmp_path))
    assert code == 0, err
    split = tmp_path / "synthetic" / "train"
    tar = split / "synthetic-train-000001.tar"
    lines = (split / "synthetic-train-000001.idx").read_text().splitlines()[1:]
    blob = bytearray(tar.read_bytes())
    keys = {}
    for line, kind in zip(lines, ["huge", "big", "garbage"]):
        ext, offset, size, member = line.split()[:4]
        assert ext == "jpg"
        offset, size = int(offset), int(size)
        data = bytes(blob[offset : offset + size])
        if kind == "garbage":
            data = b"\x00" * 16 + data[16:]
        else:
            data = with_header_size(data, *((50000, 50000) if kind == "huge" else (12000, 12000)))
        blob[offset : offset + size] = data
        keys[kind] = member.split(".")[0]
    tar.write_bytes(bytes(blob))
    return split, keys


def test_verify_and_inspect_report_absurd_and_undecodable_samples(tmp_path, capsys):
    split, keys = tampered_set(tmp_path, capsys)
    code, out, err = cli(capsys, "verify", split, "--processes", 1)
    assert code == 1 and "FAILED" in out
    fails = [line for line in err.splitlines() if line.startswith("FAIL ")]
    for kind, size in (("huge", "50000x50000"), ("big", "12000x12000")):
        assert any(keys[kind] in line and size in line and "not decoded" in line for line in fails), err
    assert any(keys["garbage"] in line and "does not decode" in line for line in fails), err

    sheet = tmp_path / "sheet.png"
    code, out, err = cli(capsys, "inspect", split, "--sheet", sheet)
    assert code == 0, err
    assert sheet.is_file() and "contact sheet" in out and "3 not drawn" in out
    not_drawn = [line for line in err.splitlines() if line.startswith("not drawn: ")]
    assert len(not_drawn) == 3
    for kind in keys:
        assert any(keys[kind] in line for line in not_drawn), err
    with Image.open(sheet) as im:
        assert im.size[1] > 0 and (np.asarray(im.convert("L")) < 200).mean() > 0.1  # the rest is drawn

    # a missing shard: named, and the others still drawn
    (split / "synthetic-train-000000.tar").unlink()
    code, out, err = cli(capsys, "inspect", split, "--sheet", sheet, "--samples", 12)
    assert code == 0 and "synthetic-train-000000.tar: cannot read" in err


# ------------------------------------------------------------------ option values


BAD_OPTIONS = [
    (["imagenet", "--src", "{src}", "--limit", "-3"], "--limit"),
    (["imagenet", "--src", "{src}", "--limit", "0"], "--limit"),
    (["imagenet", "--src", "{src}", "--processes", "-2"], "--processes"),
    (["imagenet", "--src", "{src}", "--reencode-quality", "500"], "--reencode-quality"),
    (["imagenet", "--src", "{src}", "--reencode-quality", "0"], "--reencode-quality"),
    (["imagenet", "--src", "{src}", "--shard-samples", "0"], "--shard-samples"),
    (["imagenet", "--src", "{src}", "--shard-bytes", "-1"], "--shard-bytes"),
    (["imagenet", "--src", "{src}", "--seed", "-1"], "--seed"),
    (["imagenet", "--src", "{src}", "--max-pixels", "0"], "--max-pixels"),
    (["imagenet", "--src", "{src}", "--max-pixels", str(MAX_PIXELS_CAP + 1)], "--max-pixels"),
    (["imagenet", "--src", "{src}", "--split", "../escape"], "--split"),
    (["imagenet", "--src", "{src}", "--name", "a/b"], "--name"),
    (["synthetic", "--num-samples", "0"], "--num-samples"),
    (["synthetic", "--num-samples", "-5"], "--num-samples"),
    (["synthetic", "--min-size", "8"], "--min-size"),
    (["synthetic", "--min-size", "64", "--max-size", "48"], "--max-size"),
    (["synthetic", "--data-seed", "-1"], "--data-seed"),
    (["synthetic", "--max-size", "100000"], "--max-size"),
    (["ade20k", "--root", "{src}", "--num-classes", "1"], "--num-classes"),
    (["ade20k", "--root", "{src}", "--num-classes", "70000"], "--num-classes"),
    (["coco", "--root", "{src}", "--processes", "-1"], "--processes"),
    (["verify", "{src}", "--processes", "-1"], "--processes"),
    (["verify", "{src}", "--max-pixels", "-1"], "--max-pixels"),
    (["inspect", "{src}", "--samples", "0"], "--samples"),
    (["inspect", "{src}", "--samples", "-4"], "--samples"),
]


@pytest.mark.parametrize("argv, flag", BAD_OPTIONS, ids=[" ".join(a[:1] + a[-2:]) for a, _ in BAD_OPTIONS])
def test_nonsense_option_values_are_rejected(tmp_path, capsys, monkeypatch, argv, flag):
    monkeypatch.chdir(tmp_path)
    src = tmp_path / "src"
    (src / A).mkdir(parents=True)
    (src / A / "x.JPEG").write_bytes(jpeg())
    extra = [] if argv[0] in ("verify", "inspect") else ["--no-progress"]
    code, out, err = cli(capsys, *[a.format(src=src) for a in argv], *extra)
    assert code == 2, (out, err)
    assert err.startswith((f"error: {flag}", "error: the dataset name")), err
    assert files_under(tmp_path) == [src / A / "x.JPEG"], "nothing may be written"


def test_the_real_process_rejects_bad_values_without_a_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "fastloc.shard", "synthetic", "--limit", "-3", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: --limit must be at least 1, got -3"), result.stderr
    assert "Traceback" not in result.stderr and files_under(tmp_path) == []


def test_every_converter_has_the_pixel_limit():
    from fastloc.shard.sources import CONVERTERS

    for name, cls in CONVERTERS.items():
        (field,) = [f for f in dataclasses.fields(cls) if f.name == "max_pixels"]
        assert field.default == MAX_PIXELS_DEFAULT, name


def test_missing_stuffthingmaps_point_to_the_other_label_sources(fixtures, tmp_path, capsys):
    root = tmp_path / "coco"
    root.mkdir()
    (root / "val2017").symlink_to(fixtures / "coco-val4" / "val2017")
    code, _, err = cli(capsys, "coco", "--root", root, "--split", "val", "--out", tmp_path / "out", "--no-progress")
    assert code == 2 and err.startswith("error: stuffthingmaps folder not found"), err
    assert "--labels json" in err and "--labels panoptic" in err
