"""SegCLIP through the trainer: a tiny run on captioned synthetic shards with host-side superpixels
learns, resumes after a SIGKILL onto the same curve bit for bit, runs on 2 gloo ranks as on 1
(negatives gathered across ranks with their gradient), compiled as eager, and exports an encoder
plain timm loads; its learning rates, frozen parts, presets and bad input are the reference's."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from align_runs import Killed, args, assert_same_curve, curve, kill_on_call

import fastloc.align.loop as loop
from fastloc.align.__main__ import main
from fastloc.align.prepare import adamw
from fastloc.align.presets import PRESETS
from fastloc.align.segclip import Segclip, SegclipConfig
from fastloc.data.batch import Batch
from fastloc.models.exported import load_exported

UPDATES = 8  # one epoch of 128 images in batches of 16


def segclip_args(shards, out, *extra) -> list[str]:
    return args(shards, out, "--run.checkpoint-every", 4, *extra, preset="segclip-tiny")


@pytest.fixture(scope="module")
def segclip_run(align_shards, tmp_path_factory):
    """An uninterrupted 1-epoch segclip-tiny run (8 updates of 16), checkpoints every 4: the run the
    resumed, 2-rank and compiled runs must equal."""
    out = tmp_path_factory.mktemp("segclip")
    assert main(segclip_args(align_shards, out)) == 0
    return out / "segclip-tiny"


def test_a_segclip_run_learns_and_resumes_after_a_kill_onto_the_same_curve(
    segclip_run, align_shards, tmp_path, monkeypatch
):
    """The loss falls from its start; killed inside update 6 (its step done), the rerun resumes from
    update 4 and ends on the uninterrupted curve with the same weights, text tower and optimizer
    moments included, bit for bit."""
    lines = [line[1] for line in curve(segclip_run) if line[1] is not None]
    assert len(lines) == UPDATES and sum(lines[-3:]) / 3 < lines[0]
    kill_on_call(monkeypatch, loop, "train_step", 6)
    with pytest.raises(Killed):
        main(segclip_args(align_shards, tmp_path))
    monkeypatch.undo()
    assert main(segclip_args(align_shards, tmp_path)) == 0
    assert curve(tmp_path / "segclip-tiny") == curve(segclip_run)
    a, b = (torch.load(r / "ckpt-00000008.pt", weights_only=True) for r in (tmp_path / "segclip-tiny", segclip_run))
    assert a["objective"].keys() == b["objective"].keys()
    assert all(torch.equal(a["objective"][k], b["objective"][k]) for k in b["objective"])
    assert "trainable.text.logit_scale" in b["objective"] and "trainable.group.semantic_center" in b["objective"]
    assert str(a["optimizer"]) == str(b["optimizer"])


def test_two_ranks_equal_one_rank_with_the_same_global_batch(segclip_run, align_shards, tmp_path):
    """2 gloo ranks of 8: every rank's images and captions are every pair's negatives, so the curve
    (losses, gradient norms, validation) is the 1-rank run's of 16."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", "-m"]
    argv = segclip_args(align_shards, tmp_path, "--data.batch-size", 8)
    two = subprocess.run([*torchrun, "fastloc.align", *argv], capture_output=True, text=True, timeout=400)
    assert two.returncode == 0, two.stderr[-3000:]
    assert_same_curve(segclip_run, tmp_path / "segclip-tiny", rel=1e-4)


