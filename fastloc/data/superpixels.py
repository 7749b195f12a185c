"""Felzenszwalb superpixels of a sample, as SegCLIP's preprocessing makes them (OTHER-METHODS.md
section 2; ArrowLuo/SegCLIP @ df09ba2, preprocess/COCO/{write_coco_images,felzenszwalb_extraction_coco}.py).

The reference stores every image resized to a short side of 224 (only when both sides exceed it,
PIL's antialias filter), runs scikit-image's ``felzenszwalb`` on that once, offline, and crops the
segment map with each training crop's box. Here the host stage does the same per sample, per
epoch: the map of the resized image is scaled back (nearest) to the JPEG's own size, so that the
recipe crops it exactly as it crops the image (the label path: ``LoaderConfig.superpixels``).
The ids depend only on the image, never on the draw.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Felzenszwalb:
    """The segmentation's knobs: the reference's (scale 224, sigma 0.9, min_size 224 on 224 px)."""

    short_side: int = 224  # the stored image's short side (a smaller image is kept as it is)
    scale: float = 224.0
    sigma: float = 0.9
    min_size: int = 224


def stored_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) of the reference's stored image (``resize_image_as_bytes``): both sides over
    ``short_side`` -> the short side becomes it, the long one ``int(short_side * ratio)``."""
    if width <= short_side or height <= short_side:
        return width, height
    ratio = width / height
    return (int(short_side * ratio), short_side) if ratio >= 1 else (short_side, int(short_side / ratio))


def superpixels(image: Image.Image, cfg: Felzenszwalb) -> np.ndarray:
    """[H, W] int32 segment ids of an RGB image of W x H pixels (ids from 0, in scan order)."""
    from skimage.segmentation import felzenszwalb  # imported here: only SegCLIP's loader needs it

    width, height = image.size
    size = stored_size(width, height, cfg.short_side)
    stored = image if size == (width, height) else image.resize(size, Image.Resampling.LANCZOS)
    ids = felzenszwalb(np.asarray(stored), scale=cfg.scale, sigma=cfg.sigma, min_size=cfg.min_size)
    if size != (width, height):  # nearest back to the JPEG's size: the recipe's label crop applies
        rows = np.minimum((np.arange(height) + 0.5) * size[1] / height, size[1] - 1).astype(np.int64)
        cols = np.minimum((np.arange(width) + 0.5) * size[0] / width, size[0] - 1).astype(np.int64)
        ids = ids[rows[:, None], cols[None, :]]
    return ids.astype(np.int32)
