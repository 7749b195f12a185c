"""dinov3-ade20k's training pipeline (fastloc.probe.dense.mmseg): the resize against dinov3's and
mmcv's formulas, the cat_max_ratio crop, padding, the joint flip, the photometric distortion, and
the loader's seeded order whatever the number of workers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fastloc.data.config import SOLO, LoaderConfig
from fastloc.data.loader import make_loader
from fastloc.data.order import EpochPlan
from fastloc.data.shards import open_shards
from fastloc.data.transforms import normalize, sample_rng
from fastloc.probe.dense.config import Dinov3Ade20kConfig
from fastloc.probe.dense.data import VOID, LabelSpace, open_dense_data
from fastloc.probe.dense.mmseg import (
    CROP_CHECKS,
    RATIO_RANGE,
    Mmseg,
    Photometric,
    choose_crop,
    convert,
    crop_ok,
    draw_photometric,
    photometric,
    resize_label,
    train_size,
)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IDENTITY = LabelSpace(names=["c0", "c1", "c2", "c3"], ignore=None, zero_is_ignore=False)


def augment(image: Image.Image, label: torch.Tensor, rng, short_side: int, crop: int):
    """One sample through the recipe as the torch twin runs it: (image [3, crop, crop] float32
    normalized and padded, label [crop, crop] int64 with VOID)."""
    recipe = Mmseg(labels=IDENTITY, short_side=short_side)
    (view,) = recipe.views(rng, image.height, image.width, crop, label.numpy())
    images = recipe.finish(normalize(recipe.image(image, crop, view.draw)[None], MEAN, STD), [view.draw])
    return images[0], torch.from_numpy(view.label)


def mmcv_rescale_size(w: int, h: int, ratio: float, img_scale=(2048, 512)) -> tuple[int, int]:
    """mmseg Resize(img_scale, ratio_range) -> mmcv.rescale_size, transcribed; (h, w)."""
    scale = int(img_scale[0] * ratio), int(img_scale[1] * ratio)
    f = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * f + 0.5), int(w * f + 0.5)


@pytest.mark.parametrize(
    "h, w, ratio, expected",
    [
        (512, 683, 1.0, (512, 683)),
        (512, 683, 0.5, (256, 342)),  # int(256 * 683 / 512 + 0.5) = int(342.0)
        (683, 512, 2.0, (1366, 1024)),
        (512, 683, 1.37, (701, 935)),  # short int(701.44)
        (300, 400, 1.0, (512, 683)),  # dinov3's own docstring example
        (480, 480, 0.75, (384, 384)),
    ],
)
def test_train_size_is_fixed_side_resize_and_mmcv_under_4x(h, w, ratio, expected):
    assert train_size(h, w, 512, ratio) == expected
    assert mmcv_rescale_size(w, h, ratio) == expected  # DINOv2's mmseg config agrees while long < 4 x short


def test_train_size_has_no_long_side_cap():
    """dinov3's FixedSideResize keeps the short side; mmseg's img_scale caps the long side at 2048 r."""
    assert train_size(512, 4096, 512, 1.0) == (512, 4096)
    assert mmcv_rescale_size(4096, 512, 1.0) == (256, 2048)


def test_labels_resize_by_torch_nearest_not_pil():
    """torchvision Resize(NEAREST) on a Mask tensor: index floor(i * in / out) (PIL: floor((i + 0.5) * in / out))."""
    label = torch.arange(5).repeat(2, 1)  # [2, 5]
    out = resize_label(label, (2, 3))
    assert out.tolist() == [[0, 1, 3], [0, 1, 3]] and out.dtype == torch.int64
    pil = np.asarray(Image.fromarray(label.numpy().astype(np.uint8)).resize((3, 2), Image.Resampling.NEAREST))
    assert pil[0].tolist() == [0, 2, 4]


def test_crop_ok_is_mmseg_cat_max_ratio():
    v = VOID
    assert crop_ok(torch.tensor([0, 0, 1, 1]))
    assert not crop_ok(torch.tensor([0, 0, 0, 1]))  # 0.75 is not below 0.75
    assert not crop_ok(torch.tensor([2, 2, v, v, v]))  # one class: void does not count
    assert crop_ok(torch.tensor([2, 2, 3, v, v, v, v]))  # 2 / 3 of the non-void pixels
    assert not crop_ok(torch.tensor([v, v]))


class Scripted:
    """An rng whose ``integers`` returns the scripted offsets in turn (top, left, top, left, ...)."""

    def __init__(self, values):
        self.values, self.calls = list(values), 0

    def integers(self, low, high):
        value = self.values[self.calls]
        assert low <= value < high
        self.calls += 1
        return value


def two_class_label() -> torch.Tensor:
    """[50, 200]: class 0 in columns 0-149, class 1 in 150-199; a 50 crop passes for left 113..137."""
    label = torch.zeros(50, 200, dtype=torch.int64)
    label[:, 150:] = 1
    return label


def test_crop_rejects_a_crop_dominated_by_one_class():
    label = two_class_label()
    rng = Scripted([0, 0, 0, 145, 0, 120, 0, 10])  # all class 0; 90% class 1; 40% class 1: accepted
    assert choose_crop(rng, label, 50) == (0, 120) and rng.calls == 6
    for left in range(151):
        assert crop_ok(label[:, left : left + 50]) == (113 <= left <= 137), left


def test_crop_keeps_the_draw_after_ten_failures():
    """Ten checks fail; the reference's loop then keeps its 11th draw, unchecked."""
    label = torch.zeros(50, 200, dtype=torch.int64)
    offsets = [v for k in range(CROP_CHECKS + 1) for v in (0, k)]
    rng = Scripted(offsets)
    assert choose_crop(rng, label, 50) == (0, CROP_CHECKS) and rng.calls == 2 * (CROP_CHECKS + 1)


