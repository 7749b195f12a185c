"""The loader contract, for every loader of the registry (``loader_data.LOADERS``): fixed full
batches, lockstep ranks, one epoch order shared by both loaders, resumption (also across
loaders), unusable samples replaced and flagged, configurations that would yield nothing."""

from __future__ import annotations

import gc
import io
import weakref
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from loader_data import (
    LOADERS,
    PALETTE,
    all_keys,
    block_sample,
    coordinate_sample,
    mean_image_difference,
    run_epochs,
    same_batches,
    same_samples,
    spoil,
    write_set,
)
from PIL import Image

from fastloc.data.config import SOLO, LoaderConfig, Placement
from fastloc.data.order import epoch_order
from fastloc.data.recipes import RECIPES, CenterCrop, CentreSquare, Rkrc, Rrc
from fastloc.data.samples import SkippedSampleWarning
from fastloc.data.shards import ShardError, open_shards
from fastloc.data.stream import _LIVE
from fastloc.data.transforms import largest_center_square, normalize, pil_nearest_indices
from fastloc.shard.encode import decode_label

S = 32  # output side of every loader test
NAMES = list(LOADERS)


def config(root: Path, **kw) -> LoaderConfig:
    return LoaderConfig(**{"shards": root, "batch_size": 8, "size": S, "workers": 2, "threads": 2, **kw})


def load(name: str, cfg: LoaderConfig, epochs: int = 1, at: Placement = SOLO) -> list:
    return run_epochs(LOADERS[name](cfg, at), epochs)


def reference(root: Path) -> dict[str, tuple[Image.Image, np.ndarray, int]]:
    """key -> (PIL RGB image, label [H, W], cls), read with PIL outside any loader."""
    shards, out = open_shards(root), {}
    for g in range(shards.num_samples):
        _, key, data = shards.read(g, ("jpg", "seg.png", "cls"))
        out[key] = (Image.open(io.BytesIO(data["jpg"])).convert("RGB"), decode_label(data["seg.png"]), int(data["cls"]))
    return out


# ---------------------------------------------------------------- the Batch contract


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    ("recipe", "norm"), [("eval", True), ("rkrc", False), ("rrc", True), ("center-crop", False), ("square", False)]
)
def test_batches_follow_the_contract(synthetic, name, recipe, norm):
    assert set(RECIPES) == {"eval", "rkrc", "rrc", "center-crop", "square"}  # every recipe of the registry
    cfg = config(synthetic, recipe=RECIPES[recipe](), normalize=norm)
    loader = LOADERS[name](cfg, SOLO)
    batches = list(loader)
    ref = reference(synthetic)
    assert len(batches) == len(loader) == 40 // 8
    for b in batches:
        assert b.images.shape == (8, 3, S, S) and b.images.dtype == (torch.float32 if norm else torch.uint8)
        assert b.labels.shape == (8, S, S) and b.labels.dtype == torch.int64
        assert b.cls.dtype == torch.int64 and b.cls.tolist() == [ref[k][2] for k in b.keys]
        assert b.valid.dtype == torch.bool and b.valid.all()
        assert int(b.labels.min()) >= 0 and int(b.labels.max()) < 16
    assert sorted(all_keys(batches)) == sorted(ref)
    assert loader.epoch == 1 and loader.state_dict()["position"] == 0


