"""Leopart and NeCo through the trainer: a tiny run of each trains, resumes after a SIGKILL onto the
uninterrupted curve with its EMA teacher and queue intact, exports an encoder plain timm loads;
Leopart's 2 gloo ranks equal 1 rank (Sinkhorn is global) and its compiled step equals the eager one;
the schedules, parameter groups and bad input are the references'."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from align_runs import Killed, args, assert_same_curve, curve, kill_on_call

import fastloc.align.loop as loop
from fastloc.align.__main__ import main
from fastloc.align.dense import check_backbone
from fastloc.align.leopart import Leopart, LeopartConfig
from fastloc.align.neco import Neco, NecoConfig
from fastloc.align.prepare import adamw
from fastloc.align.presets import DENSE_OPTIM, PRESETS
from fastloc.data.multicrop import MultiCrop
from fastloc.models.exported import load_exported
from fastloc.models.registry import create_model

TINY = {"backbone": "tiny", "weights": "random", "crops": MultiCrop(sizes=(32, 16))}


def dense_args(preset: str, shards, out, *extra) -> list[str]:
    return args(shards, out, *extra, preset=preset)


@pytest.fixture(scope="module", params=["leopart-tiny", "neco-tiny"])
def dense_run(request, align_shards, tmp_path_factory):
    """An uninterrupted 2-epoch run (16 updates, the queue full from update 3), checkpoints every 5."""
    out = tmp_path_factory.mktemp(request.param)
    assert main(dense_args(request.param, align_shards, out, "--optim.epochs", 2, "--run.checkpoint-every", 5)) == 0
    return request.param, out / request.param


def test_a_dense_run_trains_and_resumes_after_a_kill_with_its_teacher_and_queue(
    dense_run, align_shards, tmp_path, monkeypatch
):
    """Killed inside update 12 (its step done): the rerun resumes from update 10 and ends on the
    uninterrupted curve, with the same student, EMA teacher and queue, bit for bit."""
    preset, whole = dense_run
    lines = [line for line in curve(whole) if line[1] is not None]
    assert len(lines) == 16 and all(torch.isfinite(torch.tensor(line[1])) for line in lines)
    kill_on_call(monkeypatch, loop, "train_step", 12)
    argv = dense_args(preset, align_shards, tmp_path, "--optim.epochs", 2, "--run.checkpoint-every", 5)
    with pytest.raises(Killed):
        main(argv)
    monkeypatch.undo()
    assert main(argv) == 0
    assert curve(tmp_path / preset) == curve(whole)
    a, b = (torch.load(r / "ckpt-00000016.pt", weights_only=True)["objective"] for r in (tmp_path / preset, whole))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)
    assert int(b["queued"]) == b["queue"].shape[1] and b["queue"].abs().sum() > 0  # the queue was in use
    teacher = [k for k in b if k.startswith("teacher.net.backbone.")]
    student = "trainable." + teacher[0].removeprefix("teacher.")
    assert not torch.equal(b[teacher[0]], b[student])  # a teacher that lags the student


def test_a_dense_run_exports_an_encoder_plain_timm_loads(dense_run, tmp_path):
    _, run = dense_run
    path = tmp_path / "enc.safetensors"
    assert main(["export", str(run), "--out", str(path)]) == 0
    state = torch.load(run / "best.pt", weights_only=True)["objective"]
    encoder = load_exported(path)
    prefix = "trainable.net.backbone."
    for name, value in encoder.state_dict().items():
        torch.testing.assert_close(value, state[prefix + name])


def test_leopart_two_ranks_equal_one_rank_with_the_same_global_batch(align_shards, tmp_path):
    """Sinkhorn over the global batch makes 2 ranks of 8 compute what 1 rank of 16 computes: the
    assignments, the loss, the EMA teacher. Without the queue (per rank, as the reference's), drop
    path (each rank draws its own) and the fg mask (each rank averages over its own fg cells, as
    the reference's per-GPU loss under DDP), which would make them differ by design."""
    common = ("--optim.epochs", 1, "--data.max-val-batches", 1, "--method.queue-length", 0)
    common += ("--method.drop-path", 0, "--method.loss-mask", "all")
    one = main(
        dense_args("leopart-tiny", align_shards, tmp_path, "--run.name", "one", "--data.batch-size", 16, *common)
    )
    assert one == 0
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", "-m"]
    two_args = dense_args("leopart-tiny", align_shards, tmp_path, "--run.name", "two", "--data.batch-size", 8, *common)
    two = subprocess.run([*torchrun, "fastloc.align", *two_args], capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert_same_curve(tmp_path / "one", tmp_path / "two", rel=1e-4)


def test_leopart_compiled_step_equals_the_eager_step(align_shards, tmp_path):
    small = ("--optim.epochs", 1, "--data.max-val-batches", 1, "--run.checkpoint-every", 100)
    for name, flag in (("eager", "--system.no-compile"), ("compiled", "--system.compile")):
        assert main(dense_args("leopart-tiny", align_shards, tmp_path, "--run.name", name, *small, flag)) == 0
    a, b = curve(tmp_path / "eager"), curve(tmp_path / "compiled")
    assert len(a) == len(b) == 9
    for x, y in zip(a, b):
        for u, v in zip(x[1:], y[1:]):
            assert (u is None) == (v is None) and (u is None or u == pytest.approx(v, rel=1e-4))


# ---------------------------------------------------------------- the references' optimizer


def test_parameter_groups_and_schedules_are_the_references():
    """Four groups in exclude_from_wt_decay's order: backbone weights, backbone biases and norms,
    head weights, head biases; the head at head_lr; cls token and positional embedding decayed."""
    objective = Leopart(LeopartConfig(**TINY, prototypes=8))
    optimizer = adamw(objective, replace(DENSE_OPTIM, lr=1e-5, head_lr=1e-4))
    names = {id(p): n for n, p in objective.trainable.named_parameters()}
    groups = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    assert [g["lr_scale"] for g in optimizer.param_groups] == pytest.approx([1, 1, 10, 10])
    assert [g["decayed"] for g in optimizer.param_groups] == [True, False, True, False]
    assert "net.backbone.pos_embed" in groups[0] and "net.backbone.cls_token" in groups[0]
    assert all(n.endswith(".bias") or "norm" in n for n in groups[1])
    assert "net.prototypes.weight" in groups[2] and all(n.startswith("net.head.") for n in groups[3])


def test_the_ema_teacher_follows_the_student_with_the_cosine_momentum():
    objective = Leopart(LeopartConfig(**TINY, prototypes=8))
    teacher = [p.clone() for p in objective.teacher.parameters()]
    student = list(objective.trainable.parameters())
    objective.before_update(step=0, total=10)
    for t0, t1, s in zip(teacher, objective.teacher.parameters(), student):
        torch.testing.assert_close(t1, 0.9995 * t0 + 0.0005 * s)
    objective.before_update(step=10, total=10)  # momentum 1 at the end: no change
    after = [p.clone() for p in objective.teacher.parameters()]
    objective.before_update(step=10, total=10)
    assert all(torch.equal(a, b) for a, b in zip(after, objective.teacher.parameters()))


# ---------------------------------------------------------------- bad input


def test_bad_input_is_one_clear_line(align_shards, tmp_path, capsys):
    cases = [
        (("--method.crops.sizes", 30, 16), "not divisible by"),
        (("--method.crops.sizes", 24, 16), "fewer than the 10 per image"),
        (("--data.train", tmp_path / "nowhere"), "nowhere"),
    ]
    for extra, words in cases:
        assert main(dense_args("leopart-tiny", align_shards, tmp_path, *extra)) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and words in err and "\n" not in err, err


def test_a_class_token_mask_needs_a_class_token():
    model = create_model("tiny", "random", class_token=False, global_pool="avg")
    with pytest.raises(ValueError, match="class token"):
        check_backbone(LeopartConfig(**TINY), model)
    check_backbone(LeopartConfig(**TINY, loss_mask="all"), model)  # loss mask all needs none


def test_neco_and_leopart_presets_resolve():
    for name in ("leopart-vits16-in100", "leopart-clip-vit-b", "neco-dinov2-vitb14"):
        cfg = PRESETS[name][1]
        cfg.validate()
        assert isinstance(cfg.method, LeopartConfig | NecoConfig)
    assert PRESETS["neco-dinov2-vitb14"][1].method.crops.sizes == (518, 98)
    assert isinstance(Neco, type)


# ---------------------------------------------------------------- Gram anchoring


@pytest.mark.parametrize("kind", ["maskembed", "leopart"])
def test_the_gram_term_anchors_the_student_to_the_start_model(kind):
    """--method.gram-weight w adds w x the per-image Gram loss of the student's patch tokens against
    the frozen start model's on the same pixels: 0 at the start, positive once the student moves,
    with gradients into the student; off by default and then no anchor is built."""
    from fastloc.align.maskembed import MaskEmbed, MaskEmbedConfig

    torch.manual_seed(0)
    if kind == "maskembed":
        make = lambda w: MaskEmbed(MaskEmbedConfig(backbone="tiny", weights="random", gram_weight=w))  # noqa: E731
    else:
        make = lambda w: Leopart(LeopartConfig(**TINY, prototypes=8, loss_mask="all", gram_weight=w))  # noqa: E731
    assert make(0.0).anchor is None
    torch.manual_seed(1)
    plain = make(0.0)
    torch.manual_seed(1)
    anchored = make(2.0)
    images, sample = anchored.example(2)
    images = torch.randint(0, 256, images.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    if kind == "leopart":
        sample = (sample[0], torch.rand(sample[1].shape, generator=torch.Generator().manual_seed(3)))
    anchored.load_state_dict(plain.state_dict())
    anchored.eval(), plain.eval()  # no drop path: the two calls see the same student
    torch.testing.assert_close(anchored.losses(images, sample), plain.losses(images, sample))  # student = anchor
    encoder = anchored.encoder()
    with torch.no_grad():
        encoder.blocks[-1].mlp.fc2.weight.add_(0.05 * torch.randn_like(encoder.blocks[-1].mlp.fc2.weight))
        plain.encoder().load_state_dict(encoder.state_dict())
    gap = anchored.losses(images, sample) - plain.losses(images, sample)
    assert (gap > 0).all()
    gap.sum().backward()
    assert encoder.blocks[-1].mlp.fc2.weight.grad.abs().sum() > 0
