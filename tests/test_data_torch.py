"""The torch loader and the semantics it shares with the DALI loader (fastloc/data/order.py,
transforms.py): recipes against their references (timm, torchvision, PIL), image/label alignment,
order, ranks, resumption, corrupt and truncated shards."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from loader_data import PALETTE, block_sample, run_epochs, same_batches, write_set
from fastloc.data.config import LoaderConfig, TrainRecipe
from fastloc.data.order import (
    EpochPlan,
    ShardError,
    SkippedSampleWarning,
    batches_per_epoch,
    epoch_indices,
    epoch_order,
    open_shards,
)  # fmt: skip
from fastloc.data.torch_loader import TorchLoader, decode_image
from fastloc.data.transforms import (
    RkrcDraw,
    RrcDraw,
    apply_eval,
    apply_rkrc,
    apply_rrc,
    center_crop_or_pad,
    draw_rkrc,
    draw_rrc,
    largest_center_square,
    normalize,
    pil_nearest_indices,
    resize_label,
    rkrc_size,
    sample_rng,
)  # fmt: skip
from fastloc.shard.encode import encode_jpeg

S = 32  # output side of every loader test


# ---------------------------------------------------------------- data


def coordinate_sample(rng: np.random.Generator, i: int) -> tuple[str, np.ndarray, np.ndarray, int]:
    """Random pixels; the label of pixel (y, x) is y * W + x, so its value says where it came from."""
    h, w = (int(v) for v in rng.integers(20, 60, size=2))
    pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    return f"coords_{i:04d}", pixels, np.arange(h * w).reshape(h, w).astype(np.uint16), 0


def load_all(cfg: LoaderConfig, epochs: int = 1) -> list:
    return run_epochs(TorchLoader(cfg), epochs)


# ---------------------------------------------------------------- geometry against the references


def test_label_resize_is_pil_nearest():
    for h, w, out_h, out_w in [(36, 79, 33, 33), (288, 298, 33, 50), (5, 7, 32, 32), (224, 224, 224, 100), (301, 97, 37, 518)]:
        label = np.arange(h * w, dtype=np.int32).reshape(h, w)
        pil = np.asarray(Image.fromarray(label, mode="I").resize((out_w, out_h), Image.Resampling.NEAREST))
        assert np.array_equal(resize_label(label, out_h, out_w), pil)
        small = (label % 251).astype(np.uint8)  # the uint8 (mode L) path takes the same pixels
        pil8 = np.asarray(Image.fromarray(small).resize((out_w, out_h), Image.Resampling.NEAREST))
        assert np.array_equal(resize_label(small, out_h, out_w), pil8)
    # why the tables: at exact ties PIL's accumulated coordinate differs from torch nearest-exact
    exact = torch.nn.functional.interpolate(torch.arange(36.0)[None, None], size=33, mode="nearest-exact")
    assert not np.array_equal(exact[0, 0].long().numpy(), pil_nearest_indices(36, 33))


def test_rkrc_size_and_crop_match_timm(monkeypatch):
    import timm.data.transforms as tt

    rng = np.random.default_rng(0)
    for _ in range(300):
        h, w, size = (int(v) for v in rng.integers(8, 300, 3))
        u, log_a = float(rng.uniform(0.08, 1.0)), float(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        draws = iter([u, log_a])  # timm draws uniform(scale) first, then uniform(log ratio)
        monkeypatch.setattr(tt, "random", type("R", (), {"random": staticmethod(lambda: 0.0),
                            "uniform": staticmethod(lambda lo, hi, d=draws: next(d))}))  # fmt: skip
        img = Image.new("RGB", (w, h))
        timm_size = tt.ResizeKeepRatio.get_params(img, (size, size), 0.0, 1.0, (0.08, 1.0), True, 1.0, (3 / 4, 4 / 3))
        f, s = 1.0 / math.sqrt(u), math.sqrt(math.exp(log_a))
        assert list(rkrc_size(h, w, size, f / s, f * s)) == timm_size
    for h, w in [(30, 40), (31, 32), (32, 29), (33, 35), (29, 29)]:
        label = np.arange(h * w, dtype=np.int32).reshape(h, w)
        ours = center_crop_or_pad(h, w, S)
        padded = np.pad(label, ((ours.pad_top, ours.pad_bottom), (ours.pad_left, ours.pad_right)), mode="reflect")
        theirs = np.asarray(tt.center_crop_or_pad(Image.fromarray(label, mode="I"), S, padding_mode="reflect"))
        assert np.array_equal(padded[ours.top : ours.top + S, ours.left : ours.left + S], theirs)


@pytest.mark.parametrize("draw", [RkrcDraw(1.0, 1.0, "bilinear", False), RkrcDraw(2.7, 2.7, "bicubic", True),
                                  RkrcDraw(1.0 / 1.12, 1.12, "bilinear", True), RkrcDraw(1.3 * 1.1, 1.3 / 1.1, "bicubic", False)])  # fmt: skip
def test_rkrc_pixels_match_timm(draw):
    """Image and label go through timm's exact PIL pipeline (ResizeKeepRatio's resize, reflect
    CenterCropOrPad, flip), the label with NEAREST; the third case pads the height."""
    import timm.data.transforms as tt
    from torchvision.transforms import functional as F

    rng = np.random.default_rng(1)
    for h, w in [(40, 50), (45, 37), (100, 33)]:
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        label = np.arange(h * w, dtype=np.int32).reshape(h, w)
        image_t, label_t = apply_rkrc(Image.fromarray(pixels), label, S, draw)
        rh, rw = rkrc_size(h, w, S, draw.f_h, draw.f_w)
        expected = []
        for im, interp in [(Image.fromarray(pixels), draw.interpolation), (Image.fromarray(label, mode="I"), "nearest")]:
            im = F.resize(im, [rh, rw], F.InterpolationMode(interp))
            im = tt.center_crop_or_pad(im, S, padding_mode="reflect")
            expected.append(np.asarray(F.hflip(im) if draw.flip else im))
        assert np.array_equal(image_t.permute(1, 2, 0).numpy(), expected[0])
        assert np.array_equal(label_t.numpy(), expected[1])


def test_rrc_matches_torchvision_resized_crop():
    from torchvision.transforms import functional as F

    rng = np.random.default_rng(2)
    recipe = TrainRecipe(kind="rrc")
    for h, w in [(40, 50), (60, 25), (33, 33)]:
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        label = np.arange(h * w, dtype=np.int32).reshape(h, w)
        d = draw_rrc(sample_rng(0, 0, h), h, w, recipe)
        assert 0 <= d.top and d.top + d.height <= h and 0 <= d.left and d.left + d.width <= w
        d = RrcDraw(d.top, d.left, d.height, d.width, "bicubic", False)
        image_t, label_t = apply_rrc(Image.fromarray(pixels), label, S, d)
        ref = F.resized_crop(Image.fromarray(pixels), d.top, d.left, d.height, d.width, [S, S], F.InterpolationMode.BICUBIC)
        ref_label = F.resized_crop(Image.fromarray(label, mode="I"), d.top, d.left, d.height, d.width, [S, S],
                                   F.InterpolationMode.NEAREST)  # fmt: skip
        assert np.array_equal(image_t.permute(1, 2, 0).numpy(), np.asarray(ref))
        assert np.array_equal(label_t.numpy(), np.asarray(ref_label))


def test_eval_matches_patchseg_reference():
    from torchvision.transforms import v2

    rng = np.random.default_rng(3)
    for h, w in [(40, 57), (57, 40), (32, 32), (101, 64)]:
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        label = np.arange(h * w).reshape(h, w).astype(np.uint16)
        image_t, label_t = apply_eval(Image.fromarray(pixels), label, S)
        top, left, m = largest_center_square(h, w)
        assert (top, left, m) == ((h - min(h, w)) // 2, (w - min(h, w)) // 2, min(h, w))
        crop = Image.fromarray(pixels).crop((left, top, left + m, top + m))
        assert np.array_equal(image_t.permute(1, 2, 0).numpy(), np.asarray(v2.Resize((S, S))(crop)))
        ref_label = Image.fromarray(label[top : top + m, left : left + m].astype(np.int32), mode="I")
        assert np.array_equal(label_t.numpy(), np.asarray(ref_label.resize((S, S), Image.Resampling.NEAREST)))
        assert label_t.dtype == torch.int64


def test_rkrc_draws_follow_the_recipe():
    recipe = TrainRecipe()
    draws = [draw_rkrc(sample_rng(0, 0, g), recipe) for g in range(2000)]
    zoom = np.array([math.sqrt(d.f_h * d.f_w) for d in draws])  # f (the aspect factor cancels)
    aspect = np.array([d.f_w / d.f_h for d in draws])  # s^2 = r
    assert 0.4 < np.mean(zoom > 1 + 1e-9) < 0.6 and zoom.max() <= 1 / math.sqrt(0.08) + 1e-9
    assert 0.4 < np.mean(np.abs(aspect - 1) > 1e-9) < 0.6 and 3 / 4 - 1e-9 <= aspect.min() and aspect.max() <= 4 / 3 + 1e-9
    assert 0.4 < np.mean([d.flip for d in draws]) < 0.6
    assert 0.4 < np.mean([d.interpolation == "bicubic" for d in draws]) < 0.6
    assert draw_rkrc(sample_rng(0, 0, 7), recipe) == draws[7] != draw_rkrc(sample_rng(0, 1, 7), recipe)


# ---------------------------------------------------------------- alignment through the loader


@pytest.mark.parametrize("kind", ["rkrc", "rrc"])
def test_train_labels_stay_aligned_with_pixels(tmp_path, kind):
    rng = np.random.default_rng(4)
    root = write_set(tmp_path / "blocks", [block_sample(rng, i) for i in range(24)], num_classes=len(PALETTE))
    cfg = LoaderConfig(shards=root, batch_size=8, size=S, recipe="train", train=TrainRecipe(kind=kind),
                       normalize=False, workers=0, seed=5)  # fmt: skip
    checked = 0
    for batch in load_all(cfg, epochs=3):
        labels = batch.labels[:, None].float()  # [B, 1, S, S]
        padded = torch.nn.functional.pad(labels, (2, 2, 2, 2), mode="replicate")
        hi = torch.nn.functional.max_pool2d(padded, 5, stride=1)
        lo = -torch.nn.functional.max_pool2d(-padded, 5, stride=1)
        interior = (hi == lo)[:, 0]  # [B, S, S]: 2 px away from any label edge
        interior[:, :2] = interior[:, -2:] = interior[:, :, :2] = interior[:, :, -2:] = False  # edges may lie just outside
        colours = batch.images.permute(0, 2, 3, 1).double()  # [B, S, S, 3]
        dist = torch.cdist(colours.reshape(-1, 3), torch.tensor(PALETTE, dtype=torch.float64))
        nearest = dist.argmin(1).reshape(batch.labels.shape)
        assert torch.equal(nearest[interior], batch.labels[interior])
        assert dist.min(1).values.reshape(batch.labels.shape)[interior].max() < 40
        checked += int(interior.sum())
    assert checked > 0.3 * 3 * 24 * S * S


def test_eval_label_geometry_is_exact_through_the_loader(tmp_path):
    rng = np.random.default_rng(5)
    samples = [coordinate_sample(rng, i) for i in range(9)]
    root = write_set(tmp_path / "coords", samples, num_classes=4096)  # > 256 classes: uint16 PNGs
    assert open_shards(root).manifest["label"]["dtype"] == "uint16"
    by_key = {key: (pixels, label) for key, pixels, label, _ in samples}
    cfg = LoaderConfig(shards=root, batch_size=4, size=S, recipe="eval", normalize=False, shuffle=False,
                       drop_last=False, workers=0)  # fmt: skip
    seen = []
    for batch in load_all(cfg):
        for key, image, label in zip(batch.keys, batch.images, batch.labels):
            pixels, source = by_key[key]
            h, w = source.shape
            top, left, m = largest_center_square(h, w)
            ys, xs = top + pil_nearest_indices(m, S), left + pil_nearest_indices(m, S)
            assert np.array_equal(label.numpy(), ys[:, None] * w + xs[None, :])
            jpg_pixels = decode_image(io.BytesIO(encode_jpeg(Image.fromarray(pixels), 95, True)).getvalue())
            assert torch.equal(image, apply_eval(jpg_pixels, None, S)[0])
            seen.append(key)
    assert seen == [s[0] for s in samples]  # shuffle=False: manifest order; drop_last=False: the short batch too


# ---------------------------------------------------------------- order, ranks, resumption


def test_reads_by_index_match_webdataset(synthetic):
    import webdataset as wds

    shards = open_shards(synthetic)
    tars = [str(t) for t in shards.tars]
    streamed = list(wds.WebDataset(tars, shardshuffle=False, empty_check=False))
    assert len(streamed) == shards.num_samples
    for g, sample in enumerate(streamed):
        _, key, data = shards.read(g, ("jpg", "seg.png", "cls"))
        assert key == sample["__key__"] and all(data[ext] == sample[ext] for ext in data)


def test_same_seed_same_batches_any_workers(synthetic):
    cfg = LoaderConfig(shards=synthetic, batch_size=8, size=S, workers=0, seed=3)
    first = load_all(cfg, epochs=2)
    assert same_batches(first, load_all(LoaderConfig(**{**cfg.__dict__, "workers": 2}), epochs=2))
    assert same_batches(first, load_all(cfg, epochs=2))
    keys = [b.keys for b in first]
    assert keys[:5] != keys[5:] and sorted(k for b in keys[:5] for k in b) == sorted(k for b in keys[5:] for k in b)  # new order, same samples
    other_seed = load_all(LoaderConfig(**{**cfg.__dict__, "seed": 4}))
    assert [b.keys for b in other_seed] != keys[:5]


@given(n=st.integers(0, 200), world=st.integers(1, 9), seed=st.integers(0, 5), epoch=st.integers(0, 3), shuffle=st.booleans())
@settings(max_examples=60, deadline=None)
def test_ranks_split_every_epoch_exactly_once(n, world, seed, epoch, shuffle):
    parts = [epoch_indices(n, seed, epoch, shuffle, r, world) for r in range(world)]
    assert all(len(p) == n // world for p in parts)
    taken = np.concatenate(parts)
    order = epoch_order(n, seed, epoch, shuffle)
    assert len(np.unique(taken)) == len(taken)
    assert set(taken.tolist()) == set(order[: (n // world) * world].tolist())  # the last n mod world are dropped


@pytest.mark.parametrize("drop_last", [True, False])
def test_rank_sharding_in_the_loader(synthetic, drop_last):
    world, per_rank = 3, 40 // 3  # 13 samples per rank; 1 of 40 dropped in each epoch
    keys_by_rank, counts = [], []
    for rank in range(world):
        cfg = LoaderConfig(shards=synthetic, batch_size=4, size=S, rank=rank, world_size=world, drop_last=drop_last,
                           workers=0, recipe="eval", seed=7)  # fmt: skip
        loader = TorchLoader(cfg)
        batches = list(loader)
        counts.append((len(loader), len(batches)))
        keys_by_rank.append([k for b in batches for k in b.keys])
    expected_batches = per_rank // 4 if drop_last else math.ceil(per_rank / 4)
    assert counts == [(expected_batches, expected_batches)] * world
    assert expected_batches == batches_per_epoch(40, 4, world, drop_last)
    every = [k for keys in keys_by_rank for k in keys]
    assert len(every) == len(set(every)) == (12 if drop_last else 13) * world
    if not drop_last:
        shards = open_shards(synthetic)
        dropped = int(epoch_order(40, 7, 0, True)[-1])
        all_keys = {shards.read(g, ("cls",))[1] for g in range(40)}
        assert set(every) == all_keys - {shards.read(dropped, ("cls",))[1]}


@pytest.mark.parametrize("stop", [2, 5, 7])  # mid-epoch, at the epoch boundary, in the second epoch
def test_resume_gives_the_uninterrupted_batches(synthetic, tmp_path, stop):
    cfg = LoaderConfig(shards=synthetic, batch_size=8, size=S, workers=0, seed=1)
    epochs = 2
    uninterrupted = load_all(cfg, epochs)  # 5 batches per epoch
    loader, got = TorchLoader(cfg), []
    for epoch in range(loader.epoch, epochs):
        loader.set_epoch(epoch)
        for batch in loader:
            got.append(batch)
            if len(got) == stop:
                break
        if len(got) == stop:
            break
    torch.save({"loader": loader.state_dict()}, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)["loader"]
    resumed = TorchLoader(LoaderConfig(**{**cfg.__dict__, "workers": 2}))
    resumed.load_state_dict(saved)
    for epoch in range(resumed.epoch, epochs):
        resumed.set_epoch(epoch)
        got += list(resumed)
    assert same_batches(got, uninterrupted)
    with pytest.raises(ValueError, match="batch_size"):
        TorchLoader(LoaderConfig(**{**cfg.__dict__, "batch_size": 4})).load_state_dict(saved)


def test_epoch_plan_batches():
    plan = EpochPlan(num_samples=23, batch_size=5, seed=0, rank=1, world_size=2, drop_last=False)
    batches = plan.batches(3)
    assert len(plan) == len(batches) == 3 and [len(b) for b in batches] == [5, 5, 1]
    assert np.array_equal(np.concatenate(batches), epoch_indices(23, 0, 3, True, 1, 2))
    assert [b.tolist() for b in plan.batches(3, start=2)] == [batches[2].tolist()]


# ---------------------------------------------------------------- damage


def _member(root: Path, shard: int, line: int, ext: str) -> tuple[Path, str, int, int]:
    """(tar, key, offset, size) of a member, from the index."""
    shards = open_shards(root)
    fields = shards.indexes[shard].read_text().splitlines()[1 + line].split()
    groups = [fields[i : i + 4] for i in range(0, len(fields), 4)]
    _, offset, size, name = next(g for g in groups if g[0] == ext)
    return shards.tars[shard], name.split(".")[0], int(offset), int(size)


def test_corrupt_sample_is_skipped_with_a_warning(synthetic_copy):
    tar, key, offset, size = _member(synthetic_copy, 2, 3, "jpg")
    with open(tar, "r+b") as f:  # same size: the shard still passes the construction checks
        f.seek(offset)
        f.write(b"\x00" * size)
    tar2, key2, offset2, _ = _member(synthetic_copy, 4, 0, "seg.png")
    with open(tar2, "r+b") as f:
        f.seek(offset2 + 20)  # inside the PNG header chunk: the CRC no longer matches
        f.write(b"\xff\xfe\xfd\xfc")
    cfg = LoaderConfig(shards=synthetic_copy, batch_size=8, size=S, shuffle=False, drop_last=False, workers=2)
    loader = TorchLoader(cfg)
    with pytest.warns(SkippedSampleWarning) as caught:
        batches = list(loader)
    messages = sorted(str(w.message) for w in caught if issubclass(w.category, SkippedSampleWarning))
    assert len(messages) == 2
    assert tar.name in messages[0] and key in messages[0] and "jpg" in messages[0]
    assert tar2.name in messages[1] and key2 in messages[1] and "seg.png" in messages[1]
    keys = [k for b in batches for k in b.keys]
    assert len(keys) == 38 and key not in keys and key2 not in keys
    assert [len(b) for b in batches] == [8, 8, 7, 7, 8]  # shard 2 line 3 = sample 17, shard 4 line 0 = 28
    assert loader.skipped == 2 and set(loader.skipped_samples) == {(tar.name, key), (tar2.name, key2)}
    list(loader)  # the next epoch meets them again: counted, not warned again
    assert loader.skipped == 4 and len(loader.skipped_samples) == 2


def test_truncated_or_missing_shard_is_an_error(synthetic_copy):
    shards = open_shards(synthetic_copy)
    tar, idx = shards.tars[3], shards.indexes[3]
    cfg = LoaderConfig(shards=synthetic_copy, batch_size=8, size=S, workers=0)
    data = tar.read_bytes()
    tar.write_bytes(data[:-3000])
    with pytest.raises(ShardError, match=f"{tar.name}.*truncated"):
        TorchLoader(cfg)
    tar.unlink()
    with pytest.raises(ShardError, match=f"{tar.name}.*missing"):
        TorchLoader(cfg)
    tar.write_bytes(data)
    idx.unlink()
    with pytest.raises(ShardError, match=f"{idx.name}.*missing"):
        TorchLoader(cfg)


# ---------------------------------------------------------------- options


def test_batch_contents_follow_the_options(synthetic):
    base = LoaderConfig(shards=synthetic, batch_size=8, size=S, workers=0, recipe="eval")
    raw = next(iter(TorchLoader(LoaderConfig(**{**base.__dict__, "normalize": False}))))
    assert raw.images.dtype == torch.uint8 and raw.images.shape == (8, 3, S, S)
    assert raw.labels.dtype == torch.int64 and raw.labels.shape == (8, S, S)
    assert raw.cls.dtype == torch.int64 and raw.cls.shape == (8,) and len(raw.keys) == 8
    normed = next(iter(TorchLoader(base)))
    assert normed.images.dtype == torch.float32 and normed.keys == raw.keys
    assert torch.allclose(normed.images, normalize(raw.images, base.mean, base.std))
    mean = torch.tensor(base.mean).view(1, 3, 1, 1)
    assert torch.allclose(normed.images, (raw.images / 255 - mean) / torch.tensor(base.std).view(1, 3, 1, 1), atol=1e-5)
    unlabeled = next(iter(TorchLoader(LoaderConfig(**{**base.__dict__, "labels": False}))))
    assert unlabeled.labels is None and unlabeled.cls is not None
