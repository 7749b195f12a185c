"""Shared by the loader tests: the loader registry, hand-made shard sets with known labels, ways to
damage a sample, and batch comparisons (the ``synthetic`` fixtures are in conftest.py)."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fastloc.data.dali_loader import DaliLoader
from fastloc.data.shards import open_shards
from fastloc.data.torch_loader import TorchLoader
from fastloc.shard.encode import encode_jpeg, encode_label, label_dtype
from fastloc.shard.manifest import index_name, write_manifest
from fastloc.shard.tario import ShardWriter


def write_set(
    root: Path,
    samples: list[tuple[str, np.ndarray, np.ndarray, int]],
    num_classes: int,
    per_shard: int = 6,
    split: str = "train",
    txt: dict[str, bytes] | None = None,
) -> Path:
    """A shard set of (key, pixels [H, W, 3] uint8, label [H, W], cls) in the fastloc format; with
    ``txt`` (key -> bytes), every sample also has a `txt` member."""
    root.mkdir(parents=True)
    shards = []
    for s, start in enumerate(range(0, len(samples), per_shard)):
        name = f"t-{split}-{s:06d}.tar"
        writer = ShardWriter(root / name, fsync=False)
        chunk = samples[start : start + per_shard]
        for key, pixels, label, cls in chunk:
            h, w = label.shape
            writer.write(
                key,
                [
                    ("jpg", encode_jpeg(Image.fromarray(pixels), 95, full_chroma=True)),
                    ("seg.png", encode_label(key, label, num_classes, (w, h))),
                    ("cls", str(cls).encode()),
                    *([("txt", txt[key])] if txt is not None else []),
                ],
            )
        nbytes, sha = writer.close()
        (root / index_name(name)).write_text(writer.index_text())
        shards.append({"tar": name, "index": index_name(name), "samples": len(chunk), "bytes": nbytes, "sha256": sha})
    write_manifest(
        root,
        {
            "format": "fastloc-shards",
            "format_version": 1,
            "dataset": "t",
            "split": split,
            "num_samples": len(samples),
            "num_shards": len(shards),
            "shards": shards,
            "keys": ["jpg", "seg.png", "cls", *(["txt"] if txt is not None else [])],
            "num_classes": num_classes,
            "classes": [None] * num_classes,
            "label": {"key": "seg.png", "dtype": str(label_dtype(num_classes)), "unlabeled": 0},
            "cls": {"key": "cls"},
            "txt": None if txt is None else {"key": "txt", "format": "UTF-8 text; captions separated by newlines"},
        },
    )
    return root


PALETTE = np.array(
    [
        [0, 0, 0],
        [230, 30, 30],
        [30, 230, 30],
        [30, 30, 230],
        [230, 230, 30],
        [30, 230, 230],
        [230, 30, 230],
        [240, 240, 240],
    ]
)


def block_sample(rng: np.random.Generator, i: int) -> tuple[str, np.ndarray, np.ndarray, int]:
    """A 3 x 3 grid of flat-colour blocks of random classes, cuts >= 8 px apart (no slivers that a
    downscale would blend away); a pixel's label is the class that painted it."""
    h, w = (int(v) for v in rng.integers(24, 90, size=2))
    ys = np.sort(rng.choice(np.arange(8, h - 7, 8), size=2, replace=False))
    xs = np.sort(rng.choice(np.arange(8, w - 7, 8), size=2, replace=False))
    label = np.zeros((h, w), np.uint8)
    for y0, y1 in zip([0, *ys], [*ys, h]):
        for x0, x1 in zip([0, *xs], [*xs, w]):
            label[y0:y1, x0:x1] = rng.integers(1, len(PALETTE))
    return f"blocks_{i:04d}", PALETTE[label].astype(np.uint8), label, int(label[0, 0])


# Every loader the contract tests run: the torch twin and the DALI graph with CPU operators (the GPU
# placement is the gpu-marked test in test_data_dali.py).
LOADERS = {
    "torch": TorchLoader,
    "dali-cpu": lambda cfg, at: DaliLoader(cfg, at, device="cpu"),
}


def coordinate_sample(rng: np.random.Generator, i: int) -> tuple[str, np.ndarray, np.ndarray, int]:
    """Random pixels; the label of pixel (y, x) is y * W + x, so its value says where it came from."""
    h, w = (int(v) for v in rng.integers(20, 60, size=2))
    pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    return f"coords_{i:04d}", pixels, np.arange(h * w).reshape(h, w).astype(np.uint16), 0


def member(root: Path, g: int, ext: str) -> tuple[Path, str, int, int]:
    """(tar, key, offset, size) of member ``ext`` of global sample ``g``."""
    shards = open_shards(root)
    shard, j = shards.locate(g)
    offset, size = shards.index(shard).member(j, ext)
    return shards.tars[shard], str(shards.index(shard).keys[j]), offset, size


def spoil(root: Path, g: int, how: str) -> tuple[str, str]:
    """Damage sample ``g`` in place, keeping every size (the set still opens); (tar name, key).

    ``zeros``: the JPEG is zeroed (the host's header check rejects it); ``sampling``: the first
    component's sampling factors are zeroed (the header check passes, every decoder fails);
    ``label``: the PNG's IHDR size no longer matches the image."""
    ext = "seg.png" if how == "label" else "jpg"
    tar, key, offset, size = member(root, g, ext)
    with open(tar, "r+b") as f:
        f.seek(offset)
        data = bytearray(f.read(size))
        if how == "zeros":
            data[:] = bytes(size)
        elif how == "sampling":
            sof = data.index(b"\xff\xc0")
            data[sof + 11] = 0  # FF C0, length (2), precision, height (2), width (2), count, [id, sampling, ...]
        elif how == "label":
            data[16:20] = b"\x00\x00\x0f\xff"  # IHDR width
        else:
            raise ValueError(how)
        f.seek(offset)
        f.write(data)
    return tar.name, key


def run_epochs(loader, epochs: int = 1) -> list:
    """Every batch of ``epochs`` epochs, from epoch 0."""
    out = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        out += list(loader)
    return out


def _equal(x, y) -> bool:
    return (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))


def same_samples(a, b) -> bool:
    """The same keys, labels, classes and valid flags in the same batches (images may differ)."""
    return len(a) == len(b) and all(
        x.keys == y.keys and _equal(x.labels, y.labels) and _equal(x.cls, y.cls) and torch.equal(x.valid, y.valid)
        for x, y in zip(a, b)
    )


def same_batches(a, b) -> bool:
    """``same_samples`` and bit-identical images."""
    return same_samples(a, b) and all(torch.equal(x.images, y.images) for x, y in zip(a, b))


def mean_image_difference(a, b) -> float:
    """The largest per-batch mean absolute difference of two runs' uint8 images, in grey levels."""
    return max(float((x.images.int() - y.images.int()).abs().float().mean()) for x, y in zip(a, b))


def all_keys(batches) -> list[str]:
    return [k for b in batches for k in b.keys]
