"""Hummingbird in-context retrieval (fastloc.probe.dense.hummingbird): the bank's label
distributions and sampling against hand-made maps and a transcription of the reference's loops,
the seeded colour jitter (the bank recipe's), the matching, and the CLI end to end on the tiny VOC."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from fastloc.data.transforms import sample_rng
from fastloc.probe.dense.config import HummingbirdConfig
from fastloc.probe.dense.data import VOID, LabelSpace, dense_backbone, eval_split, open_dense_data
from fastloc.probe.dense.hummingbird import (
    CROP,
    EMPTY_SCORE,
    Bank,
    build_bank,
    colour_jitter,
    kept_slots,
    matched_counts,
    patch_distributions,
    sample_patches,
    samples_per_image,
    transfer_counts,
)
from fastloc.probe.dense.metrics import SegCounts, mean_iou

X = VOID


# --- The bank's labels ------------------------------------------------------------------------------------------


def hand_map() -> torch.Tensor:
    """4 x 4 pixels, 2 x 2 patches of 2 x 2 (row-major): a mixed patch with void, a 1/2 patch, a pure 2
    patch, an all-void patch."""
    return torch.tensor([[[0, 1, 1, 1], [0, X, 1, 2], [2, 2, X, X], [2, 2, X, X]]])


def test_patch_distributions_count_void_as_background():
    dist = patch_distributions(hand_map(), 2, 3, "background")
    want = [[0.75, 0.25, 0.0], [0.0, 0.75, 0.25], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]
    assert dist.shape == (1, 4, 3)
    torch.testing.assert_close(dist[0], torch.tensor(want))


def test_patch_distributions_leave_void_out_with_bank_void_ignore():
    dist = patch_distributions(hand_map(), 2, 3, "ignore")
    want = [[2 / 3, 1 / 3, 0.0], [0.0, 0.75, 0.25], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]
    torch.testing.assert_close(dist[0], torch.tensor(want))


def reference_sample(gt: torch.Tensor, num_classes: int, count: int, uniform: torch.Tensor) -> torch.Tensor:
    """hbird_eval.py's get_class_frequency, get_patch_scores and sample_features for one image:
    gt [N, p * p] pixel labels per patch, uniform [N]."""
    frequency = torch.zeros(num_classes)
    for patch in gt:
        frequency[patch.unique()] += 1
    scores, nonzero = torch.zeros(len(gt)), torch.zeros(len(gt), dtype=torch.bool)
    for j, patch in enumerate(gt):
        classes = patch.unique()
        scores[j], nonzero[j] = frequency[classes].sum(), len(classes) > 0
    scores[~nonzero] = 1e6
    scores[nonzero] *= uniform[nonzero]
    return torch.topk(scores, count, largest=False).indices


def test_sampling_equals_the_references_loops():
    g = torch.Generator().manual_seed(0)
    B, C, p, grid, count = 3, 5, 2, 4, 6
    labels = torch.randint(0, C, (B, grid * p, grid * p), generator=g)
    labels[0, :4] = 0  # a common background
    uniform = torch.rand(B, grid * grid, generator=g)
    got = sample_patches(patch_distributions(labels, p, C), count, uniform)
    assert got.shape == (B, count)
    for b in range(B):
        gt = labels[b].view(grid, p, grid, p).permute(0, 2, 1, 3).reshape(grid * grid, p * p)
        assert got[b].tolist() == reference_sample(gt, C, count, uniform[b]).tolist()


def test_sampling_takes_the_rare_class_patches_first():
    # 8 x 8 pixels, 4 x 4 patches of 2 x 2; class 1 in one patch, class 2 in two, the rest background
    labels = torch.zeros(2, 8, 8, dtype=torch.int64)
    labels[:, 0:2, 0:2] = 1  # patch 0: only class 1
    labels[:, 6:8, 4:8] = 2  # patches 14, 15: only class 2
    labels[1, 2, 2] = 1  # image 1: patch 5 holds 1 and background
    dist = patch_distributions(labels, 2, 3)
    flat = torch.ones(2, 16)  # no randomness: the scores alone decide
    chosen = sample_patches(dist, 3, flat)
    assert chosen.shape == (2, 3)
    assert sorted(chosen[0].tolist()) == [0, 14, 15] and chosen[0, 0] == 0  # class frequency 1, 2, 2 (background: 13)
    # image 1: class 1 is in 2 patches; patch 5 scores 2 + 12 and comes after every pure background patch
    assert sorted(chosen[1].tolist()) == [0, 14, 15]
    order = sample_patches(dist, 16, flat)[1].tolist()
    assert order[-1] == 5
    # at random, the class-1 patch is picked first far more often than any background patch
    uniform = torch.rand(2000, 16, generator=torch.Generator().manual_seed(1))
    picks = torch.bincount(sample_patches(dist[:1].expand(2000, -1, -1), 1, uniform)[:, 0], minlength=16)
    background = torch.ones(16, dtype=torch.bool)
    background[[0, 14, 15]] = False
    assert picks[0] > picks[14] > 3 * picks[background].max() and picks[0] > picks[15] > 3 * picks[background].max()


def test_sampling_takes_an_all_void_patch_last():
    dist = patch_distributions(hand_map(), 2, 3, "ignore")  # patch 3: no class
    uniform = torch.rand(50, 4, generator=torch.Generator().manual_seed(2))
    chosen = sample_patches(dist.expand(50, -1, -1), 3, uniform)
    assert not (chosen == 3).any()
    assert EMPTY_SCORE > 1e5


def test_samples_per_image_floors_and_refuses_an_empty_or_oversized_share():
    assert samples_per_image(0, 16, 1, 64) == 64
    assert samples_per_image(500, 16, 1, 64) == 31  # memory_size // (images x epochs)
    assert samples_per_image(500, 8, 2, 64) == 31
    with pytest.raises(ValueError):
        samples_per_image(10, 16, 1, 64)
    with pytest.raises(ValueError):
        samples_per_image(10_000, 16, 1, 64)


def test_kept_slots_leave_out_repeats_and_images_past_the_limit():
    seen = np.zeros(5, dtype=bool)
    assert kept_slots(np.array([0, 1, 2]), seen).tolist() == [0, 1, 2]
    assert kept_slots(np.array([3, 4, 5, 6]), seen).tolist() == [0, 1]  # 5, 6: past train_images
    assert kept_slots(np.array([0, 1, 4]), seen).tolist() == []  # an epoch's cycled repeats
    assert kept_slots(np.array([7, 7]), np.zeros(8, dtype=bool)).tolist() == [0]


# --- Colour jitter ----------------------------------------------------------------------------------------------


def images(n: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def draw_jitter(seed: int, epoch: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(applied [count, 4], factors [count, 4]) of the bank recipe's draws for samples 0..count-1
    of a 40 x 50 image, as the loaders draw them (``sample_rng``)."""
    draws = [CROP.draw(sample_rng(seed, epoch, i), 40, 50) for i in range(count)]
    return torch.tensor([d.applied for d in draws]), torch.tensor([d.factors for d in draws], dtype=torch.float64)


