"""The output side of a conversion: full and read-only disks, two runs of one split at once, a
finished set that lost a shard, progress in a log, and what the manifest records.

Full and read-only file systems are real where the machine allows a private mount namespace
(``unshare``: a small tmpfs that fills up, one remounted read-only), and injected at the layer that
writes files otherwise (and in addition, inside the worker processes of the pool).
"""

import errno
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fs_faults import in_private_mount, needs_unshare

from fastloc.progress import Progress
from fastloc.shard import tario
from fastloc.shard.__main__ import main
from fastloc.shard.lock import LOCK_FILE, split_lock
from fastloc.shard.manifest import read_manifest

ARGS = ["synthetic", "--num-samples", 40, "--shard-samples", 7, "--min-size", 48, "--max-size", 96, "--no-progress"]


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def shard_cmd(*argv) -> list[str]:
    return [sys.executable, "-m", "fastloc.shard", *map(str, argv)]


def digests(split: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(split.glob("*.tar"))}


def listing(split: Path) -> list[str]:
    return sorted(p.name for p in split.iterdir())


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted conversion every damaged or resumed run must equal."""
    out = tmp_path_factory.mktemp("reference")
    assert main([str(a) for a in ARGS] + ["--processes", "1", "--out", str(out)]) == 0
    return out / "synthetic" / "train"


# ------------------------------------------------------------------ a full disk


@needs_unshare
def test_a_real_full_disk_is_a_clean_error_and_a_rerun_resumes(tmp_path, reference):
    """A 256 kB tmpfs fills up mid-way (two worker processes; the set is 0.5 MB); the same tmpfs,
    grown, then resumes from the shards that were complete, or starts afresh if none was."""
    mnt, copy = tmp_path / "mnt", tmp_path / "copy"
    mnt.mkdir()
    copy.mkdir()
    command = " ".join(f"'{a}'" for a in shard_cmd(*ARGS, "--processes", 2, "--out", mnt))
    script = f"""
