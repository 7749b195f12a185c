"""``manifest.json``: what a shard set holds and how it was made (schema in shards/README.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastloc.shard.errors import ConversionError
from fastloc.shard.jsonfile import read_json_object
from fastloc.shard.tario import atomic_write

FORMAT = "fastloc-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_REQUIRED = ("format", "format_version", "dataset", "split", "num_samples", "shards", "keys", "classes", "num_classes")
_REQUIRED_SHARD = ("tar", "index", "samples", "bytes", "sha256")


def shard_name(dataset: str, split: str, index: int) -> str:
    return f"{dataset}-{split}-{index:06d}.tar"


def index_name(tar_name: str) -> str:
    return tar_name[: -len(".tar")] + ".idx"


def shard_problem(split_dir: Path, shard: dict[str, Any]) -> str | None:
    """Why a shard the manifest lists cannot be read as listed (its tar missing, of another size,
    or its index missing), or None. A stat per file: no reading."""
    tar, index = Path(split_dir) / shard["tar"], Path(split_dir) / shard["index"]
    try:
        size = tar.stat().st_size
    except OSError:
        return f"{tar}: shard listed in the manifest is missing"
    if size != shard["bytes"]:
        what = "truncated" if size < shard["bytes"] else "changed"
        return f"{tar}: {size} bytes but the manifest says {shard['bytes']} ({what})"
    if not index.is_file():
        return f"{index}: index of shard {shard['tar']} is missing"
    return None


def write_manifest(split_dir: Path, manifest: dict[str, Any]) -> Path:
    path = split_dir / MANIFEST
    atomic_write(path, json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    return path


def find_manifest(path: Path) -> Path:
    """Accept a manifest file or the split folder holding one."""
    path = Path(path)
    candidate = path / MANIFEST if path.is_dir() else path
    if not candidate.is_file():
        raise ConversionError(f"{candidate}: no manifest (not a finished shard set)")
    return candidate


def read_manifest(path: Path) -> dict[str, Any]:
    """Load and sanity-check a manifest; malformed ones raise ConversionError naming the file."""
    path = find_manifest(path)
    manifest = read_json_object(path, "manifest", _REQUIRED)
    if manifest["format"] != FORMAT or manifest["format_version"] > FORMAT_VERSION:
        raise ConversionError(
            f"{path}: format {manifest['format']!r} v{manifest['format_version']} "
            f"is not {FORMAT!r} <= v{FORMAT_VERSION}"
        )
    if not isinstance(manifest["shards"], list):
        raise ConversionError(f"{path}: 'shards' is not a list")
    for i, shard in enumerate(manifest["shards"]):
        if not isinstance(shard, dict) or any(k not in shard for k in _REQUIRED_SHARD):
            raise ConversionError(f"{path}: shard entry {i} lacks one of {_REQUIRED_SHARD}")
        for key in ("tar", "index"):  # files of the split folder: never a path out of it
            name = shard[key]
            if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
                raise ConversionError(f"{path}: shard entry {i} names {key} {name!r}, not a file of the split folder")
        if not all(isinstance(shard[k], int) and shard[k] >= 0 for k in ("samples", "bytes")):
            raise ConversionError(f"{path}: shard entry {i} has a bad sample or byte count")
    return manifest