def test_augment_pads_a_small_image():
    """Resized below the crop: the crop is the whole image, padded at the bottom and right."""
    image, label = stripes(20, 30)
    for g in range(6):
        ratio = sample_rng(0, 0, g).uniform(*RATIO_RANGE)  # augment's first draw
        h, w = train_size(20, 30, 16, ratio)
        x, y = augment(image, label, sample_rng(0, 0, g), 16, 64)
        assert x.shape == (3, 64, 64) and y.shape == (64, 64) and x.dtype == torch.float32
        assert (y[:h, :w] != VOID).all() and (y[h:] == VOID).all() and (y[:, w:] == VOID).all()
        assert (x[:, h:] == 0).all() and (x[:, :, w:] == 0).all()


def stripes(h: int, w: int) -> tuple[Image.Image, torch.Tensor]:
    """Four vertical stripes, left to right: class k, grey 80 k."""
    column = np.arange(w) * 4 // w  # [W]
    pixels = np.repeat((80 * column).astype(np.uint8)[None, :, None], 3, axis=2).repeat(h, axis=0)
    return Image.fromarray(pixels), torch.from_numpy(column).repeat(h, 1)


def test_augment_flips_image_and_label_together():
    """Darker stripes keep the smaller class ids whether the sample was flipped or not (brightness,
    contrast, saturation and hue keep grey grey and the order of grey levels)."""
    image, label = stripes(64, 128)
    sides = set()
    for g in range(24):
        x, y = augment(image, label, sample_rng(3, 0, g), 64, 64)
        present = [c for c in range(4) if (y == c).any()]
        means = [float(x[0][y == c].mean()) for c in present]
        assert means == sorted(means), (g, present, means)
        if len(present) > 1:
            sides.add(bool(y[0, 0] < y[0, -1]))
    assert sides == {True, False}  # flipped and unflipped samples


def test_convert_brightness_and_contrast_exact():
    pixels = np.array([[[0, 100, 250]]], np.uint8)
    assert convert(pixels, beta=10.7).tolist() == [[[10, 110, 255]]]  # truncated, clipped
    assert convert(pixels, beta=-32.0).tolist() == [[[0, 68, 218]]]
    assert convert(np.array([[[3, 100, 200]]], np.uint8), alpha=1.5).tolist() == [[[4, 150, 255]]]
    assert convert(np.array([[[3, 101, 200]]], np.uint8), alpha=0.5).tolist() == [[[1, 50, 100]]]


def random_pixels(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)


def only(**kw) -> Photometric:
    fields = {"brightness": None, "contrast_first": False, "contrast": None, "saturation": None, "hue": None}
    return Photometric(**(fields | kw))


