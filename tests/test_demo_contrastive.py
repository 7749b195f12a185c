"""The demo's contrastive image-text training (``fastloc.demo.contrastive``) on a small captioned
synthetic set: the loss falls, both saved towers load back to the trained modules' outputs, captions
are retrieved above chance after training; a set without captions and towers of different widths
are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fastloc.demo.contrastive as contrastive_module
from fastloc.data.shards import ShardError
from fastloc.demo.contrastive import (
    ContrastiveConfig,
    clip_loss,
    contrastive,
    first_captions,
    image_embeddings,
    retrieval_accuracy,
    text_embeddings,
)
from fastloc.demo.pretrain import save_weights, train_loader
from fastloc.models.registry import create_model, image_config
from fastloc.models.text import TINY_CFG, load_text_tower

CPU = torch.device("cpu")
EPOCHS = 10  # 64 images, batch 32: 20 updates
RUN = {"epochs": EPOCHS, "lr": 1e-3, "warmup_updates": 2, "workers": 0}


def shard_set(out: Path, count: int, captions: bool = True) -> Path:
    from fastloc.shard.convert import convert
    from fastloc.shard.sources.synthetic import SyntheticConfig

    convert(
        SyntheticConfig(
            out=out,
            num_samples=count,
            difficulty="demo",
            min_size=64,
            max_size=96,
            captions=captions,
            processes=1,
            progress=False,
            fsync=False,
        )
    )
    return out / "synthetic" / "train"


@pytest.fixture(scope="module")
def start(tmp_path_factory) -> tuple[Path, Path]:
    """64 captioned images and a random tiny ViT's weights (the image tower's start)."""
    root = tmp_path_factory.mktemp("contrastive")
    torch.manual_seed(1)
    weights = root / "init.safetensors"
    save_weights(create_model("tiny", "random"), weights)
    return shard_set(root / "data", 64), weights


@pytest.fixture(scope="module")
def trained(start, tmp_path_factory):
    """A run (avg pool: from a random ViT the class token learns too slowly for 20 updates); the
    towers as trained, caught on their way to ``save_towers``."""
    train, weights = start
    out = tmp_path_factory.mktemp("run")
    caught = {}

    def save_towers(model, tower, out_image, out_text):
        caught.update(model=model, tower=tower)
        save(model, tower, out_image, out_text)

    save = contrastive_module.save_towers
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(contrastive_module, "save_towers", save_towers)
        cfg = ContrastiveConfig(pool="avg", **RUN)
        result = contrastive(cfg, train, weights, out / "image.safetensors", out / "text.safetensors", CPU)
    return cfg, out, result, caught["model"].eval(), caught["tower"].eval()


def first_batch(train: Path, model) -> tuple[torch.Tensor, list[str]]:
    loader = train_loader(train, image_config(model), CPU, batch_size=32, seed=0, workers=0, captions=True)
    batch = next(iter(loader))
    loader.close()
    return batch.images, first_captions(batch)


@torch.no_grad()
def retrieval(model, tower, tokenizer, images, captions, pool) -> float:
    texts = text_embeddings(tower, tokenizer(captions))
    _, logits = clip_loss(image_embeddings(model, images, pool), texts, torch.zeros(()))
    return float(retrieval_accuracy(logits, captions))


def test_the_image_embedding_is_the_pooled_output_after_the_final_norm(start):
    """token: the class token; avg: the mean of the patch tokens (not the class token); both after
    the final norm, L2-normalised."""
    model = create_model("tiny", start[1]).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = model.forward_features(images)  # [B, 1 + N, D], after model.norm
        token, avg = (image_embeddings(model, images, pool) for pool in ("token", "avg"))
    assert tokens.shape == (2, 1 + 64, 96)
    assert torch.allclose(token, F.normalize(tokens[:, 0], dim=-1), atol=1e-6)
    assert torch.allclose(avg, F.normalize(tokens[:, 1:].mean(1), dim=-1), atol=1e-6)


def test_the_loss_falls(trained):
    result = trained[2]
    losses = result["loss_per_epoch"]
    assert len(losses) == EPOCHS and result["updates"] == 2 * EPOCHS
    assert losses[-1] < losses[0] - 0.4, losses  # measured: 3.98 -> 2.53
    assert 1 <= result["logit_scale"] <= 100 and result["embed_dim"] == 96
    assert result["retrieval_per_epoch"][-1] > result["retrieval_per_epoch"][0]


def test_the_saved_towers_are_the_trained_ones(trained, start):
    _, out, result, model, tower = trained
    images, captions = first_batch(start[0], model)
    image = create_model("tiny", out / "image.safetensors").eval()
    text, tokenizer = load_text_tower("tiny", out / "text.safetensors")
    tokens = tokenizer(captions)
    with torch.no_grad():
        assert torch.equal(image.forward_features(images), model.forward_features(images))
        assert torch.equal(text.encode_text(tokens), tower.encode_text(tokens))
    assert text.logit_scale.exp().item() == pytest.approx(result["logit_scale"])


def test_captions_are_retrieved_above_chance_after_training(trained, start):
    """Image->caption top-1 over a training batch of 32 (chance 1/32): the trained towers against
    the untrained start (the random ViT, a random text tower)."""
    cfg, _, _, model, tower = trained
    images, captions = first_batch(start[0], model)
    _, tokenizer = load_text_tower("tiny", "random")
    after = retrieval(model, tower, tokenizer, images, captions, cfg.pool)
    torch.manual_seed(cfg.seed)
    untrained, _ = load_text_tower("tiny", "random")
    before = retrieval(create_model("tiny", start[1]).eval(), untrained, tokenizer, images, captions, cfg.pool)
    assert after >= 0.15 and after > before + 0.1, (before, after)  # measured: 0.06 before, 0.31 after


def test_a_set_without_captions_is_refused(tmp_path, start):
    train = shard_set(tmp_path / "data", 8, captions=False)
    out = tmp_path / "out"
    with pytest.raises(ShardError) as caught:
        contrastive(ContrastiveConfig(**RUN), train, start[1], out / "image.safetensors", out / "text.safetensors", CPU)
    message = str(caught.value)
    assert "\n" not in message and str(train) in message and "no txt" in message
    assert not out.exists()


def test_towers_of_different_widths_are_refused(tmp_path, start, monkeypatch):
    monkeypatch.setitem(TINY_CFG, "embed_dim", 64)
    with pytest.raises(ValueError, match=r"width \(96\).*width \(64\) differ"):
        contrastive(
            ContrastiveConfig(**RUN), start[0], start[1], tmp_path / "i.safetensors", tmp_path / "t.safetensors", CPU
        )
    assert not list(tmp_path.iterdir())
