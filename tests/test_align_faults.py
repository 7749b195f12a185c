"""Bad input and faults of ``python -m fastloc.align``: every bad option value, every export
error and a full or read-only disk end in one ``error:`` line naming the option or the path
(exit 2, no traceback, nothing half-written), and the same command works once the cause is gone."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from align_runs import args, curve
from fs_faults import in_private_mount, module_command, needs_unshare

from fastloc.align.__main__ import main


def error(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*")) if folder.exists() else []


# ---------------------------------------------------------------- option values


BAD_OPTIONS = [
    ("--run.checkpoint-every", "0"),
    ("--run.log-every", "0"),
    ("--run.seed", "-1"),
    ("--run.name", "../../escape"),
    ("--run.name", "a\nb"),
    ("--run.name", ".hidden"),
    ("--data.accumulation", "0"),
    ("--data.accumulation", "3"),  # does not divide the batch of 16
    ("--data.batch-size", "0"),
    ("--data.val-batch-size", "-1"),
    ("--data.workers", "-1"),
    ("--data.threads", "0"),
    ("--data.max-val-batches", "-2"),
    ("--optim.epochs", "0"),
    ("--optim.epochs", "-1"),
    ("--optim.lr", "0"),
    ("--optim.lr", "nan"),
    ("--optim.min-lr-ratio", "1.5"),
    ("--optim.warmup-updates", "-1"),
    ("--optim.betas", "0.9 1.0"),
    ("--optim.eps", "0"),
    ("--optim.weight-decay", "-0.1"),
    ("--optim.clip-grad-norm", "-1"),
    ("--method.masks.keep-ratio", "1.5"),
    ("--method.masks.keep-ratio", "0"),
    ("--method.skip-blocks", "-1"),
    ("--method.decoder-depth", "0"),
    ("--method.soft-cap", "0"),
    ("--system.peak-tflops", "0"),
]
if not torch.cuda.is_available():
    BAD_OPTIONS.append(("--system.device", "cuda"))


@pytest.mark.parametrize("flag, value", BAD_OPTIONS, ids=[f"{f} {v!r}" for f, v in BAD_OPTIONS])
def test_bad_values_are_one_line_naming_the_option_and_nothing_is_written(align_shards, tmp_path, capsys, flag, value):
    out = tmp_path / "runs"
    code, err = error(capsys, *args(align_shards, out, flag, *value.split(" ")))
    assert code == 2 and err.startswith(f"error: {flag} ") and err.count("\n") == 1, err
    assert files_under(out) == [], "nothing may be written"


def test_the_real_process_refuses_a_bad_value_without_a_traceback(align_shards, tmp_path):
    command = [sys.executable, "-m", "fastloc.align", *args(align_shards, tmp_path, "--optim.epochs", "0")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 2 and result.stderr == "error: --optim.epochs must be at least 1, got 0\n"


def test_missing_data_and_unknown_presets(align_shards, tmp_path, capsys):
    code, err = error(capsys, *args(align_shards, tmp_path, "--data.train", tmp_path / "nowhere"))
    assert code == 2 and err.startswith("error: ") and "nowhere" in err and "no manifest" in err
    assert main(["train", "no-such-preset"]) == 2
    assert main([]) == 2 and "Presets:" in capsys.readouterr().err


# ---------------------------------------------------------------- export


@pytest.fixture
def run_copy(align_run, tmp_path) -> Path:
    """A copy of the finished run to damage (its config.json and best.pt)."""
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.json", "best.pt"):
        shutil.copy(align_run / name, run / name)
    return run


def other_method_checkpoint(run: Path) -> None:
    """best.pt of a run whose decoder has one block: a run's config.json beside another's checkpoint."""
    state = torch.load(run / "best.pt", weights_only=True)
    state["config"]["method.decoder_depth"] = 1
    torch.save(state, run / "best.pt")


def missing_keys(run: Path) -> None:
    state = torch.load(run / "best.pt", weights_only=True)
    state["objective"] = {k: v for k, v in state["objective"].items() if "decoder" not in k}
    torch.save(state, run / "best.pt")


def wrong_shapes(run: Path) -> None:
    state = torch.load(run / "best.pt", weights_only=True)
    key = next(k for k in state["objective"] if k.endswith("qkv.weight"))
    state["objective"][key] = state["objective"][key][:, :8]
    torch.save(state, run / "best.pt")


EXPORT_FAULTS = {
    "not-a-run": (lambda run: (run / "config.json").unlink(), "not a run directory"),
    "config-not-json": (lambda run: (run / "config.json").write_text("{"), "not the config of an alignment run"),
    "no-best": (lambda run: (run / "best.pt").unlink(), "no best checkpoint"),
    "tampered": (lambda run: (run / "best.pt").write_bytes(b"\x00" * 64), "unreadable checkpoint"),
    "truncated": (lambda run: (run / "best.pt").write_bytes((run / "best.pt").read_bytes()[:5000]), "unreadable"),
    "not-a-checkpoint": (lambda run: torch.save({"a": torch.zeros(2)}, run / "best.pt"), "not a checkpoint of"),
    "another-method": (other_method_checkpoint, "saved by another method"),
    "missing-keys": (missing_keys, "does not fit the objective: missing"),
    "wrong-shapes": (wrong_shapes, "does not fit the objective"),
}


@pytest.mark.parametrize("fault", EXPORT_FAULTS)
def test_export_errors_are_one_line_and_write_nothing(run_copy, capsys, fault):
    damage, says = EXPORT_FAULTS[fault]
    damage(run_copy)
    before = files_under(run_copy)
    code, err = error(capsys, "export", run_copy)
    assert code == 2 and err.startswith("error: ") and says in err and err.count("\n") == 1, err
    assert files_under(run_copy) == before


def test_export_to_a_folder_that_cannot_be_written_is_one_line(run_copy, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    code, err = error(capsys, "export", run_copy, "--out", tmp_path / "file" / "enc.safetensors")
    assert (
        code == 2 and err.startswith(f"error: --out {tmp_path / 'file'}: cannot write there") and err.count("\n") == 1
    ), err


def test_a_run_out_that_is_a_file_is_one_line(align_shards, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    code, err = error(capsys, *args(align_shards, tmp_path / "file"))
    assert code == 2 and err.startswith(f"error: --run.out {tmp_path / 'file' / 'tiny'}: cannot write there"), err


# ---------------------------------------------------------------- a full and a read-only disk


@needs_unshare
def test_a_full_disk_is_one_line_and_the_same_command_resumes_once_there_is_space(align_shards, align_run, tmp_path):
    """A 20 MB tmpfs holds two step checkpoints of 8.8 MB, not best.pt beside them: the run stops
    at epoch 0's end with one line naming the file, no half-written file left. Grown, the same
    command resumes and ends on the uninterrupted run's curve. Remounted read-only, the same
    command is one line naming --run.out."""
    mnt, copy = tmp_path / "mnt", tmp_path / "copy"
    mnt.mkdir()
    copy.mkdir()
    command = module_command(
        "fastloc.align", *args(align_shards, mnt, "--optim.epochs", 2, "--run.checkpoint-every", 3)
    )
    script = f"""
