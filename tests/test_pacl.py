"""PACL: its loss equals NMS05's code on the same inputs (sigmoid weights, own-caption pooling) and,
in the paper's per-pair softmax form, a direct double loop over every image-text pair (chunked or
not, with gradients); a tiny run trains through the loop, resumes after a SIGKILL onto the same
curve, runs on 2 gloo ranks as on 1 (negatives gathered across ranks) and compiled as eager."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from align_runs import Killed, args, assert_same_curve, curve, kill_on_call
from safetensors.torch import save_file

import fastloc.align.loop as loop
from fastloc.align.__main__ import main
from fastloc.align.pacl import Pacl, PaclConfig, Trainable
from fastloc.align.pacl_ops import Embedder, infonce_losses, own_scores, pair_scores
from fastloc.align.presets import PRESETS
from fastloc.cli import BadValue

# ---------------------------------------------------------------- NMS05's code, transcribed
# A transcription of NMS05/Patch-Aligned-Contrastive-Learning @ d3d1b7f, model/pacl.py: the
# embedder (Patch_Projection), the weights and pooling (open_clip_pacl.patch_alignment and the
# pooling of open_clip_pacl.forward, on given projections) and ClipLoss; open_clip and the
# LayerNorm/Dropout/text head around them are left out (fastloc does not build them).


class Patch_Projection(torch.nn.Module):  # the reference's name
    def __init__(self):
        super(Patch_Projection, self).__init__()  # noqa: UP008

        self.linear_projection = self.text_projection = nn.Sequential(
            nn.Linear(768, 512),
        )
        self.non_linear_projection = nn.Sequential(
            nn.Linear(768, 512),
            nn.GELU(),
            nn.Linear(512, 512),
        )

    def forward(self, x):
        return self.linear_projection(x) + self.non_linear_projection(x)


def patch_alignment(visual_patch_proj, text_cls_proj):  # open_clip_pacl.patch_alignment
    normalized_visual_patch_proj = F.normalize(visual_patch_proj, dim=-1)
    normalized_visual_patch_proj = normalized_visual_patch_proj.transpose(-2, -1)
    normalized_text_cls_proj = F.normalize(text_cls_proj, dim=-1)
    normalized_text_cls_proj = normalized_text_cls_proj.unsqueeze(1)
    patch_activations = normalized_text_cls_proj @ normalized_visual_patch_proj
    patch_activations = patch_activations.squeeze()
    return F.sigmoid(patch_activations * 10)


def reference_forward(visual_proj, text_proj):  # open_clip_pacl.forward after the two towers
    patch_activations = patch_alignment(visual_proj, text_proj)
    patch_pooled_visual_projections = torch.sum(visual_proj * patch_activations.unsqueeze(-1), dim=1)
    return F.normalize(patch_pooled_visual_projections, dim=-1), F.normalize(text_proj, dim=-1)


class ClipLoss(nn.Module):
    def __init__(self, temperature):
        super().__init__()
        self.logit_scale = 1.0 / temperature

    def get_ground_truth(self, device, num_logits):
        labels = torch.arange(num_logits, device=device, dtype=torch.long)
        return labels

    def get_logits(self, image_features, text_features):
        logits_per_image = self.logit_scale * image_features @ text_features.T
        logits_per_text = self.logit_scale * text_features @ image_features.T
        return logits_per_image, logits_per_text

    def forward(self, image_features, text_features):
        device = image_features.device
        logits_per_image, logits_per_text = self.get_logits(image_features, text_features)
        labels = self.get_ground_truth(device, logits_per_image.shape[0])
        total_loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
        return total_loss


# ---------------------------------------------------------------- the loss


def trainable(embedder: Embedder, **cfg) -> Trainable:
    return Trainable(PaclConfig(backbone="tiny", weights="random", **cfg), embedder, None)


def test_the_loss_equals_nms05s_code_on_the_same_inputs():
    """--method.weighting sigmoid --method.own-caption --method.activation gelu, a fixed 0.1: the
    embedder, the loss and its gradients are NMS05's (B 4, 9 patches of CLIP B/16's 768 -> 512)."""
    torch.manual_seed(0)
    tokens, texts = torch.randn(4, 9, 768), torch.randn(4, 512)
    reference = Patch_Projection()
    ours = Embedder(768, 512, "gelu")
    ours.linear.load_state_dict(reference.linear_projection[0].state_dict())
    ours.mlp.load_state_dict(reference.non_linear_projection.state_dict())
    torch.testing.assert_close(ours(tokens), reference(tokens))
    expected = ClipLoss(0.1)(*reference_forward(reference(tokens), texts))
    expected.backward()
    model = trainable(ours, weighting="sigmoid", own_caption=True, temperature=0.1, learn_temperature=False)
    got = infonce_losses(model(tokens, texts, texts), 0, 4).mean()
    got.backward()
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(ours.mlp[2].weight.grad, reference.non_linear_projection[2].weight.grad)
    torch.testing.assert_close(ours.linear.weight.grad, reference.linear_projection[0].weight.grad)


def direct_losses(patches: torch.Tensor, texts: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The paper's loss, written out: for every image i and text j, softmax weights of i's
    patches by their cosine with t_j, z_ij their weighted sum, phi_ij = cos(z_ij, t_j); then the
    symmetric InfoNCE per image."""
    B = len(patches)
    phi = torch.zeros(B, B)
    for i in range(B):
        for j in range(B):
            s = F.cosine_similarity(patches[i], texts[j][None], dim=-1)  # [P]
            z = (s.softmax(0)[:, None] * patches[i]).sum(0)  # [d]
            phi[i, j] = F.cosine_similarity(z, texts[j], dim=0)
    logits = scale * phi
    target = torch.arange(B)
    i2t = torch.stack([F.cross_entropy(logits[i], target[i]) for i in range(B)])
    t2i = torch.stack([F.cross_entropy(logits[:, i], target[i]) for i in range(B)])
    return (i2t + t2i) / 2


