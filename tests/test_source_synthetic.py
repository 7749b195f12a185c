"""The synthetic source: seeded scenes whose labels match their pixels, and a patch task that is
learnable but not trivial."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from fastloc.shard.errors import ConversionError, SampleError
from fastloc.shard.sources import synthetic as syn
from fastloc.shard.sources.base import Item

C = len(syn.CLASSES)
N_SCENES = 200


def patch_union(label: np.ndarray, p: int = 16) -> np.ndarray:
    """Patch-Seg union targets [N, C] bool: leftover border pixels dropped, class 0 positive only
    for patches that are entirely 0."""
    g0, g1 = label.shape[0] // p, label.shape[1] // p
    patches = label[: g0 * p, : g1 * p].reshape(g0, p, g1, p).transpose(0, 2, 1, 3).reshape(g0 * g1, p * p)
    y = np.zeros((g0 * g1, C), bool)
    y[np.repeat(np.arange(g0 * g1), p * p), patches.ravel()] = True
    y[y.sum(1) > 1, 0] = False
    return y


@pytest.fixture(scope="module")
def scenes() -> list[syn.Scene]:
    return [syn.generate(0, i) for i in range(N_SCENES)]


def test_class_space():
    assert syn.CLASSES[0] == "background"
    assert len(set(syn.CLASSES)) == C <= 255  # uint8 label PNGs
    assert sorted(syn.REGION_CLASSES + syn.OBJECT_CLASSES) == list(range(C))
    assert [syn.CLASSES[c] for c in syn.OBJECT_CLASSES] == syn.SHAPES
    assert len(syn.SHAPES) >= 8 and len(syn.TEXTURES) >= 4


# ---------------------------------------------------------------- determinism


def test_same_seed_and_index_give_the_same_sample():
    a, b = syn.generate(3, 17), syn.generate(3, 17)
    np.testing.assert_array_equal(a.pixels, b.pixels)
    np.testing.assert_array_equal(a.label, b.label)
    assert a.caption() == b.caption() and a.objects == b.objects
    p1, l1 = syn.render_scene(np.random.default_rng(5), 100, 140)
    p2, l2 = syn.render_scene(np.random.default_rng(5), 100, 140)
    np.testing.assert_array_equal(p1, p2)
    np.testing.assert_array_equal(l1, l2)


def test_other_index_or_seed_gives_another_sample():
    base = syn.generate(0, 10)
    for other in (syn.generate(0, 11), syn.generate(1, 10)):
        same_shape = other.pixels.shape == base.pixels.shape
        assert not same_shape or not np.array_equal(other.pixels, base.pixels)
    # the image sizes alone already vary
    assert len({s.pixels.shape for s in (syn.generate(0, i) for i in range(8))}) > 4


def test_sample_does_not_depend_on_other_samples():
    fresh = syn.SyntheticConfig(num_samples=8, data_seed=4).source()
    want = fresh.load(fresh.items()[5])
    busy = syn.SyntheticConfig(num_samples=40, data_seed=4).source()
    items = busy.items()
    for item in reversed(items[:12]):  # other samples first, out of order
        busy.load(item)
    got = busy.load(items[5])
    assert got.key == want.key == "synthetic_00000005"
    np.testing.assert_array_equal(got.pixels, want.pixels)
    np.testing.assert_array_equal(got.label, want.label)
    assert (got.cls, got.txt, got.meta) == (want.cls, want.txt, want.meta)
    assert busy.items()[:8] == fresh.items()


# ---------------------------------------------------------------- pixels and labels agree


def test_flat_palette_rendering_paints_exactly_the_labels():
    """Same rng state, flat colours per class: same layout, and every pixel has its label's colour.

    So the masks that paint the pixels are the masks that write the labels (no anti-aliasing,
    nothing painted without its label), in the textured rendering too, whose geometry is the same.
    """
    ids = np.arange(C)
    palette = np.stack([ids * 15, 255 - ids * 7, (ids * 101) % 256], axis=1).astype(np.uint8)
    assert len(np.unique(palette, axis=0)) == C
    for seed in range(40):
        h, w = 96 + 7 * seed, 300 - 5 * seed
        textured = syn.draw_scene(np.random.default_rng([9, seed]), h, w)
        flat = syn.draw_scene(np.random.default_rng([9, seed]), h, w, palette=palette)
        np.testing.assert_array_equal(flat.label, textured.label)
        np.testing.assert_array_equal(flat.pixels, palette[flat.label])
        assert flat.objects == textured.objects and flat.object_pixels == textured.object_pixels
        assert flat.regions == textured.regions
        assert textured.pixels.shape == (h, w, 3) and textured.pixels.dtype == np.uint8
        assert textured.label.shape == (h, w) and textured.label.dtype == np.uint8


def test_object_bookkeeping_matches_the_label_map(scenes):
    for s in scenes:
        counts = np.bincount(s.label.ravel(), minlength=C)
        assert len(counts) == C  # every value is a class id
        assert s.class_pixels == counts.tolist()
        assert s.classes_present == np.flatnonzero(counts).tolist()
        # the visible pixels of the objects of each class are exactly the pixels labelled so
        per_class = np.zeros(C, int)
        np.add.at(per_class, s.objects, s.object_pixels)
        np.testing.assert_array_equal(per_class[syn.OBJECT_CLASSES], counts[syn.OBJECT_CLASSES])
        assert set(np.flatnonzero(counts[syn.REGION_CLASSES])) <= set(s.regions)
        lo, hi = syn.OBJECTS_PER_IMAGE
        assert lo <= len(s.objects) <= hi and len(s.object_colours) == len(s.objects)
        assert syn.REGIONS_PER_IMAGE[0] <= len(s.regions) <= syn.REGIONS_PER_IMAGE[1]
        assert len(set(s.regions)) == len(s.regions)
        # cls: the largest visible object, ties to the smallest id
        top = max(s.object_pixels)
        assert s.cls == min(c for c, n in zip(s.objects, s.object_pixels) if n == top)
        assert s.cls in syn.OBJECT_CLASSES and counts[s.cls] > 0


def test_shape_areas_match_their_masks():
    """Sizes are drawn as equal-area disc diameters, so the analytic areas must be right."""
    g = np.linspace(-1.1, 1.1, 1101, dtype=np.float32)
    u, v = np.meshgrid(g, g)
    for shape in syn.SHAPES:
        for p in (0.0, 0.5, 0.99):
            area = syn._shape_mask(shape, u, v, p).sum() * (2.2 / 1100) ** 2
            assert area == pytest.approx(syn._shape_area(shape, p), rel=0.03), (shape, p)
            assert not syn._shape_mask(shape, u, v, p)[np.hypot(u, v) > 1.05].any()


# ---------------------------------------------------------------- the task


def test_every_class_appears_and_images_hold_several(scenes):
    images_with = np.zeros(C, int)
    for s in scenes:
        images_with[s.classes_present] += 1
    assert (images_with > 0).all(), dict(zip(syn.CLASSES, images_with))
    assert images_with.min() >= N_SCENES // 20  # no class is rare
    assert np.mean([len(s.classes_present) for s in scenes]) >= 4
    assert min(len(s.classes_present) for s in scenes) >= 2


def test_patch_union_task_is_not_trivial(scenes):
    y = np.concatenate([patch_union(s.label) for s in scenes])  # [N, C]
    positives = y.sum(1)
    assert (positives >= 1).all()
    assert (positives >= 2).mean() > 0.15  # many patches hold a boundary
    rate = y.mean(0)
    assert rate.max() < 0.4  # no class is in nearly every patch
    assert rate[syn.OBJECT_CLASSES].min() > 0.005  # objects are not negligible
    # images come in several sizes and aspect ratios, so loaders must crop and resize
    shapes = {s.label.shape for s in scenes}
    assert len(shapes) > N_SCENES // 2 and any(h != w for h, w in shapes)
    assert all(192 <= h <= 320 and 192 <= w <= 320 for h, w in shapes)


def test_colour_does_not_give_the_object_class_away(scenes):
    """A nearest-class-mean colour classifier over objects is little better than chance."""
    feats, labels = [], []
    for s in scenes:
        pixels = s.pixels.reshape(-1, 3).astype(float)
        flat = s.label.ravel()
        for c in set(s.objects):
            feats.append(pixels[flat == c].mean(0) if (flat == c).any() else None)
            labels.append(c)
    keep = [f is not None for f in feats]
    x = np.array([f for f, k in zip(feats, keep) if k])
    t = np.array([c for c, k in zip(labels, keep) if k])
    classes = np.unique(t)
    means = np.stack([x[t == c].mean(0) for c in classes])
    pred = classes[np.argmin(((x[:, None] - means[None]) ** 2).sum(-1), axis=1)]
    assert (pred == t).mean() < 0.25  # chance is 0.1 over 10 shapes


# ---------------------------------------------------------------- the source


def test_source_info_items_and_load():
    cfg = syn.SyntheticConfig(num_samples=6, split="val", data_seed=7, min_size=64, max_size=96)
    src = cfg.source()
    info = src.info()
    assert (info.dataset, info.split) == ("synthetic", "val")
    assert info.classes == syn.CLASSES and info.num_classes == C
    assert info.has_label and info.has_cls and info.has_txt
    assert info.label_encoding["unlabeled"] == 0 and info.label_encoding["space"] == f"synthetic-{C}"
    assert info.extra["generator_version"] == syn.GENERATOR_VERSION and info.extra["data_seed"] == 7
    json.dumps(info.extra)
    items = src.items()
    assert [it.key for it in items] == [f"synthetic_{i:08d}" for i in range(6)]
    assert [it.ref for it in items] == list(range(6))
    for item in items:
        assert "." not in item.key
        sample = src.load(item)
        h, w = sample.label.shape
        assert 64 <= h <= 96 and 64 <= w <= 96
        assert item.size == int(h * w * syn.BYTES_PER_PIXEL) > 0
        assert sample.jpg is None and sample.pixels.shape == (h, w, 3) and sample.pixels.dtype == np.uint8
        assert sample.label.dtype == np.uint8 and sample.label.max() < C
        assert sample.key == item.key and "7" in sample.source
        assert sample.cls in syn.OBJECT_CLASSES
        assert sample.meta["classes_present"] == np.flatnonzero(np.bincount(sample.label.ravel())).tolist()
        assert len(sample.meta["objects"]) == len(sample.meta["object_pixels"])
        json.dumps(sample.meta)
        assert sample.txt and " on " in sample.txt
        for c, n in zip(sample.meta["objects"], sample.meta["object_pixels"]):
            assert n == 0 or syn.CLASSES[c] in sample.txt
    quiet = syn.SyntheticConfig(num_samples=2, captions=False).source()
    assert not quiet.info().has_txt and quiet.load(quiet.items()[0]).txt is None


def test_caption_lists_visible_objects_then_grounds():
    scene = syn.generate(0, 1)
    text = scene.caption()
    assert text == syn.generate(0, 1).caption()
    things, _, grounds = text.partition(" on ")
    assert things.startswith("a ") and grounds
    largest = scene.objects[int(np.argmax(scene.object_pixels))]
    assert things.split(",")[0].split(" and ")[0].endswith(syn.CLASSES[largest])


def test_size_estimate_is_honest():
    """Item.size (area x BYTES_PER_PIXEL) is close to the writer's encoding of generated pixels:
    JPEG quality 95 with full-resolution chroma, and the label PNG at compress_level 3."""
    ratios = []
    for i in range(24):
        s = syn.generate(0, i)
        jpg, png = io.BytesIO(), io.BytesIO()
        Image.fromarray(s.pixels).save(jpg, format="JPEG", quality=95, subsampling=0)
        Image.fromarray(s.label).save(png, format="PNG", compress_level=3)
        ratios.append((jpg.tell() + png.tell()) / (s.label.size * syn.BYTES_PER_PIXEL))
    assert 0.7 < np.mean(ratios) < 1.4


@pytest.mark.parametrize(
    "overrides",
    [dict(min_size=200, max_size=100), dict(min_size=8), dict(num_samples=-1), dict(data_seed=-3)],
)
def test_bad_options_are_conversion_errors(overrides):
    src = syn.SyntheticConfig(**overrides).source()
    with pytest.raises(ConversionError):
        src.info()
    with pytest.raises(ConversionError):
        src.items()


def test_load_raises_sample_error_only():
    src = syn.SyntheticConfig(num_samples=1).source()
    with pytest.raises(SampleError):
        src.load(Item(key="synthetic_bad", size=0, ref="not an index"))


def test_splits_are_different_image_streams():
    train, val = syn.generate(0, 5, split="train"), syn.generate(0, 5, split="val")
    assert train.pixels.shape != val.pixels.shape or not np.array_equal(train.pixels, val.pixels)
    assert np.array_equal(syn.generate(0, 5, split="val").label, val.label)


def test_captions_use_an_before_a_vowel():
    captions = [syn.generate(0, i).caption() for i in range(60)]
    assert any("an orange " in c for c in captions)  # the case that read "a orange"
    for c in captions:
        for article, word in zip(c.split()[:-1], c.split()[1:]):
            if article in ("a", "an"):
                assert (article == "an") == (word[0] in "aeiou"), c
