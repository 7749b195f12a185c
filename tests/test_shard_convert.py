"""End to end on the synthetic set: format, readers, determinism, resume, process count."""

import dataclasses
import glob
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from fastloc.shard.convert import convert
from fastloc.shard.errors import ConversionError, SampleError
from fastloc.shard.manifest import read_manifest
from fastloc.shard.sources.synthetic import SyntheticConfig, SyntheticSource
from fastloc.shard.tario import iter_samples
from fastloc.shard.verify import verify


def small(tmp_path, **kw) -> SyntheticConfig:
    options = dict(out=tmp_path, num_samples=40, shard_samples=6, processes=1, progress=False, min_size=48, max_size=80)
    options.update(kw)
    return SyntheticConfig(**options)


def tar_digests(split_dir: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(split_dir.glob("*.tar"))}


def stable(manifest: dict) -> dict:
    """The manifest minus what legitimately differs between runs (time, command, processes)."""
    m = json.loads(json.dumps(manifest))
    for key in ("created", "command"):
        m["conversion"].pop(key)
    m["conversion"]["options"].pop("processes")
    m["conversion"]["options"].pop("fsync")
    m["conversion"]["options"].pop("out")
    return m


def test_synthetic_shards_hold_exactly_the_source_samples(tmp_path):
    cfg = small(tmp_path)
    manifest = convert(cfg)
    split = tmp_path / "synthetic" / "train"
    assert manifest["num_samples"] == 40 and manifest["num_shards"] == 7
    assert [s["samples"] for s in manifest["shards"]] == [6] * 6 + [4]
    assert manifest["keys"] == ["jpg", "seg.png", "cls", "txt", "json"]
    assert manifest["label"]["dtype"] == "uint8" and manifest["num_classes"] == len(manifest["classes"])
    assert sorted(p.name for p in split.iterdir()) == sorted(
        [f"synthetic-train-{i:06d}.{ext}" for i in range(7) for ext in ("tar", "idx")] + ["manifest.json"]
    )

    # Read back with the webdataset library and compare with the source, sample by sample.
    source = SyntheticSource(cfg)
    by_key = {item.key: item for item in source.items()}
    tars = [str(split / s["tar"]) for s in manifest["shards"]]
    seen = []
    for sample in wds.WebDataset(tars, shardshuffle=False):
        key = sample["__key__"]
        seen.append(key)
        expected = source.load(by_key[key])
        label = np.asarray(Image.open(io.BytesIO(sample["seg.png"])))
        np.testing.assert_array_equal(label, expected.label)
        image = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB")).astype(int)
        assert image.shape == expected.pixels.shape
        assert np.abs(image - expected.pixels).mean() < 6  # JPEG q95
        assert int(sample["cls"]) == expected.cls
        assert sample["txt"].decode() == expected.txt
        meta = json.loads(sample["json"])
        assert meta["key"] == key and meta["width"] == image.shape[1]
    assert sorted(seen) == sorted(by_key)  # every sample exactly once
    assert seen != sorted(seen)  # globally shuffled

    assert verify(split).ok


def test_index_files_point_at_the_member_bytes(tmp_path):
    convert(small(tmp_path, num_samples=10))
    split = tmp_path / "synthetic" / "train"
    for tar in split.glob("*.tar"):
        blob = tar.read_bytes()
        lines = (split / (tar.stem + ".idx")).read_text().splitlines()
        header, rows = lines[0].split(), lines[1:]
        assert header[0] == "v1.2" and int(header[1]) == len(rows)
        members = [m for _, ms in iter_samples(tar) for m in ms]
        fields = [f for row in rows for f in zip(*[iter(row.split())] * 4)]
        assert len(fields) == len(members)
        for (ext, offset, size, name), (m_ext, _, data) in zip(fields, members):
            assert ext == m_ext and name.endswith("." + ext)
            assert blob[int(offset) : int(offset) + int(size)] == data