def test_jitter_draws_are_seeded_and_within_colorjitters_ranges():
    a, b = draw_jitter(0, 0, 4000), draw_jitter(0, 0, 4000)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    other = draw_jitter(0, 1, 4000)
    assert not torch.equal(a[1], other[1])
    applied, factors = a
    assert ((factors[:, :3] >= 0.9) & (factors[:, :3] <= 1.1)).all()
    assert ((factors[:, 3] >= -0.1) & (factors[:, 3] <= 0.1)).all()
    assert applied.float().mean(0).tolist() == pytest.approx([0.5] * 4, abs=0.04)


def test_jitter_is_the_identity_when_nothing_is_drawn():
    x = images()
    off = torch.zeros(len(x), 4, dtype=torch.bool)
    factors = draw_jitter(3, 0, len(x))[1]
    assert torch.equal(colour_jitter(x, off, factors), x)
    neutral = torch.tensor([[1.0, 1.0, 1.0, 0.0]] * len(x), dtype=torch.float64)
    assert torch.equal(colour_jitter(x, torch.ones(len(x), 4, dtype=torch.bool), neutral), x)


def test_jitter_applies_the_drawn_ops_in_order():
    x = images(2)
    applied = torch.tensor([[True, False, True, False], [False, True, False, True]])
    factors = torch.tensor([[1.08, 0.93, 0.91, 0.05], [0.95, 1.07, 1.02, -0.06]], dtype=torch.float64)
    out = colour_jitter(x, applied, factors)
    assert torch.equal(out[0], TF.adjust_saturation(TF.adjust_brightness(x[0], 1.08), 0.91))
    assert torch.equal(out[1], TF.adjust_hue(TF.adjust_contrast(x[1], 1.07), -0.06))
    same = colour_jitter(x, *draw_jitter(5, 0, 2))
    assert torch.equal(same, colour_jitter(x, *draw_jitter(5, 0, 2)))
    assert not torch.equal(same, x)


