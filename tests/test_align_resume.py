"""Resuming an alignment run: whatever moment a run is killed at, the same command continues it
exactly, so its metrics equal the uninterrupted run's (conftest's ``align_run``: 2 epochs of 8
updates, checkpoints every 3). Kills land mid-epoch (a real SIGKILL), at an epoch's end when the
checkpoint interval divides the epoch, just after an epoch-end checkpoint, before the first
checkpoint and during a checkpoint write; corrupt checkpoints fall back; a second writer of one
run directory is refused; a non-finite state is never saved."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from align_runs import Killed, args, curve, kill_on_call, metrics

import fastloc.align.checkpoint as checkpoint
import fastloc.align.loop as loop
from fastloc.align.__main__ import main
from fastloc.lock import folder_lock


def attempts(run: Path) -> list[dict]:
    return json.loads((run / "run.json").read_text())["attempts"]


def kill_then_resume(monkeypatch, command: list[str]) -> None:
    """Run ``command`` until the patched kill, then the same command again, unpatched, to its end."""
    with pytest.raises(Killed):
        main(command)
    monkeypatch.undo()
    assert main(command) == 0


# ---------------------------------------------------------------- kills at every moment


KILLER = """
import os, signal, sys
import fastloc.align.loop as loop
original = loop.train_step
done = 0
def step(*a, **k):
    global done
    out = original(*a, **k)
    done += 1
    if done == int(os.environ["KILL_AFTER"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return out
loop.train_step = step
from fastloc.align.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_killed_run_resumes_exactly(align_shards, align_run, tmp_path):
    """SIGKILL inside update 11, after its step, before it is logged (checkpoints at 3, 6, 9, ...):
    the rerun of the same command continues from update 9 and the whole loss curve equals the
    uninterrupted run's, exactly."""
    command = args(align_shards, tmp_path, "--optim.epochs", 2, "--run.checkpoint-every", 3)
    env = {**os.environ, "KILL_AFTER": "11"}
    killed = subprocess.run([sys.executable, "-c", KILLER, *command], env=env, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert max(m["step"] for m in metrics(tmp_path / "tiny")) == 10
    resumed = subprocess.run([sys.executable, "-m", "fastloc.align", *command], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    last = attempts(tmp_path / "tiny")[-1]
    assert last["step"] == 9 and last["resumed_from"].endswith("ckpt-00000009.pt")
    assert curve(tmp_path / "tiny") == curve(align_run)


def test_a_kill_between_the_epochs_last_update_and_its_validation_trains_no_epoch_twice(
    align_shards, align_run, tmp_path, monkeypatch
):
    """Checkpoints every 4 divide the epoch's 8 updates: update 8's checkpoint is written inside
    the epoch, then the kill comes before the validation. The rerun validates epoch 0 and trains
    epoch 1 only: 16 updates in all, the uninterrupted curve."""
    kill_on_call(monkeypatch, loop.Loop, "validate", 1, before=True)
    kill_then_resume(monkeypatch, args(align_shards, tmp_path, "--optim.epochs", 2, "--run.checkpoint-every", 4))
    run = tmp_path / "tiny"
    assert attempts(run)[-1]["resumed_from"].endswith("ckpt-00000008.pt")
    assert curve(run) == curve(align_run)


def test_a_kill_after_the_epoch_end_checkpoint_resumes_from_it(align_shards, align_run, tmp_path, monkeypatch):
    """Checkpoints every 3 do not divide the epoch's 8 updates: the newest checkpoint when update 9
    dies is epoch 0's end (update 8, validated). The rerun trains epoch 1 from its first update."""
    kill_on_call(monkeypatch, loop, "train_step", 9, before=True)
    kill_then_resume(monkeypatch, args(align_shards, tmp_path, "--optim.epochs", 2, "--run.checkpoint-every", 3))
    run = tmp_path / "tiny"
    assert attempts(run)[-1]["resumed_from"].endswith("ckpt-00000008.pt")
    assert curve(run) == curve(align_run)


def test_a_kill_before_the_first_checkpoint_leaves_no_metric_line_twice(align_shards, align_run, tmp_path, monkeypatch):
    """Killed after update 5, with no checkpoint yet: the rerun starts afresh and the killed
    attempt's five lines are gone, not doubled."""
    kill_on_call(monkeypatch, loop, "train_step", 5)
    command = args(align_shards, tmp_path, "--optim.epochs", 2, "--run.checkpoint-every", 100)
    with pytest.raises(Killed):
        main(command)
    assert [m["step"] for m in metrics(tmp_path / "tiny")] == [1, 2, 3, 4]  # update 5 died before its line
    monkeypatch.undo()
    assert main(command) == 0
    assert curve(tmp_path / "tiny") == curve(align_run)


@pytest.mark.parametrize(
    "interval, write, resumed_from",
    [(3, 2, "ckpt-00000003.pt"), (4, 3, "ckpt-00000008.pt")],
    ids=["mid-epoch", "epoch-end-best"],
)
def test_a_kill_during_a_checkpoint_write_resumes_from_the_one_before(
    align_shards, align_run, tmp_path, monkeypatch, interval, write, resumed_from
):
    """The kill lands inside a checkpoint's write, half of it on disk: the update-6 checkpoint
    (interval 3), or best.pt after epoch 0's validation line (interval 4: update 8's checkpoint
    inside the epoch is the one before). The half-written file is removed, the validation line
    of an epoch the checkpoint had not validated is dropped, and the curve is the uninterrupted one."""
    original, calls = torch.save, []

    def half_then_kill(state, f, *a, **k):
        calls.append(1)
        if len(calls) == write:
            f.write(b"half a checkpoint")
            raise Killed
        return original(state, f, *a, **k)

    monkeypatch.setattr(checkpoint.torch, "save", half_then_kill)
    run = tmp_path / "tiny"
    command = args(align_shards, tmp_path, "--optim.epochs", 2, "--run.checkpoint-every", interval)
    with pytest.raises(Killed):
        main(command)
    assert list(run.glob(".*.tmp")), "the kill left the half-written file"
    monkeypatch.undo()
    assert main(command) == 0
    assert attempts(run)[-1]["resumed_from"].endswith(resumed_from)
    assert not list(run.glob(".*.tmp"))
    assert curve(run) == curve(align_run)


# ---------------------------------------------------------------- damaged checkpoints


def test_two_corrupt_newest_checkpoints_fall_back_to_best_and_nothing_readable_is_deleted(
    align_shards, align_run, tmp_path, monkeypatch
):
    """Killed after update 11 (checkpoints 9 and 8 kept, best.pt from epoch 0's end at 8): both step
    checkpoints are damaged. The rerun resumes from best.pt, moves the damaged files aside and
    keeps every checkpoint it writes; its curve is the uninterrupted one."""
    kill_on_call(monkeypatch, loop, "train_step", 11)
    run = tmp_path / "tiny"
    command = args(align_shards, tmp_path, "--optim.epochs", 2, "--run.checkpoint-every", 3)
    with pytest.raises(Killed):
        main(command)
    monkeypatch.undo()
    assert sorted(p.name for p in run.glob("*.pt")) == ["best.pt", "ckpt-00000008.pt", "ckpt-00000009.pt"]
    (run / "ckpt-00000009.pt").write_bytes(b"damaged")
    (run / "ckpt-00000008.pt").write_bytes((run / "ckpt-00000008.pt").read_bytes()[:1000])
    with pytest.warns(UserWarning, match="unreadable checkpoint"):
        assert main(command) == 0
    assert attempts(run)[-1]["resumed_from"].endswith("best.pt") and attempts(run)[-1]["step"] == 8
    names = sorted(p.name for p in run.iterdir() if ".pt" in p.name)
    assert names == [
        "best.pt",
        "ckpt-00000008.pt.unreadable",
        "ckpt-00000009.pt.unreadable",
        "ckpt-00000015.pt",
        "ckpt-00000016.pt",
    ]
    assert curve(run) == curve(align_run)


def test_another_configuration_is_refused_and_unreadable_checkpoints_are_never_guessed_past(
    align_shards, tmp_path, monkeypatch, capsys
):
    """A finished 1-epoch run (data paths given relative): the same run with absolute paths or from
    another folder resumes (nothing left to do); another learning rate is refused with the field
    named; with every checkpoint unreadable, the run refuses in one line and deletes nothing."""
    monkeypatch.chdir(align_shards.parent)
    relative = args(Path(align_shards.name), tmp_path, "--run.checkpoint-every", 3)
    assert main(relative) == 0
    run = tmp_path / "tiny"
    before = curve(run)
    monkeypatch.chdir(tmp_path)
    assert main(args(align_shards, tmp_path, "--run.checkpoint-every", 3)) == 0  # absolute, elsewhere
    assert attempts(run)[-1]["resumed_from"].endswith("ckpt-00000008.pt") and curve(run) == before
    capsys.readouterr()
    assert main(args(align_shards, tmp_path, "--optim.lr", "5e-4")) == 2
    assert "another configuration (optim.lr: 0.001 -> 0.0005)" in capsys.readouterr().err
    for path in run.glob("*.pt"):
        path.write_bytes(b"damaged")
    files = sorted(p.name for p in run.iterdir())
    assert main(args(align_shards, tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {run}: no readable checkpoint") and "best.pt" in err
    assert sorted(p.name for p in run.iterdir()) == files


# ---------------------------------------------------------------- one writer, finite state


def test_a_second_writer_of_a_run_directory_is_refused(align_shards, tmp_path, capsys):
    run = tmp_path / "tiny"
    run.mkdir()
    with folder_lock(run):  # this test process plays the run that is writing
        assert main(args(align_shards, tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {run}: another run is writing this run directory (pid {os.getpid()} on ")
    assert sorted(p.name for p in run.iterdir()) == []  # nothing written, the lock file gone with its holder


@pytest.mark.parametrize("poison", ["grad-norm", "weights"])
def test_a_non_finite_state_is_never_checkpointed(align_shards, tmp_path, monkeypatch, capsys, poison):
    """Update 3 leaves a finite loss but NaN weights (with an infinite gradient norm, as a blow-up
    does, or without one): its checkpoint is not written, and the stop names the last good one."""
    original, done = loop.train_step, []

    def blow_up(objective, prepared, *a, **k):
        out = original(objective, prepared, *a, **k)
        done.append(1)
        if len(done) == 3:
            prepared.params[0].data.fill_(float("nan"))
            if poison == "grad-norm":
                out = {**out, "grad_norm": torch.tensor(float("inf"))}
        return out

    monkeypatch.setattr(loop, "train_step", blow_up)
    code = main(args(align_shards, tmp_path, "--run.checkpoint-every", 3, "--run.log-every", 5))
    err = capsys.readouterr().err
    what = "the gradient norm is not finite at update 3" if poison == "grad-norm" else "not finite after update 3"
    assert code == 1 and what in err and "no checkpoint was written" in err, err
    assert list((tmp_path / "tiny").glob("*.pt")) == []


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
    align_shards, tmp_path, monkeypatch, capsys
):
    original, done = loop.train_step, []

    def poisoned(*a, **k):
        out = original(*a, **k)
        done.append(1)
        return {**out, "loss": out["loss"] * float("nan")} if len(done) == 5 else out

    monkeypatch.setattr(loop, "train_step", poisoned)
    code = main(args(align_shards, tmp_path, "--run.checkpoint-every", 2, "--run.log-every", 2))
    err = capsys.readouterr().err
    assert code == 1 and "not finite at update 5" in err and "ckpt-00000004.pt" in err  # seen at the log of 6
    assert sorted(p.name for p in (tmp_path / "tiny").glob("ckpt-*.pt")) == ["ckpt-00000002.pt", "ckpt-00000004.pt"]
    assert torch.load(tmp_path / "tiny" / "ckpt-00000004.pt", weights_only=True)["step"] == 4
