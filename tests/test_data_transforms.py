"""The recipes against their references (timm, torchvision, PIL, Patch-Seg), label gathers that
equal PIL's NEAREST exactly, and the ``Window`` that hands the same geometry to a tensor resize."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from fastloc.data.recipes import CenterCrop, CentreSquare, Rkrc, RkrcDraw, Rrc, RrcDraw, Square
from fastloc.data.transforms import (
    center_crop_or_pad,
    largest_center_square,
    pil_filter,
    pil_nearest_indices,
    resize_label,
    rkrc_size,
    sample_rng,
)

S = 32


def apply(recipe, image: Image.Image, label: np.ndarray, size: int, draw):
    """A recipe's image and label map of one view: ([3, S, S] uint8, [S, S] int64)."""
    return recipe.image(image, size, draw), torch.from_numpy(recipe.label(label, size, draw).astype(np.int64))


def test_label_resize_is_pil_nearest():
    for h, w, out_h, out_w in [
        (36, 79, 33, 33),
        (288, 298, 33, 50),
        (5, 7, 32, 32),
        (224, 224, 224, 100),
        (301, 97, 37, 518),
    ]:
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
        monkeypatch.setattr(
            tt,
            "random",
            type(
                "R", (), {"random": staticmethod(lambda: 0.0), "uniform": staticmethod(lambda lo, hi, d=draws: next(d))}
            ),
        )
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


@pytest.mark.parametrize(
    "draw",
    [
        RkrcDraw(1.0, 1.0, "bilinear", False),
        RkrcDraw(2.7, 2.7, "bicubic", True),
        RkrcDraw(1.0 / 1.12, 1.12, "bilinear", True),
        RkrcDraw(1.3 * 1.1, 1.3 / 1.1, "bicubic", False),
    ],
)
def test_rkrc_pixels_match_timm(draw):
    """Image and label go through timm's exact PIL pipeline (ResizeKeepRatio's resize, reflect
    CenterCropOrPad, flip), the label with NEAREST; the third case pads the height."""
    import timm.data.transforms as tt
    from torchvision.transforms import functional as F

    rng = np.random.default_rng(1)
    for h, w in [(40, 50), (45, 37), (100, 33)]:
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        label = np.arange(h * w, dtype=np.int32).reshape(h, w)
        image_t, label_t = apply(Rkrc(), Image.fromarray(pixels), label, S, draw)
        rh, rw = rkrc_size(h, w, S, draw.f_h, draw.f_w)
        expected = []
        for im, interp in [
            (Image.fromarray(pixels), draw.interpolation),
            (Image.fromarray(label, mode="I"), "nearest"),
        ]:
            im = F.resize(im, [rh, rw], F.InterpolationMode(interp))
            im = tt.center_crop_or_pad(im, S, padding_mode="reflect")
            expected.append(np.asarray(F.hflip(im) if draw.flip else im))
        assert np.array_equal(image_t.permute(1, 2, 0).numpy(), expected[0])
        assert np.array_equal(label_t.numpy(), expected[1])


def test_rrc_matches_torchvision_resized_crop():
    from torchvision.transforms import functional as F

    rng = np.random.default_rng(2)
    recipe = Rrc()
    for h, w in [(40, 50), (60, 25), (33, 33)]:
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        label = np.arange(h * w, dtype=np.int32).reshape(h, w)
        d = recipe.draw(sample_rng(0, 0, h), h, w)
        assert d.top >= 0 and d.top + d.height <= h and d.left >= 0 and d.left + d.width <= w
        d = RrcDraw(d.top, d.left, d.height, d.width, "bicubic", False)
        image_t, label_t = apply(Rrc(), Image.fromarray(pixels), label, S, d)
        ref = F.resized_crop(
            Image.fromarray(pixels), d.top, d.left, d.height, d.width, [S, S], F.InterpolationMode.BICUBIC
        )
        ref_label = F.resized_crop(
            Image.fromarray(label, mode="I"), d.top, d.left, d.height, d.width, [S, S], F.InterpolationMode.NEAREST
        )
        assert np.array_equal(image_t.permute(1, 2, 0).numpy(), np.asarray(ref))
        assert np.array_equal(label_t.numpy(), np.asarray(ref_label))


