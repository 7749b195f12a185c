"""The DALI loader in DALI's CPU-only mode (one gpu-marked test runs the mixed/GPU path): the
Batch contract, the recipes against PIL and the torch twin, image/label alignment, DALI's order,
rank split and resumption, corrupt and truncated shards."""

from __future__ import annotations

import io
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from loader_data import PALETTE, all_keys, block_sample, run_epochs, same_batches, write_set
from fastloc.data.config import LoaderConfig, TrainRecipe
from fastloc.data.dali_loader import DaliLoader
from fastloc.data.dali_pipeline import (
    INTERPOLATIONS,
    Spec,
    build_probe_pipeline,
    epoch_tar_order,
    label_eval,
    rank_range,
)  # fmt: skip
from fastloc.data.order import (
    ShardError,
    SkippedSampleWarning,
    open_shards,
    shard_index,
)
from fastloc.data.transforms import (
    RkrcDraw,
    RrcDraw,
    apply_rkrc,
    apply_rrc,
    normalize,
)
from fastloc.shard.encode import decode_label

S = 32  # output side of every loader test


# ---------------------------------------------------------------- data


def load(cfg: LoaderConfig, epochs: int = 1) -> list:
    return run_epochs(DaliLoader(cfg, device="cpu"), epochs)


def config(root: Path, **kw) -> LoaderConfig:
    return LoaderConfig(**{"shards": root, "batch_size": 8, "size": S, "workers": 2, **kw})



def encoded(a: np.ndarray, fmt: str) -> np.ndarray:
    out = io.BytesIO()
    Image.fromarray(a).save(out, format=fmt, **({"quality": 95, "subsampling": 0} if fmt == "JPEG" else {}))
    return np.frombuffer(out.getvalue(), np.uint8)


def reference(root: Path) -> dict[str, tuple[Image.Image, np.ndarray, int]]:
    """key -> (PIL RGB image, label [H, W], cls), read with PIL outside any loader."""
    shards, out = open_shards(root), {}
    for g in range(shards.num_samples):
        _, key, data = shards.read(g, ("jpg", "seg.png", "cls"))
        out[key] = (Image.open(io.BytesIO(data["jpg"])).convert("RGB"), decode_label(data["seg.png"]), int(data["cls"]))
    return out


# ---------------------------------------------------------------- the Batch contract


@pytest.mark.parametrize(("recipe", "kind", "norm"), [("eval", "rkrc", True), ("eval", "rkrc", False),
                                                      ("train", "rkrc", True), ("train", "rrc", False)])  # fmt: skip
def test_batches_follow_the_contract(synthetic, recipe, kind, norm):
    cfg = config(synthetic, recipe=recipe, train=TrainRecipe(kind=kind), normalize=norm)
    loader = DaliLoader(cfg, device="cpu")
    batches = list(loader)
    ref = reference(synthetic)
    assert len(batches) == len(loader) == 40 // 8
    for b in batches:
        assert b.images.shape == (8, 3, S, S) and b.images.dtype == (torch.float32 if norm else torch.uint8)
        assert b.labels.shape == (8, S, S) and b.labels.dtype == torch.int64
        assert b.cls.dtype == torch.int64 and b.cls.tolist() == [ref[k][2] for k in b.keys]
        assert all(isinstance(k, str) and k in ref for k in b.keys)
        assert 0 <= int(b.labels.min()) and int(b.labels.max()) < 16
    assert sorted(all_keys(batches)) == sorted(ref)
    assert loader.epoch == 1 and loader.state_dict()["position"] == 0


