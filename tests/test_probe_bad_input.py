"""Bad input to the probe's command lines (Patch-Seg, each dense protocol, compare) and the demo's:
every nonsense value, unusable folder or unsafe name is one ``error:`` line that starts with the
option, exit 2, before any model is built or data read, with nothing written; a file-system
failure during the work is one line naming the path. Plus the real processes (no traceback) and a
real read-only folder.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fs_faults import in_private_mount, module_command, needs_unshare
from loader_data import PALETTE, block_sample, write_set

from fastloc.demo.__main__ import main as demo_main
from fastloc.probe.__main__ import main as probe_main

FAST = ["--device", "cpu", "--loader", "cpu", "--workers", "0"]
PROBE = ["{tmp}/no-data", "--backbone", "tiny", "--weights", "random", *FAST]


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if not p.is_dir())


def folders_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_dir())


def cli(main, capsys, argv: list[str]) -> tuple[int, str]:
    """(exit code, stderr) of an in-process run; never a traceback."""
    code = main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, err


def one_error(err: str, flag: str) -> str:
    """The one stderr line, an ``error:`` that starts with ``flag``."""
    assert err.count("\n") == 1 and err.startswith(f"error: {flag} "), err
    return err


# Each value must fail on its own rule before the data are opened: the data path does not exist,
# so a value checked too late would end in "no such shard set" instead.
PROBE_BAD = [
    (["--epochs", "0"], "--epochs"),
    (["--epochs", "-1"], "--epochs"),
    (["--batch-size", "0"], "--batch-size"),
    (["--eval-batch-size", "-2"], "--eval-batch-size"),
    (["--lr", "0"], "--lr"),
    (["--lr", "-0.001"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--min-lr", "-1"], "--min-lr"),
    (["--min-lr", "0.1"], "--min-lr"),  # above --lr 1e-3
    (["--weight-decay", "-0.1"], "--weight-decay"),
    (["--warmup-updates", "-1"], "--warmup-updates"),
    (["--num-layers", "0"], "--num-layers"),
    (["--hidden-size", "0"], "--hidden-size"),
    (["--skip-blocks", "-1"], "--skip-blocks"),
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2**32)], "--seed"),
    (["--workers", "-1"], "--workers"),
    (["--predictions", "-1"], "--predictions"),
    (["--head", "transformer-cls", "--reduction", "majority"], "--head"),
    (["--name", "../../escape"], "--name"),
    (["--name", "two\nlines"], "--name"),
    (["--name", ".hidden"], "--name"),
    (["--train-split", "../other"], "--train-split"),
    (["--val-split", "a/b"], "--val-split"),
    (["--cache-dir", "{tmp}/a-file"], "--cache-dir"),
    (["--out", "{tmp}/a-file/runs"], "--out"),
    (["--results", "{tmp}/a-file"], "--results"),
]

# what every dense protocol shares, then each protocol's own knobs
DENSE_COMMON = [
    (["--image-size", "0"], "--image-size"),
    (["--eval-batch-size", "0"], "--eval-batch-size"),
    (["--skip-blocks", "-1"], "--skip-blocks"),
    (["--seed", "-3"], "--seed"),
    (["--workers", "-1"], "--workers"),
    (["--name", "../escape"], "--name"),
    (["--val-split", ".."], "--val-split"),
    (["--cache-dir", "{tmp}/a-file"], "--cache-dir"),
    (["--out", "{tmp}/a-file/runs"], "--out"),
    (["--results", "{tmp}/a-file"], "--results"),
]
DENSE_BAD = {
    "overcluster": [
        (["--clusters", "0"], "--clusters"),
        (["--clusters", "100", "-5"], "--clusters"),
        (["--seeds", "0"], "--seeds"),
        (["--iterations", "0"], "--iterations"),
        (["--restarts", "-1"], "--restarts"),
        (["--max-points-per-centroid", "-1"], "--max-points-per-centroid"),
        (["--pca-dim", "-1"], "--pca-dim"),
        (["--mask-size", "0"], "--mask-size"),
        (["--batch-size", "0"], "--batch-size"),
    ],
    "linear": [
        (["--lr", "-1"], "--lr"),
        (["--lr", "inf"], "--lr"),
        (["--epochs", "-1"], "--epochs"),
        (["--iterations", "5"], "--iterations"),  # leopart-voc trains for epochs
        (["--protocol", "dinov3-ade20k", "--epochs", "3"], "--epochs"),
        (["--protocol", "dinov3-ade20k", "--iterations", "-1"], "--iterations"),
        (["--batch-size", "-1"], "--batch-size"),
        (["--crop-size", "0"], "--crop-size"),
        (["--stride", "0"], "--stride"),
        (["--stride", "600"], "--stride"),  # above the crop: pixels no window covers
        (["--short-side", "0"], "--short-side"),
        (["--probe-size", "0"], "--probe-size"),
        (["--train-split", "a/b"], "--train-split"),
    ],
    "hummingbird": [
        (["--neighbours", "0"], "--neighbours"),
        (["--neighbours", "40", "--memory-size", "10"], "--neighbours"),
        (["--temperature", "0"], "--temperature"),
        (["--temperature", "-0.02"], "--temperature"),
        (["--memory-size", "-1"], "--memory-size"),
        (["--augmentation-epochs", "0"], "--augmentation-epochs"),
        (["--train-images", "-1"], "--train-images"),
        (["--bank-chunk", "0"], "--bank-chunk"),
        (["--zero-is-ignore"], "--zero-is-ignore"),  # with --bank-void background: no class for void
    ],
}

DEMO_BAD = [
    (["--train-images", "0"], "--train-images"),
    (["--train-images", "-5"], "--train-images"),
    (["--train-images", "31"], "--train-images"),  # less than one training batch
    (["--quick", "--train-images", "-5"], "--train-images"),
    (["--val-images", "0"], "--val-images"),
    (["--pretrain-epochs", "0"], "--pretrain-epochs"),
    (["--align-epochs", "-1"], "--align-epochs"),
    (["--probe-epochs", "0"], "--probe-epochs"),
    (["--seed", "-1"], "--seed"),
    (["--workers", "-1"], "--workers"),
    (["--backbone", "nope"], "--backbone"),
    (["--skip-blocks", "4"], "--skip-blocks"),  # tiny has 4 blocks
    (["--skip-blocks", "-1"], "--skip-blocks"),
    (["--shards", "{tmp}/a-file"], "--shards"),
    (["--out", "{tmp}/a-file"], "--out"),
]

if not torch.cuda.is_available():  # refused where torch sees no CUDA device
    for table in (PROBE_BAD, DENSE_COMMON, DEMO_BAD):
        table.append((["--device", "cuda"], "--device"))
DENSE_CASES = [(p, argv, flag) for p, own in DENSE_BAD.items() for argv, flag in [*DENSE_COMMON, *own]]


def ids(cases) -> list[str]:
    return [" ".join(str(x) for x in case[:-1]).replace("\n", "\\n") for case in cases]


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """An empty folder as the working directory (the default --out, --results and --cache-dir
    land here if anything is written), holding one regular file."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("not a folder\n")
    return tmp_path