def test_eval_matches_patchseg_reference():
    from torchvision.transforms import v2

    rng = np.random.default_rng(3)
    for h, w in [(40, 57), (57, 40), (32, 32), (101, 64)]:
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        label = np.arange(h * w).reshape(h, w).astype(np.uint16)
        image_t, label_t = apply(CentreSquare(), Image.fromarray(pixels), label, S, None)
        top, left, m = largest_center_square(h, w)
        assert (top, left, m) == ((h - min(h, w)) // 2, (w - min(h, w)) // 2, min(h, w))
        crop = Image.fromarray(pixels).crop((left, top, left + m, top + m))
        assert np.array_equal(image_t.permute(1, 2, 0).numpy(), np.asarray(v2.Resize((S, S))(crop)))
        ref_label = Image.fromarray(label[top : top + m, left : left + m].astype(np.int32), mode="I")
        assert np.array_equal(label_t.numpy(), np.asarray(ref_label.resize((S, S), Image.Resampling.NEAREST)))
        assert label_t.dtype == torch.int64


def test_square_is_torchvision_resize_of_the_whole_image():
    """Leopart's and Hummingbird's evaluation input: Resize((S, S)) on the PIL image and mask."""
    from torchvision.transforms import v2

    rng = np.random.default_rng(4)
    for h, w in [(40, 57), (57, 40), (101, 64)]:
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        label = rng.integers(0, 256, (h, w), dtype=np.uint8)
        image = Image.fromarray(pixels)
        assert np.array_equal(
            Square().image(image, S, None).permute(1, 2, 0).numpy(), np.asarray(v2.Resize((S, S))(image))
        )
        nearest = v2.Resize((S, S), interpolation=v2.InterpolationMode.NEAREST)(Image.fromarray(label))
        assert np.array_equal(Square().label(label, S, None), np.asarray(nearest))
        got = _through_window(image, Square().window(h, w, S, None))
        assert np.array_equal(got, Square().image(image, S, None).numpy())


def test_rkrc_draws_follow_the_recipe():
    recipe = Rkrc()
    draws = [recipe.draw(sample_rng(0, 0, g), 1, 1) for g in range(2000)]
    zoom = np.array([math.sqrt(d.f_h * d.f_w) for d in draws])  # f (the aspect factor cancels)
    aspect = np.array([d.f_w / d.f_h for d in draws])  # s^2 = r
    assert 0.4 < np.mean(zoom > 1 + 1e-9) < 0.6 and zoom.max() <= 1 / math.sqrt(0.08) + 1e-9
    assert (
        0.4 < np.mean(np.abs(aspect - 1) > 1e-9) < 0.6 and aspect.min() >= 3 / 4 - 1e-9 and aspect.max() <= 4 / 3 + 1e-9
    )
    assert 0.4 < np.mean([d.flip for d in draws]) < 0.6
    assert 0.4 < np.mean([d.interpolation == "bicubic" for d in draws]) < 0.6
    assert recipe.draw(sample_rng(0, 0, 7), 1, 1) == draws[7] != recipe.draw(sample_rng(0, 1, 7), 1, 1)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_eval_label_gather_is_pil_nearest(dtype):
    """Awkward sizes, including exact ties where DALI's INTERP_NN and PIL differ (e.g. 36 -> 33)."""
    rng = np.random.default_rng(0)
    for h, w, size in [
        (36, 40, 33),
        (148, 150, 125),
        (12, 59, 21),
        (10, 162, 75),
        (184, 12, 249),
        (7, 7, 7),
        (5, 300, 224),
        (333, 500, 224),
        (480, 640, 518),
        (1, 9, 3),
    ]:
        label = rng.integers(0, 256 if dtype == np.uint8 else 4096, (h, w), dtype=dtype)
        m = min(h, w)
        left, top = (w - m) // 2, (h - m) // 2
        crop = Image.fromarray(label).crop((left, top, left + m, top + m))
        ours = CentreSquare().label(label, size, None)
        if dtype == np.uint8:  # mode L: PIL's own NEAREST resize
            assert np.array_equal(ours, np.asarray(crop.resize((size, size), Image.NEAREST)))
        else:  # mode I;16: PIL computes each coordinate afresh; the twin's tables are mode L's (see the reply)
            index = np.minimum(np.add.accumulate(np.r_[m / size * 0.5, np.full(size - 1, m / size)]).astype(int), m - 1)
            assert np.array_equal(ours, label[top + index][:, left + index])


def _through_window(image: Image.Image, window) -> np.ndarray:
    """What a tensor resize does with a Window, done with PIL: resize the box, reflect-pad, flip."""
    top, left, height, width = window.crop
    y0, x0, y1, x1 = window.box
    image = image.crop((left, top, left + width, top + height))
    box = None if window.box == (0, 0, height, width) else (x0, y0, x1, y1)
    out = image.resize((window.out[1], window.out[0]), pil_filter(window.interpolation), box=box)
    top, bottom, left, right = window.pad
    pixels = np.pad(np.asarray(out), ((top, bottom), (left, right), (0, 0)), mode="reflect")
    return np.ascontiguousarray(pixels[:, ::-1] if window.flip else pixels).transpose(2, 0, 1)


def test_windows_give_the_recipes_geometry():
    """Cropping, resizing the Window's box (PIL's box argument) and padding equals each recipe's
    pixels: exactly for rrc and eval (crop, then resize), to the rounding of rkrc's fractional box."""
    rng = np.random.default_rng(6)
    recipe = Rkrc()
    worst = 0.0
    for trial in range(60):
        h, w = (int(v) for v in rng.integers(8, 120, 2))
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        if trial % 3 == 0:
            draw = recipe.draw(sample_rng(0, trial, 0), 1, 1)
            if trial % 2:  # an aspect jitter that pads one side
                draw = RkrcDraw(1 / math.sqrt(4 / 3), math.sqrt(4 / 3), draw.interpolation, draw.flip)
            window, expect = recipe.window(h, w, S, draw), recipe.image(image, S, draw)
            if min(rkrc_size(h, w, S, draw.f_h, draw.f_w)) < S:
                assert sum(window.pad) > 0
        elif trial % 3 == 1:
            draw = Rrc().draw(sample_rng(0, trial, 0), h, w)
            window, expect = Rrc().window(h, w, S, draw), Rrc().image(image, S, draw)
        else:
            window, expect = CentreSquare().window(h, w, S, None), CentreSquare().image(image, S, None)
        got = _through_window(image, window)
        assert got.shape == (3, S, S)
        diff = np.abs(got.astype(int) - expect.numpy().astype(int))
        worst = max(worst, diff.mean())
        if trial % 3:  # integer boxes: exactly the recipe
            assert diff.max() == 0, trial
    assert worst < 1.0


@pytest.mark.parametrize("crop_pct", [0.875, 0.9, 1.0])
def test_center_crop_is_timms_eval_transform(crop_pct):
    """MaskEmbed's validation transform: timm's Resize(floor(S / crop_pct)) + CenterCrop(S), bit
    for bit on PIL images; label maps through the same geometry with NEAREST."""
    from timm.data import create_transform

    timm_eval = create_transform(input_size=(3, S, S), is_training=False, crop_pct=crop_pct, interpolation="bicubic")
    resize, crop = timm_eval.transforms[:2]
    label_resize = type(resize)(resize.size, interpolation=F_NEAREST())
    rng = np.random.default_rng(8)
    for h, w in [(40, 57), (57, 40), (36, 36), (100, 33), (20, 25), (35, 61)]:
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        label = np.arange(h * w, dtype=np.int32).reshape(h, w)
        image_t, label_t = CenterCrop(crop_pct=crop_pct).image(Image.fromarray(pixels), S, None), None
        assert np.array_equal(image_t.permute(1, 2, 0).numpy(), np.asarray(crop(resize(Image.fromarray(pixels)))))
        label_t = CenterCrop(crop_pct=crop_pct).label(label, S, None)
        assert np.array_equal(label_t, np.asarray(crop(label_resize(Image.fromarray(label, mode="I")))))
        window = CenterCrop(crop_pct=crop_pct).window(h, w, S, None)
        through = _through_window(Image.fromarray(pixels), window)
        assert np.abs(through.astype(int) - image_t.numpy().astype(int)).mean() < 1.0


def F_NEAREST():
    from torchvision.transforms import InterpolationMode

    return InterpolationMode.NEAREST