@pytest.mark.parametrize("chunk", [2, 5])
def test_the_per_pair_loss_equals_a_double_loop_chunked_or_not(chunk):
    """The default (softmax, every pair, learnt temperature from 0.07): losses per image and the
    gradients of the embedder and the temperature equal the loop's; 5 texts in chunks of 2 (3
    chunks, the last short, each recomputed in the backward) or one chunk."""
    torch.manual_seed(1)
    tokens, texts = torch.randn(5, 7, 12), torch.randn(5, 6)
    model = trainable(Embedder(12, 6), text_chunk=chunk)
    got = infonce_losses(model(tokens, texts, texts), 0, 5)
    got.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    expected = direct_losses(model.embedder(tokens), texts, model.logit_scale.exp())
    expected.sum().backward()
    torch.testing.assert_close(got, expected)
    for got_grad, p in zip(grads, model.parameters()):
        torch.testing.assert_close(got_grad, p.grad)


def test_own_caption_pooling_is_the_diagonal_of_the_pairwise_pooling_and_the_loss_differs():
    """Each image pooled with its own caption is the pairwise pooling's diagonal; the other
    entries (an image pooled by another caption's weights) differ, and so does the loss, under
    either weighting."""
    torch.manual_seed(2)
    patches, texts = torch.randn(4, 6, 8), torch.randn(4, 8)
    for weighting in ("softmax", "sigmoid"):
        pairs, own = pair_scores(patches, texts, weighting, 3), own_scores(patches, texts, texts, weighting)
        torch.testing.assert_close(pairs.diagonal(), own.diagonal())
        off = ~torch.eye(4, dtype=torch.bool)
        assert (pairs[off] - own[off]).abs().min() > 1e-4
        assert (infonce_losses(10 * pairs, 0, 4) - infonce_losses(10 * own, 0, 4)).abs().max() > 1e-3
    assert (pair_scores(patches, texts, "softmax", 4) - pair_scores(patches, texts, "sigmoid", 4)).abs().max() > 1e-3


def test_the_embedder_is_the_papers_size_and_the_towers_are_frozen_and_rebuilt():
    """1.05 M parameters at 768 -> 512 (the paper: about 1.1 M); the towers take no gradient and
    are in no state dict (the config rebuilds them), unless --method.train-vision."""
    assert sum(p.numel() for p in Embedder(768, 512).parameters()) == 1_050_112
    objective = Pacl(PaclConfig(backbone="tiny", weights="random"))
    assert {k.split(".")[0] for k in objective.state_dict()} == {"trainable", "tower_sums"}
    assert set(objective.trainable.state_dict()) == {
        "logit_scale",
        *(f"embedder.{k}" for k in Embedder(96, 96).state_dict()),
    }
    assert not any(True for _ in objective.text.parameters()) and not any(True for _ in objective.vision.parameters())
    unfrozen = Pacl(PaclConfig(backbone="tiny", weights="random", train_vision=True))
    assert unfrozen.frozen() == [unfrozen.text] and any(
        k.startswith("vision.") for k in unfrozen.trainable.state_dict()
    )
    assert not unfrozen.is_head("vision.model.blocks.0.mlp.fc1.weight") and unfrozen.is_head("embedder.linear.weight")
    held = dict(objective.vision.model.named_buffers())
    assert all(torch.equal(v, held[k]) for k, v in objective.encoder().state_dict().items())
    other = Pacl(PaclConfig(backbone="tiny", weights="random"))  # another random tower: not the run's
    other.load_state_dict(objective.state_dict())
    with pytest.raises(RuntimeError, match="not the one this run trained with"):
        other.encoder()