def test_the_compiled_step_equals_the_eager_step_and_the_encoder_exports(segclip_run, align_shards, tmp_path, capsys):
    """The first 3 updates equal the eager run's; later ones only run and stay finite: a near-tie of
    the hard assignment's argmax (about 1,000 per update) can go the other way in compiled code, and
    the curves then part. Then the export, and python -m fastloc.probe zeroshot on it under both rules."""
    assert main(segclip_args(align_shards, tmp_path, "--system.compile")) == 0
    a, b = curve(segclip_run), curve(tmp_path / "segclip-tiny")
    assert len(a) == len(b) == UPDATES + 1 and [x[0] for x in a] == [y[0] for y in b]
    for x, y in zip(a[:3], b[:3]):
        for u, v in zip(x[1:], y[1:]):
            assert (u is None) == (v is None) and (u is None or u == pytest.approx(v, rel=1e-4))
    assert all(math.isfinite(v) for y in b for v in y[1:] if v is not None)
    path = tmp_path / "enc.safetensors"
    assert main(["export", str(segclip_run), "--out", str(path)]) == 0
    state = torch.load(segclip_run / "best.pt", weights_only=True)["objective"]
    for name, value in load_exported(path).state_dict().items():
        torch.testing.assert_close(value, state["trainable.vit." + name])
    # the zero-shot rule's towers come back from the run: its text tower too, not a fresh one
    from fastloc.probe.zeroshot.segclip import load_parts, load_run, segment_segclip

    objective = load_run(segclip_run)
    loaded = objective.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in state) and "trainable.text.text_projection" in state
    exported = load_parts(path, path.with_name("enc.segclip.safetensors"))  # the export's parts file
    images = torch.randn(2, 3, 64, 64)
    for a, b in zip(exported.trainable.readout(images), objective.trainable.readout(images)):
        torch.testing.assert_close(a, b)
    texts = torch.nn.functional.normalize(torch.randn(5, 96), dim=-1)
    image = torch.randn(3, 80, 100)
    classes = segment_segclip(objective.trainable, image, texts, bg_thresh=0.8, short_side=64, window=(64, 48))
    assert classes.shape == (80, 100) and classes.max() <= 5
    from fastloc.probe.__main__ import main as probe

    parts, out = path.with_name("enc.segclip.safetensors"), tmp_path / "zs"
    where = ["--out", str(out / "runs"), "--results", str(out / "results"), "--cache-dir", str(out / "cache")]
    common = ["zeroshot", str(align_shards), "--backbone", str(path), "--max-images", "2"]  # --head auto: beside it
    common += ["--pictures", "0", "--device", "cpu", "--precision", "fp32", "--short-side", "64", *where]
    for rule, window in (
        ("segclip", ["--window", "64", "48", "--head", str(parts)]),
        ("harness", ["--window", "64", "32", "--pamr", "off"]),
    ):
        assert probe([*common, "--rule", rule, *window]) == 0
        (run,) = (
            r
            for r in (out / "runs").iterdir()
            if json.loads((r / "result.json").read_text())["protocol"]["rule"] == rule
        )
        protocol = json.loads((run / "result.json").read_text())["protocol"]
        assert protocol["readout"] == "segclip groups" and protocol["projection"] == str(parts)
        assert ("segclip_rule" in protocol) == (rule == "segclip")
    assert protocol["settings"]["window"] == [64, 32] and protocol["settings"]["short_side"] == 64  # the harness's
    capsys.readouterr()
    assert probe([*common, "--rule", "harness", "--window", "32", "16"]) == 2  # windows the tower cannot read
    assert "SegCLIP's tower reads windows of its training size 64" in capsys.readouterr().err


# ---------------------------------------------------------------- the reference's optimizer


def test_learning_rates_and_frozen_parts_are_the_references():
    """New parts (group module, blocks on groups, final norm, projection, MAE parts) at head_lr;
    the pretrained blocks of both towers at lr; patch embedding, class/positional embeddings, pre-norm,
    the text token and positional embeddings and the projection's bias never updated."""
    objective = Segclip(SegclipConfig(backbone="tiny", weights="random"))
    cfg = PRESETS["segclip-clip-vit-b"][1].optim
    optimizer = adamw(objective, cfg)
    names = {id(p): n for n, p in objective.trainable.named_parameters()}
    groups = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    assert [g["lr_scale"] for g in optimizer.param_groups] == pytest.approx([1, 1, 1000, 1000])
    head = {n.split(".")[0] for n in groups[2] + groups[3]}
    assert head == {"vit", "proj", "group", "reconstruct", "mae_blocks", "decoder"}
    assert {n for n in groups[2] + groups[3] if n.startswith("vit.")} == {
        n
        for n, _ in objective.trainable.named_parameters()
        if n.startswith(("vit.blocks.2.", "vit.blocks.3.", "vit.norm."))
    }
    assert all(n.startswith(("vit.blocks.0.", "vit.blocks.1.", "text.")) for n in groups[0] + groups[1])
    assert "text.logit_scale" in groups[1] and "text.text_projection" in groups[0]
    frozen = {n for n, p in objective.trainable.named_parameters() if not p.requires_grad}
    assert frozen == {
        "vit.cls_token",
        "vit.pos_embed",
        "vit.patch_embed.proj.weight",
        "vit.patch_embed.proj.bias",
        "proj.bias",
        "text.token_embedding.weight",
        "text.positional_embedding",
    }
    assert objective.trainable.proj.bias.eq(0).all()