def refused(main, capsys, workdir: Path, argv: list[str], flag: str) -> str:
    code, err = cli(main, capsys, [a.format(tmp=workdir) for a in argv])
    assert code == 2, err
    line = one_error(err, flag)
    assert files_under(workdir) == [workdir / "a-file"] and folders_under(workdir) == [], "nothing may be written"
    return line


@pytest.mark.parametrize("argv, flag", PROBE_BAD, ids=ids(PROBE_BAD))
def test_patch_seg_refuses_bad_values_before_any_work(workdir, capsys, argv, flag):
    refused(probe_main, capsys, workdir, [*PROBE, *argv], flag)


@pytest.mark.parametrize("protocol, argv, flag", DENSE_CASES, ids=ids(DENSE_CASES))
def test_each_dense_protocol_refuses_bad_values_before_any_work(workdir, capsys, protocol, argv, flag):
    base = [protocol, "{tmp}/no-data", "--backbone", "tiny", "--weights", "random", *FAST]
    refused(probe_main, capsys, workdir, [*base, *argv], flag)


def test_compare_refuses_an_output_folder_it_cannot_write(workdir, capsys):
    line = refused(probe_main, capsys, workdir, ["compare", "a", "b", "--out", "{tmp}/a-file/plot.png"], "--out")
    assert f"{workdir}/a-file: cannot write there" in line