def test_bad_options_name_the_option():
    cases = [({"temperature": 0.0}, "--method.temperature"), ({"text_chunk": 0}, "--method.text-chunk")]
    if importlib.util.find_spec("spacy") is None:
        cases.append(({"noun_phrases": True}, "spaCy"))
    for changes, words in cases:
        with pytest.raises(BadValue, match=words):
            PaclConfig(**changes).validate()


def test_noun_phrase_captions_follow_the_draws(monkeypatch):
    """NMS05's object-centric captions (with a stand-in for spaCy's parser): below 1/2 a noun
    phrase in a template, drawn by the step's uniforms; else, or without a phrase, the caption."""
    import fastloc.align.pacl as pacl

    class Chunk:
        def __init__(self, text):
            self.text = text

    class Parsed:
        def __init__(self, caption):
            self.noun_chunks = [Chunk(w) for w in caption.split() if w[0].isupper()]

    monkeypatch.setattr(pacl, "_PARSER", Parsed)
    captions = ["A Red Cube left", "A Blue Ball", "no nouns here"]
    draws = [[0.2, 0.6, 0.1], [0.7, 0.0, 0.0], [0.1, 0.5, 0.5]]
    assert pacl.noun_phrase_captions(captions, draws) == ["a picture of red.", "A Blue Ball", "no nouns here"]
    assert pacl.noun_phrase_captions(captions[:1], [[0.0, 0.99, 0.99]]) == ["a good photo of cube."]


def test_the_presets_resolve():
    cfg = PRESETS["pacl-clip-vit-b"][1]
    cfg.validate()
    assert isinstance(cfg.method, PaclConfig) and not cfg.method.own_caption and cfg.method.weighting == "softmax"
    assert (cfg.optim.lr, cfg.optim.betas, cfg.optim.eps, cfg.optim.weight_decay) == (5e-4, (0.9, 0.98), 1e-6, 0.2)
    assert cfg.optim.epochs == 10 and str(cfg.data.train) == "shards/coco/train"


# ---------------------------------------------------------------- through the trainer


def pacl_args(shards, out, *extra) -> list[str]:
    return args(shards, out, "--optim.epochs", 2, "--run.checkpoint-every", 5, *extra, preset="pacl-tiny")


@pytest.fixture(scope="module")
def pacl_run(align_shards, tmp_path_factory):
    """An uninterrupted 2-epoch pacl-tiny run (16 updates of 16 captioned images), checkpoints every 5."""
    out = tmp_path_factory.mktemp("pacl")
    assert main(pacl_args(align_shards, out)) == 0
    return out / "pacl-tiny"


def test_a_pacl_run_learns_and_resumes_after_a_kill_onto_the_same_curve(pacl_run, align_shards, tmp_path, monkeypatch):
    """The loss falls from its start; killed inside update 12, the rerun resumes from update 10
    and ends on the uninterrupted curve with the same embedder and temperature, bit for bit; the
    checkpoint holds only the trainable part."""
    lines = [line[1] for line in curve(pacl_run) if line[1] is not None]
    assert len(lines) == 16 and sum(lines[-4:]) / 4 < lines[0]
    kill_on_call(monkeypatch, loop, "train_step", 12)
    with pytest.raises(Killed):
        main(pacl_args(align_shards, tmp_path))
    monkeypatch.undo()
    assert main(pacl_args(align_shards, tmp_path)) == 0
    assert curve(tmp_path / "pacl-tiny") == curve(pacl_run)
    a, b = (
        torch.load(r / "ckpt-00000016.pt", weights_only=True)["objective"] for r in (tmp_path / "pacl-tiny", pacl_run)
    )
    assert a.keys() == b.keys() and all(k.startswith("trainable.") for k in b if k != "tower_sums")
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert b["trainable.logit_scale"] != torch.tensor(1 / 0.07).log()  # the temperature learns


