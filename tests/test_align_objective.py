"""The objective seam: every registered objective keeps the interface's contract, and a second
objective defined and registered here, with no edit of fastloc/align (an EMA self-distillation of
the patch tokens), trains through the same loop, resumes after a SIGKILL onto the same curve with
its EMA teacher intact, and exports its encoder."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, fields, replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from align_runs import Killed, curve, kill_on_call
from torch import nn

import fastloc.align.loop as loop
from fastloc.align.__main__ import main
from fastloc.align.checkpoint import load_objective, plain
from fastloc.align.config import OBJECTIVES, AlignConfig
from fastloc.align.export import method_config
from fastloc.align.loop import train
from fastloc.align.objective import Objective, ObjectiveConfig
from fastloc.align.presets import PRESETS
from fastloc.models.exported import exported_metadata, load_exported
from fastloc.models.registry import create_model, image_config


@dataclass(frozen=True, kw_only=True)
class EmaConfig(ObjectiveConfig):
    """EMA self-distillation of the patch tokens."""

    momentum: float = 0.9
    """The teacher's EMA momentum."""


class Tokens(nn.Module):
    """A timm backbone's output tokens: [B, 3, S, S] -> [B, T, D]."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(images)


class EmaDistill(Objective):
    """The student sees the image with half its patches blanked and predicts its EMA teacher's
    tokens of the whole image."""

    def __init__(self, cfg: EmaConfig):
        super().__init__()
        model = create_model(cfg.backbone, cfg.weights)
        self.cfg, self.image, self.trainable = cfg, image_config(model), Tokens(model)
        self.teacher = copy.deepcopy(self.trainable).requires_grad_(False)

    def sample(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        grid = self.image.grid  # keep-masks [B, 1, g, g]
        return torch.rand(batch, 1, grid, grid, generator=generator, device=generator.device) < 0.5

    def losses(self, images: torch.Tensor, keep: torch.Tensor, model: nn.Module | None = None) -> torch.Tensor:
        x = images.float() / 255
        with torch.no_grad():
            target = self.teacher(x)
        pred = (self.trainable if model is None else model)(x * F.interpolate(keep.float(), size=x.shape[-2:]))
        return (pred - target).square().flatten(1).mean(1)

    @torch.no_grad()
    def before_update(self, step: int, total: int) -> None:
        torch._foreach_lerp_(list(self.teacher.parameters()), list(self.trainable.parameters()), 1 - self.cfg.momentum)

    def encoder(self) -> nn.Module:
        return self.trainable.model


def register() -> None:
    OBJECTIVES[EmaConfig] = EmaDistill


def ema_config(shards: Path, out: Path) -> AlignConfig:
    """The tiny preset's run with the EMA objective: 1 epoch of 8 updates, checkpoints every 3."""
    tiny = PRESETS["tiny"][1]
    return replace(
        tiny,
        method=EmaConfig(backbone="tiny", weights="random"),
        data=replace(tiny.data, train=shards / "train", val=shards / "val"),
        run=replace(tiny.run, out=out, name="ema", log_every=1, checkpoint_every=3, progress=False),
    )


@pytest.fixture(scope="module")
def registered():
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(OBJECTIVES, EmaConfig, EmaDistill)
        yield


@pytest.fixture(scope="module")
def ema_run(registered, align_shards, tmp_path_factory) -> Path:
    return train(ema_config(align_shards, tmp_path_factory.mktemp("ema")))


# ---------------------------------------------------------------- the contract


CASES = {**OBJECTIVES, EmaConfig: EmaDistill}


@pytest.mark.parametrize("kind", CASES, ids=lambda kind: kind.__name__)
def test_every_objective_keeps_the_contract(registered, kind, tmp_path):
    """On the tiny backbone: its config comes back from config.json as its own type (no two
    registered configs have the same fields), its frozen modules stay in eval mode outside the
    trainable part, its whole state loads back strictly, and it counts its FLOPs."""
    names = {f.name for f in fields(kind)}
    assert all({f.name for f in fields(other)} != names for other in CASES if other is not kind)
    cfg = kind(backbone="tiny", weights="random")
    (tmp_path / "config.json").write_text(json.dumps({"config": {"method": plain(cfg)}}))
    assert method_config(tmp_path) == cfg
    objective = CASES[kind](cfg).train()
    assert objective.trainable.training and all(not m.training for m in objective.frozen())
    assert all(m is not objective.trainable for m in objective.frozen())
    load_objective(CASES[kind](cfg), objective.state_dict())
    assert objective.flops_per_image() > 0


# ---------------------------------------------------------------- a second objective


def test_a_second_objective_trains_and_resumes_after_a_kill_with_its_ema_teacher(
    ema_run, align_shards, tmp_path, monkeypatch
):
    """Killed inside update 5 (after its step and EMA update): the rerun resumes from update 3
    and ends on the uninterrupted curve, with the same student and EMA teacher, bit for bit."""
    lines = [line for line in curve(ema_run) if line[1] is not None]
    assert len(lines) == 8 and lines[-1][1] < lines[0][1]  # it learns
    kill_on_call(monkeypatch, loop, "train_step", 5)
    with pytest.raises(Killed):
        train(ema_config(align_shards, tmp_path))
    monkeypatch.undo()
    monkeypatch.setitem(OBJECTIVES, EmaConfig, EmaDistill)
    run = train(ema_config(align_shards, tmp_path))
    attempts = json.loads((run / "run.json").read_text())["attempts"]
    assert attempts[-1]["resumed_from"].endswith("ckpt-00000003.pt")
    assert curve(run) == curve(ema_run)
    resumed, whole = (torch.load(r / "ckpt-00000008.pt", weights_only=True)["objective"] for r in (run, ema_run))
    assert resumed.keys() == whole.keys() and all(torch.equal(resumed[k], whole[k]) for k in whole)
    teacher = [k for k in whole if k.startswith("teacher.")]
    assert teacher and not torch.equal(whole[teacher[0]], whole["trainable." + teacher[0].removeprefix("teacher.")])


def test_a_second_objective_exports_its_encoder(ema_run, tmp_path):
    path = tmp_path / "enc.safetensors"
    assert main(["export", str(ema_run), "--out", str(path)]) == 0
    meta = exported_metadata(path)
    assert meta["timm_id"] == "vit_tiny_patch16_224" and meta["soft_cap"] is None and meta["step"] == 8
    objective = EmaDistill(method_config(ema_run))
    objective.load_state_dict(torch.load(ema_run / "best.pt", weights_only=True)["objective"])
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(load_exported(path).forward_features(x), objective.encoder().eval().forward_features(x))
