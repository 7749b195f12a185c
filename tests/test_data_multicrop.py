"""Multi-crop (``fastloc/data/multicrop.py``): the crops against Leopart's own sampling loop, both
loaders delivering the same draws and bases, and the device's views against torchvision's ops.

The reference is MkuuWaUjinga/leopart @ 7835701, src/leopart_transforms.py (NeCo's
neco_transforms.py @ 3932160 is the same code); it is not installed: ``reference_crops`` below
transcribes its lines, and ``reference_get_params`` torchvision's (0.29.1) RandomResizedCrop.get_params
that it calls, with torch's global generator replaced by the numpy generator fastloc draws from.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from loader_data import LOADERS, mean_image_difference, run_epochs
from torchvision.ops import roi_align
from torchvision.transforms.v2 import functional as TF

from fastloc.data.config import SOLO, LoaderConfig
from fastloc.data.multicrop import BLUR, BOX, GREY, JITTER, PARAMS, SIGMA, MultiCrop, cut_views, intersects, view_boxes
from fastloc.data.recipes import Square
from fastloc.data.shards import open_shards
from fastloc.data.transforms import sample_rng
from fastloc.shard.encode import parse_jpeg_header

L = 48  # the loader's base side in the loader tests
SMALL = MultiCrop(sizes=(24, 12))  # the tests' views: 2 x 24 px, 4 x 12 px

# ---------------------------------------------------------------- the crops: Leopart's loop


def reference_get_params(rng: np.random.Generator, height: int, width: int, scale, ratio):
    """torchvision/transforms/transforms.py 941-970 (RandomResizedCrop.get_params), its draws from
    ``rng``: ``torch.empty(1).uniform_(a, b)`` -> a + (b - a) u, ``torch.randint(0, n)`` ->
    ``rng.integers(0, n)`` (float64 in place of torch's float32 draws)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * (scale[0] + (scale[1] - scale[0]) * rng.random())
        aspect_ratio = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * rng.random())
        w = int(round(math.sqrt(target_area * aspect_ratio)))  # noqa: RUF046 (as transcribed)
        h = int(round(math.sqrt(target_area / aspect_ratio)))  # noqa: RUF046
        if 0 < w <= width and 0 < h <= height:
            i = int(rng.integers(0, height - h + 1))
            j = int(rng.integers(0, width - w + 1))
            return i, j, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))  # noqa: RUF046
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))  # noqa: RUF046
    else:
        w = width
        h = height
    return (height - h) // 2, (width - w) // 2, h, w


def reference_crops(recipe: MultiCrop, rng: np.random.Generator, height: int, width: int) -> tuple[list, int]:
    """leopart_transforms.py 74-80 (one RandomResizedCrop per crop) and 83-113 (``__call__``'s
    sampling loop, the pixel work left out): ([x1, y1, x2, y2] per crop, redraws)."""
    sample = SimpleNamespace(size=(width, height))  # a PIL image's (w, h)
    nmb_crops, min_scale_crops = list(recipe.counts), [s[0] for s in recipe.scales]
    max_scale_crops = [s[1] for s in recipe.scales]
    rrc_transforms = []
    for i in range(len(recipe.sizes)):
        scale = (min_scale_crops[i], max_scale_crops[i])
        rrc_transforms.extend([SimpleNamespace(scale=scale, ratio=(3.0 / 4.0, 4.0 / 3.0))] * nmb_crops[i])
    crop_bboxes = torch.zeros(len(rrc_transforms), 4)
    redraws = 0
    for i, rrc_transform in enumerate(rrc_transforms):
        y1, x1, h, w = reference_get_params(rng, height, width, rrc_transform.scale, rrc_transform.ratio)
        if i > 0:
            while True:
                bbox = torch.Tensor([x1, y1, x1 + w, y1 + h])
                left_top = torch.max(bbox.unsqueeze(0)[:, None, :2], crop_bboxes[: min(i, nmb_crops[0]), :2])
                right_bottom = torch.min(bbox.unsqueeze(0)[:, None, 2:], crop_bboxes[: min(i, nmb_crops[0]), 2:])
                wh = (right_bottom - left_top).clamp(min=0)  # _upcast: float32 stays float32
                inter = wh[:, :, 0] * wh[:, :, 1]
                min_intersection = int((sample.size[0] * sample.size[1]) * recipe.min_intersection)
                if i in list(range(nmb_crops[0])):
                    min_intersection *= 2
                if not torch.all(inter > min_intersection):
                    y1, x1, h, w = reference_get_params(rng, height, width, rrc_transform.scale, rrc_transform.ratio)
                    redraws += 1
                else:
                    break
        crop_bboxes[i] = torch.Tensor([x1, y1, x1 + w, y1 + h])
    return crop_bboxes.tolist(), redraws