def test_dali_cpu_pipeline_reads_the_shards(tmp_path):
    from nvidia.dali import fn, pipeline_def, types

    manifest = convert(small(tmp_path, num_samples=13, shard_samples=5))
    split = tmp_path / "synthetic" / "train"
    tars = [str(split / s["tar"]) for s in manifest["shards"]]
    reference = {
        key: {ext: data for ext, _, data in members} for tar in tars for key, members in iter_samples(Path(tar))
    }

    def read(index_paths):
        @pipeline_def(batch_size=13, num_threads=1, device_id=None)
        def pipe():
            jpg, seg, meta = fn.readers.webdataset(
                paths=tars,
                index_paths=index_paths,
                ext=["jpg", "seg.png", "json"],
                missing_component_behavior="error",
            )
            image = fn.decoders.image(jpg, device="cpu", output_type=types.RGB)
            label = fn.decoders.image(seg, device="cpu", output_type=types.ANY_DATA, dtype=types.UINT8)
            return jpg, image, label, meta

        p = pipe()
        p.build()
        return [[np.array(t.at(i)) for i in range(13)] for t in p.run()]

    jpgs, images, labels, metas = read([t[:-4] + ".idx" for t in tars])
    assert len({json.loads(bytes(m))["key"] for m in metas}) == 13
    for jpg, image, label, meta in zip(jpgs, images, labels, metas):
        ref = reference[json.loads(bytes(meta))["key"]]
        assert bytes(jpg) == ref["jpg"]
        np.testing.assert_array_equal(label[..., 0], np.asarray(Image.open(io.BytesIO(ref["seg.png"]))))
        assert image.shape[:2] == label.shape[:2]
    # Without the index files DALI scans the tars itself: the same samples must come out.
    jpgs_scanned = read(None)[0]
    assert [bytes(a) for a in jpgs] == [bytes(b) for b in jpgs_scanned]


def test_output_does_not_depend_on_process_count_or_fsync(tmp_path):
    one = convert(small(tmp_path / "one", processes=1))
    two = convert(small(tmp_path / "two", processes=2))
    lazy = convert(small(tmp_path / "lazy", processes=2, fsync=False))
    digests = tar_digests(tmp_path / "one/synthetic/train")
    assert digests == tar_digests(tmp_path / "two/synthetic/train") == tar_digests(tmp_path / "lazy/synthetic/train")
    assert stable(one) == stable(two)
    assert one["shards"] == lazy["shards"] and one["conversion"]["fingerprint"] == lazy["conversion"]["fingerprint"]


def test_shard_bytes_target(tmp_path):
    items = {i.key: i.size for i in SyntheticSource(small(tmp_path)).items()}
    target = sum(items.values()) // 5
    manifest = convert(small(tmp_path, shard_samples=None, shard_bytes=target))
    sizes = [s["samples"] for s in manifest["shards"]]
    assert len(sizes) >= 5 and sum(sizes) == 40
    for shard in manifest["shards"]:
        keys = [k for k, _ in iter_samples(tmp_path / "synthetic/train" / shard["tar"])]
        assert sum(items[k] for k in keys) <= target or len(keys) == 1


def test_unchanged_rerun_is_a_no_op_and_other_options_conflict(tmp_path, capsys):
    first = convert(small(tmp_path))
    before = tar_digests(tmp_path / "synthetic/train")
    assert convert(small(tmp_path)) == first
    assert "nothing to do" in capsys.readouterr().out
    with pytest.raises(ConversionError, match="other options"):
        convert(small(tmp_path, seed=1))
    assert tar_digests(tmp_path / "synthetic/train") == before
    again = convert(small(tmp_path, seed=1, overwrite=True))
    assert again["conversion"]["options"]["seed"] == "1"


def test_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    reference = convert(small(tmp_path / "ref"))

    calls = {"n": 0}
    original = SyntheticSource.load

    def flaky_load(self, item):
        calls["n"] += 1
        if calls["n"] == 21:  # mid-way through the fourth shard
            raise KeyboardInterrupt
        return original(self, item)

    monkeypatch.setattr(SyntheticSource, "load", flaky_load)
    with pytest.raises(ConversionError, match="interrupted with 3 of 7 shards complete"):
        convert(small(tmp_path / "run"))
    split = tmp_path / "run/synthetic/train"
    assert len(list(split.glob("*.tar"))) == 3 and not (split / "manifest.json").exists()
    assert not list(split.glob(".*.partial"))

    monkeypatch.setattr(SyntheticSource, "load", original)
    resumed = convert(small(tmp_path / "run"))
    assert calls["n"] == 21  # no shard was redone by the counting loader...
    assert tar_digests(split) == tar_digests(tmp_path / "ref/synthetic/train")
    assert stable(resumed) == stable(reference)
    assert not (split / ".fastloc-work").exists()