mount -t tmpfs -o size=20m tmpfs '{mnt}' || exit 99
{command}; echo "rc1=$?" >&2
ls -a '{mnt}/tiny' > '{copy}/after-error.txt'
mount -o remount,size=64m tmpfs '{mnt}' || exit 98
{command}; echo "rc2=$?" >&2
cp '{mnt}/tiny/metrics.jsonl' '{mnt}/tiny/run.json' '{copy}/'
mount -o remount,ro tmpfs '{mnt}' || exit 98
{command}; echo "rc3=$?" >&2
"""
    result = in_private_mount(script)
    err = result.stderr
    assert "rc1=2" in err and "rc2=0" in err and "rc3=2" in err, err + result.stdout
    assert "Traceback" not in err
    first, third = [line for line in err.splitlines() if line.startswith("error:")]
    assert first.startswith(f"error: {mnt}/tiny/best.pt: No space left on device; free some space and rerun"), first
    assert third.startswith(f"error: --run.out {mnt}/tiny: cannot write there (Read-only file system)"), third
    left = (copy / "after-error.txt").read_text().split()
    assert not [name for name in left if name.endswith(".tmp")] and "ckpt-00000006.pt" in left
    assert json.loads((copy / "run.json").read_text())["attempts"][-1]["resumed_from"].endswith("ckpt-00000006.pt")
    assert curve(copy) == curve(align_run)