@pytest.mark.parametrize("argv, flag", DEMO_BAD, ids=ids(DEMO_BAD))
def test_the_demo_refuses_bad_values_before_any_stage(workdir, capsys, argv, flag):
    refused(demo_main, capsys, workdir, [*argv], flag)


# ---------------------------------------------------------------- checks that need the data


@pytest.fixture(scope="module")
def blocks(tmp_path_factory) -> Path:
    """A small Patch-Seg set (train 8, val 4 colour-block images)."""
    root = tmp_path_factory.mktemp("blocks")
    for split, n, seed in (("train", 8, 0), ("val", 4, 1)):
        rng = np.random.default_rng(seed)
        write_set(root / split, [block_sample(rng, i) for i in range(n)], len(PALETTE), per_shard=4, split=split)
    return root


def test_a_run_directory_or_results_table_that_cannot_take_the_run_is_refused_before_any_work(
    blocks, voc, workdir, capsys
):
    """After the data are opened (their dataset names the CSV) and before any model: a run
    directory path held by a file, a results CSV of another table; the folders checked before
    (the default --cache-dir) are not left behind."""
    (workdir / "runs" / "probe").mkdir(parents=True)
    (workdir / "runs" / "probe" / "taken").write_text("")
    (workdir / "results").mkdir()
    (workdir / "results" / "outputs-t.csv").write_text("a, b\n")
    (workdir / "results" / "dense-overcluster-voc.csv").write_text("a, b\n")
    before = files_under(workdir)
    argv = [str(blocks), "--backbone", "tiny", "--weights", "random", *FAST]
    code, err = cli(probe_main, capsys, [*argv, "--name", "taken"])
    assert code == 2 and one_error(err, "--name").endswith(": exists and is not a folder\n")
    code, err = cli(probe_main, capsys, argv)
    assert code == 2 and "outputs-t.csv: its header is not this protocol's results header" in one_error(
        err, "--results"
    )
    dense = ["overcluster", str(voc), "--backbone", "tiny", "--weights", "random", "--image-size", "64", *FAST]
    code, err = cli(probe_main, capsys, [*dense, "--name", "taken"])
    assert code == 2 and one_error(err, "--name").endswith(": exists and is not a folder\n")
    code, err = cli(probe_main, capsys, dense)
    assert code == 2 and "dense-overcluster-voc.csv: its header" in one_error(err, "--results")
    assert files_under(workdir) == before and not (workdir / "runs" / "probe" / "cache").exists()


# ---------------------------------------------------------------- a file-system failure during the work


def enospc(*args, **kwargs):
    raise OSError(28, "No space left on device", "/full/disk/result.json")


@pytest.mark.parametrize(
    "main, target, argv",
    [
        (probe_main, "fastloc.probe.run.probe", ["data"]),
        (probe_main, "fastloc.probe.dense.overcluster.run", ["overcluster", "data"]),
        (probe_main, "fastloc.probe.dense.linear.run", ["linear", "data"]),
        (probe_main, "fastloc.probe.dense.hummingbird.run", ["hummingbird", "data"]),
        (probe_main, "fastloc.probe.compare.compare", ["compare", "a", "b"]),
        (demo_main, "fastloc.demo.__main__.run", []),
    ],
    ids=["probe", "overcluster", "linear", "hummingbird", "compare", "demo"],
)
def test_a_full_disk_during_the_work_is_one_line_naming_the_path(workdir, capsys, monkeypatch, main, target, argv):
    monkeypatch.setattr(target, enospc)
    code, err = cli(main, capsys, argv)
    assert code == 2
    assert err == "error: /full/disk/result.json: No space left on device; free some space and rerun the same command\n"


