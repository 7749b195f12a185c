"""Reading a shard set by global sample index: positioned reads at the ``.idx`` offsets.

Global sample index ``g`` runs over the shards in manifest order and, within a shard, in tar
order. Reading by index (not by streaming the tar through ``webdataset``) is what lets both
loaders follow one global permutation per epoch, split it across ranks sample by sample, and
resume without re-reading a prefix; the index files exist for DALI anyway.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fastloc.shard.errors import ConversionError
from fastloc.shard.manifest import find_manifest, read_manifest, shard_problem
from fastloc.shard.tario import INDEX_VERSION, split_name


class ShardError(RuntimeError):
    """A shard set cannot be read as its manifest describes (missing or truncated tar, bad index)."""


@dataclass(frozen=True)
class ShardSet:
    """A checked shard set: where every global sample index lives.

    Built by ``open_shards``; cheap to pickle into worker processes (the per-shard indexes are
    parsed lazily, per process, by ``shard_index``).
    """

    root: Path  # the split folder
    manifest: dict[str, Any]
    tars: tuple[Path, ...]
    indexes: tuple[Path, ...]
    starts: np.ndarray  # [num_shards + 1] int64: global index of each shard's first sample
    stamps: tuple[int, ...]  # each index file's mtime_ns when opened: a rewritten set is re-parsed

    @property
    def num_samples(self) -> int:
        return int(self.starts[-1])

    def locate(self, g: int) -> tuple[int, int]:
        """(shard, index within the shard) of global sample ``g``."""
        if not 0 <= g < self.num_samples:
            raise IndexError(f"sample {g} outside [0, {self.num_samples})")
        shard = int(np.searchsorted(self.starts, g, side="right")) - 1
        return shard, int(g - self.starts[shard])

    def index(self, shard: int) -> ShardIndex:
        entry = self.manifest["shards"][shard]
        return shard_index(str(self.indexes[shard]), entry["samples"], entry["bytes"], self.stamps[shard])

    def name(self, g: int) -> tuple[str, str]:
        """(shard tar name, key) of global sample ``g``, from the index alone."""
        shard, j = self.locate(g)
        return self.manifest["shards"][shard]["tar"], str(self.index(shard).keys[j])

    def read(self, g: int, exts: tuple[str, ...]) -> tuple[str, str, dict[str, bytes]]:
        """(shard tar name, key, {ext: bytes}) of global sample ``g``: positioned reads, no tar walk."""
        shard, j = self.locate(g)
        index = self.index(shard)
        data = {}
        with open(self.tars[shard], "rb") as f:
            for ext in exts:
                offset, size = index.member(j, ext)
                blob = os.pread(f.fileno(), size, offset)
                if len(blob) != size:
                    raise ShardError(f"{self.tars[shard]}: truncated at sample {index.keys[j]} ({ext})")
                data[ext] = blob
        return self.manifest["shards"][shard]["tar"], str(index.keys[j]), data


def open_shards(path: Path) -> ShardSet:
    """Read the manifest and check that every tar and index is there and has the listed size.

    Cheap (one ``stat`` and one line per shard); the full index of a shard is parsed when a
    sample of it is first read. Raises ``ShardError`` naming the first broken shard.
    """
    try:
        manifest_path = find_manifest(Path(path))
        manifest = read_manifest(manifest_path)
    except ConversionError as exc:
        raise ShardError(str(exc)) from None
    root = manifest_path.parent
    if "jpg" not in manifest["keys"]:
        raise ShardError(f"{manifest_path}: samples have no jpg member (keys {manifest['keys']})")
    tars, indexes, counts, stamps = [], [], [], []
    for entry in manifest["shards"]:
        tar, idx = root / entry["tar"], root / entry["index"]
        problem = shard_problem(root, entry)
        if problem:
            raise ShardError(problem)
        with open(idx) as f:
            header = f.readline().split()
        if header != [INDEX_VERSION, str(entry["samples"])]:
            raise ShardError(
                f"{idx}: header {' '.join(header)!r}, expected '{INDEX_VERSION} {entry['samples']}' "
                f"(the manifest's sample count of {entry['tar']})"
            )
        tars.append(tar)
        indexes.append(idx)
        stamps.append(idx.stat().st_mtime_ns)
        counts.append(int(entry["samples"]))
    starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)
    if int(starts[-1]) != manifest["num_samples"]:
        raise ShardError(
            f"{manifest_path}: shards hold {int(starts[-1])} samples, num_samples says {manifest['num_samples']}"
        )
    return ShardSet(root, manifest, tuple(tars), tuple(indexes), starts, tuple(stamps))


@dataclass(frozen=True)
class ShardIndex:
    """One shard's ``.idx``: keys and member (offset, size) by sample."""

    keys: np.ndarray  # [n] str
    exts: tuple[str, ...]  # member extensions, in member order
    offsets: np.ndarray  # [n, members] int64 data offsets from the start of the tar
    sizes: np.ndarray  # [n, members] int64

    def member(self, j: int, ext: str) -> tuple[int, int]:
        m = self.exts.index(ext)
        return int(self.offsets[j, m]), int(self.sizes[j, m])


@functools.lru_cache(maxsize=512)  # per process; a few ms to re-parse a shard that fell out
def shard_index(path: str, samples: int, tar_bytes: int, stamp: int = 0) -> ShardIndex:
    """Parse and check a wds2idx file (all samples must have the same members, inside the tar)."""
    lines = Path(path).read_text().splitlines()
    if not lines or lines[0].split() != [INDEX_VERSION, str(samples)]:
        raise ShardError(f"{path}: bad header, expected '{INDEX_VERSION} {samples}'")
    body = [line for line in lines[1:] if line.strip()]
    tokens = [line.split() for line in body]
    width = len(tokens[0]) if tokens else 0
    if len(body) != samples or width == 0 or width % 4 or any(len(t) != width for t in tokens):
        raise ShardError(f"{path}: {len(body)} sample lines of uneven or malformed member groups, expected {samples}")
    table = np.array(tokens, dtype=str).reshape(samples, width // 4, 4)  # [n, members, (ext, off, size, name)]
    exts = tuple(table[0, :, 0].tolist())
    try:
        offsets, sizes = table[:, :, 1].astype(np.int64), table[:, :, 2].astype(np.int64)
    except ValueError:
        raise ShardError(f"{path}: non-numeric offset or size") from None
    if (table[:, :, 0] != np.array(exts)).any():
        raise ShardError(f"{path}: samples do not all have the members {exts}")
    if (offsets < 0).any() or (sizes < 0).any() or int((offsets + sizes).max(initial=0)) > tar_bytes:
        raise ShardError(f"{path}: members reach past the end of the {tar_bytes}-byte tar")
    keys = np.array([split_name(name)[0] for name in table[:, 0, 3].tolist()])  # [n]
    return ShardIndex(keys=keys, exts=exts, offsets=offsets, sizes=sizes)
