"""Bad input through the real command line: skipped and reported, or --strict; never a traceback.

Layouts are built in tmp_path from the real dataset excerpts (symlinks to the fixtures plus files
derived from them); nothing is copied into the repository.
"""

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastloc.shard.__main__ import main
from fastloc.shard.encode import parse_jpeg_header
from fastloc.shard.inspect import CAPTION, TILE
from fastloc.shard.manifest import read_manifest
from fastloc.shard.tario import iter_samples

OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")  # e.g. <_io.BytesIO object at 0x7f...>


def cli(capsys, *argv) -> tuple[int, str, str]:
    """Run ``python -m fastloc.shard ARGV`` in-process: (exit status, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def cli_subprocess(*argv, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fastloc.shard", *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if not p.is_dir()) if path.exists() else []


def jpeg_bytes(image: Image.Image, **save) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90, **save)
    return out.getvalue()


# ------------------------------------------------------------------ ImageNet class folders


A, B = "n01514668", "n01530575"  # two class folders (cls 0 and 1: sorted wnids)


def imagenet_layout(fixtures: Path, src: Path) -> dict:
    """SRC/<wnid>/*.JPEG with good, re-encodable and unreadable images.

    Returns {"good": [paths], "gray": path, "reencoded": {path: reason word},
    "bad": {path: reason word}} (paths as strings, as the report names them).
    """
    sample = fixtures / "imagenet-sample"
    for wnid in (A, B):
        (src / wnid).mkdir(parents=True)
    good = [
        (A, "n01514668_cock.JPEG"),
        (A, "n01514859_hen.JPEG"),
        (B, "n01518878_ostrich.JPEG"),
        (B, "n01530575_brambling.JPEG"),
    ]
    for wnid, name in good:
        (src / wnid / name).symlink_to(sample / name)
    gray = src / B / "n02096051_Airedale.JPEG"  # a real grayscale baseline JPEG
    gray.symlink_to(sample / "n02096051_Airedale.JPEG")
    with Image.open(gray) as im:
        assert im.mode == "L"

    with Image.open(sample / "n01531178_goldfinch.JPEG") as im:
        rgb = im.convert("RGB")
    cmyk = src / A / f"{A}_cmyk.JPEG"
    cmyk.write_bytes(jpeg_bytes(rgb.convert("CMYK")))
    png = src / A / f"{A}_png.JPEG"
    out = io.BytesIO()
    rgb.save(out, format="PNG")
    png.write_bytes(out.getvalue())
    progressive = src / B / f"{B}_progressive.JPEG"
    progressive.write_bytes(jpeg_bytes(rgb, progressive=True))

    empty = src / B / f"{B}_empty.JPEG"
    empty.write_bytes(b"")
    real = (sample / "n01558993_robin.JPEG").read_bytes()
    truncated = src / A / f"{A}_truncated.JPEG"
    truncated.write_bytes(real[: len(real) // 2])
    garbage = src / B / f"{B}_garbage.JPEG"
    noise = bytearray(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    noise[:2] = b"\x13\x37"  # not even a JPEG start-of-image marker
    garbage.write_bytes(bytes(noise))

    return {
        "good": [str(src / wnid / name) for wnid, name in good] + [str(gray)],
        "gray": str(gray),
        "reencoded": {str(cmyk): "CMYK", str(png): "PNG", str(progressive): "progressive"},
        "bad": {str(empty): "empty", str(truncated): "truncated", str(garbage): "cannot decode"},
    }


def imagenet_args(src: Path, out: Path, *extra) -> list:
    return ["imagenet", "--src", src, "--out", out, "--shard-samples", 4, "--no-progress", *extra]


def test_imagenet_bad_images_are_skipped_and_reported(fixtures, tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    layout = imagenet_layout(fixtures, src)
    code, stdout, stderr = cli(capsys, *imagenet_args(src, out, "--processes", 1))
    assert code == 0, stderr
    assert "Traceback" not in stderr
    split = out / "imagenet" / "train"
    manifest = read_manifest(split)
    report = manifest["report"]
    n_good, n_re, n_bad = len(layout["good"]), len(layout["reencoded"]), len(layout["bad"])

    # counts: everything planned, good + re-encoded converted, the bad ones skipped
    assert report["planned"] == n_good + n_re + n_bad
    assert report["converted"] == manifest["num_samples"] == n_good + n_re
    assert report["reencoded"] == n_re and report["skipped"] == n_bad
    assert f"converted {n_good + n_re}, re-encoded {n_re}, skipped {n_bad}" in stdout

    # skipped: each bad file by its path, with a clear reason
    skipped = {e["path"]: e["reason"] for e in report["skipped_samples"]}
    assert set(skipped) == set(layout["bad"])
    for path, word in layout["bad"].items():
        reason = skipped[path]
        assert word in reason, (path, reason)
        assert not OBJECT_REPR.search(reason), f"reason shows a Python object, not the problem: {reason}"
        assert f"skipped {path}: {reason}" in stdout
    assert "0 bytes" in skipped[str(src / B / f"{B}_empty.JPEG")]

    # re-encoded: counted by reason (one each), listed by path, printed
    by_reason = report["reencoded_by_reason"]
    assert sum(by_reason.values()) == n_re and set(by_reason.values()) == {1}
    for word in ("CMYK", "PNG", "progressive"):
        assert len([r for r in by_reason if word in r]) == 1, (word, by_reason)
    reencoded = {e["path"]: e["reason"] for e in report["reencoded_samples"]}
    assert set(reencoded) == set(layout["reencoded"])
    for path, word in layout["reencoded"].items():
        assert word in reencoded[path]
    for reason, count in by_reason.items():
        assert f"re-encoded {count}: {reason}" in stdout

    # the shards: pass-through bytes untouched, re-encoded ones baseline JPEGs of the same size
    samples = {}
    for shard in manifest["shards"]:
        for key, members in iter_samples(split / shard["tar"]):
            samples[key] = {ext: data for ext, _, data in members}
    metas = {json.loads(m["json"])["source"]: m for m in samples.values()}
    assert set(metas) == set(layout["good"]) | set(layout["reencoded"])
    for path in layout["good"]:
        member = metas[path]
        assert member["jpg"] == Path(path).read_bytes(), f"{path} was not passed through untouched"
        assert json.loads(member["json"])["reencoded"] is None
        assert int(member["cls"]) == (0 if f"/{A}/" in path else 1)
    with Image.open(io.BytesIO(metas[layout["gray"]]["jpg"])) as im:
        assert im.mode == "L"
    for path in layout["reencoded"]:
        data = metas[path]["jpg"]
        header = parse_jpeg_header(data)
        assert header.coding == "baseline" and header.precision == 8 and header.components in (1, 3)
        with Image.open(path) as original:
            assert (header.width, header.height) == original.size
        assert json.loads(metas[path]["json"])["reencoded"] == reencoded[path]

    code, stdout, stderr = cli(capsys, "verify", split)
    assert code == 0, stderr
    assert "OK" in stdout and "FAIL" not in stderr

    # inspect: a summary of the set and a contact sheet with class captions
    sheet = tmp_path / "imagenet.png"
    code, stdout, stderr = cli(capsys, "inspect", split, "--sheet", sheet)
    assert code == 0, stderr
    assert f"{n_good + n_re} samples" in stdout and "skipped 3" in stdout
    with Image.open(sheet) as im:
        assert im.size == (4 * TILE, 2 * (TILE + CAPTION))


def test_imagenet_strict_stops_and_leaves_nothing(fixtures, tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    layout = imagenet_layout(fixtures, src)
    code, _, stderr = cli(capsys, *imagenet_args(src, out, "--processes", 1, "--strict"))
    assert code != 0
    assert stderr.startswith("error:") and "--strict" in stderr
    assert any(path in stderr for path in layout["bad"]), stderr
    assert files_under(out) == []  # no tar, idx, manifest, work folder or partial file
    assert not (out / "imagenet" / "train").exists()


def test_imagenet_strict_in_a_real_process_has_no_traceback(fixtures, tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    layout = imagenet_layout(fixtures, src)
    # two worker processes and shards of 2: the failing shard is not the only one in flight
    result = cli_subprocess(*imagenet_args(src, out, "--processes", 2, "--strict", "--shard-samples", 2))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    assert result.stderr.startswith("error:"), result.stderr
    named = [path for path in layout["bad"] if path in result.stderr]
    assert len(named) == 1, result.stderr
    assert files_under(out) == []

    # without --strict the same layout converts (and says what it skipped)
    result = cli_subprocess(*imagenet_args(src, out, "--processes", 2))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    for path in layout["bad"]:
        assert f"skipped {path}: " in result.stdout


# ------------------------------------------------------------------ ADE20K SceneParsing labels


def ade20k_layout(fixtures: Path, root: Path) -> dict:
    """ADEChallengeData2016-style root: one good sample and four with label problems."""
    real = fixtures / "ade20k-sceneparsing3"
    images, labels = root / "images" / "validation", root / "annotations" / "validation"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    (root / "objectInfo150.csv").symlink_to(real / "objectInfo150.csv")
    (root / "sceneCategories.txt").symlink_to(real / "sceneCategories.txt")

    def image(n: int, like: int) -> str:
        path = images / f"ADE_val_{n:08d}.jpg"
        path.symlink_to(real / "images" / "validation" / f"ADE_val_{like:08d}.jpg")
        return str(path)

    def real_label(n: int) -> Image.Image:
        return Image.open(real / "annotations" / "validation" / f"ADE_val_{n:08d}.png")

    label = {n: labels / f"ADE_val_{n:08d}.png" for n in range(1, 6)}
    good = image(1, 1)
    label[1].symlink_to(real / "annotations" / "validation" / "ADE_val_00000001.png")
    missing = image(2, 2)  # no label map at all
    wrong_size = image(3, 3)  # 400x300 image, 200x150 label map
    with real_label(3) as im:
        assert im.size == (400, 300)
        im.crop((0, 0, 200, 150)).save(label[3])
    out_of_range = image(4, 1)  # label ids 200 in a 151-class space
    with real_label(1) as im:
        ids = np.array(im)
    assert ids.max() < 151
    ids[10:20, 10:20] = 200
    Image.fromarray(ids).save(label[4])
    corrupt = image(5, 2)  # label file of garbage bytes
    label[5].write_bytes(np.random.default_rng(1).integers(0, 256, 1000, dtype=np.uint8).tobytes())
    return {
        "good": good,
        "missing": (missing, str(label[2])),
        "wrong_size": (wrong_size, str(label[3])),
        "out_of_range": (out_of_range, str(label[4])),
        "corrupt": (corrupt, str(label[5])),
    }


def test_ade20k_label_problems_are_skipped_with_reasons(fixtures, tmp_path, capsys):
    root, out = tmp_path / "ADEChallengeData2016", tmp_path / "out"
    layout = ade20k_layout(fixtures, root)
    code, stdout, stderr = cli(
        capsys, "ade20k", "--root", root, "--split", "val", "--out", out, "--no-progress", "--processes", 1
    )
    assert code == 0, stderr
    assert "Traceback" not in stderr
    split = out / "ade20k" / "val"
    manifest = read_manifest(split)
    report = manifest["report"]
    assert manifest["num_samples"] == report["converted"] == 1
    assert report["skipped"] == 4 and report["reencoded"] == 0

    skipped = {e["path"]: e["reason"] for e in report["skipped_samples"]}
    assert len(skipped) == 4

    def reason_for(case: str) -> str:  # every label problem is named by the label file
        return skipped[layout[case][1]]

    assert "not found" in skipped[layout["missing"][1]]
    wrong_size = reason_for("wrong_size")
    assert "200x150" in wrong_size and "400x300" in wrong_size
    out_of_range = reason_for("out_of_range")
    assert "200" in out_of_range and "class space" in out_of_range and "151" in out_of_range
    corrupt = skipped[layout["corrupt"][1]]
    assert "cannot decode" in corrupt and not OBJECT_REPR.search(corrupt), corrupt
    for path, reason in skipped.items():
        assert f"skipped {path}: {reason}" in stdout

    code, stdout, stderr = cli(capsys, "verify", split, "--processes", 1)
    assert code == 0 and "OK" in stdout, stderr


# ------------------------------------------------------------------ malformed JSON, missing folders


@pytest.mark.parametrize(
    "content, says",
    [
        (b'{"images": [{"id": 1, "file_name": ', "not valid JSON"),
        (b"\xff\xfe\x00 not text", "not valid JSON"),
        (b"[1, 2, 3]", "JSON object"),
        (b'{"images": [], "annotations": []}', "categories"),
    ],
    ids=["truncated", "binary", "not-an-object", "missing-key"],
)
def test_coco_malformed_json_is_a_clean_error(fixtures, tmp_path, capsys, content, says):
    root, out = tmp_path / "coco", tmp_path / "out"
    (root / "annotations").mkdir(parents=True)
    (root / "val2017").symlink_to(fixtures / "coco-val4" / "val2017")
    instances = root / "annotations" / "instances_val2017.json"
    instances.write_bytes(content)
    code, _, stderr = cli(
        capsys, "coco", "--root", root, "--split", "val", "--labels", "json", "--out", out, "--no-progress"
    )
    assert code == 2
    assert stderr.startswith("error:") and str(instances) in stderr and says in stderr, stderr
    assert "Traceback" not in stderr
    assert files_under(out) == []


def test_coco_malformed_json_in_a_real_process(fixtures, tmp_path):
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "val2017").symlink_to(fixtures / "coco-val4" / "val2017")
    (root / "annotations" / "instances_val2017.json").write_text('{"images": [')
    result = cli_subprocess(
        "coco", "--root", "coco", "--split", "val", "--labels", "json", "--no-progress", cwd=tmp_path
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: coco/annotations/instances_val2017.json"), result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "shards").exists() or files_under(tmp_path / "shards") == []


@pytest.mark.parametrize(
    "argv",
    [
        ["coco", "--root", "{missing}", "--no-progress"],
        ["coco", "--root", "{missing}", "--labels", "json", "--no-progress"],
        ["imagenet", "--src", "{missing}", "--no-progress"],
        ["ade20k", "--root", "{missing}", "--no-progress"],
        ["verify", "{missing}", "--processes", "1"],
        ["inspect", "{missing}"],
    ],
    ids=["coco", "coco-json", "imagenet", "ade20k", "verify", "inspect"],
)
def test_missing_directory_is_a_clean_error(tmp_path, capsys, monkeypatch, argv):
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "no" / "such" / "folder"
    code, _, stderr = cli(capsys, *[a.format(missing=missing) for a in argv])
    assert code == 2
    assert stderr.startswith("error:") and str(missing) in stderr, stderr
    assert "Traceback" not in stderr
    assert files_under(tmp_path) == []  # nothing written: no shards/ folder, no contact sheet


# ------------------------------------------------------------------ verify and inspect


@pytest.fixture(scope="module")
def synthetic_set(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    code = main(
        [
            "synthetic",
            "--num-samples",
            "12",
            "--shard-samples",
            "4",
            "--min-size",
            "48",
            "--max-size",
            "64",
            "--no-progress",
            "--processes",
            "1",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    return out / "synthetic" / "train"


@pytest.fixture
def shard_set(synthetic_set, tmp_path) -> Path:
    """A private copy of the synthetic set to tamper with."""
    copy = tmp_path / "train"
    shutil.copytree(synthetic_set, copy)
    return copy


def fail_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("FAIL ")]


def test_verify_passes_an_untouched_set(shard_set, capsys):
    for target in (shard_set, shard_set / "manifest.json"):
        code, stdout, stderr = cli(capsys, "verify", target)
        assert code == 0, stderr
        assert "3 shards, 12 samples: OK" in stdout and fail_lines(stderr) == []


def test_verify_names_the_sample_whose_jpg_bytes_changed(shard_set, capsys):
    tar = shard_set / "synthetic-train-000001.tar"
    line = (shard_set / "synthetic-train-000001.idx").read_text().splitlines()[2]  # second sample
    ext, offset, size, member = line.split()[:4]
    assert ext == "jpg"
    key = member.split(".")[0]
    blob = bytearray(tar.read_bytes())
    blob[int(offset) + int(size) // 2] ^= 0x55
    tar.write_bytes(bytes(blob))
    code, stdout, stderr = cli(capsys, "verify", shard_set)
    assert code == 1
    assert "FAILED" in stdout
    lines = fail_lines(stderr)
    assert any(tar.name in line and "SHA-256" in line for line in lines), stderr
    assert any(tar.name in line and key in line and "CRC" in line for line in lines), stderr
    assert all(tar.name in line for line in lines), stderr  # the other shards are fine


def test_verify_names_a_missing_tar(shard_set, capsys):
    (shard_set / "synthetic-train-000002.tar").unlink()
    code, _, stderr = cli(capsys, "verify", shard_set)
    assert code == 1
    assert any("synthetic-train-000002.tar" in line and "missing" in line for line in fail_lines(stderr)), stderr


def test_verify_names_the_shard_whose_count_differs(shard_set, capsys):
    path = shard_set / "manifest.json"
    manifest = json.loads(path.read_text())
    assert manifest["shards"][1]["samples"] == 4
    manifest["shards"][1]["samples"] = 3
    path.write_text(json.dumps(manifest))
    code, _, stderr = cli(capsys, "verify", shard_set)
    assert code == 1
    lines = fail_lines(stderr)
    assert len(lines) == 1 and "synthetic-train-000001.tar" in lines[0] and "3" in lines[0], stderr


def test_verify_names_a_corrupt_index(shard_set, capsys):
    index = shard_set / "synthetic-train-000000.idx"
    lines = index.read_text().splitlines()
    fields = lines[2].split()
    fields[1] = str(int(fields[1]) + 512)  # the second sample's jpg offset
    lines[2] = " ".join(fields)
    index.write_text("\n".join(lines) + "\n")
    code, _, stderr = cli(capsys, "verify", shard_set)
    assert code == 1
    lines = fail_lines(stderr)
    assert len(lines) == 1 and index.name in lines[0], stderr


def test_verify_rejects_a_malformed_manifest(shard_set, capsys):
    manifest = shard_set / "manifest.json"
    manifest.write_text(manifest.read_text()[:100])  # cut short: not valid JSON
    code, _, stderr = cli(capsys, "verify", shard_set)
    assert code == 2
    assert stderr.startswith("error:") and str(manifest) in stderr, stderr
    assert "Traceback" not in stderr


def test_inspect_prints_the_summary_and_writes_a_contact_sheet(synthetic_set, tmp_path, capsys, monkeypatch):
    manifest = read_manifest(synthetic_set)
    sheet = tmp_path / "sheets" / "sheet.png"
    code, stdout, stderr = cli(capsys, "inspect", synthetic_set, "--sheet", sheet)
    assert code == 0, stderr
    assert "dataset synthetic" in stdout and "12 samples" in stdout
    assert f"classes: {manifest['num_classes']}" in stdout and "background" in stdout
    assert str(sheet) in stdout
    with Image.open(sheet) as im:
        assert im.format == "PNG"
        assert im.size == (4 * TILE, 3 * (TILE + CAPTION))  # 12 samples, 4 per row
        pixels = np.asarray(im.convert("RGB"))
    assert (pixels < 200).mean() > 0.2  # tiles drawn, not a blank page

    # default: DATASET-SPLIT-samples.png in the current folder
    monkeypatch.chdir(tmp_path)
    code, stdout, stderr = cli(capsys, "inspect", synthetic_set, "--samples", 5)
    assert code == 0, stderr
    with Image.open(tmp_path / "synthetic-train-samples.png") as im:
        assert im.size == (4 * TILE, 2 * (TILE + CAPTION))


def test_truncated_class_tar_is_reported_as_unreachable(fixtures, tmp_path, capsys):
    """A tar cut inside a member header: its tail is reported, not silently dropped."""
    files = sorted((fixtures / "imagenet-sample").glob("*.JPEG"))[:3]
    src = tmp_path / "tars"
    src.mkdir()
    tar = src / "n01440764.tar"
    with tarfile.open(tar, "w") as t:
        for f in files:
            t.add(f, arcname=f"n01440764_{f.stem}.JPEG")
    with tarfile.open(tar) as t:
        last = t.getmembers()[-1]
    os.truncate(tar, last.offset + 100)
    code, stdout, stderr = cli(capsys, "imagenet", "--src", src, "--out", tmp_path / "out", "--no-progress")
    assert code == 0, stderr
    manifest = read_manifest(tmp_path / "out/imagenet/train")
    assert manifest["num_samples"] == 2
    assert [u["path"] for u in manifest["report"]["unreachable"]] == [str(tar)]
    assert f"unreachable {tar}: no end-of-archive block" in stdout