def test_killed_process_resumes_to_the_uninterrupted_result(tmp_path):
    """SIGKILL a real conversion mid-way (no chance to clean up), then rerun the same command."""
    args = [
        "synthetic",
        "--num-samples",
        "300",
        "--shard-samples",
        "10",
        "--processes",
        "2",
        "--min-size",
        "96",
        "--max-size",
        "128",
        "--no-progress",
    ]
    run = [sys.executable, "-m", "fastloc.shard", *args, "--out", str(tmp_path / "run")]
    split = tmp_path / "run/synthetic/train"
    proc = subprocess.Popen(run, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 120
    while len(list(split.glob("*.tar"))) < 3 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the workers too
    proc.wait()
    complete = len(list(split.glob("*.tar")))
    assert 3 <= complete < 30, "the conversion finished before it could be killed: make it longer"
    assert not (split / "manifest.json").exists()

    subprocess.run(run, check=True, capture_output=True)
    subprocess.run(
        [sys.executable, "-m", "fastloc.shard", *args, "--out", str(tmp_path / "ref")], check=True, capture_output=True
    )
    assert tar_digests(split) == tar_digests(tmp_path / "ref/synthetic/train")
    assert stable(read_manifest(split)) == stable(read_manifest(tmp_path / "ref/synthetic/train"))


def test_limit_and_no_shuffle(tmp_path):
    manifest = convert(small(tmp_path, limit=9, shuffle=False))
    keys = [k for s in manifest["shards"] for k, _ in iter_samples(tmp_path / "synthetic/train" / s["tar"])]
    assert keys == [f"synthetic_{i:08d}" for i in range(9)]


def test_name_option_and_manifest_record(tmp_path):
    cfg = small(tmp_path, name="toy", split="val", data_seed=3)
    manifest = convert(cfg, command="python -m fastloc.shard synthetic ...")
    assert (tmp_path / "toy/val/toy-val-000000.tar").exists()
    assert manifest["dataset"] == "toy" and manifest["split"] == "val"
    assert manifest["conversion"]["command"].startswith("python -m fastloc.shard")
    assert manifest["conversion"]["options"]["data_seed"] == "3"
    assert manifest["source"]["data_seed"] == 3
    assert dataclasses.asdict(cfg).keys() == manifest["conversion"]["options"].keys()
    assert glob.glob(str(tmp_path / "toy/val/*.idx"))


def test_damaged_work_files_are_handled(tmp_path, monkeypatch):
    """A damaged shard record means "write that shard again"; a damaged plan is a clear error."""
    convert(small(tmp_path / "ref"))
    calls = {"n": 0}
    original = SyntheticSource.load

    def interrupt_at_20(self, item):
        calls["n"] += 1
        if calls["n"] == 20:
            raise KeyboardInterrupt
        return original(self, item)

    monkeypatch.setattr(SyntheticSource, "load", interrupt_at_20)
    with pytest.raises(ConversionError, match="interrupted"):
        convert(small(tmp_path / "run"))
    monkeypatch.setattr(SyntheticSource, "load", original)
    work = tmp_path / "run/synthetic/train/.fastloc-work"
    records = sorted(work.glob("*.tar.json"))
    assert len(records) == 3
    records[0].write_text("{not json")
    plan = work / "plan.json"
    good_plan = plan.read_text()
    plan.write_text("garbage")
    with pytest.raises(ConversionError, match="plan.json: work plan is not valid JSON.*--overwrite"):
        convert(small(tmp_path / "run"))
    plan.write_text(good_plan)
    convert(small(tmp_path / "run"))
    assert tar_digests(tmp_path / "run/synthetic/train") == tar_digests(tmp_path / "ref/synthetic/train")


def test_strict_leaves_no_empty_folders(tmp_path, monkeypatch):
    def bad(self, item):
        raise SampleError("synthetic#0", "broken on purpose")

    monkeypatch.setattr(SyntheticSource, "load", bad)
    with pytest.raises(ConversionError, match="--strict: synthetic#0: broken on purpose"):
        convert(small(tmp_path / "out", strict=True))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
