"""A small Pascal VOC for the dense protocols' tests: the official layout (palette PNGs with void
borders), converted by ``python -m fastloc.shard voc`` into train, val and trainaug shards.

Each image is background (class 0) with two objects of classes 1-3, and each class has its own
colour (with noise), so even a random-weight backbone's patch tokens tell the classes apart:
a protocol that works scores well above chance, and one that scrambles labels does not.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {0: (40, 90, 40), 1: (220, 40, 40), 2: (40, 40, 220), 3: (230, 220, 60)}
OBJECT_CLASSES = (1, 2, 3)


def voc_palette() -> list[int]:
    """The VOC colour map: the bits of the class id interleaved into R, G, B (255 -> 224,224,192)."""
    palette = []
    for k in range(256):
        r = g = b = 0
        c = k
        for j in range(8):
            r |= (c & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def sample(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """(pixels [H, W, 3] uint8, label [H, W] uint8): two objects with 2-pixel void borders."""
    label = np.zeros((h, w), np.uint8)
    for c in rng.choice(OBJECT_CLASSES, size=2, replace=False):
        bh, bw = int(rng.integers(h // 4, h // 2)), int(rng.integers(w // 4, w // 2))
        top, left = int(rng.integers(2, h - bh - 2)), int(rng.integers(2, w - bw - 2))
        label[top - 2 : top + bh + 2, left - 2 : left + bw + 2] = 255
        label[top : top + bh, left : left + bw] = c
    pixels = np.zeros((h, w, 3), np.float64)
    for c, colour in COLOURS.items():
        pixels[label == c] = colour
    pixels[label == 255] = (128, 128, 128)
    pixels += rng.normal(0, 12, pixels.shape)
    return np.clip(pixels, 0, 255).astype(np.uint8), label


def make_voc(root: Path, train: int = 12, val: int = 8, aug_only: int = 4, seed: int = 0) -> Path:
    """The VOC2012 layout under ``root`` (JPEGImages, SegmentationClass, SegmentationClassAug,
    ImageSets/Segmentation/{train,val,trainaug}.txt); returns ``root``."""
    rng = np.random.default_rng(seed)
    for folder in ("JPEGImages", "SegmentationClass", "SegmentationClassAug", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    ids = [f"2007_{n:06d}" for n in range(train + val + aug_only)]
    for n, image_id in enumerate(ids):
        h, w = int(rng.integers(56, 80)), int(rng.integers(56, 96))
        pixels, label = sample(rng, h, w)
        Image.fromarray(pixels).save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
        png = Image.fromarray(label)
        png.putpalette(voc_palette())
        if n < train + val:
            png.save(root / "SegmentationClass" / f"{image_id}.png")
        Image.fromarray(label).save(root / "SegmentationClassAug" / f"{image_id}.png")
    lists = root / "ImageSets" / "Segmentation"
    train_ids, val_ids, aug_ids = ids[:train], ids[train : train + val], ids[train + val :]
    (lists / "train.txt").write_text("".join(f"{i}\n" for i in train_ids))
    (lists / "val.txt").write_text("".join(f"{i}\n" for i in val_ids))
    (lists / "trainaug.txt").write_text("".join(f"{i}\n" for i in sorted(train_ids + aug_ids)))
    return root


def voc_shards(tmp: Path) -> Path:
    """make_voc converted into tmp/shards/voc/{train,val,trainaug}; returns tmp/shards/voc."""
    from fastloc.shard.convert import convert
    from fastloc.shard.sources.voc import VocConfig

    root = make_voc(tmp / "VOC2012")
    for split in ("train", "val", "trainaug"):
        convert(VocConfig(root=root, split=split, out=tmp / "shards", processes=1, progress=False, fsync=False))
    return tmp / "shards" / "voc"