def test_normalize_is_crop_mirror_normalize_of_the_uint8_images(synthetic):
    raw = load(config(synthetic, recipe="eval", normalize=False))
    cfg = config(synthetic, recipe="eval", mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    for a, b in zip(raw, load(cfg)):
        assert a.keys == b.keys
        torch.testing.assert_close(b.images, normalize(a.images, cfg.mean, cfg.std), atol=1e-5, rtol=1e-5)


def test_labels_off(synthetic):
    (b, *_) = load(config(synthetic, labels=False))
    assert b.labels is None and b.cls is not None and b.images.shape == (8, 3, S, S)


# ---------------------------------------------------------------- recipes against PIL and the twin


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_eval_label_gather_is_pil_nearest(dtype):
    """Awkward sizes, including exact ties where DALI's INTERP_NN and PIL differ (e.g. 36 -> 33)."""
    rng = np.random.default_rng(0)
    for h, w, size in [(36, 40, 33), (148, 150, 125), (12, 59, 21), (10, 162, 75), (184, 12, 249), (7, 7, 7),
                       (5, 300, 224), (333, 500, 224), (480, 640, 518), (1, 9, 3)]:  # fmt: skip
        label = rng.integers(0, 256 if dtype == np.uint8 else 4096, (h, w), dtype=dtype)
        m = min(h, w)
        left, top = (w - m) // 2, (h - m) // 2
        crop = Image.fromarray(label).crop((left, top, left + m, top + m))
        ours = label_eval(label[..., None], size)[..., 0]
        if dtype == np.uint8:  # mode L: PIL's own NEAREST resize
            assert np.array_equal(ours, np.asarray(crop.resize((size, size), Image.NEAREST)))
        else:  # mode I;16: PIL computes each coordinate afresh; the twin's tables are mode L's (see the reply)
            index = np.minimum(np.add.accumulate(np.r_[m / size * 0.5, np.full(size - 1, m / size)]).astype(int), m - 1)
            assert np.array_equal(ours, label[top + index][:, left + index])


def test_eval_agrees_with_pil_and_the_torch_twin(synthetic):
    """Patch-Seg preprocessing: labels identical to PIL (centre square + NEAREST) and to the
    torch loader; images within JPEG-decoder and resampling tolerance of PIL bilinear."""
    from fastloc.data.torch_loader import TorchLoader

    cfg = config(synthetic, recipe="eval", normalize=False, shuffle=False, drop_last=False)
    dali = {k: (i, l, c) for b in load(cfg) for k, i, l, c in zip(b.keys, b.images, b.labels, b.cls)}
    twin = {k: (i, l, c) for b in TorchLoader(replace(cfg, workers=0)) for k, i, l, c in zip(b.keys, b.images, b.labels, b.cls)}
    ref = reference(synthetic)
    assert set(dali) == set(twin) == set(ref)
    diffs = []
    for key, (image, label, cls) in dali.items():
        pil, source, source_cls = ref[key]
        m = min(pil.size)
        left, top = (pil.width - m) // 2, (pil.height - m) // 2
        box = (left, top, left + m, top + m)
        expect = np.asarray(Image.fromarray(source).crop(box).resize((S, S), Image.NEAREST))
        assert np.array_equal(label.numpy(), expect), key
        assert torch.equal(label, twin[key][1]) and int(cls) == source_cls == int(twin[key][2])
        pixels = np.asarray(pil.crop(box).resize((S, S), Image.BILINEAR)).transpose(2, 0, 1)
        diff = np.abs(image.numpy().astype(int) - pixels.astype(int))
        assert diff.max() <= 48, key  # single pixels at sharp edges
        diffs.append(diff.mean())
        assert np.abs(image.numpy().astype(int) - twin[key][0].numpy().astype(int)).mean() < 2.0
    assert max(diffs) < 2.0 and np.mean(diffs) < 1.0


def _probe(kind: str) -> tuple[Spec, object]:
    spec = Spec(device="cpu", recipe="train", size=S, train=TrainRecipe(kind=kind), normalize=False,
                mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), label_dtype="uint8", cls=False, seeds=())  # fmt: skip
    return spec, build_probe_pipeline(spec, ["jpg", "seg.png"], None, draws=True)