def test_two_ranks_equal_one_rank_with_the_same_global_batch(pacl_run, align_shards, tmp_path):
    """2 gloo ranks of 8: every rank's captions are every image's negatives (texts gathered, the
    score rows gathered with their gradient), so the curve is the 1-rank run's of 16."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", "-m"]
    argv = pacl_args(align_shards, tmp_path, "--run.name", "pacl-tiny", "--data.batch-size", 8)
    two = subprocess.run([*torchrun, "fastloc.align", *argv], capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert_same_curve(pacl_run, tmp_path / "pacl-tiny", rel=1e-4)


def test_the_compiled_step_equals_the_eager_step(pacl_run, align_shards, tmp_path):
    assert main(pacl_args(align_shards, tmp_path, "--system.compile")) == 0
    a, b = curve(pacl_run), curve(tmp_path / "pacl-tiny")
    assert len(a) == len(b) == 18
    for x, y in zip(a, b):
        for u, v in zip(x[1:], y[1:]):
            assert (u is None) == (v is None) and (u is None or u == pytest.approx(v, rel=1e-4))


# ---------------------------------------------------------------- the zero-shot readout


def test_the_zero_shot_readout_is_the_compatibility_the_embedder_was_trained_with():
    """patch_logits (the harness's clip readout with the embedder as the tower's head) equals
    cos(e_v(token), t) as the objective computes it in training, patch by patch (row-major)."""
    from fastloc.align.pacl_ops import compatibility
    from fastloc.probe.zeroshot.pacl import patch_logits

    torch.manual_seed(3)
    objective = Pacl(PaclConfig(backbone="tiny", weights="random")).eval()
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    texts = torch.randn(5, 96)
    with torch.no_grad():
        expected = compatibility(objective.embedder()(objective.vision(images)), texts)  # [B, T, P]
    vision = objective.vision
    normalised = (images.float() - vision.mean) / vision.std
    got = patch_logits(objective.encoder().eval(), objective.embedder(), normalised, texts)  # [B, T, 8, 8]
    torch.testing.assert_close(got.flatten(2), expected, rtol=1e-4, atol=1e-5)
    # the harness reads it out through its plain clip readout (whole image: one window, upsampled)
    from fastloc.probe.zeroshot.pacl import with_embedder
    from fastloc.probe.zeroshot.segment import window_logits

    model = with_embedder(objective.encoder().eval(), objective.embedder())
    whole = window_logits(model, normalised[0], F.normalize(texts, dim=-1), None, "clip")  # [T, 64, 64]
    upsampled = F.interpolate(got[:1], size=(64, 64), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(whole, upsampled, rtol=1e-4, atol=1e-5)


def test_export_writes_the_embedder_beside_the_tower_and_zeroshot_reads_it_out(pacl_run, align_shards, tmp_path):
    """python -m fastloc.align export of a frozen-tower run: the tower rebuilt from the run's weights
    and seed (checked against the sums in the checkpoint) and ENC.embedder.safetensors, the trained
    embedder exactly; python -m fastloc.probe zeroshot finds that file beside the encoder (--head
    auto) and scores the plain clip readout with it."""
    from fastloc.models.exported import load_exported
    from fastloc.probe.__main__ import main as probe
    from fastloc.probe.zeroshot.pacl import is_embedder, load_embedder

    encoder = tmp_path / "enc.safetensors"
    assert main(["export", str(pacl_run), "--out", str(encoder)]) == 0
    embedder = tmp_path / "enc.embedder.safetensors"
    assert is_embedder(embedder) and not is_embedder(encoder) and not is_embedder(pacl_run / "best.pt")
    state = torch.load(pacl_run / "best.pt", weights_only=True)["objective"]
    for name, value in load_embedder(embedder).state_dict().items():
        assert torch.equal(value, state[f"trainable.embedder.{name}"])
    torch.manual_seed(0)  # the preset's --run.seed: the frozen random tower the run trained on
    tower = Pacl(PRESETS["pacl-tiny"][1].method).vision.model.state_dict()
    exported = load_exported(encoder).state_dict()
    assert all(torch.equal(exported[k], v) for k, v in tower.items() if k in exported)
    out = tmp_path / "zs"
    paths = ["--out", str(out / "runs"), "--results", str(out / "results"), "--cache-dir", str(out / "cache")]
    small = ["--short-side", "64", "--window", "32", "16", "--pamr", "off", "--device", "cpu", "--precision", "fp32"]
    argv = ["zeroshot", str(align_shards), "--backbone", str(encoder), "--readout", "clip"]  # --head auto: beside it
    assert probe([*argv, "--text-weights", "random", "--max-images", "2", "--pictures", "0", *small, *paths]) == 0
    (run,) = (out / "runs").iterdir()
    result = json.loads((run / "result.json").read_text())
    assert result["protocol"]["projection"] == str(embedder) and result["protocol"]["readout"] == "clip"
    assert 0 <= result["selected"]["miou"] <= 1
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(1)}, str(plain))
    with pytest.raises(ValueError, match="not a PACL embedder"):
        load_embedder(plain)
