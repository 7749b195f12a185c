"""SegCLIP's superpixels through the data path (``LoaderConfig.superpixels``): the segment ids of the
reference's stored image (``resize_image_as_bytes`` then scikit-image's ``felzenszwalb``), in the
label map's place, cropped exactly as the image; the same from both loaders, whatever the draw."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from loader_data import LOADERS, run_epochs
from PIL import Image
from skimage.segmentation import felzenszwalb

from fastloc.data.config import SOLO, LoaderConfig
from fastloc.data.recipes import Rkrc
from fastloc.data.shards import open_shards
from fastloc.data.superpixels import Felzenszwalb, stored_size, superpixels
from fastloc.data.transforms import sample_rng

SMALL = Felzenszwalb(short_side=40, scale=50.0, sigma=0.9, min_size=20)  # 48-96 px images: a few segments each


def resize_image_as_bytes(img: Image.Image, resize_to: int = 224) -> Image.Image:
    """Transcribed from ArrowLuo/SegCLIP @ df09ba2, preprocess/COCO/write_coco_images.py (PIL's
    ANTIALIAS is LANCZOS; the bytes round trip left out)."""
    w, h = img.size
    if w > resize_to and h > resize_to:
        w_h_aspect_ratio = float(w) / float(h)
        if w_h_aspect_ratio >= 1.0:
            w, h = int(resize_to * w_h_aspect_ratio), resize_to
        else:
            w, h = resize_to, int(resize_to / w_h_aspect_ratio)
        return img.resize((w, h), Image.LANCZOS)
    return img


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (225, 1000), (224, 500), (100, 80), (300, 300)])
def test_the_stored_size_is_the_references(size):
    assert stored_size(*size, 224) == resize_image_as_bytes(Image.new("RGB", size)).size


def test_the_ids_are_felzenszwalb_of_the_stored_image_scaled_back():
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
    image = Image.fromarray(np.kron(blocks, np.ones((40, 40, 1), np.uint8)))  # 320 x 240: resized to 298 x 224
    ids = superpixels(image, Felzenszwalb())
    stored = resize_image_as_bytes(image)
    expected = felzenszwalb(np.asarray(stored), scale=224, sigma=0.9, min_size=224)
    assert ids.shape == (240, 320) and ids.dtype == np.int32
    back = np.asarray(Image.fromarray(expected.astype(np.int32)).resize(image.size, Image.NEAREST))
    assert np.array_equal(ids, back)  # nearest back to the JPEG's size, PIL's rule
    assert len(np.unique(ids)) > 1


@pytest.mark.parametrize("name", list(LOADERS))
def test_batch_labels_are_the_crops_segment_ids(synthetic, name):
    """Each slot's labels equal the recipe's crop of the whole image's superpixels, for its draw."""
    cfg = LoaderConfig(shards=synthetic, batch_size=8, size=32, recipe=Rkrc(), seed=5, workers=2, threads=1)
    cfg = LoaderConfig(**{**cfg.__dict__, "superpixels": SMALL, "normalize": False})
    batches = run_epochs(LOADERS[name](cfg, SOLO))
    shards = open_shards(synthetic)
    for b in batches[:2]:
        assert b.labels.dtype == torch.int64 and b.labels.shape == (8, 32, 32)
        for slot, g in enumerate(b.index.tolist()):
            _, _, data = shards.read(g, ("jpg",))
            image = Image.open(io.BytesIO(data["jpg"])).convert("RGB")
            full = superpixels(image, SMALL)
            (view,) = cfg.recipe.views(sample_rng(cfg.seed, 0, g), image.height, image.width, cfg.size, full)
            assert np.array_equal(b.labels[slot].numpy(), view.label)
