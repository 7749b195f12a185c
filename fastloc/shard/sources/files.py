"""Listing source folders and reading source files.

Listing never raises for one odd entry: a symbolic link that points nowhere or into a loop, or a
folder that cannot be read, is classified and reported by the source, as a broken link is.
Reading one sample's files turns every failure into a SampleError naming the file.
"""

from __future__ import annotations

import errno
import io
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from fastloc.shard.encode import MAX_PIXELS_DEFAULT, pixel_problem
from fastloc.shard.errors import ConversionError, SampleError
from fastloc.shard.sources.base import Item


@dataclass(frozen=True)
class Entry:
    """One name in a folder, classified without ever raising."""

    name: str
    path: str
    kind: str  # "dir", "file", or "bad" (a broken or looping symbolic link, or not statable)
    problem: str | None = None  # why a "bad" entry cannot be used


def _link_problem(path: str, error: OSError | None) -> str:
    if error is not None and error.errno == errno.ELOOP:
        return "symbolic link loop (too many levels of symbolic links)"
    if os.path.islink(path):
        try:
            return f"broken symbolic link (to {os.readlink(path)})"
        except OSError:
            return "broken symbolic link"
    return f"cannot be read: {error.strerror if error is not None and error.strerror else error}"


def scan_folder(folder: str | os.PathLike) -> list[Entry]:
    """The entries of ``folder`` sorted by name (hidden ones included); OSError if the folder itself
    cannot be listed."""
    entries = []
    with os.scandir(folder) as it:
        for e in it:
            try:
                if e.is_dir():
                    kind, problem = "dir", None
                elif e.is_file():
                    kind, problem = "file", None
                elif e.is_symlink():  # neither: the link points nowhere
                    kind, problem = "bad", _link_problem(e.path, None)
                else:
                    kind, problem = "file", None  # a fifo, socket or device: reading it reports it
            except OSError as error:  # ELOOP and friends: is_dir() follows the link and fails
                kind, problem = "bad", _link_problem(e.path, error)
            entries.append(Entry(e.name, e.path, kind, problem))
    entries.sort(key=lambda entry: entry.name)
    return entries


def walk_files(top: str | os.PathLike, want) -> tuple[list[str], list[tuple[str, str]]]:
    """The paths under ``top`` whose name ``want(name)`` accepts (following folder links, each
    real folder once), and ``(path, reason)`` for what cannot be listed or used: link loops,
    unreadable folders, and broken or looping links that ``want`` does not accept.

    A broken link that ``want`` accepts stays in the list, so that reading it reports the sample.
    """
    files: list[str] = []
    problems: list[tuple[str, str]] = []
    seen: dict[tuple[int, int], str] = {}
    stack = [str(top)]
    while stack:
        folder = stack.pop()
        try:
            st = os.stat(folder)
            key = (st.st_dev, st.st_ino)
            if key in seen:
                problems.append((folder, f"symbolic link loop: the same folder as {seen[key]}, listed once"))
                continue
            seen[key] = folder
            entries = scan_folder(folder)
        except OSError as error:
            problems.append((folder, f"cannot list folder: {error.strerror or error}"))
            continue
        for entry in entries:
            if entry.kind == "dir":
                stack.append(entry.path)
            elif want(entry.name):
                files.append(entry.path)
            elif entry.kind == "bad":
                problems.append((entry.path, entry.problem or "unusable entry"))
    files.sort()
    problems.sort()
    return files, problems


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
        if os.path.islink(path):
            raise SampleError(path, f"{what} is a {_link_problem(path, None)}") from None
        raise SampleError(path, f"{what} not found") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise SampleError(path, f"{what} is a {_link_problem(path, e)}") from None
        raise SampleError(path, f"cannot read {what}: {e.strerror or e}") from None
    if not data:
        raise SampleError(path, f"empty {what} (0 bytes)")
    return data


def read_label_png(
    path: str | os.PathLike, modes: tuple[str, ...], expected: str, max_pixels: int | None = MAX_PIXELS_DEFAULT
) -> np.ndarray:
    """The pixels of a label PNG whose PIL mode is one of ``modes`` (``expected`` says which); one
    whose header announces more than ``max_pixels`` pixels is refused before it is decoded."""
    path = str(path)
    data = read_bytes(path, what="label PNG")
    try:
        with Image.open(io.BytesIO(data)) as image:
            problem = pixel_problem(image.width, image.height, max_pixels)
            if problem is not None:
                raise SampleError(path, problem.replace("image is", "label PNG is", 1))
            image.load()
            fmt, mode = image.format, image.mode
            pixels = np.asarray(image)
    except SampleError:
        raise
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
            raise ConversionError(f"duplicate sample key {item.key!r}: {where(first[item.key])} and {where(item)}")
        first[item.key] = item


def _bad_values(path: str | os.PathLike, values: np.ndarray, allowed: str) -> SampleError:
    shown = ", ".join(map(str, values[:8].tolist())) + (", ..." if values.size > 8 else "")
    return SampleError(str(path), f"label values {shown} are not {allowed}")


def check_label_values(
    label: np.ndarray, num_classes: int, ignore: int | None, path: str | os.PathLike, allowed: str
) -> None:
    """A SampleError naming the label file when a value is neither a class id (0..num_classes-1)
    nor ``ignore``; ``allowed`` says what is, e.g. "VOC classes (0-20, or 255 = void)"."""
    outside = label >= num_classes
    if ignore is not None:
        outside &= label != ignore
    bad = np.unique(label[outside])
    if bad.size:
        raise _bad_values(path, bad, allowed)


def map_label_values(label: np.ndarray, table: np.ndarray, path: str | os.PathLike, allowed: str) -> np.ndarray:
    """[H, W] uint8 ``table[label]`` of an 8-bit label map; ``table`` holds 256 entries, -1 for the
    values the source does not define (a SampleError naming the label file, ``allowed`` says which
    are defined)."""
    mapped = table[label]
    bad = np.unique(label[mapped < 0])
    if bad.size:
        raise _bad_values(path, bad, allowed)
    return mapped.astype(np.uint8)