# --- Matching ---------------------------------------------------------------------------------------------------


def test_hungarian_matching_scores_a_permuted_perfect_prediction_one():
    target = torch.randint(0, 4, (2, 8, 8), generator=torch.Generator().manual_seed(0))
    target[0, 0] = VOID
    permutation = torch.tensor([2, 3, 1, 0])  # no class kept
    counts = SegCounts(4, ignore=VOID)
    counts.update(permutation[target.clamp(min=0)], target)
    matrix = counts.checked_counts()
    assert mean_iou(matched_counts(matrix, "hungarian")) == pytest.approx(1.0)
    assert mean_iou(matched_counts(matrix, "none")) == 0.0


# --- End to end -------------------------------------------------------------------------------------------------


def args(voc: Path, tmp: Path, memory: int, name: str) -> list[str]:
    return [
        "hummingbird",
        str(voc),
        "--train-split", "trainaug",
        "--backbone", "tiny",
        "--weights", "random",
        "--image-size", "64",
        "--memory-size", str(memory),
        "--eval-batch-size", "5",
        "--device", "cpu",
        "--loader", "cpu",
        "--workers", "0",
        "--cache-dir", str(tmp / "cache"),
        "--out", str(tmp / "runs"),
        "--results", str(tmp / "results"),
        "--name", name,
    ]  # fmt: skip


def shuffled_baseline(cfg: HummingbirdConfig) -> tuple[float, float]:
    """(mIoU of the bank, mIoU of the same bank with its labels shuffled over its rows), in process."""
    device = torch.device("cpu")
    torch.manual_seed(cfg.seed)  # run()'s order: the same random weights
    data = open_dense_data(cfg)
    labels = LabelSpace.of(data, cfg.zero_is_ignore)
    backbone = dense_backbone(cfg, device)
    bank = build_bank(cfg, data.train, backbone, labels, device, main=False)
    cache = eval_split(cfg, data.val, backbone, device, main=False)
    permutation = torch.randperm(bank.size, generator=torch.Generator().manual_seed(0))
    shuffled = replace(bank, labels=bank.labels[permutation])
    scores = []
    for b in (bank, shuffled):
        counts = transfer_counts(cfg, cache, b, labels, backbone.image.grid, device, main=False).checked_counts()
        scores.append(mean_iou(matched_counts(counts, cfg.matching)))
    return scores[0], scores[1]


def tiny(voc, **kw) -> HummingbirdConfig:
    """The tiny ViT at 64 px on the small VOC's trainaug, every patch in the bank, on the CPU."""
    common = {"train_split": "trainaug", "backbone": "tiny", "weights": "random", "image_size": 64}
    return HummingbirdConfig(data=voc, memory_size=0, device="cpu", loader="cpu", workers=0, **common, **kw)


