"""``python -m fastloc.align``: the tiny preset end to end on the CPU (train, validate, checkpoint,
export), 2-rank DDP = 1 rank, compiled = eager, the schedule and the help texts. Resuming is in
test_align_resume.py, faults and bad input in test_align_faults.py."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from align_runs import args, assert_same_curve, curve, metrics

from fastloc.align.__main__ import main
from fastloc.align.config import OptimConfig
from fastloc.align.prepare import learning_rate
from fastloc.models.exported import exported_metadata, load_exported

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def shards(align_shards) -> Path:
    return align_shards


@pytest.fixture
def run(align_run) -> Path:
    """An uninterrupted 2-epoch tiny run (16 updates), checkpoints every 3 (conftest.py)."""
    return align_run


def test_a_tiny_run_trains_validates_and_records(run):
    config = json.loads((run / "config.json").read_text())
    assert config["preset"] == "tiny" and config["config"]["method"]["backbone"] == "tiny" and config["git"]
    sigma = json.loads((run / "run.json").read_text())["sigma"]
    assert 0.5 < sigma < 2  # a random ViT's final LayerNorm outputs: about unit variance
    lines = metrics(run)
    train = [m for m in lines if "loss" in m]
    vals = [m for m in lines if "val_loss" in m]
    assert [m["step"] for m in train] == list(range(1, 17)) and [m["step"] for m in vals] == [8, 16]
    assert 0.8 < train[0]["loss"] < 1.6  # sigma-scaled targets: about 1 at the start
    assert train[-1]["loss"] < 0.8 * train[0]["loss"] and vals[1]["val_loss"] < vals[0]["val_loss"]
    assert all(math.isfinite(m["grad_norm"]) and m["images_per_s"] > 0 for m in train)
    assert train[0]["lr"] == pytest.approx(learning_rate(OptimConfig(epochs=2, lr=1e-3), 0, 16))
    names = sorted(p.name for p in run.glob("*.pt"))
    assert names == ["best.pt", "ckpt-00000015.pt", "ckpt-00000016.pt"]  # the newest two step checkpoints
    state = torch.load(run / "best.pt", weights_only=True)
    assert state["step"] == 16 and not any(k.startswith("teacher.") for k in state["objective"])


def test_the_exported_encoder_loads_into_plain_timm(run, tmp_path):
    assert main(["export", str(run), "--out", str(tmp_path / "enc.safetensors")]) == 0
    path = tmp_path / "enc.safetensors"
    meta = exported_metadata(path)
    assert meta["timm_id"] == "vit_tiny_patch16_224" and meta["soft_cap"] == 30.0 and meta["step"] == 16
    plain = timm.create_model(
        meta["timm_id"],
        pretrained=True,
        num_classes=0,
        pretrained_cfg_overlay={"file": str(path), "custom_load": False},
        **meta["timm_kwargs"],
    ).eval()
    aligned = load_exported(path)
    from fastloc.align.export import method_config
    from fastloc.align.maskembed import MaskEmbed

    objective = MaskEmbed(method_config(run))
    objective.load_state_dict(torch.load(run / "best.pt", weights_only=True)["objective"], strict=False)
    x = torch.randn(2, 3, 64, 64)
    student = objective.encoder().eval().forward_features(x)
    torch.testing.assert_close(aligned.forward_features(x), student)
    assert plain.forward_features(x).shape == student.shape  # plain timm: no cap, its own eps


# ---------------------------------------------------------------- resume, DDP, compile


def test_two_ranks_equal_one_rank_with_the_same_global_batch(shards, tmp_path):
    one = main(args(shards, tmp_path, "--run.name", "one", "--data.batch-size", 16, "--data.val-batch-size", 8))
    assert one == 0
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--standalone",
        "-m",
        "fastloc.align",
        *args(shards, tmp_path, "--run.name", "two", "--data.batch-size", 8, "--data.val-batch-size", 4),
    ]
    two = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert len(curve(tmp_path / "one")) == 9
    assert_same_curve(tmp_path / "one", tmp_path / "two")
    sigma = [json.loads((tmp_path / n / "run.json").read_text())["sigma"] for n in ("one", "two")]
    assert sigma[0] == pytest.approx(sigma[1], rel=1e-9)


def test_the_compiled_step_equals_the_eager_step(shards, tmp_path):
    """torch.compile of the teacher and of student + decoder (forward and backward): 4 updates."""
    small = ("--data.max-val-batches", 1, "--run.checkpoint-every", 100)
    eager = main(args(shards, tmp_path, "--run.name", "eager", *small, "--system.no-compile", "--optim.epochs", 1))
    compiled = main(args(shards, tmp_path, "--run.name", "compiled", *small, "--system.compile", "--optim.epochs", 1))
    assert eager == compiled == 0
    a, b = curve(tmp_path / "eager"), curve(tmp_path / "compiled")
    assert len(a) == len(b) == 9
    for x, y in zip(a, b):
        for u, v in zip(x[1:], y[1:]):
            assert (u is None) == (v is None) and (u is None or u == pytest.approx(v, rel=1e-4))


def test_learning_rate_schedule():
    cfg = OptimConfig(lr=1e-3, min_lr_ratio=0.1)
    assert learning_rate(cfg, 0, 100) == pytest.approx(1e-3) and learning_rate(cfg, 100, 100) == pytest.approx(1e-4)
    assert learning_rate(cfg, 50, 100) == pytest.approx(5.5e-4)
    warm = OptimConfig(lr=1e-3, min_lr_ratio=0.1, warmup_updates=10)
    assert learning_rate(warm, 0, 100) == pytest.approx(1e-4) and learning_rate(warm, 5, 100) == pytest.approx(5.5e-4)
    assert learning_rate(warm, 10, 100) == pytest.approx(learning_rate(cfg, 10, 100))  # the cosine not shifted


@pytest.mark.gpu
def test_gpu_compiled_bf16_step_tracks_the_eager_step():
    """On CUDA (FlexAttention, the Triton masking kernel, bf16 autocast): 5 updates of the tiny
    model on device batches, compiled and eager, from the same start."""
    from fastloc.align.config import SystemConfig
    from fastloc.align.maskembed import MaskEmbed, MaskEmbedConfig
    from fastloc.align.prepare import prepare
    from fastloc.align.step import Update, train_step
    from fastloc.runtime import Runtime

    runtime = Runtime(torch.device("cuda"), 0, 1, 0)
    losses = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        objective = MaskEmbed(MaskEmbedConfig(backbone="tiny", weights="random"))
        prepared = prepare(objective, OptimConfig(lr=1e-3), SystemConfig(precision="bf16", compile=compiled), runtime)
        generator = torch.Generator("cuda").manual_seed(0)
        images = torch.randint(0, 256, (16, 3, 64, 64), dtype=torch.uint8, device="cuda", generator=generator)
        out = []
        for _ in range(5):
            masks = objective.sample(16, generator)
            out.append(
                float(train_step(objective, prepared, images, masks, Update(0, 1, 1e-3, 0.01), 2, 1.0, "bf16")["loss"])
            )
        losses[compiled] = out
    assert all(math.isfinite(v) for v in losses[True]) and losses[True][-1] < losses[True][0]
    assert losses[True] == pytest.approx(losses[False], rel=2e-2)


def test_every_config_field_has_help(capsys):
    """Each field of every config under AlignConfig has a docstring, so --help explains it."""
    import dataclasses

    from fastloc.align.config import AlignConfig

    todo, seen = [AlignConfig], set()
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.add(cls)
        args = cls.__doc__.split("Args:\n", 1)[1] if "Args:\n" in cls.__doc__ else ""
        for f in dataclasses.fields(cls):
            assert f"    {f.name}: " in args, f"{cls.__name__}.{f.name} has no help text"
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if dataclasses.is_dataclass(default):
                todo.append(type(default))
    assert len(seen) == 7  # AlignConfig, MaskEmbedConfig, MaskConfig, Data, Optim, System, Run
    assert main(["train", "tiny", "--help"]) == 0 and "--method.masks.sampler" in capsys.readouterr().out