def test_hue_round_trip_and_wrap():
    """adjust_hue's RGB -> HSV -> RGB is the identity within a grey level; the factor wraps at
    +-0.5 (the hue circle); a third of the circle turns red into green."""
    pixels = random_pixels()
    same = photometric(pixels, only(hue=0.0)).astype(int)
    assert np.abs(same - pixels).max() <= 1
    half = photometric(pixels, only(hue=0.5)).astype(int)
    assert np.abs(half - photometric(pixels, only(hue=-0.5)).astype(int)).max() <= 1
    red = np.array([[[255, 0, 0]]], np.uint8)
    assert photometric(red, only(hue=1 / 3)).tolist() == [[[0, 255, 0]]]


def test_saturation_blends_with_grey():
    pixels = random_pixels(1)
    assert (photometric(pixels, only(saturation=1.0)) == pixels).all()
    grey = photometric(pixels, only(saturation=0.0))
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()


def test_contrast_mode_orders_contrast_around_saturation():
    pixels = random_pixels(2)
    first = photometric(pixels, only(contrast_first=True, contrast=1.4, saturation=0.3))
    last = photometric(pixels, only(contrast_first=False, contrast=1.4, saturation=0.3))
    desaturated = photometric(pixels, only(saturation=0.3))
    assert (last == convert(desaturated, alpha=1.4)).all()
    assert (first == photometric(convert(pixels, alpha=1.4), only(saturation=0.3))).all()
    assert (first != last).any()


def test_photometric_draws_stay_in_range_and_gate_at_half():
    draws = [draw_photometric(np.random.default_rng(s)) for s in range(400)]
    for name, (lo, hi) in {
        "brightness": (-32, 32),
        "contrast": (0.5, 1.5),
        "saturation": (0.5, 1.5),
        "hue": (-0.5, 0.5),
    }.items():
        values = [getattr(d, name) for d in draws if getattr(d, name) is not None]
        assert all(lo <= v <= hi for v in values) and 150 < len(values) < 250, name
    assert 150 < sum(d.contrast_first for d in draws) < 250


def first_batches(voc, seed: int, workers: int, epochs: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    cfg = Dinov3Ade20kConfig(data=voc, train_split="trainaug", crop_size=64, stride=43)
    data = open_dense_data(cfg)
    labels = LabelSpace.of(data, True)
    recipe = Mmseg(labels=labels, short_side=48)
    cfg = LoaderConfig(shards=data.train.root, batch_size=4, size=64, recipe=recipe, seed=seed, workers=workers)
    loader = make_loader(cfg, SOLO)
    out = []
    try:
        for _ in range(epochs):
            for b, batch in enumerate(loader):
                if b < 2:
                    out.append((batch.images, batch.labels, batch.index))
    finally:
        loader.close()
    assert len(loader) == len(EpochPlan(open_shards(data.train.root).num_samples, 4))
    return out


def test_loader_is_seeded_whatever_the_workers(voc):
    one = first_batches(voc, seed=0, workers=0)
    again = first_batches(voc, seed=0, workers=2)
    other = first_batches(voc, seed=1, workers=0)
    for (x, y, g), (x2, y2, g2) in zip(one, again):
        assert torch.equal(x, x2) and torch.equal(y, y2) and torch.equal(g, g2)
        assert x.shape == (4, 3, 64, 64) and y.shape == (4, 64, 64) and y.dtype == torch.int64
        assert int(y.min()) >= VOID and int(y.max()) < 20 and (y == VOID).any()
    assert not torch.equal(one[0][0], one[2][0])  # another epoch, another order and draws
    assert not any(torch.equal(x, x2) for (x, _, _), (x2, _, _) in zip(one, other))


def test_a_sample_that_does_not_read_is_replaced(voc):
    """The next sample of the epoch's share takes its slot, marked not valid."""
    cfg = Dinov3Ade20kConfig(data=voc, train_split="trainaug", crop_size=64, stride=43)
    data = open_dense_data(cfg)
    recipe = Mmseg(labels=LabelSpace.of(data, True), short_side=48)
    loader = make_loader(LoaderConfig(shards=data.train.root, batch_size=4, size=64, recipe=recipe, workers=0), SOLO)
    share, _ = loader.plan.share(0)
    sample, valid, skipped = loader.reader.fill(0, 1, {int(share[1]): "does not decode"})
    assert not valid and sample.g == int(share[2]) and skipped[0].reason == "does not decode"
    sample, valid, _ = loader.reader.fill(0, 0, {})
    assert valid and sample.g == int(share[0])
    loader.close()
