"""Reading source files for one sample: every failure becomes a SampleError naming the file."""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, UnidentifiedImageError

from fastloc.shard.errors import ConversionError, SampleError
from fastloc.shard.sources.base import Item


def file_size(path: str | os.PathLike) -> int:
    """Bytes on disk, 0 for a missing file (``load`` reports it when the sample is read)."""
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def read_bytes(path: str | os.PathLike, what: str = "file") -> bytes:
    """The whole file; missing, unreadable and empty files are SampleErrors."""
    path = str(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise SampleError(path, f"{what} not found") from None
    except OSError as e:
        raise SampleError(path, f"cannot read {what}: {e.strerror or e}") from None
    if not data:
        raise SampleError(path, f"empty {what} (0 bytes)")
    return data


def read_label_png(path: str | os.PathLike, modes: tuple[str, ...], expected: str) -> np.ndarray:
    """The pixels of a label PNG whose PIL mode is one of ``modes`` (``expected`` says which)."""
    path = str(path)
    data = read_bytes(path, what="label PNG")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            fmt, mode = image.format, image.mode
            pixels = np.asarray(image)
    except UnidentifiedImageError:  # its message shows the BytesIO object, not the problem
        raise SampleError(path, "cannot decode label PNG: not in an image format Pillow can read") from None
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise SampleError(path, f"cannot decode label PNG: {type(e).__name__}: {e}") from None
    if fmt != "PNG":
        raise SampleError(path, f"label file is {fmt}, expected a PNG")
    if mode not in modes:
        raise SampleError(path, f"label PNG has mode {mode}, expected {expected}")
    return pixels


def check_unique_keys(items: list[Item], where=lambda item: item.ref) -> None:
    """Two samples with one key would collide in the tar: a layout problem, not a bad sample."""
    first: dict[str, Item] = {}
    for item in items:
        if item.key in first:
            raise ConversionError(
                f"duplicate sample key {item.key!r}: {where(first[item.key])} and {where(item)}"
            )
        first[item.key] = item