# ---------------------------------------------------------------- the real processes


REAL = {
    "probe": (["fastloc.probe", "{tmp}/no-data", "--epochs", "0"], "--epochs"),
    "overcluster": (["fastloc.probe", "overcluster", "{tmp}/no-data", "--clusters", "0"], "--clusters"),
    "linear": (["fastloc.probe", "linear", "{tmp}/no-data", "--stride", "0"], "--stride"),
    "hummingbird": (["fastloc.probe", "hummingbird", "{tmp}/no-data", "--temperature", "0"], "--temperature"),
    "compare": (["fastloc.probe", "compare", "a", "b", "--out", "{tmp}/a-file/x.png"], "--out"),
    "demo": (["fastloc.demo", "--train-images", "-5"], "--train-images"),
}


def test_the_real_processes_print_one_line_and_no_traceback(workdir):
    """Every CLI as a user starts it (run side by side: each is mostly Python's start-up)."""
    running = {
        name: subprocess.Popen(
            [sys.executable, "-m", *[a.format(tmp=workdir) for a in argv]],
            cwd=workdir,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (argv, _) in REAL.items()
    }
    for name, process in running.items():
        out, err = process.communicate(timeout=300)
        assert process.returncode == 2, (name, out, err)
        assert "Traceback" not in out + err, (name, err)
        one_error(err, REAL[name][1])
    assert files_under(workdir) == [workdir / "a-file"] and folders_under(workdir) == []


@needs_unshare
def test_a_real_read_only_output_or_results_folder_is_refused_before_the_work(blocks, tmp_path):
    """A read-only --out, then a read-only --results: refused before the cache is built or a head
    trained, where they used to fail after training and lose the figures."""
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    mnt.mkdir()
    args = [blocks, "--backbone", "tiny", "--weights", "random", *FAST, "--cache-dir", cache]
    out_ro = module_command("fastloc.probe", *args, "--out", mnt / "runs", "--results", tmp_path / "results")
    results_ro = module_command("fastloc.probe", *args, "--out", tmp_path / "runs", "--results", mnt / "results")
    script = f"""
mount -t tmpfs -o size=1m tmpfs '{mnt}' || exit 99
mkdir '{mnt}/runs' '{mnt}/results'
mount -o remount,ro tmpfs '{mnt}' || exit 98
{out_ro}; echo "rc=$?" >&2
{results_ro}; echo "rc=$?" >&2
"""
    result = in_private_mount(script)
    err = result.stderr
    assert err.count("rc=2") == 2 and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors[0] == f"error: --out {mnt}/runs: cannot write there (Read-only file system)"
    assert errors[1] == f"error: --results {mnt}/results: cannot write there (Read-only file system)"
    assert not cache.exists() or not any(cache.iterdir())  # no feature was computed
    assert json.dumps(result.stdout).count("epoch") == 0


def test_under_torchrun_only_rank_0_checks_the_folders_before_the_ranks_meet(workdir, monkeypatch):
    """The early check removes the folders it made: a second rank checking at the same moment found
    its folder gone (seen in CI); the others check in the run, after meeting rank 0."""
    from fastloc.cli import BadValue
    from fastloc.probe.__main__ import refuse_early
    from fastloc.probe.dense.config import parse

    cfg = parse("knn", [str(workdir / "no-data"), "--out", str(workdir / "a-file" / "out")])
    monkeypatch.setenv("RANK", "1")
    refuse_early(cfg)  # not checked here
    assert folders_under(workdir) == []
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(BadValue, match="--out"):
        refuse_early(cfg)
    assert folders_under(workdir) == []