def test_the_logit_scale_is_clamped_at_100():
    objective = Segclip(SegclipConfig(backbone="tiny", weights="random"))
    scale = objective.trainable.text.logit_scale
    assert float(scale) == pytest.approx(torch.tensor(1 / 0.07).log().item())
    with torch.no_grad():
        scale.fill_(5.0)
    objective.before_update(0, 1)
    assert float(scale) == pytest.approx(torch.tensor(100.0).log().item())


def test_step_sample_tokenizes_one_caption_and_pools_segments_per_patch():
    objective = Segclip(SegclipConfig(backbone="tiny", weights="random", max_words=5))
    labels = torch.zeros(2, 64, 64, dtype=torch.int64)
    labels[1, :, 32:] = 7
    batch = Batch(
        images=torch.zeros(2, 3, 64, 64, dtype=torch.uint8), labels=labels, captions=(("a b c d e f",), ("x",))
    )
    sample = objective.step_sample(batch, objective.sample(2, torch.Generator().manual_seed(0)))
    tokens, segments = sample[-2:]
    assert tokens.shape == (2, 32) and tokens[0, 4] == 49407 and tokens[0, 5:].eq(0).all()  # cut at 5 with the end
    assert segments.shape == (2, 64) and segments[0].eq(0).all() and segments[1].view(8, 8)[:, 4:].eq(7).all()
    noise, order, mae_noise = sample[:3]
    assert (
        noise.shape == (2, 8, 64)
        and mae_noise.shape == (2, 8, 15)
        and torch.equal(order.sort(1).values[0], torch.arange(64))
    )
    with pytest.raises(ValueError, match="captions"):
        objective.step_sample(Batch(images=batch.images, labels=labels), sample)


# ---------------------------------------------------------------- presets, bad input


def test_the_segclip_presets_resolve():
    name, cfg = "segclip-clip-vit-b", PRESETS["segclip-clip-vit-b"][1]
    cfg.validate()
    assert isinstance(cfg.method, SegclipConfig) and cfg.data.batch_size == 96 and cfg.system.precision == "fp32"
    assert (cfg.optim.lr, cfg.optim.head_lr, cfg.optim.betas, cfg.optim.eps) == (4e-6, 4e-3, (0.9, 0.98), 1e-6)
    assert cfg.optim.epochs == 10 and str(cfg.data.train) == "shards/coco/train", name
    tiny = PRESETS["segclip-tiny"][1]
    tiny.validate()
    assert tiny.method.backbone == "tiny" and not tiny.system.compile


def test_bad_input_is_one_clear_line(align_shards, tmp_path, capsys):
    cases = [
        (("--method.group-blocks", 4), "--method.group-blocks"),
        (("--method.mask-ratio", 1.0), "--method.mask-ratio"),
        (("--method.centres", 1), "--method.centres"),
    ]
    for extra, words in cases:
        assert main(segclip_args(align_shards, tmp_path, *extra)) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and words in err and "\n" not in err, err


def warmup_cosine(x, warmup=0.002, lr_start=0.0, lr_end=0.0):
    """Transcribed from ArrowLuo/SegCLIP @ df09ba2, modules/optimization_adamw.py (x: the update / total)."""
    if x < warmup:
        return (x * (1.0 - lr_start) / warmup) + lr_start
    new_x = (x - warmup) / (1 - warmup)
    return lr_end + 0.5 * (1.0 - lr_end) * (1 + math.cos(math.pi * new_x))


def test_the_schedule_is_the_references_warmup_cosine():
    """--optim.warmup-fraction 0.15 (the preset's): linear over 15% of the updates, then the cosine
    over the rest, as AdaptAdamW's warmup_cosine; the fraction and a count of warmup updates exclude each other."""
    from fastloc.align.config import OptimConfig
    from fastloc.align.prepare import learning_rate
    from fastloc.cli import BadValue

    cfg = PRESETS["segclip-clip-vit-b"][1].optim
    assert cfg.warmup_fraction == 0.15 and cfg.min_lr_ratio == 0.0
    total = 1540
    for update in (0, 1, 100, 230, 231, 232, 800, 1539):
        assert learning_rate(cfg, update, total) == pytest.approx(
            cfg.lr * warmup_cosine(update / total, 0.15), abs=1e-15
        )
    with pytest.raises(BadValue, match="--optim.warmup-fraction"):
        OptimConfig(warmup_fraction=0.1, warmup_updates=5).validate()
    with pytest.raises(BadValue, match="--optim.warmup-fraction"):
        OptimConfig(warmup_fraction=1.0).validate()