SHAPES = [(48, 48), (60, 90), (333, 500), (500, 120), (1200, 1600)]  # (h, w): square, wide, tall, large


@pytest.mark.parametrize(
    "recipe",
    [
        MultiCrop(),
        MultiCrop(min_intersection=0.12),
        MultiCrop(
            sizes=(224, 98, 64), counts=(3, 2, 2), scales=((0.3, 1), (0.15, 0.3), (0.14, 0.2)), min_intersection=0.1
        ),
    ],
    ids=["leopart", "tight-overlap", "three-kinds"],
)
def test_the_crops_are_those_of_leopart_s_loop_on_the_same_draws(recipe):
    redraws = 0
    for h, w in SHAPES:
        for seed in range(40):
            ours = recipe.crop_boxes(np.random.default_rng([seed, h, w]), h, w)
            theirs, n = reference_crops(recipe, np.random.default_rng([seed, h, w]), h, w)
            assert [[left, top, left + cw, top + ch] for top, left, ch, cw in ours] == theirs, (h, w, seed)
            redraws += n
    assert redraws > 20  # the overlap rule was exercised, not only the first draws


@pytest.mark.parametrize("side", [4095, 4096, 4097, 5001])
def test_the_overlap_test_rounds_as_the_reference_s_float32_tensors(side):
    """Past 2^24 px the reference's float32 intersection (leopart_transforms.py:93-106) rounds: at
    each threshold around the exact area, ``intersects`` answers as its tensors do."""
    box, other = (0, 0, side, side + 1), (0, 0, 9000, 9000)
    for threshold in range(side * (side + 1) - 3, side * (side + 1) + 3):
        bbox = torch.Tensor([box[1], box[0], box[1] + box[3], box[0] + box[2]])
        crop_bboxes = torch.Tensor([[other[1], other[0], other[1] + other[3], other[0] + other[2]]])
        left_top = torch.max(bbox.unsqueeze(0)[:, None, :2], crop_bboxes[:, :2])
        right_bottom = torch.min(bbox.unsqueeze(0)[:, None, 2:], crop_bboxes[:, 2:])
        wh = (right_bottom - left_top).clamp(min=0)
        reference = bool(torch.all(wh[:, :, 0] * wh[:, :, 1] > threshold))
        assert intersects(box, [other], threshold) == reference, threshold