def test_cli_end_to_end_beats_a_bank_with_shuffled_labels(voc, tmp_path):
    from fastloc.probe.__main__ import main

    for memory, name in ((0, "all"), (500, "sampled")):
        assert main(args(voc, tmp_path, memory, name)) == 0
    results = {n: json.loads((tmp_path / "runs" / n / "result.json").read_text()) for n in ("all", "sampled")}
    rows = (tmp_path / "results" / "dense-hummingbird-voc.csv").read_text().splitlines()
    assert len(rows) == 1 + 4  # header, then miou and pixel_accuracy per run
    assert results["all"]["protocol"]["bank_size"] == 16 * 64  # every patch of the 16 trainaug images
    assert results["sampled"]["protocol"]["samples_per_image"] == 31
    assert results["sampled"]["protocol"]["bank_size"] == 16 * 31
    for result in results.values():
        assert result["protocol"]["name"] == "hummingbird" and result["protocol"]["matching"] == "hungarian"
        assert len(result["per_class_iou"]["miou"]) == 21
        assert 0 <= result["selected"]["pixel_accuracy"] <= 1
    cfg = tiny(voc, eval_batch_size=5, cache_dir=tmp_path / "cache")
    real, shuffled = shuffled_baseline(cfg)
    assert real == pytest.approx(results["all"]["selected"]["miou"], abs=1e-6)  # the same bank as the CLI's
    assert real > shuffled + 0.25 and results["sampled"]["selected"]["miou"] > shuffled + 0.25


def test_a_seed_gives_one_bank_and_train_images_takes_the_first(voc, tmp_path):
    cfg = tiny(voc, eval_batch_size=3, train_images=5, augmentation_epochs=2)
    device = torch.device("cpu")
    data = open_dense_data(cfg)
    labels = LabelSpace.of(data, False)
    torch.manual_seed(0)
    backbone = dense_backbone(cfg, device)
    banks = [build_bank(cfg, data.train, backbone, labels, device, main=False) for _ in range(2)]
    assert isinstance(banks[0], Bank) and banks[0].size == 5 * 2 * 64 and banks[0].images == 5
    assert torch.equal(banks[0].features, banks[1].features) and torch.equal(banks[0].labels, banks[1].labels)
    epochs = banks[0].features.view(2, 5 * 64, -1)
    assert not torch.equal(epochs[0], epochs[1])  # each pass augments afresh
    assert torch.allclose(banks[0].features.float().norm(dim=1), torch.ones(banks[0].size), atol=1e-2)
    assert torch.allclose(banks[0].labels.sum(1), torch.ones(banks[0].size))  # void counted as background
    other = build_bank(replace(cfg, seed=1), data.train, backbone, labels, device, main=False)
    assert not torch.equal(other.features, banks[0].features)


def test_the_banks_recipe_jitters_the_crop_it_draws(voc):
    """The bank's loader yields RandomResizedCrop's pixels (the same recipe without jitter gives the
    same labels) jittered by the draws that follow the crop's in each sample's ``sample_rng``."""
    from PIL import Image

    from fastloc.data.config import SOLO, LoaderConfig
    from fastloc.data.loader import make_loader
    from fastloc.data.recipes import Rrc

    fields = {f: getattr(CROP, f) for f in ("scale", "ratio", "flip_p", "interpolations")}
    cfg = LoaderConfig(shards=voc / "train", batch_size=4, size=32, normalize=False, loader="cpu", workers=0)
    batches = []
    for recipe in (CROP, Rrc(**fields)):
        loader = make_loader(replace(cfg, recipe=recipe, seed=3), SOLO)
        batches.append(next(iter(loader)))
        loader.close()
    jittered, plain = batches
    assert torch.equal(jittered.labels, plain.labels) and not torch.equal(jittered.images, plain.images)
    sizes = [Image.open(voc.parent.parent / "VOC2012" / "JPEGImages" / f"{key}.jpg").size for key in plain.keys]
    draws = [CROP.draw(sample_rng(3, 0, int(g)), h, w) for g, (w, h) in zip(plain.index, sizes)]
    applied = torch.tensor([d.applied for d in draws])
    expected = colour_jitter(plain.images, applied, torch.tensor([d.factors for d in draws], dtype=torch.float64))
    assert torch.equal(jittered.images, expected)
