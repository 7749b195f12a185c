"""Hand-made shard sets with known labels, shared by the loader tests (fixtures: conftest.py)."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fastloc.shard.encode import encode_jpeg, encode_label, label_dtype
from fastloc.shard.manifest import index_name, write_manifest
from fastloc.shard.tario import ShardWriter


def write_set(root: Path, samples: list[tuple[str, np.ndarray, np.ndarray, int]], num_classes: int, per_shard: int = 6) -> Path:
    """A shard set of (key, pixels [H, W, 3] uint8, label [H, W], cls) in the fastloc format."""
    root.mkdir(parents=True)
    shards = []
    for s, start in enumerate(range(0, len(samples), per_shard)):
        name = f"t-train-{s:06d}.tar"
        writer = ShardWriter(root / name, fsync=False)
        chunk = samples[start : start + per_shard]
        for key, pixels, label, cls in chunk:
            h, w = label.shape
            writer.write(key, [("jpg", encode_jpeg(Image.fromarray(pixels), 95, full_chroma=True)),
                               ("seg.png", encode_label(key, label, num_classes, (w, h))),
                               ("cls", str(cls).encode())])  # fmt: skip
        nbytes, sha = writer.close()
        (root / index_name(name)).write_text(writer.index_text())
        shards.append({"tar": name, "index": index_name(name), "samples": len(chunk), "bytes": nbytes, "sha256": sha})
    write_manifest(root, {
        "format": "fastloc-shards", "format_version": 1, "dataset": "t", "split": "train",
        "num_samples": len(samples), "num_shards": len(shards), "shards": shards, "keys": ["jpg", "seg.png", "cls"],
        "num_classes": num_classes, "classes": [None] * num_classes,
        "label": {"key": "seg.png", "dtype": str(label_dtype(num_classes)), "unlabeled": 0},
        "cls": {"key": "cls"}, "txt": None,
    })  # fmt: skip
    return root


PALETTE = np.array([[0, 0, 0], [230, 30, 30], [30, 230, 30], [30, 30, 230], [230, 230, 30], [30, 230, 230],
                    [230, 30, 230], [240, 240, 240]])  # fmt: skip


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


def run_epochs(loader, epochs: int = 1) -> list:
    """Every batch of ``epochs`` epochs, from epoch 0."""
    out = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        out += list(loader)
    return out


def same_batches(a, b) -> bool:
    return len(a) == len(b) and all(
        x.keys == y.keys and torch.equal(x.images, y.images) and torch.equal(x.labels, y.labels)
        and torch.equal(x.cls, y.cls) for x, y in zip(a, b)
    )  # fmt: skip


def all_keys(batches) -> list[str]:
    return [k for b in batches for k in b.keys]
