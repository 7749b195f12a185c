"""Difficulties of the synthetic generator: ``standard`` draws exactly what it drew before they
existed; ``demo`` is an easier 8-class task (large shapes with plain fills, coarse textures,
varied backgrounds) for a tiny ViT at 64 px."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import zlib

import numpy as np
import pytest

from fastloc.shard.manifest import read_manifest
from fastloc.shard.sources import synthetic as syn

DEMO = syn.DIFFICULTIES["demo"]
N_SCENES = 120


def digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.tobytes() if isinstance(p, np.ndarray) else str(p).encode())
    return h.hexdigest()[:16]


@pytest.fixture(scope="module")
def demo() -> list[syn.Scene]:
    return [syn.generate(0, i, 96, 160, difficulty="demo") for i in range(N_SCENES)]


@pytest.fixture(scope="module")
def standard() -> list[syn.Scene]:
    return [syn.generate(0, i, 96, 160) for i in range(N_SCENES)]


# ---------------------------------------------------------------- standard: unchanged


# (data_seed, index, min_size, max_size, split): digests of (pixels, label) and of (caption, objects,
# regions, object_pixels), computed before difficulties existed.
BEFORE = [
    ((0, 0, 192, 320, "train"), "692bdc4c7f8fc79a", "a9d005e022a6062a"),
    ((0, 7, 192, 320, "train"), "7e6ec348a73e648f", "1bde13f8e8836d12"),
    ((3, 17, 64, 96, "val"), "6003d80b39301fca", "e141d1e74823cf9a"),
    ((5, 2, 96, 160, "train"), "2d83940bab91d10f", "8917698c9fe3539b"),
]


@pytest.mark.parametrize("args, pixels, facts", BEFORE)
def test_standard_samples_are_byte_identical_to_before(args, pixels, facts):
    for scene in (syn.generate(*args), syn.generate(*args, difficulty="standard")):
        assert digest(scene.pixels, scene.label) == pixels
        assert digest(scene.caption(), scene.objects, scene.regions, scene.object_pixels) == facts


def test_standard_palette_rendering_and_manifest_facts_are_unchanged():
    ids = np.arange(len(syn.CLASSES))
    palette = np.stack([ids * 15, 255 - ids * 7, (ids * 101) % 256], 1).astype(np.uint8)
    scene = syn.draw_scene(np.random.default_rng([9, 1]), 120, 200, palette=palette)
    assert digest(scene.pixels, scene.label) == "56b1a4851b0536a1"
    info = syn.SyntheticConfig(num_samples=3, data_seed=7, min_size=64, max_size=96).source().info()
    assert digest(json.dumps(info.extra, sort_keys=True)) == "b20592221f65dcf4"
    assert digest(info.label_encoding, info.source, info.classes) == "97eb136d9382b977"
    assert "difficulty" not in info.extra


def test_standard_difficulty_holds_the_module_constants():
    d = syn.DIFFICULTIES["standard"]
    assert d.classes == syn.CLASSES
    assert (d.region_classes, d.object_classes) == (syn.REGION_CLASSES, syn.OBJECT_CLASSES)
    assert (d.regions_per_image, d.region_count_weights) == (syn.REGIONS_PER_IMAGE, syn.REGION_COUNT_WEIGHTS)
    assert (d.objects_per_image, d.object_diameter) == (syn.OBJECTS_PER_IMAGE, syn.OBJECT_DIAMETER)
    assert d.fills == tuple(syn.FILLS) and d.fill_weights == tuple(syn.FILL_WEIGHTS.tolist())
    assert d.background_weight == syn.BACKGROUND_WEIGHT and d.object_margin == 0.0
    assert d.texture_period is None and d.background == "gradient"
    # the standard seed has no difficulty in it
    want = np.random.default_rng([4, zlib.crc32(b"val"), 9]).random(3)
    np.testing.assert_array_equal(syn.sample_rng(4, 9, "val", "standard").random(3), want)


# ---------------------------------------------------------------- demo: the class set


def test_demo_class_space():
    assert DEMO.classes == [
        "background",
        "stripes",
        "checkerboard",
        "dots",
        "circle",
        "square",
        "triangle",
        "cross",
    ]
    assert (DEMO.region_classes, DEMO.object_classes) == ([0, 1, 2, 3], [4, 5, 6, 7])
    assert set(DEMO.fills) == {"flat", "gradient"}
    assert syn.difficulty_of("demo") is DEMO and syn.difficulty_of(DEMO) is DEMO
    with pytest.raises(ValueError, match="unknown difficulty"):
        syn.difficulty_of("hard")


def test_demo_scenes_use_the_demo_classes_and_counts(demo):
    images_with = np.zeros(8, int)
    for s in demo:
        assert s.classes == tuple(DEMO.classes) and int(s.label.max()) < 8
        counts = np.bincount(s.label.ravel(), minlength=8)
        assert len(counts) == 8 and s.class_pixels == counts.tolist()
        assert 1 <= len(s.objects) <= 3 and set(s.objects) <= set(DEMO.object_classes)
        assert 1 <= len(s.regions) <= 3 and set(s.regions) <= set(DEMO.region_classes)
        assert len(set(s.regions)) == len(s.regions)
        per_class = np.zeros(8, int)
        np.add.at(per_class, s.objects, s.object_pixels)
        np.testing.assert_array_equal(per_class[4:], counts[4:])
        assert s.cls in DEMO.object_classes
        images_with[s.classes_present] += 1
    assert images_with.min() >= N_SCENES // 10, dict(zip(DEMO.classes, images_with))


def test_demo_objects_are_few_and_large(demo, standard):
    def share(scenes, classes):
        return np.mean([np.isin(s.label, classes).mean() for s in scenes])

    def per_object(scenes):
        return np.mean([n / s.label.size for s in scenes for n in s.object_pixels])

    assert share(demo, DEMO.object_classes) > 1.15 * share(standard, syn.OBJECT_CLASSES)
    assert per_object(demo) > 2.5 * per_object(standard)
    assert np.mean([len(s.objects) for s in demo]) < 2.5 < np.mean([len(s.objects) for s in standard])


def plane_residual(pixels: np.ndarray, mask: np.ndarray) -> float:
    """Largest per-channel std of the pixels under ``mask`` around their best-fitting plane in (y, x)."""
    ys, xs = np.nonzero(mask)
    a = np.stack([ys, xs, np.ones_like(ys)], 1).astype(float)
    values = pixels[mask].astype(float)  # [n, 3]
    coef, *_ = np.linalg.lstsq(a, values, rcond=None)
    return float((values - a @ coef).std(0).max())


def single_objects(scene: syn.Scene):
    """(fill, visible mask) of each object whose class is the only one of its kind in the scene."""
    for cls, fill, n in zip(scene.objects, scene.object_fills, scene.object_pixels):
        if scene.objects.count(cls) == 1 and n >= 64:
            yield fill, scene.label == cls


def test_demo_object_fills_are_never_textures(demo, standard):
    """Recorded fills are flat or gradient, and each object's pixels are a plane plus pixel noise
    (a textured fill, as standard draws them, is far from any plane)."""
    residuals = []
    for s in demo:
        assert set(s.object_fills) <= {"flat", "gradient"} and len(s.object_fills) == len(s.objects)
        residuals += [plane_residual(s.pixels, mask) for _, mask in single_objects(s)]
    assert len(residuals) > N_SCENES and max(residuals) < 6.0
    textured = [plane_residual(s.pixels, m) for s in standard for f, m in single_objects(s) if f in syn.TEXTURES]
    assert len(textured) > 50 and np.mean(np.array(textured) > 6.0) > 0.9


def test_demo_backgrounds_vary(demo, standard):
    """Class 0 is no near-constant colour: it is told by the absence of texture and shape."""

    def spreads(scenes):
        return np.array([s.pixels[s.label == 0].std(0).max() for s in scenes if (s.label == 0).sum() >= 400])

    ours, before = spreads(demo), spreads(standard)
    assert len(ours) > N_SCENES // 5
    assert np.mean(ours > 8.0) > 0.8
    assert np.median(ours) > 2 * np.median(before)


def test_demo_palette_rendering_paints_exactly_the_labels():
    palette = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 255, 255]], np.uint8)
    palette = np.concatenate([palette, [[255, 0, 255], [128, 128, 128]]]).astype(np.uint8)
    for seed in range(10):
        h, w = 80 + 9 * seed, 170 - 6 * seed
        textured = syn.draw_scene(np.random.default_rng([2, seed]), h, w, difficulty="demo")
        flat = syn.draw_scene(np.random.default_rng([2, seed]), h, w, palette=palette, difficulty=DEMO)
        np.testing.assert_array_equal(flat.label, textured.label)
        np.testing.assert_array_equal(flat.pixels, palette[flat.label])
        assert flat.objects == textured.objects and flat.regions == textured.regions


def test_demo_colour_does_not_give_the_object_class_away(demo):
    feats, labels = [], []
    for s in demo:
        for cls in set(s.objects):
            if s.class_pixels[cls]:
                feats.append(s.pixels[s.label == cls].mean(0))
                labels.append(cls)
    x, t = np.array(feats), np.array(labels)
    classes = np.unique(t)
    means = np.stack([x[t == c].mean(0) for c in classes])
    pred = classes[np.argmin(((x[:, None] - means[None]) ** 2).sum(-1), axis=1)]
    assert (pred == t).mean() < 0.45  # chance is 0.25 over 4 shapes


# ---------------------------------------------------------------- demo: determinism and the source


def test_demo_is_deterministic_and_its_own_stream():
    a, b = syn.generate(3, 5, 96, 160, difficulty="demo"), syn.generate(3, 5, 96, 160, difficulty=DEMO)
    np.testing.assert_array_equal(a.pixels, b.pixels)
    np.testing.assert_array_equal(a.label, b.label)
    assert a.caption() == b.caption()
    for i in range(4):
        easy, hard = syn.generate(3, i, 96, 160, difficulty="demo"), syn.generate(3, i, 96, 160)
        assert easy.pixels.shape != hard.pixels.shape or not np.array_equal(easy.pixels, hard.pixels)


def test_demo_source_records_its_classes_and_parameters():
    src = syn.SyntheticConfig(num_samples=4, data_seed=2, min_size=64, max_size=96, difficulty="demo").source()
    info = src.info()
    assert info.classes == DEMO.classes and info.num_classes == 8
    assert info.label_encoding["space"] == "synthetic-demo-8" and info.label_encoding["unlabeled"] == 0
    extra = info.extra
    assert (extra["region_classes"], extra["object_classes"]) == ([0, 1, 2, 3], [4, 5, 6, 7])
    assert extra["difficulty"] == "demo" and extra["difficulty_parameters"]["shapes"] == list(DEMO.shapes)
    assert extra["objects_per_image"] == [1, 3] and "[1/4, 1/2]" in extra["object_diameter"]
    assert "crc32(b'demo')" in extra["rng"] and "difficulty=demo" in info.source
    json.dumps(extra)
    for item in src.items():
        sample = src.load(item)
        want = syn.generate(2, item.ref, 64, 96, difficulty="demo")
        np.testing.assert_array_equal(sample.pixels, want.pixels)
        assert sample.label.max() < 8 and sample.cls in DEMO.object_classes
        assert sample.txt and " on " in sample.txt
        for cls, n in zip(sample.meta["objects"], sample.meta["object_pixels"]):
            assert n == 0 or DEMO.classes[cls] in sample.txt


def test_demo_cli_converts_and_verifies(tmp_path):
    def shard(*argv):
        run = subprocess.run([sys.executable, "-m", "fastloc.shard", *argv], capture_output=True, text=True)
        assert run.returncode == 0, run.stdout + run.stderr
        return run

    common = ["--num-samples", "16", "--min-size", "64", "--max-size", "96", "--processes", "1", "--no-progress"]
    shard("synthetic", "--difficulty", "demo", *common, "--out", str(tmp_path))
    split = tmp_path / "synthetic" / "train"
    manifest = read_manifest(split)
    assert manifest["classes"] == DEMO.classes and manifest["num_samples"] == 16
    assert manifest["source"]["difficulty"] == "demo"
    assert manifest["source"]["object_classes"] == DEMO.object_classes
    assert manifest["conversion"]["options"]["difficulty"] == "demo"
    shard("verify", str(split), "--processes", "1")