mount -t tmpfs -o size=256k tmpfs '{mnt}' || exit 99
{command}; echo "rc1=$?" >&2
ls -a '{mnt}/synthetic/train' > '{copy}/after-error.txt'
mount -o remount,size=20m tmpfs '{mnt}' || exit 98
{command}; echo "rc2=$?" >&2
cp -r '{mnt}/synthetic' '{copy}/'
"""
    result = in_private_mount(script)
    err = result.stderr
    assert "rc1=2" in err and "rc2=0" in err, err + result.stdout
    assert "Traceback" not in err and "RemoteTraceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert f"error: {mnt}/synthetic/train/" in line and "No space left on device" in line
    assert "rerun the same command" in line and "free some space" in line
    left = (copy / "after-error.txt").read_text().split()
    assert not [name for name in left if name.endswith(".partial")], "a failed run leaves no partial file"
    kept = [name for name in left if name.endswith(".tar")]  # which shards finished first depends on timing
    assert ("resuming" in result.stdout) == bool(kept), (kept, result.stdout)
    assert digests(copy / "synthetic/train") == digests(reference)


def _fill_disk_after(monkeypatch, budget: int):
    """Writes through the shard writer fail with ENOSPC once ``budget`` bytes went through, in each
    process (the pool's workers are forked after this, so they inherit it)."""
    original = tario._HashingFile.write
    written = {"n": 0}

    def write(self, data):
        written["n"] += len(data)
        if written["n"] > budget:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(self, data)

    monkeypatch.setattr(tario._HashingFile, "write", write)


def test_a_full_disk_in_the_worker_pool_is_a_clean_error_and_a_rerun_resumes(tmp_path, capsys, monkeypatch, reference):
    _fill_disk_after(monkeypatch, 150_000)  # each worker fills up in its second shard (about 90 kB each)
    code, _, err = cli(capsys, *ARGS, "--processes", 2, "--out", tmp_path)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(f"error: {tmp_path}/synthetic/train/."), err
    assert ".partial: No space left on device; free some space there, then rerun the same command" in err
    split = tmp_path / "synthetic" / "train"
    assert not list(split.glob(".*.partial")) and not (split / "manifest.json").exists()
    complete = len(list(split.glob("*.tar")))
    assert complete >= 1 and f"the {complete} of 6 shards already complete are kept" in err, err

    monkeypatch.undo()  # the disk is freed
    code, _, err = cli(capsys, *ARGS, "--processes", 2, "--out", tmp_path)
    assert code == 0, err
    assert digests(split) == digests(reference)
    assert listing(split) == listing(reference)


# ------------------------------------------------------------------ a read-only output


@needs_unshare
def test_a_real_read_only_output_is_a_clean_error(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    fresh = " ".join(f"'{a}'" for a in shard_cmd(*ARGS, "--out", mnt / "new"))
    existing = " ".join(f"'{a}'" for a in shard_cmd(*ARGS, "--out", mnt))
    script = f"""
mount -t tmpfs -o size=1m tmpfs '{mnt}' || exit 99
mkdir -p '{mnt}/synthetic/train'
mount -o remount,ro tmpfs '{mnt}' || exit 98
{fresh}; echo "rc=$?" >&2
{existing}; echo "rc=$?" >&2
"""
    result = in_private_mount(script)
    err = result.stderr
    assert err.count("rc=2") == 2 and "Traceback" not in err, err
    errors = [x for x in err.splitlines() if x.startswith("error:")]
    assert errors[0].startswith(f"error: {mnt}/new: Read-only file system; choose another --out")
    assert errors[1].startswith(f"error: {mnt}/synthetic/train/{LOCK_FILE}: Read-only file system")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through chmod; the injected variant tests this path")
def test_a_read_only_folder_is_a_clean_error(tmp_path, capsys):
    tmp_path.joinpath("out").mkdir()
    os.chmod(tmp_path / "out", 0o555)
    try:
        code, _, err = cli(capsys, *ARGS, "--out", tmp_path / "out")
    finally:
        os.chmod(tmp_path / "out", 0o755)
    assert code == 2 and err.startswith(f"error: {tmp_path}/out/synthetic: Permission denied"), err


@pytest.mark.parametrize("where", ["folder", "lock", "plan", "shard", "manifest"])
def test_refused_writes_are_clean_errors(tmp_path, capsys, monkeypatch, where):
    """EACCES/EROFS injected where the conversion creates folders and opens files for writing."""
    out = tmp_path / "out"
    split = out / "synthetic" / "train"
    if where != "folder":
        split.mkdir(parents=True)
    denied = {
        "folder": (Path, "mkdir", lambda p: p == out / "synthetic", errno.EACCES),
        "lock": (os, "open", lambda p: str(p).endswith(LOCK_FILE), errno.EROFS),
        "plan": (tario, "open", lambda p: "plan.json" in str(p), errno.EACCES),
        "shard": (tario, "open", lambda p: str(p).endswith(".tar.partial"), errno.EROFS),
        "manifest": (tario, "open", lambda p: "manifest.json" in str(p), errno.EROFS),
    }[where]
    module, name, hit, code_ = denied
    original = getattr(module, name, None) or open

    def refuse(path, *args, **kwargs):
        if hit(Path(path) if not isinstance(path, int) else path):
            raise OSError(code_, os.strerror(code_), str(path))
        return original(path, *args, **kwargs)

    monkeypatch.setattr(module, name, refuse, raising=module is not tario)
    code, _, err = cli(capsys, *ARGS, "--processes", 1, "--out", out)
    assert code == 2
    assert err.startswith("error: ") and os.strerror(code_) in err and "rerun the same command" in err, err
    assert not list(split.glob(".*.partial")) if split.exists() else True
    assert not (split / LOCK_FILE).exists() if split.exists() else True


# ------------------------------------------------------------------ two conversions of one split


def test_a_second_conversion_of_a_locked_split_refuses_or_waits(tmp_path, reference):
    split = tmp_path / "synthetic" / "train"
    split.mkdir(parents=True)
    run = shard_cmd(*ARGS, "--processes", 1, "--out", tmp_path)
    with split_lock(split):  # this test process plays the conversion that is running
        refused = subprocess.run([*run, "--no-wait"], capture_output=True, text=True, timeout=120, check=False)
        assert refused.returncode == 2, refused.stderr
        assert refused.stderr.startswith(f"error: {split}: another conversion is writing this split folder")
        assert f"(pid {os.getpid()} on " in refused.stderr and "Traceback" not in refused.stderr
        assert listing(split) == [LOCK_FILE]

        waiting = subprocess.Popen(run, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = waiting.stderr.readline()  # blocks until it reports that it waits
        assert "waiting for it to finish" in line and f"pid {os.getpid()}" in line, line
        time.sleep(0.3)
        assert waiting.poll() is None and listing(split) == [LOCK_FILE]  # still waiting, nothing written
    _, err = waiting.communicate(timeout=120)
    assert waiting.returncode == 0, err
    assert digests(split) == digests(reference) and listing(split) == listing(reference)


def test_two_real_conversions_of_one_split_at_once(tmp_path, reference):
    run = shard_cmd(*ARGS, "--processes", 2, "--out", tmp_path)
    procs = [subprocess.Popen(run, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=180) + (p.returncode,) for p in procs]
    for _, err, code in results:
        assert code == 0 and "Traceback" not in err, err
    split = tmp_path / "synthetic" / "train"
    assert digests(split) == digests(reference) and listing(split) == listing(reference)
    outs = "".join(out for out, _, _ in results)
    assert "40 samples in 6 shards" in outs  # one converted; the other waited, then found the work done
    assert "nothing to do" in outs or outs.count("40 samples in 6 shards") == 2


def test_the_lock_is_released_on_errors_and_leaves_no_file(tmp_path):
    split = tmp_path / "split"
    split.mkdir()
    with pytest.raises(RuntimeError), split_lock(split):
        assert (split / LOCK_FILE).exists()
        raise RuntimeError
    assert listing(split) == []
    with split_lock(split, wait=False):
        pass
    assert listing(split) == []


# ------------------------------------------------------------------ a finished set that lost a shard


@pytest.mark.parametrize("damage", ["deleted", "truncated", "index-deleted"])
def test_a_finished_set_missing_a_shard_is_repaired(tmp_path, capsys, reference, damage):
    code, _, err = cli(capsys, *ARGS, "--processes", 1, "--out", tmp_path)
    assert code == 0, err
    split = tmp_path / "synthetic" / "train"
    manifest_before = (split / "manifest.json").read_bytes()
    tar = split / "synthetic-train-000003.tar"
    if damage == "deleted":
        tar.unlink()
    elif damage == "truncated":
        os.truncate(tar, tar.stat().st_size // 2)
    else:
        tar.with_suffix(".idx").unlink()
    code, out, err = cli(capsys, *ARGS, "--processes", 1, "--out", tmp_path)
    assert code == 0, err
    assert "nothing to do" not in out
    assert "1 shard of the manifest is missing or not of the recorded size (synthetic-train-000003.tar)" in out
    assert "1 shard written again" in out
    assert digests(split) == digests(reference) and listing(split) == listing(reference)
    assert (split / "manifest.json").read_bytes() == manifest_before
    code, out, err = cli(capsys, "verify", split)
    assert code == 0 and "6 shards, 40 samples: OK" in out

    code, out, err = cli(capsys, *ARGS, "--processes", 2, "--no-wait", "--out", tmp_path)  # run-only options
    assert code == 0 and "nothing to do" in out


def test_a_shard_that_cannot_be_rebuilt_the_same_is_an_error(tmp_path, capsys):
    code, _, err = cli(capsys, *ARGS, "--processes", 1, "--out", tmp_path)
    assert code == 0, err
    split = tmp_path / "synthetic" / "train"
    manifest = json.loads((split / "manifest.json").read_text())
    manifest["shards"][2]["sha256"] = "0" * 64  # as if the source had changed since
    (split / "manifest.json").write_text(json.dumps(manifest))
    (split / manifest["shards"][2]["tar"]).unlink()
    code, _, err = cli(capsys, *ARGS, "--processes", 1, "--out", tmp_path)
    assert code == 2 and "differs from the manifest" in err and "--overwrite" in err, err


# ------------------------------------------------------------------ progress, manifest, wording


def test_progress_without_a_terminal_is_periodic_lines(tmp_path):
    result = subprocess.run(
        shard_cmd(*ARGS[:-1], "--processes", 2, "--out", tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr
    lines = [x for x in result.stderr.splitlines() if x.startswith("synthetic/train: ")]
    assert 3 <= len(lines) <= 11, result.stderr  # about every 10%, and one at the end
    assert lines[-1].startswith("synthetic/train: 40/40 samples (100%)") and "elapsed" in lines[-1]
    counts = [int(x.split()[1].split("/")[0]) for x in lines]
    assert counts == sorted(counts) and all("img/s" in x for x in lines)


def test_progress_on_a_terminal_is_a_bar():
    class Terminal:
        text = ""

        def isatty(self):
            return True

        def write(self, s):
            Terminal.text += s

        def flush(self):
            pass

    progress = Progress(10, 0, "x/train", stream=Terminal())
    for _ in range(10):
        progress.update(1)
    progress.close()
    assert "\r" in Terminal.text and "10/10" in Terminal.text


def test_manifest_source_path_is_absolute_and_counts_are_worded(fixtures, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "src" / "n01514668").mkdir(parents=True)
    jpg = min((fixtures / "imagenet-sample").glob("n01514668_*.JPEG"))
    (tmp_path / "src" / "n01514668" / jpg.name).symlink_to(jpg)
    code, out, err = cli(capsys, "imagenet", "--src", "src", "--out", "shards", "--no-progress")
    assert code == 0, err
    manifest = read_manifest(tmp_path / "shards/imagenet/train")
    assert manifest["source"]["path"] == str(tmp_path / "src")
    assert "1 sample in 1 shard (" in out
    code, out, err = cli(capsys, "verify", "shards/imagenet/train")
    assert code == 0 and "1 shard, 1 sample: OK" in out
    code, out, err = cli(capsys, "inspect", "shards/imagenet/train", "--sheet", tmp_path / "s.png")
    assert code == 0 and "1 sample in 1 shard," in out
    path = tmp_path / "shards/imagenet/train/manifest.json"
    manifest = json.loads(path.read_text())
    manifest["shards"][0]["bytes"] += 1
    path.write_text(json.dumps(manifest))
    code, out, err = cli(capsys, "verify", "shards/imagenet/train")
    assert code == 1 and "FAILED (1 problem)" in out