def test_every_crop_overlaps_every_global_and_keeps_its_scale():
    recipe = MultiCrop(min_intersection=0.05)
    kinds = [scale for scale, n in zip(recipe.scales, recipe.counts) for _ in range(n)]
    fractions: list[list[float]] = [[] for _ in kinds]
    rows = []
    for index in range(300):
        h, w = SHAPES[index % len(SHAPES)]
        draw = recipe.draw(sample_rng(0, 0, index), h, w)
        rows.append(draw.params)
        threshold = int(h * w * recipe.min_intersection)
        for i, (top, left, ch, cw) in enumerate(draw.boxes):
            assert top >= 0 and left >= 0 and top + ch <= h and left + cw <= w
            area = ch * cw / (h * w)
            slack = (ch + cw + 1) / (2 * h * w)  # the sides are rounded to whole pixels
            assert kinds[i][0] - slack <= area <= kinds[i][1] + slack, (h, w, i, area)
            fractions[i].append(area)
            for j, (g_top, g_left, g_h, g_w) in enumerate(draw.boxes[: min(i, 2)]):
                inter = max(0, min(left + cw, g_left + g_w) - max(left, g_left)) * max(
                    0, min(top + ch, g_top + g_h) - max(top, g_top)
                )
                assert inter > threshold * (2 if i < 2 else 1), (h, w, i, j)
        normalized = np.array(
            [[left / w, top / h, (left + cw) / w, (top + ch) / h] for top, left, ch, cw in draw.boxes]
        )
        np.testing.assert_allclose(draw.params[:, BOX], normalized, rtol=1e-6)
    for i, (lo, hi) in enumerate(kinds):  # the draws span each kind's range
        assert min(fractions[i]) < lo + 0.1 * (hi - lo) and max(fractions[i]) > hi - 0.2 * (hi - lo)
    p = np.concatenate(rows)  # [300 V, PARAMS]
    assert abs(p[:, JITTER].mean() - 0.8) < 0.04 and abs(p[:, GREY].mean() - 0.2) < 0.04
    assert abs(p[:, BLUR].mean() - 0.5) < 0.05
    assert p[:, 5:8].min() >= 0.2 and p[:, 5:8].max() <= 1.8 and np.abs(p[:, 8]).max() <= 0.2
    assert p[:, SIGMA].min() >= 0.1 and p[:, SIGMA].max() <= 2.0
    assert {tuple(r) for r in p[:, 9:13].astype(int)} == set(itertools.permutations(range(4)))


# ---------------------------------------------------------------- both loaders


def _config(root, **kw) -> LoaderConfig:
    return LoaderConfig(
        **{"shards": root, "batch_size": 8, "size": L, "recipe": SMALL, "normalize": False, "labels": False, **kw}
    )


def _params(batches) -> torch.Tensor:
    return torch.stack([b.params for b in batches])


