"""Re-read a shard set and check every byte against its manifest.

Per shard: the tar exists with the listed size and SHA-256; its index file equals the index
rebuilt from the tar; it holds the listed number of samples, each with exactly the manifest's
keys. Per sample: the JPEG fully decodes; the label PNG decodes losslessly to the declared dtype,
has the image's size and only ids in [0, num_classes); `cls` is an index into the classes; the
`json` parses and its CRC-32s match the other members. Problems name the shard and the sample.
An image or label map whose header announces more pixels than the limit is reported without
being decoded, and a set that holds no sample at all is a problem too.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing as mp
import os
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fastloc.shard.encode import MAX_PIXELS_DEFAULT, decode_label, jpeg_size, pixel_problem
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


def conversion_max_pixels(manifest: dict[str, Any]) -> int:
    """The pixel limit the set was converted with (the default for older manifests)."""
    try:
        return int(manifest["conversion"]["options"]["max_pixels"])
    except (KeyError, TypeError, ValueError):
        return MAX_PIXELS_DEFAULT


def verify(path: Path, processes: int = 0, max_pixels: int | None = None) -> VerifyResult:
    """Check a shard set (its split folder or manifest); never raises for bad shards.

    ``max_pixels`` (default: the limit the set was converted with) bounds every image and label map.
    """
    manifest_path = find_manifest(Path(path))
    manifest = read_manifest(manifest_path)
    split_dir = manifest_path.parent
    limit = conversion_max_pixels(manifest) if max_pixels is None else max_pixels
    jobs = [(split_dir, shard, manifest, limit) for shard in manifest["shards"]]
    processes = min(processes or os.cpu_count() or 1, max(len(jobs), 1))
    if processes > 1:
        with mp.get_context("fork").Pool(processes) as pool:
            results = pool.map(_verify_shard, jobs, chunksize=1)
    else:
        results = [_verify_shard(job) for job in jobs]
    problems = [p for found, _ in results for p in found]
    samples = sum(n for _, n in results)
    if not jobs or manifest["num_samples"] == 0:
        problems.append("manifest: the set holds no samples (an empty conversion is not a result)")
    if samples != manifest["num_samples"]:
        problems.append(f"manifest: num_samples is {manifest['num_samples']} but the shards hold {samples}")
    listed = {s["tar"] for s in manifest["shards"]}
    for tar in sorted(split_dir.glob("*.tar")):
        if tar.name not in listed:
            problems.append(f"{tar.name}: tar file not listed in the manifest")
    return VerifyResult(len(jobs), samples, problems)


def _verify_shard(job: tuple[Path, dict[str, Any], dict[str, Any], int]) -> tuple[list[str], int]:
    split_dir, shard, manifest, max_pixels = job
    name = shard["tar"]
    tar = split_dir / name
    if not tar.is_file():
        return [f"{name}: missing"], 0
    problems = []
    size = tar.stat().st_size
    if size != shard["bytes"]:
        problems.append(f"{name}: {size} bytes, manifest says {shard['bytes']}")
    digest = hashlib.sha256()
    try:
        with open(tar, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    except OSError as exc:
        return problems + [f"{name}: cannot read: {exc.strerror or exc}"], 0
    if digest.hexdigest() != shard["sha256"]:
        problems.append(f"{name}: SHA-256 differs from the manifest")
    samples = []
    try:
        for key, members in iter_samples(tar):
            samples.append((key, members))
            for problem in _check_sample(key, members, manifest, max_pixels):
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
    else:
        try:
            if index.read_text() != build_index(samples):
                problems.append(f"{shard['index']}: index does not match {name}")
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(f"{shard['index']}: cannot read: {exc}")
    return problems, len(samples)


def _check_sample(
    key: str, members: list[tuple[str, int, bytes]], manifest: dict[str, Any], max_pixels: int | None = None
) -> list[str]:
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
    size = jpeg_size(data["jpg"])
    too_large = pixel_problem(*size, max_pixels) if size else None
    if too_large is not None:  # reported from the header, never decoded
        return problems + [f"jpg not decoded: {too_large.replace('image is', 'it is', 1)}"]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # max_pixels decides
            image = Image.open(io.BytesIO(data["jpg"]))
            if image.format != "JPEG":
                problems.append(f"jpg member is {image.format}, not JPEG")
            too_large = pixel_problem(image.width, image.height, max_pixels)
            if too_large is not None:
                return problems + [f"jpg not decoded: {too_large.replace('image is', 'it is', 1)}"]
            image.load()
        width, height = image.size
    except Exception as exc:  # any decoder failure is a finding, not a crash
        return problems + [f"jpg does not decode: {exc}"]
    if manifest.get("label"):
        try:
            label = decode_label(data["seg.png"], max_pixels)
        except Exception as exc:
            return problems + [f"seg.png does not decode: {exc}"]
        if label.dtype != np.dtype(manifest["label"]["dtype"]):
            problems.append(f"seg.png is {label.dtype}, manifest says {manifest['label']['dtype']}")
        if label.shape != (height, width):
            problems.append(f"seg.png is {label.shape[1]}x{label.shape[0]}, image is {width}x{height}")
        ignore = manifest["label"].get("ignore")
        ids = label[label != ignore] if ignore is not None else label
        if ids.size and int(ids.max()) >= manifest["num_classes"]:
            problems.append(f"seg.png has id {int(ids.max())} >= num_classes {manifest['num_classes']}")
    if manifest.get("cls"):
        text = data["cls"].decode("ascii", "replace")
        if not text.isdigit() or int(text) >= manifest["num_classes"]:
            problems.append(f"cls {text!r} is not an index into the {manifest['num_classes']} classes")
    return problems
