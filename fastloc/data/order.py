"""Which samples an epoch holds, in which order, on which rank: the torch twin's order.

Everything that decides *which* sample comes next lives here, as plain numpy arithmetic. The
DALI loader keeps the counts, the batching, the skip rule and the state format defined here, but
its order is that of DALI's streaming ``fn.readers.webdataset`` (tars permuted per epoch,
contiguous rank ranges, a shuffle buffer; see ``dali_loader.py``), so the two loaders yield
the same samples per epoch in different orders, and a state saved by one restores only in that
one. Each is deterministic on its own: the same seed and epoch give the same batches.

**The sample list.** A shard set is a list of tars (``manifest["shards"]``, in order). Global
sample index ``g`` runs over the shards in manifest order and within a shard in tar order: shard
``i`` holds ``g`` in ``[starts[i], starts[i] + manifest["shards"][i]["samples"])``.

**The epoch order.** With ``shuffle``, ``numpy.random.default_rng([seed, epoch]).permutation(N)``
(N = total samples); without, ``arange(N)``. It depends on nothing else (not on ranks, workers,
batch size or device).

**Ranks.** Each rank gets ``n = N // world_size`` samples: rank ``r`` takes positions ``r,
r + world_size, r + 2 world_size, ...`` of the first ``n * world_size`` positions of the epoch
order. The last ``N mod world_size`` samples *of the epoch order* are dropped for that epoch
(when shuffling, they are different samples every epoch); every other sample is seen exactly
once per epoch across ranks. Every rank therefore has the same number of samples and batches,
so collectives stay in lockstep.

**Batches.** A rank's samples are cut into consecutive batches of ``batch_size``; with
``drop_last`` the last incomplete one is dropped (``n // batch_size`` batches), otherwise it is
yielded short (``ceil(n / batch_size)`` batches).

**Corrupt samples.** A sample whose image, label map or class does not decode is left out of
its batch, which comes out one sample shorter (a batch whose samples are all corrupt is not
yielded at all). Batch boundaries never move, so positions, resumption and the other ranks are
unaffected. Each skipped sample is counted and warned about once (``SkippedSampleWarning``,
naming the shard and key). Structural damage (a missing or truncated tar, a missing or
inconsistent index) is a ``ShardError`` instead: checked when the loader is built, and again
when a member is read.

**Random augmentation** is seeded per sample by ``(seed, epoch, g)`` (``transforms.sample_rng``),
so it does not depend on which rank or worker decoded the sample.

**Resumption.** ``LoaderState(epoch, position)``: ``position`` batches of ``epoch`` have been
yielded. A restored loader starts at batch ``position`` of ``epoch``, so its next batch is the one
an uninterrupted run would have produced.

**Reading.** Samples are read by global index with plain positioned file reads at the offsets of
the shard's ``.idx`` file (the DALI ``wds2idx`` format), not by streaming the tar through
``webdataset``. Streaming readers only offer shard-level shuffling plus a shuffle buffer and
shard-level rank splitting; reading by index gives any permutation of the whole epoch, exact
sample-level rank splitting, and resumption that costs nothing (no re-reading of the skipped
prefix). The index files exist for DALI's reader anyway.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fastloc.shard.errors import ConversionError
from fastloc.shard.manifest import find_manifest, read_manifest
from fastloc.shard.tario import INDEX_VERSION, split_name


class ShardError(RuntimeError):
    """A shard set cannot be read as its manifest describes (missing or truncated tar, bad index)."""


class SkippedSampleWarning(UserWarning):
    """One sample did not decode and was left out of its batch; the message names shard and key."""


# ---------------------------------------------------------------- the sample list


@dataclass(frozen=True)
class ShardSet:
    """A checked shard set: where every global sample index lives.

    Built by ``open_shards``; cheap to pickle into DataLoader workers (the per-shard indexes are
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

    def read(self, g: int, exts: tuple[str, ...]) -> tuple[str, str, dict[str, bytes]]:
        """(shard tar name, key, {ext: bytes}) of global sample ``g``: positioned reads, no tar walk."""
        shard, j = self.locate(g)
        entry = self.manifest["shards"][shard]
        index = shard_index(str(self.indexes[shard]), entry["samples"], entry["bytes"], self.stamps[shard])
        data = {}
        with open(self.tars[shard], "rb") as f:
            for ext in exts:
                offset, size = index.member(j, ext)
                f.seek(offset)
                blob = f.read(size)
                if len(blob) != size:
                    raise ShardError(f"{self.tars[shard]}: truncated at sample {index.keys[j]} ({ext})")
                data[ext] = blob
        return entry["tar"], str(index.keys[j]), data


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
        if not tar.is_file():
            raise ShardError(f"{tar}: shard listed in the manifest is missing")
        size = tar.stat().st_size
        if size != entry["bytes"]:
            what = "truncated" if size < entry["bytes"] else "changed"
            raise ShardError(f"{tar}: {size} bytes but the manifest says {entry['bytes']} ({what})")
        if not idx.is_file():
            raise ShardError(f"{idx}: index of shard {entry['tar']} is missing")
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
        raise ShardError(f"{manifest_path}: shards hold {int(starts[-1])} samples, num_samples says {manifest['num_samples']}")
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


# ---------------------------------------------------------------- the epoch order


def _count(manifest_or_count: dict[str, Any] | int) -> int:
    if isinstance(manifest_or_count, dict):
        return int(sum(s["samples"] for s in manifest_or_count["shards"]))
    return int(manifest_or_count)


def epoch_order(num_samples: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """[N] int64: the global sample indices of an epoch, before the rank split."""
    if shuffle:
        return np.random.default_rng([seed, epoch]).permutation(num_samples).astype(np.int64)
    return np.arange(num_samples, dtype=np.int64)


def epoch_indices(
    manifest_or_count: dict[str, Any] | int, seed: int, epoch: int, shuffle: bool, rank: int = 0, world_size: int = 1
) -> np.ndarray:
    """[N // world_size] int64: rank ``rank``'s global sample indices for ``epoch``, in order."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, {world_size})")
    n = _count(manifest_or_count)
    order = epoch_order(n, seed, epoch, shuffle)
    per_rank = n // world_size
    return order[: per_rank * world_size][rank::world_size]  # the last n mod world_size are dropped


def batches_per_epoch(
    manifest_or_count: dict[str, Any] | int, batch_size: int, world_size: int = 1, drop_last: bool = True
) -> int:
    """Batches each rank yields per epoch (the same on every rank)."""
    per_rank = _count(manifest_or_count) // world_size
    return per_rank // batch_size if drop_last else math.ceil(per_rank / batch_size)


@dataclass(frozen=True)
class EpochPlan:
    """One rank's batches of every epoch: the order, rank split and batching rules above."""

    num_samples: int
    batch_size: int
    seed: int = 0
    shuffle: bool = True
    rank: int = 0
    world_size: int = 1
    drop_last: bool = True

    def __post_init__(self):
        if self.batch_size < 1 or self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got {self}")

    def __len__(self) -> int:
        return batches_per_epoch(self.num_samples, self.batch_size, self.world_size, self.drop_last)

    def indices(self, epoch: int) -> np.ndarray:
        """[N // world_size] int64 global sample indices of this rank."""
        return epoch_indices(self.num_samples, self.seed, epoch, self.shuffle, self.rank, self.world_size)

    def batches(self, epoch: int, start: int = 0) -> list[np.ndarray]:
        """Batches ``start, start + 1, ...`` of ``epoch``, each [<= batch_size] int64."""
        idx, b = self.indices(epoch), self.batch_size
        return [idx[i * b : (i + 1) * b] for i in range(start, len(self))]

    def fingerprint(self) -> dict[str, int]:
        """What a saved position depends on (rank excluded: all ranks share one position)."""
        return {"num_samples": self.num_samples, "batch_size": self.batch_size, "seed": self.seed,
                "shuffle": int(self.shuffle), "world_size": self.world_size, "drop_last": int(self.drop_last)}  # fmt: skip


# ---------------------------------------------------------------- resumption


@dataclass
class LoaderState:
    """Where a loader stands: ``position`` batches of ``epoch`` already yielded."""

    epoch: int = 0
    position: int = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(self.epoch), "position": int(self.position)}  # plain ints: weights_only-safe

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def loader_state_dict(state: LoaderState, plan: EpochPlan) -> dict[str, int]:
    """A loader's checkpoint entry: the state (an exhausted epoch saved as the next one's start)
    plus the plan's fingerprint, so a restore with other batching is refused."""
    if state.position >= len(plan):
        state = LoaderState(state.epoch + 1, 0)
    return {**state.state_dict(), **plan.fingerprint()}


def restore_state(saved: dict[str, Any], plan: EpochPlan) -> LoaderState:
    """The inverse of ``loader_state_dict``; raises ValueError when the plan differs."""
    expected = plan.fingerprint()
    differ = {k: (saved[k], v) for k, v in expected.items() if k in saved and int(saved[k]) != v}
    if differ:
        raise ValueError(f"loader state was saved with other settings (saved, now): {differ}")
    state = LoaderState()
    state.load_state_dict(saved)
    if state.position > len(plan):
        raise ValueError(f"saved position {state.position} is past the epoch's {len(plan)} batches")
    return state


def warn_skipped(shard: str, key: str, reason: str) -> None:
    warnings.warn(f"{shard}: sample {key} skipped: {reason}", SkippedSampleWarning, stacklevel=3)


__all__ = [
    "EpochPlan", "LoaderState", "ShardError", "ShardIndex", "ShardSet", "SkippedSampleWarning",
    "batches_per_epoch", "epoch_indices", "epoch_order", "loader_state_dict", "open_shards",
    "restore_state", "shard_index", "warn_skipped",
]  # fmt: skip


class EpochLoader:
    """What both loaders share: the epoch/position state over an ``EpochPlan``.

    Subclasses set ``self.plan`` and ``self.state`` and implement ``__iter__``, which advances
    ``self.state.position`` as it hands batches over and moves to ``(epoch + 1, 0)`` at the end.
    """

    plan: EpochPlan
    state: LoaderState

    @property
    def epoch(self) -> int:
        return self.state.epoch

    def __len__(self) -> int:
        """Batches per epoch on this rank, the same on every rank (fewer are yielded only if a
        whole batch is corrupt)."""
        return len(self.plan)

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first batch, unless it is the current epoch (a restored position stays)."""
        if epoch != self.state.epoch:
            self.state = LoaderState(epoch, 0)

    def state_dict(self) -> dict:
        """Plain ints (epoch, position and the batching fingerprint): safe for ``weights_only=True``."""
        return loader_state_dict(self.state, self.plan)

    def load_state_dict(self, state: dict) -> None:
        self.state = restore_state(state, self.plan)