def test_both_loaders_deliver_the_same_draws_and_bases(synthetic):
    cfg = _config(synthetic, seed=3, workers=0, threads=1)
    twin = run_epochs(LOADERS["torch"](cfg, SOLO), 2)
    workers = run_epochs(LOADERS["torch"](replace(cfg, workers=2), SOLO), 2)
    dali = run_epochs(LOADERS["dali-cpu"](replace(cfg, workers=2, threads=2), SOLO), 2)
    p = _params(twin)  # [T, B, V, PARAMS]
    assert p.shape == (10, 8, 6, PARAMS) and p.dtype == torch.float32
    assert torch.equal(p, _params(workers)) and torch.equal(p, _params(dali))
    assert [b.keys for b in twin] == [b.keys for b in dali]
    assert twin[0].images.shape == (8, 3, L, L) and twin[0].images.dtype == torch.uint8
    assert mean_image_difference(twin, dali) < 1.5  # the loader tests' bound between the two loaders
    # the params are the recipe's draws for the sample, epoch and seed in each slot
    shards = open_shards(synthetic)
    for t in (0, 7):
        for slot, g in enumerate(twin[t].index.tolist()):
            header = parse_jpeg_header(shards.read(g, ("jpg",))[2]["jpg"])
            draw = SMALL.draw(sample_rng(3, t // 5, g), header.height, header.width)
            assert torch.equal(twin[t].params[slot], torch.tensor(draw.params))
    # the views cut from either loader's bases differ as little as the bases do (in grey levels)
    grey_levels = ((0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255))
    worst = 0.0
    for a, b in zip(twin, dali):
        for va, vb in zip(SMALL.cut(a.images, a.params, *grey_levels), SMALL.cut(b.images, b.params, *grey_levels)):
            worst = max(worst, float((va - vb).abs().mean()))
    assert 0 < worst < 1.5
    with pytest.raises(ValueError, match="MultiCrop makes no label maps"):
        next(iter(LOADERS["torch"](replace(cfg, labels=True), SOLO)))


@pytest.mark.parametrize(("saver", "restorer"), [("torch", "torch"), ("torch", "dali-cpu")])
def test_a_resumed_run_draws_the_same_crops(synthetic, saver, restorer):
    cfg = _config(synthetic, seed=5, workers=2, threads=2)
    whole = _params(run_epochs(LOADERS[saver](cfg, SOLO), 2))
    first = LOADERS[saver](cfg, SOLO)
    got = [b.params for _, b in zip(range(2), first)]  # two batches of epoch 0, then stop
    second = LOADERS[restorer](cfg, SOLO)
    second.load_state_dict(first.state_dict())
    first.close()
    for epoch in range(second.epoch, 2):
        second.set_epoch(epoch)
        got += [b.params for b in second]
    assert torch.equal(torch.stack(got), whole)
    moved = next(iter(LOADERS[restorer](replace(cfg, workers=0), SOLO))).to("cpu")  # Batch.to carries them
    assert torch.equal(moved.params, whole[0])
    plain = next(iter(LOADERS[restorer](replace(cfg, recipe=Square(), workers=0), SOLO)))
    assert plain.params is None  # a recipe without params (Recipe.params' default)


# ---------------------------------------------------------------- the device's views


def _photometric_reference(crop: torch.Tensor, row: torch.Tensor, kernel: int) -> torch.Tensor:
    """One view with torchvision's own functional ops, in the reference's order
    (leopart_transforms.py 63-67: RandomApply(ColorJitter), RandomGrayscale, RandomApply(blur);
    ColorJitter.forward's loop over fn_idx, torchvision/transforms/transforms.py 1280-1288)."""
    if row[JITTER] > 0.5:
        b, c, s, h = row[5:9].tolist()
        for fn_id in row[9:13].long().tolist():
            if fn_id == 0:
                crop = TF.adjust_brightness(crop, b)
            elif fn_id == 1:
                crop = TF.adjust_contrast(crop, c)
            elif fn_id == 2:
                crop = TF.adjust_saturation(crop, s)
            elif fn_id == 3:
                crop = TF.adjust_hue(crop, h)
    if row[GREY] > 0.5:
        crop = TF.rgb_to_grayscale(crop, num_output_channels=3)
    if row[BLUR] > 0.5:
        crop = TF.gaussian_blur(crop, [kernel, kernel], [float(row[SIGMA])] * 2)
    return crop


def test_the_device_s_photometric_ops_are_torchvision_s():
    """Every view of 24 samples: roi_align's crop, then torchvision's functional ops applied per
    image with the drawn factors, order and sigma, then TF.normalize -> cut_views' view."""
    recipe = MultiCrop(sizes=(32, 16))
    params = torch.from_numpy(recipe.params([recipe.draw(sample_rng(1, 0, i), 70, 90) for i in range(24)]))
    base = torch.randint(0, 256, (24, 3, 40, 40), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    base[0] = 128  # a grey image (hue and saturation: h = s = 0)
    base[1, :, :, :20] = base[1, :1, :, :20]  # grey pixels beside coloured ones
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    views = recipe.cut(base, params, mean, std)
    assert [tuple(v.shape) for v in views] == [(24, 3, 32, 32)] * 2 + [(24, 3, 16, 16)] * 4
    for v, view in enumerate(views):
        side = view.shape[-1]
        for i in range(24):
            box = torch.cat([torch.zeros(1), params[i, v, BOX] * 40])[None]  # [1, 5]
            crop = roi_align(base[i : i + 1].float() / 255, box, (side, side), 1.0, -1, True)[0]
            expected = TF.normalize(_photometric_reference(crop, params[i, v], 13), list(mean), list(std))
            torch.testing.assert_close(view[i], expected, atol=2e-5, rtol=0)
    flat = params.reshape(-1, PARAMS)
    for column in (JITTER, GREY, BLUR):  # each gate both ways among the views compared
        assert 0 < int((flat[:, column] > 0.5).sum()) < flat.shape[0]
    assert torch.equal(view_boxes(params), params[..., BOX])


def _plain(boxes: list[tuple[float, float, float, float]]) -> torch.Tensor:
    """[1, V, PARAMS]: the views' normalized boxes, no jitter, grey or blur."""
    p = torch.zeros(1, len(boxes), PARAMS)
    p[0, :, BOX] = torch.tensor(boxes)
    return p


def _inside(n: int, size: int, clamped: bool = False) -> torch.Tensor:
    """[size] bool: the output pixels whose sample point lies between the box's first and last
    pixel centres along an axis of n box pixels (``clamped``: past the last is allowed too)."""
    at = (torch.arange(size) + 0.5) * n / size - 0.5
    return (at >= 0) & ((at <= n - 1) | clamped)


def test_roi_align_crops_as_resized_crop():
    """A 96-px view of a 20 x 30 box of a 64-px base (an upscale) against torchvision's
    ``resized_crop`` (bilinear) of the same box: equal (1e-5) wherever the sample point lies
    between the box's pixel centres; the outer half pixel interpolates with the pixels just outside
    the box (resized_crop clamps to the box's edge), a mean difference under 2 grey levels over the
    whole view on noise. At the base's edges both clamp: the whole base matches everywhere, a
    bottom-right quarter everywhere but its top and left half pixel."""
    base = torch.randint(0, 256, (1, 3, 64, 64), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    top, left, h, w, size = 10, 7, 20, 30, 96
    boxes = [(left / 64, top / 64, (left + w) / 64, (top + h) / 64), (0.0, 0.0, 1.0, 1.0), (0.5, 0.5, 1.0, 1.0)]
    unit = ((0.0,) * 3, (1.0,) * 3)
    inner, whole, corner = (v[0] for v in cut_views(base, _plain(boxes), (size,) * 3, *unit))
    pixels = base[0].float() / 255
    expected = TF.resized_crop(pixels, top, left, h, w, [size, size], antialias=False)
    interior = _inside(h, size)[:, None] & _inside(w, size)[None, :]
    assert 0.9 < interior.float().mean() < 1
    torch.testing.assert_close(inner[:, interior], expected[:, interior], atol=1e-5, rtol=0)
    assert 0 < float((inner - expected).abs().mean()) * 255 < 2
    torch.testing.assert_close(
        whole, TF.resized_crop(pixels, 0, 0, 64, 64, [size, size], antialias=False), atol=1e-5, rtol=0
    )
    expected = TF.resized_crop(pixels, 32, 32, 32, 32, [size, size], antialias=False)
    kept = _inside(32, size, clamped=True)[:, None] & _inside(32, size, clamped=True)[None, :]
    torch.testing.assert_close(corner[:, kept], expected[:, kept], atol=1e-5, rtol=0)
    assert float((corner[:, ~kept] - expected[:, ~kept]).abs().max()) > 1e-3  # the half pixel outside the box


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"sizes": (224,)}, "one entry per kind"),
        ({"sizes": (224, 0)}, r"MultiCrop.sizes must be positive"),
        ({"counts": (2, 0)}, r"MultiCrop.counts must be positive"),
        ({"scales": ((0.25, 1.0), (0.3, 0.2))}, r"MultiCrop.scales must be \(low, high\)"),
        ({"scales": ((0.25, 1.5), (0.05, 0.25))}, r"MultiCrop.scales must be \(low, high\)"),
        ({"min_intersection": 0.0}, r"MultiCrop.min_intersection must be in \(0, 1\)"),
        ({"min_intersection": 0.3}, r"MultiCrop.scales \[1\]\[1\] must exceed the overlap"),
        ({"jitter": 3.0}, r"MultiCrop.jitter must be in \[0, 2.5\]"),
        ({"grey_p": 1.5}, r"MultiCrop.grey_p must be in \[0, 1\]"),
        ({"blur": -1.0}, r"MultiCrop.blur must be a finite number >= 0"),
    ],
)
def test_bad_fields_are_one_clear_error(fields, match):
    with pytest.raises(ValueError, match=match):
        MultiCrop(**fields)


def test_bad_device_inputs_are_one_clear_error():
    base = torch.zeros(2, 3, 16, 16, dtype=torch.uint8)
    params = _plain([(0.0, 0.0, 1.0, 1.0)] * 6).expand(2, -1, -1)
    with pytest.raises(ValueError, match=r"base must be \[B, 3, L, L\] uint8"):
        SMALL.cut(base.float(), params, (0, 0, 0), (1, 1, 1))
    with pytest.raises(ValueError, match="params must be"):
        SMALL.cut(base, params[:, :, :4], (0, 0, 0), (1, 1, 1))
    with pytest.raises(ValueError, match="5 sizes for 6 views"):
        cut_views(base, params, (8,) * 5, (0, 0, 0), (1, 1, 1))