@pytest.mark.parametrize("name", NAMES)
def test_batch_contents_follow_the_options(synthetic, name):
    raw = load(name, config(synthetic, recipe=CentreSquare(), normalize=False))
    cfg = config(synthetic, recipe=CentreSquare(), mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    normed = load(name, cfg)
    for a, b in zip(raw, normed):
        assert a.keys == b.keys and b.images.dtype == torch.float32
        torch.testing.assert_close(b.images, normalize(a.images, cfg.mean, cfg.std), atol=1e-5, rtol=1e-5)
    mean, std = torch.tensor(cfg.mean).view(1, 3, 1, 1), torch.tensor(cfg.std).view(1, 3, 1, 1)
    assert torch.allclose(normed[0].images, (raw[0].images / 255 - mean) / std, atol=1e-5)
    (unlabeled, *_) = load(name, config(synthetic, labels=False))
    assert unlabeled.labels is None and unlabeled.cls is not None and unlabeled.images.shape == (8, 3, S, S)


# ---------------------------------------------------------------- one order for both loaders


@pytest.mark.parametrize(
    "kw",
    [
        {"recipe": CentreSquare(), "shuffle": False, "drop_last": False},
        {"recipe": CenterCrop(crop_pct=0.9), "drop_last": False},
        {"recipe": RECIPES["square"](), "shuffle": False, "drop_last": False},
        {"recipe": Rkrc(), "seed": 3},
        {"recipe": Rrc(), "batch_size": 4, "at": Placement(rank=1, world_size=3)},
    ],
    ids=["eval", "center-crop", "square", "train-rkrc", "train-rrc-rank1of3"],
)
def test_both_loaders_yield_the_same_batches(synthetic, kw):
    """Same seed, epoch and rank: the same keys, labels, classes and valid flags in the same
    batches; the images differ only by the resampling (DALI's against PIL's)."""
    cfg = config(synthetic, normalize=False, **{k: v for k, v in kw.items() if k != "at"})
    torch_batches, dali_batches = (load(name, cfg, 2, kw.get("at", SOLO)) for name in NAMES)
    assert same_samples(torch_batches, dali_batches)
    assert mean_image_difference(torch_batches, dali_batches) < 1.5


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_batches_any_workers(synthetic, name):
    cfg = config(synthetic, recipe=Rkrc(), seed=3, workers=0, threads=1)
    first = load(name, cfg, epochs=2)
    assert same_batches(first, load(name, replace(cfg, workers=2, threads=2), epochs=2))
    keys = [b.keys for b in first]
    assert keys[:5] != keys[5:] and sorted(all_keys(first[:5])) == sorted(all_keys(first[5:]))  # new order
    assert [b.keys for b in load(name, replace(cfg, seed=4))] != keys[:5]


@pytest.mark.parametrize("name", NAMES)
def test_unshuffled_order_is_the_manifest_order(synthetic, name):
    shards = open_shards(synthetic)
    keys = all_keys(load(name, config(synthetic, recipe=CentreSquare(), shuffle=False, drop_last=False)))
    assert keys == [shards.name(g)[1] for g in range(40)]


# ---------------------------------------------------------------- ranks in lockstep


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("drop_last", [True, False])
def test_ranks_run_in_lockstep(synthetic, name, drop_last):
    """World 3 over 40 samples, batch 4: every rank yields the same number of full batches.
    Training: 13 samples per rank, 3 batches, nothing seen twice. Evaluation: the order cycled
    to 3 x 4 x 4 = 48 slots, and the valid ones hold every sample exactly once."""
    shards = open_shards(synthetic)
    ranks = []
    for rank in range(3):
        cfg = config(synthetic, batch_size=4, drop_last=drop_last, recipe=CentreSquare(), seed=7)
        loader = LOADERS[name](cfg, Placement(rank=rank, world_size=3))
        batches = list(loader)
        assert len(batches) == len(loader) == (3 if drop_last else 4)
        assert all(len(b) == 4 and b.images.shape[0] == 4 and b.labels.shape[0] == 4 for b in batches)
        ranks.append(batches)
    valid = [k for batches in ranks for b in batches for k, v in zip(b.keys, b.valid.tolist()) if v]
    assert len(valid) == len(set(valid))
    if drop_last:
        assert len(valid) == 36 and all(b.valid.all() for r in ranks for b in r)
        order = epoch_order(40, 7, 0, True)
        assert set(valid) <= {shards.name(int(g))[1] for g in order[:39]}  # the last of the order is left out
    else:
        assert sorted(valid) == sorted(shards.name(g)[1] for g in range(40))
        assert sum(int((~b.valid).sum()) for r in ranks for b in r) == 48 - 40


@pytest.mark.parametrize("name", NAMES)
def test_configurations_that_yield_nothing_are_errors(synthetic, name):
    with pytest.raises(
        ValueError, match=r"batch_size 16 is larger than each rank's share of 13 samples \(40 samples over 3"
    ):
        LOADERS[name](config(synthetic, batch_size=16), Placement(world_size=3))
    with pytest.raises(ValueError, match="40 samples cannot be shared by 41 ranks"):
        LOADERS[name](config(synthetic, batch_size=1, drop_last=False), Placement(world_size=41))
    assert len(LOADERS[name](config(synthetic, batch_size=16, drop_last=False), Placement(world_size=3))) == 1


@pytest.mark.parametrize("name", NAMES)
def test_a_loader_in_a_reference_cycle_releases_its_workers(synthetic, name):
    """A live worker stream is held by the registry (never garbage together with its queues, which
    the collector would close first, leaving each worker to time out); collecting its loader
    releases the stream and stops the workers."""
    loader = LOADERS[name](config(synthetic, recipe=CentreSquare()), SOLO)
    next(iter(loader))
    stream = loader._host if name == "torch" else loader._feeder.host
    assert stream in _LIVE
    workers, gone = list(stream._workers), weakref.ref(stream)  # torch's worker processes
    loader.cycle = loader
    del loader, stream
    gc.collect()
    assert gone() is None and not any(w.is_alive() for w in workers)


# ---------------------------------------------------------------- resumption


def _stop_after(loader, stop: int, epochs: int) -> list:
    got = []
    for epoch in range(loader.epoch, epochs):
        loader.set_epoch(epoch)
        for batch in loader:
            got.append(batch)
            if len(got) == stop:
                return got
    return got


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("stop", [2, 5, 7])  # mid-epoch, at the epoch boundary, in the second epoch
def test_resume_gives_the_uninterrupted_batches(synthetic, tmp_path, name, stop):
    cfg = config(synthetic, recipe=Rkrc(), seed=1)
    uninterrupted = load(name, cfg, epochs=2)  # 5 batches per epoch
    loader = LOADERS[name](cfg, SOLO)
    got = _stop_after(loader, stop, 2)
    torch.save({"loader": loader.state_dict()}, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)["loader"]
    assert (saved["epoch"], saved["position"]) == divmod(stop, 5)
    resumed = LOADERS[name](replace(cfg, workers=1), SOLO)
    resumed.load_state_dict(saved)
    for epoch in range(resumed.epoch, 2):
        resumed.set_epoch(epoch)
        got += list(resumed)
    assert same_batches(got, uninterrupted)
    with pytest.raises(ValueError, match="batch_size"):
        LOADERS[name](replace(cfg, batch_size=4), SOLO).load_state_dict(saved)


@pytest.mark.parametrize(("saver", "restorer"), [NAMES, NAMES[::-1]])
def test_a_state_saved_by_one_loader_restores_in_the_other(synthetic, saver, restorer):
    cfg = config(synthetic, recipe=Rkrc(), seed=2, normalize=False)
    whole = load(restorer, cfg, epochs=2)
    first = LOADERS[saver](cfg, SOLO)
    _stop_after(first, 3, 2)
    second = LOADERS[restorer](cfg, SOLO)
    second.load_state_dict(first.state_dict())
    rest = []
    for epoch in range(second.epoch, 2):
        second.set_epoch(epoch)
        rest += list(second)
    assert same_batches(rest, whole[3:])


# ---------------------------------------------------------------- samples that cannot be used


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("recipe", ["eval", "rkrc"])
def test_unusable_samples_are_replaced_and_flagged(synthetic_copy, name, recipe):
    """A zeroed JPEG (the header check), one no decoder takes (sampling factors 0), and a label map
    of the wrong size: each slot gets the next usable sample of the order, marked not valid;
    every batch stays full; each sample is warned about once, naming shard and key."""
    spoiled = {
        17: spoil(synthetic_copy, 17, "zeros"),
        18: spoil(synthetic_copy, 18, "sampling"),
        28: spoil(synthetic_copy, 28, "label"),
    }
    shards = open_shards(synthetic_copy)
    loader = LOADERS[name](config(synthetic_copy, recipe=RECIPES[recipe](), shuffle=False, drop_last=False), SOLO)
    with pytest.warns(SkippedSampleWarning) as caught:
        batches = list(loader)
    messages = sorted(str(w.message) for w in caught if issubclass(w.category, SkippedSampleWarning))
    assert len(messages) == 3
    for (tar, key), reason in zip(spoiled.values(), ["jpg does not decode", "jpg does not decode", "seg.png"]):
        assert any(tar in m and key in m and reason in m for m in messages), (key, messages)
    keys = all_keys(batches)
    expected = [shards.name(g)[1] for g in range(40)]
    expected[17] = expected[18] = expected[19]  # both replaced by the next usable one
    expected[28] = expected[29]
    assert [len(b) for b in batches] == [8] * 5 and keys == expected
    assert torch.cat([b.valid for b in batches]).nonzero().flatten().tolist() == [
        i for i in range(40) if i not in (17, 18, 28)
    ]
    assert loader.replaced == 4 and len(loader.skipped_samples) == 3  # 18 was met twice (slot 17, then 18)
    again = list(loader)  # the next epoch meets them again: counted, not warned again
    assert all_keys(again) == keys and loader.replaced == 8 and len(loader.skipped_samples) == 3


def test_both_loaders_replace_alike(synthetic_copy):
    for g, how in [(3, "sampling"), (11, "zeros"), (30, "label")]:
        spoil(synthetic_copy, g, how)
    cfg = config(synthetic_copy, recipe=Rkrc(), seed=5, normalize=False, batch_size=4)
    with pytest.warns(SkippedSampleWarning):
        torch_batches, dali_batches = (load(name, cfg, 2, Placement(rank=1, world_size=2)) for name in NAMES)
    assert same_samples(torch_batches, dali_batches)
    assert sum(int((~b.valid).sum()) for b in torch_batches) > 0


@pytest.mark.parametrize("name", NAMES)
def test_a_share_with_nothing_usable_is_an_error(synthetic_copy, name):
    for g in range(40):
        spoil(synthetic_copy, g, "zeros")
    with pytest.raises(ShardError, match="no usable sample in rank 0's share.*jpg does not decode"):
        list(LOADERS[name](config(synthetic_copy), SOLO))


@pytest.mark.parametrize("name", NAMES)
def test_images_over_the_pixel_limit_are_replaced(synthetic, name):
    """The header's size is checked before anything is decoded (the limit is lowered here: the
    synthetic images are 48-96 px)."""
    ref = reference(synthetic)
    limit = 60 * 60
    with pytest.warns(SkippedSampleWarning, match="over the limit of 3,600"):
        batches = load(name, config(synthetic, recipe=CentreSquare(), max_pixels=limit, shuffle=False, drop_last=False))
    for b in batches:  # replacements included
        for key in b.keys:
            assert ref[key][0].width * ref[key][0].height <= limit
    small = sum(im.width * im.height <= limit for im, _, _ in ref.values())
    assert 0 < small < 40 and sum(int(b.valid.sum()) for b in batches) == small


@pytest.mark.parametrize("name", NAMES)
def test_truncated_or_missing_shard_is_an_error(synthetic_copy, name):
    shards = open_shards(synthetic_copy)
    tar, idx = shards.tars[3], shards.indexes[3]
    cfg = config(synthetic_copy)
    data = tar.read_bytes()
    tar.write_bytes(data[:-3000])
    with pytest.raises(ShardError, match=f"{tar.name}.*truncated"):
        LOADERS[name](cfg, SOLO)
    tar.unlink()
    with pytest.raises(ShardError, match=f"{tar.name}.*missing"):
        LOADERS[name](cfg, SOLO)
    tar.write_bytes(data)
    idx.unlink()
    with pytest.raises(ShardError, match=f"{idx.name}.*missing"):
        LOADERS[name](cfg, SOLO)


# ---------------------------------------------------------------- geometry through the loaders


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", ["rkrc", "rrc"])
def test_train_labels_stay_aligned_with_pixels(tmp_path, name, kind):
    """Flat colour blocks: wherever the label map is constant within 2 px, the pixel's nearest
    palette colour is its class's. The same check with the label map mirrored fails, so it can
    see a misalignment."""
    rng = np.random.default_rng(4)
    root = write_set(tmp_path / "blocks", [block_sample(rng, i) for i in range(24)], num_classes=len(PALETTE))
    cfg = config(root, recipe=RECIPES[kind](), normalize=False, seed=5)
    checked = mirrored_wrong = 0
    for batch in load(name, cfg, epochs=3):
        labels = batch.labels[:, None].float()  # [B, 1, S, S]
        padded = torch.nn.functional.pad(labels, (2, 2, 2, 2), mode="replicate")
        hi = torch.nn.functional.max_pool2d(padded, 5, stride=1)
        lo = -torch.nn.functional.max_pool2d(-padded, 5, stride=1)
        interior = (hi == lo)[:, 0]  # [B, S, S]: 2 px away from any label edge
        interior[:, :2] = interior[:, -2:] = interior[:, :, :2] = interior[:, :, -2:] = False
        colours = batch.images.permute(0, 2, 3, 1).double().reshape(-1, 3)  # [B S S, 3]
        nearest = torch.cdist(colours, torch.tensor(PALETTE, dtype=torch.float64)).argmin(1).reshape(batch.labels.shape)
        assert torch.equal(nearest[interior], batch.labels[interior])
        checked += int(interior.sum())
        mirrored = interior.flip(-1)
        mirrored_wrong += int((nearest[mirrored] != batch.labels.flip(-1)[mirrored]).sum())
    assert checked > 0.25 * 3 * 24 * S * S and mirrored_wrong > 0.05 * checked


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("recipe", ["eval", "rkrc"])
def test_uint16_label_maps_are_lossless(tmp_path, name, recipe):
    """> 256 classes: 16-bit PNGs whose label is the source position y * W + x, so every output
    label says which source pixel it came from: eval takes exactly PIL's nearest pixels of the
    centre square; train takes whole source rows and columns (a separable gather, no mixing)."""
    rng = np.random.default_rng(5)
    samples = [coordinate_sample(rng, i) for i in range(9)]
    root = write_set(tmp_path / "coords", samples, num_classes=4096)
    assert open_shards(root).manifest["label"]["dtype"] == "uint16"
    sources = {key: label for key, _, label, _ in samples}
    cfg = config(root, batch_size=3, recipe=RECIPES[recipe](), shuffle=False, drop_last=False)
    seen = []
    for batch in load(name, cfg):
        for key, label in zip(batch.keys, batch.labels):
            source = sources[key]
            h, w = source.shape
            rows, cols = label // w, label % w  # [S, S] source coordinates
            if recipe == "eval":
                top, left, m = largest_center_square(h, w)
                ys, xs = top + pil_nearest_indices(m, S), left + pil_nearest_indices(m, S)
                assert np.array_equal(label.numpy(), ys[:, None] * w + xs[None, :])
            assert (rows == rows[:, :1]).all() and (cols == cols[:1, :]).all()
            seen.append(key)
    assert seen == list(sources)
