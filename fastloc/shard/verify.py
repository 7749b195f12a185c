"""Re-read a shard set and check every byte against its manifest.

Per shard: the tar exists with the listed size and SHA-256; its index file equals the index
rebuilt from the tar; it holds the listed number of samples, each with exactly the manifest's
keys. Per sample: the JPEG fully decodes; the label PNG decodes losslessly to the declared dtype,
has the image's size and only ids in [0, num_classes); `cls` is an index into the classes; the
`json` parses and its CRC-32s match the other members. Problems name the shard and the sample.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing as mp
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fastloc.shard.encode import decode_label
from fastloc.shard.manifest import find_manifest, read_manifest
from fastloc.shard.tario import build_index, iter_samples


@dataclass(frozen=True)
class VerifyResult:
    shards: int
    samples: int
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(path: Path, processes: int = 0) -> VerifyResult:
    """Check a shard set (its split folder or manifest); never raises for bad shards."""
    manifest_path = find_manifest(Path(path))
    manifest = read_manifest(manifest_path)
    split_dir = manifest_path.parent
    jobs = [(split_dir, shard, manifest) for shard in manifest["shards"]]
    processes = min(processes or os.cpu_count() or 1, max(len(jobs), 1))
    if processes > 1:
        with mp.get_context("fork").Pool(processes) as pool:
            results = pool.map(_verify_shard, jobs, chunksize=1)
    else:
        results = [_verify_shard(job) for job in jobs]
    problems = [p for found, _ in results for p in found]
    samples = sum(n for _, n in results)
    if samples != manifest["num_samples"]:
        problems.append(f"manifest: num_samples is {manifest['num_samples']} but the shards hold {samples}")
    listed = {s["tar"] for s in manifest["shards"]}
    for tar in sorted(split_dir.glob("*.tar")):
        if tar.name not in listed:
            problems.append(f"{tar.name}: tar file not listed in the manifest")
    return VerifyResult(len(jobs), samples, problems)


def _verify_shard(job: tuple[Path, dict[str, Any], dict[str, Any]]) -> tuple[list[str], int]:
    split_dir, shard, manifest = job
    name = shard["tar"]
    tar = split_dir / name
    if not tar.is_file():
        return [f"{name}: missing"], 0
    problems = []
    size = tar.stat().st_size
    if size != shard["bytes"]:
        problems.append(f"{name}: {size} bytes, manifest says {shard['bytes']}")
    digest = hashlib.sha256()
    with open(tar, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    if digest.hexdigest() != shard["sha256"]:
        problems.append(f"{name}: SHA-256 differs from the manifest")
    samples = []
    try:
        for key, members in iter_samples(tar):
            samples.append((key, members))
            for problem in _check_sample(key, members, manifest):
                problems.append(f"{name} sample {key}: {problem}")
    except Exception as exc:  # a damaged tar: report where reading stopped
        where = f"after sample {samples[-1][0]}" if samples else "at the start"
        problems.append(f"{name}: unreadable tar {where}: {exc}")
        return problems, len(samples)
    if len(samples) != shard["samples"]:
        problems.append(f"{name}: {len(samples)} samples, manifest says {shard['samples']}")
    index = split_dir / shard["index"]
    if not index.is_file():
        problems.append(f"{shard['index']}: index file missing")
    elif index.read_text() != build_index(samples):
        problems.append(f"{shard['index']}: index does not match {name}")
    return problems, len(samples)


def _check_sample(key: str, members: list[tuple[str, int, bytes]], manifest: dict[str, Any]) -> list[str]:
    data = {ext: blob for ext, _, blob in members}
    exts = [ext for ext, _, _ in members]
    if exts != manifest["keys"]:
        return [f"members {exts}, manifest says {manifest['keys']}"]
    problems = []
    try:
        meta = json.loads(data["json"])
        for ext, crc in meta["crc32"].items():
            if zlib.crc32(data[ext]) != crc:
                problems.append(f"{ext} does not match its CRC-32 (changed after conversion)")
    except (ValueError, KeyError, TypeError) as exc:
        problems.append(f"json member unreadable: {exc}")
    try:
        image = Image.open(io.BytesIO(data["jpg"]))
        if image.format != "JPEG":
            problems.append(f"jpg member is {image.format}, not JPEG")
        image.load()
        width, height = image.size
    except Exception as exc:  # any decoder failure is a finding, not a crash
        return problems + [f"jpg does not decode: {exc}"]
    if manifest.get("label"):
        try:
            label = decode_label(data["seg.png"])
        except Exception as exc:
            return problems + [f"seg.png does not decode: {exc}"]
        if label.dtype != np.dtype(manifest["label"]["dtype"]):
            problems.append(f"seg.png is {label.dtype}, manifest says {manifest['label']['dtype']}")
        if label.shape != (height, width):
            problems.append(f"seg.png is {label.shape[1]}x{label.shape[0]}, image is {width}x{height}")
        if label.size and int(label.max()) >= manifest["num_classes"]:
            problems.append(f"seg.png has id {int(label.max())} >= num_classes {manifest['num_classes']}")
    if manifest.get("cls"):
        text = data["cls"].decode("ascii", "replace")
        if not text.isdigit() or int(text) >= manifest["num_classes"]:
            problems.append(f"cls {text!r} is not an index into the {manifest['num_classes']} classes")
    return problems