def _scene(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[:h, :w]
    pixels = np.stack([128 + 90 * np.sin(x / 3.1), 128 + 90 * np.cos(y / 2.3), (7 * x + 3 * y) % 256], -1)
    return np.clip(pixels, 0, 255).astype(np.uint8), ((x // 3 + 5 * (y // 4)) % 200).astype(np.uint8)


def test_rkrc_geometry_matches_the_twin():
    """The DALI graph with the random draws fed in equals the twin's timm rkrc: label maps
    exactly (sizes rounded half to even, centre crop, reflect pad, flip), images within tolerance."""
    rng = np.random.default_rng(1)
    _, pipe = _probe("rkrc")
    worst = 0.0
    for trial in range(60):
        h, w = (int(v) for v in rng.integers(5, 90, 2))
        if trial < 4:  # exact ties of the unzoomed size, e.g. 64 x 90 at S = 32 -> 32 x 45
            h, w = [(64, 90), (90, 64), (2 * S, 2 * S + 1), (S + 1, 3 * S)][trial]
        pixels, label = _scene(rng, h, w)
        zoom, jitter = (float(v) for v in rng.integers(0, 2, 2)) if trial >= 8 else (0.0, float(trial >= 6))
        u, log_r = float(rng.uniform(0.08, 1.0)), float(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        if trial in (6, 7):
            log_r = math.log(3 / 4) if trial == 6 else math.log(4 / 3)  # one side below S: reflect padding
        interp, flip = ["bilinear", "bicubic"][trial % 2], int(rng.integers(0, 2))
        jpg = encoded(pixels, "JPEG")
        feeds = {"jpg": jpg, "seg.png": encoded(label, "PNG"), "zoom": zoom, "u": u, "jitter": jitter,
                 "log_r": log_r, "interp": INTERPOLATIONS[interp], "flip": flip}  # fmt: skip
        for name, value in feeds.items():
            kind = np.float64 if name in ("zoom", "u", "jitter", "log_r") else np.int32
            pipe.feed_input(name, [value if name in ("jpg", "seg.png") else np.array(value, kind)])
        image, out_label = (np.array(t.at(0)) for t in pipe.run()[:2])
        f = 1.0 / math.sqrt(u) if zoom else 1.0
        s = math.sqrt(math.exp(log_r))
        draw = RkrcDraw(f / s if jitter else f, f * s if jitter else f, interp, bool(flip))
        twin_image, twin_label = apply_rkrc(Image.open(io.BytesIO(jpg.tobytes())).convert("RGB"), label, S, draw)
        assert np.array_equal(out_label[..., 0], twin_label.numpy()), (trial, h, w, draw)
        diff = np.abs(image.astype(int) - twin_image.numpy().astype(int))
        worst = max(worst, diff.mean())
    assert worst < 2.0


def test_rrc_window_matches_the_twin():
    rng = np.random.default_rng(2)
    _, pipe = _probe("rrc")
    for trial in range(20):
        h, w = (int(v) for v in rng.integers(12, 90, 2))
        pixels, label = _scene(rng, h, w)
        ch, cw = int(rng.integers(1, h + 1)), int(rng.integers(1, w + 1))
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        interp, flip = ["bilinear", "bicubic"][trial % 2], trial % 3 == 0
        jpg = encoded(pixels, "JPEG")
        pipe.feed_input("jpg", [jpg])
        pipe.feed_input("seg.png", [encoded(label, "PNG")])
        pipe.feed_input("anchor", [np.array([top, left], np.int32)])
        pipe.feed_input("window", [np.array([ch, cw], np.int32)])
        pipe.feed_input("interp", [np.array(INTERPOLATIONS[interp], np.int32)])
        pipe.feed_input("flip", [np.array(int(flip), np.int32)])
        image, out_label = (np.array(t.at(0)) for t in pipe.run()[:2])
        draw = RrcDraw(top, left, ch, cw, interp, flip)
        twin_image, twin_label = apply_rrc(Image.open(io.BytesIO(jpg.tobytes())).convert("RGB"), label, S, draw)
        assert np.array_equal(out_label[..., 0], twin_label.numpy()), (trial, draw)
        assert np.abs(image.astype(int) - twin_image.numpy().astype(int)).mean() < 2.5


def constant_within(labels: torch.Tensor, r: int) -> torch.Tensor:
    """[B, S, S] bool: the label is the same everywhere within r pixels (Chebyshev), and the pixel
    is r pixels inside the output (an edge may lie just outside the window)."""
    padded = torch.nn.functional.pad(labels[:, None].float(), (r, r, r, r), mode="replicate")
    hi = torch.nn.functional.max_pool2d(padded, 2 * r + 1, 1)
    inside = (hi == -torch.nn.functional.max_pool2d(-padded, 2 * r + 1, 1))[:, 0]
    inside[:, :r] = inside[:, -r:] = inside[:, :, :r] = inside[:, :, -r:] = False
    return inside


@pytest.mark.parametrize("kind", ["rkrc", "rrc"])
def test_train_labels_stay_aligned_with_pixels(tmp_path, kind):
    """Flat colour blocks: wherever the label map is constant within 2 px, the pixel's nearest
    palette colour is its class's (within 4 px, also close to it: zooms up to 3.5x blur edges over
    a few pixels). The same check with the label map mirrored fails, so it can see a misalignment."""
    rng = np.random.default_rng(4)
    root = write_set(tmp_path / "blocks", [block_sample(rng, i) for i in range(24)], num_classes=len(PALETTE))
    cfg = config(root, recipe="train", train=TrainRecipe(kind=kind), normalize=False, seed=5)
    checked = mirrored_wrong = 0
    for batch in load(cfg, epochs=3):
        interior, deep = (constant_within(batch.labels, r) for r in (2, 4))  # [B, S, S] each
        colours = batch.images.permute(0, 2, 3, 1).double().reshape(-1, 3)  # [B S S, 3]
        dist = torch.cdist(colours, torch.tensor(PALETTE, dtype=torch.float64))
        nearest = dist.argmin(1).reshape(batch.labels.shape)  # [B, S, S]
        assert torch.equal(nearest[interior], batch.labels[interior])
        assert dist.min(1).values.reshape(batch.labels.shape)[deep].max() < 40
        checked += int(interior.sum())
        mirrored = batch.labels.flip(-1)
        mirrored_wrong += int((nearest[interior.flip(-1)] != mirrored[interior.flip(-1)]).sum())
    assert checked > 0.25 * 3 * 24 * S * S
    assert mirrored_wrong > 0.05 * checked


@pytest.mark.parametrize("recipe", ["eval", "train"])
def test_uint16_label_maps_are_lossless(tmp_path, recipe):
    """> 256 classes: 16-bit PNGs whose label is the source position y * W + x, so every output
    label says which source pixel it came from: eval takes exactly PIL's nearest pixels of the
    centre square; train takes whole source rows and columns (a separable gather, no mixing)."""
    rng = np.random.default_rng(5)
    samples = []
    for i in range(9):
        h, w = (int(v) for v in rng.integers(20, 60, size=2))
        samples.append((f"coords_{i:04d}", rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
                        np.arange(h * w).reshape(h, w).astype(np.uint16), 0))  # fmt: skip
    root = write_set(tmp_path / "coords", samples, num_classes=4096)
    assert open_shards(root).manifest["label"]["dtype"] == "uint16"
    width = {key: label.shape[1] for key, _, label, _ in samples}
    cfg = config(root, batch_size=4, recipe=recipe, shuffle=False, drop_last=False)
    seen = []
    for batch in load(cfg):
        for key, label in zip(batch.keys, batch.labels):
            source = next(lab for k, _, lab, _ in samples if k == key)
            h, w = source.shape
            rows, cols = label // width[key], label % width[key]  # [S, S] source coordinates
            if recipe == "eval":
                m = min(h, w)
                crop = Image.fromarray(source[(h - m) // 2 :, (w - m) // 2 :][:m, :m].astype(np.int32))  # mode I
                assert np.array_equal(label.numpy(), np.asarray(crop.resize((S, S), Image.NEAREST)))
            assert (rows == rows[:, :1]).all() and (cols == cols[:1, :]).all()
            seen.append(key)
    assert sorted(seen) == sorted(width)


# ---------------------------------------------------------------- order, ranks, resumption


def test_same_seed_and_epoch_give_the_same_batches(synthetic):
    cfg = config(synthetic, recipe="train", seed=3)
    first, again = load(cfg, epochs=2), load(replace(cfg, workers=1), epochs=2)
    assert same_batches(first, again)  # order and augmentation, whatever the number of threads
    assert all_keys(first[:5]) != all_keys(first[5:])  # the next epoch: another order
    assert sorted(all_keys(first[:5])) == sorted(all_keys(first[5:]))
    assert all_keys(load(config(synthetic, recipe="train", seed=4))) != all_keys(first[:5])
    unshuffled = all_keys(load(config(synthetic, recipe="eval", shuffle=False, drop_last=False)))
    shards = open_shards(synthetic)
    tar_order = [k for i, e in enumerate(shards.manifest["shards"])
                 for k in shard_index(str(shards.indexes[i]), e["samples"], e["bytes"], shards.stamps[i]).keys]  # fmt: skip
    assert unshuffled == tar_order


@pytest.mark.parametrize("drop_last", [True, False])
def test_ranks_split_each_epoch_without_overlap(synthetic, drop_last):
    """World 3 over 40 samples: DALI gives rank r the contiguous range [40 r // 3, 40 (r+1) // 3)
    of the epoch's tar order (13, 13, 14 samples); each rank yields 40 // 3 = 13 of them (the
    14th is dropped), minus the short batch with drop_last. Nothing is read twice in an epoch."""
    shards = open_shards(synthetic)
    keys_of = [list(shard_index(str(shards.indexes[i]), e["samples"], e["bytes"], shards.stamps[i]).keys)
               for i, e in enumerate(shards.manifest["shards"])]  # fmt: skip
    for epoch in (0, 1):
        ranks = []
        for rank in range(3):
            loader = DaliLoader(config(synthetic, batch_size=4, rank=rank, world_size=3, drop_last=drop_last,
                                       recipe="eval", seed=7), device="cpu")  # fmt: skip
            loader.set_epoch(epoch)
            batches = list(loader)
            assert len(batches) == len(loader) == (3 if drop_last else 4)
            ranks.append(all_keys(batches))
        order = [k for i in epoch_tar_order(len(keys_of), 7, epoch, True) for k in keys_of[i]]
        for rank, keys in enumerate(ranks):
            start, stop = rank_range(40, rank, 3)
            assert len(keys) == (12 if drop_last else 13) and set(keys) <= set(order[start:stop])
        union = [k for keys in ranks for k in keys]
        assert len(union) == len(set(union)) == (36 if drop_last else 39)
        if epoch == 0:
            first = ranks
    assert [set(k) for k in ranks] != [set(k) for k in first]  # the tar order, hence the rank shares, change


@pytest.mark.parametrize("stop", [2, 5, 7])  # mid-epoch, at the epoch boundary, in the second epoch
def test_resume_gives_the_uninterrupted_batches(synthetic, tmp_path, stop):
    cfg = config(synthetic, recipe="train", seed=9, batch_size=8)
    whole = load(cfg, epochs=2)
    loader = DaliLoader(cfg, device="cpu")
    seen = 0
    while seen < stop:
        for _batch in loader:
            seen += 1
            if seen == stop:
                break
    path = tmp_path / "ckpt.pt"
    torch.save({"loader": loader.state_dict()}, path)
    state = torch.load(path, weights_only=True)["loader"]
    assert state["epoch"] == stop // 5 and state["position"] == stop % 5
    assert ("dali_rank0" in state) == (stop % 5 != 0)  # a DALI checkpoint only mid-epoch
    resumed = DaliLoader(cfg, device="cpu")
    resumed.load_state_dict(state)
    rest = []
    for epoch in range(resumed.epoch, 2):
        resumed.set_epoch(epoch)
        rest += list(resumed)
    assert same_batches(rest, whole[stop:])
    if "dali_rank0" in state:  # another rank's state (no checkpoint for this rank): re-read, same batches
        other = DaliLoader(cfg, device="cpu")
        other.load_state_dict({k: v for k, v in state.items() if k != "dali_rank0"})
        assert same_batches(list(other), whole[stop : 5 * (stop // 5 + 1)])


def test_a_saved_state_is_refused_by_other_batching(synthetic):
    loader = DaliLoader(config(synthetic), device="cpu")
    state = loader.state_dict()
    with pytest.raises(ValueError, match="batch_size"):
        DaliLoader(config(synthetic, batch_size=4), device="cpu").load_state_dict(state)


# ---------------------------------------------------------------- damaged shards


def _member(root: Path, shard: int, line: int, ext: str) -> tuple[Path, str, int, int]:
    """(tar, key, offset, size) of a member, from the index."""
    shards = open_shards(root)
    fields = shards.indexes[shard].read_text().splitlines()[1 + line].split()
    groups = [fields[i : i + 4] for i in range(0, len(fields), 4)]
    _, offset, size, name = next(g for g in groups if g[0] == ext)
    return shards.tars[shard], name.split(".")[0], int(offset), int(size)


@pytest.mark.parametrize("recipe", ["eval", "train"])
def test_corrupt_sample_is_skipped_with_a_warning(synthetic_copy, recipe):
    tar, key, offset, size = _member(synthetic_copy, 2, 3, "jpg")
    with open(tar, "r+b") as f:  # same size: the shard still passes the construction checks
        f.seek(offset)
        f.write(b"\x00" * size)
    tar2, key2, offset2, _ = _member(synthetic_copy, 4, 0, "seg.png")
    with open(tar2, "r+b") as f:
        f.seek(offset2 + 16)  # the IHDR chunk: width and height no longer match the image, CRC broken
        f.write(b"\x00\x00\x0f\xff")
    cfg = config(synthetic_copy, recipe=recipe, shuffle=False, drop_last=False)
    loader = DaliLoader(cfg, device="cpu")
    with pytest.warns(SkippedSampleWarning) as caught:
        batches = list(loader)
    messages = sorted(str(w.message) for w in caught if issubclass(w.category, SkippedSampleWarning))
    assert len(messages) == 2
    assert tar.name in messages[0] and key in messages[0]
    assert tar2.name in messages[1] and key2 in messages[1]
    keys = all_keys(batches)
    assert len(keys) == 38 and key not in keys and key2 not in keys
    assert [len(b) for b in batches] == [8, 8, 7, 7, 8]  # shard 2 line 3 = sample 17, shard 4 line 0 = 28
    assert loader.skipped == 2 and set(loader.skipped_samples) == {(tar.name, key), (tar2.name, key2)}
    with pytest.warns(SkippedSampleWarning, match=key):  # without labels only the JPEG is bad
        clean = load(config(synthetic_copy, recipe=recipe, shuffle=False, drop_last=False, labels=False))
    assert len(all_keys(clean)) == 39
    again = list(loader)  # the next epoch meets them again: counted, not warned again
    assert all_keys(again) == keys and loader.skipped == 4 and len(loader.skipped_samples) == 2


def test_truncated_or_missing_shard_is_an_error(synthetic_copy):
    shards = open_shards(synthetic_copy)
    tar, idx = shards.tars[3], shards.indexes[3]
    cfg = config(synthetic_copy)
    data = tar.read_bytes()
    tar.write_bytes(data[:-3000])
    with pytest.raises(ShardError, match=f"{tar.name}.*truncated"):
        DaliLoader(cfg, device="cpu")
    tar.unlink()
    with pytest.raises(ShardError, match=f"{tar.name}.*missing"):
        DaliLoader(cfg, device="cpu")
    tar.write_bytes(data)
    idx.unlink()
    with pytest.raises(ShardError, match=f"{idx.name}.*missing"):
        DaliLoader(cfg, device="cpu")


# ---------------------------------------------------------------- the GPU path


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", ["eval", "train"])
def test_gpu_pipeline_matches_the_cpu_pipeline(synthetic, recipe):
    """device='gpu' (nvJPEG mixed decode, GPU resize/pad/normalize): CUDA batches; labels as the
    CPU pipeline's (the same draws: DALI's random operators are seeded alike on both backends),
    images within the decoders' tolerance."""
    cfg = config(synthetic, recipe=recipe, normalize=False, batch_size=8)
    gpu = list(DaliLoader(cfg, device="gpu"))
    cpu = load(cfg)
    assert len(gpu) == len(cpu) == 5
    for g, c in zip(gpu, cpu):
        assert g.images.is_cuda and g.labels.is_cuda and g.cls.is_cuda and g.keys == c.keys
        assert g.images.dtype == torch.uint8 and g.labels.dtype == torch.int64
        assert torch.equal(g.labels.cpu(), c.labels) and torch.equal(g.cls.cpu(), c.cls)
        assert (g.images.cpu().int() - c.images.int()).abs().float().mean() < 3.0
    normalized = next(iter(DaliLoader(config(synthetic, recipe="eval"), device="gpu")))
    assert normalized.images.is_cuda and normalized.images.dtype == torch.float32
