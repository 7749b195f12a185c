"""The feature cache: a frozen backbone's tokens and the pooled labels of one split, on disk.

Preprocessing is deterministic, so the features are computed once and every epoch, head and dense
protocol reads them back through memory maps (RAM stays bounded). A cache is built in a hidden
``.partial-*`` folder renamed into place when whole, its files take their full size before any row
is written (a full disk is one error, not a SIGBUS), and rows carry CRC-32 checksums checked on
opening. The files and rules: README.md, "Feature cache".
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import socket
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from fastloc.kernels.label_pool import label_pool
from fastloc.progress import Progress
from fastloc.runtime import any_rank, collective_device

FORMAT = 2  # 2: checksum.npy
CHECKSUMS = "checksum"
VERIFY_BYTES = 256 << 20  # at most this much of a cache is read back and checked when it is opened


class CacheError(RuntimeError):
    """A cache folder that cannot be used; the message says which and why."""


class DamagedCache(CacheError):
    """A cache whose files are there but whose contents are not what was written."""


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """[..., C] 0/1 -> [..., ceil(C / 8)] uint8, bit k of byte j = class 8 j + k."""
    c = bits.shape[-1]
    padded = torch.nn.functional.pad(bits.to(torch.uint8), (0, 8 * math.ceil(c / 8) - c))
    weights = torch.tensor([1 << k for k in range(8)], dtype=torch.uint8, device=bits.device)
    return (padded.unflatten(-1, (-1, 8)) * weights).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, classes: int) -> torch.Tensor:
    """The inverse of ``pack_bits``: [..., C8] uint8 -> [..., C] uint8."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(-1) >> shifts) & 1).flatten(-2)[..., :classes]


def pool_targets(labels: torch.Tensor, patch: int, classes: int) -> dict[str, torch.Tensor]:
    """Label maps [B, S, S] -> the three reductions as the cache stores them (checked: a label
    outside [0, C) is a ValueError, one host sync per batch)."""
    return {
        "union": pack_bits(label_pool(labels, patch, classes, "union", torch.uint8, check=True)),
        "majority": label_pool(labels, patch, classes, "majority", check=True),
        "global": pack_bits(label_pool(labels, patch, classes, "global-union", torch.uint8, check=True)),
    }


def targets_for(reduction: str, stored: dict[str, torch.Tensor], classes: int) -> torch.Tensor:
    """What the loss reads: union [B, N, C] float, majority [B, N] int64, global-union [B, 1, C] float."""
    if reduction == "majority":
        return stored["majority"].long()
    if reduction == "union":
        return unpack_bits(stored["union"], classes).float()
    return unpack_bits(stored["global"], classes).float().unsqueeze(1)


def cache_key(backbone: str, manifest: dict[str, Any], image: dict[str, Any], skip_blocks: int, dtype: str) -> dict:
    """Everything the cached arrays depend on."""
    shards = [s["sha256"] for s in manifest["shards"]]  # the tars' digests: the data itself
    data = hashlib.blake2b(json.dumps([manifest["classes"], shards]).encode(), digest_size=16)
    key = {
        "backbone": backbone,
        "dataset": manifest["dataset"],
        "split": manifest["split"],
        "data": data.hexdigest(),
        "num_samples": int(manifest["num_samples"]),
        "num_classes": int(manifest["num_classes"]),
        "image": image,
        "skip_blocks": skip_blocks,
        "feature_dtype": dtype,
        "recipe": "eval",
    }
    return json.loads(json.dumps(key))  # as meta.json gives it back (tuples become lists)


def image_key(image) -> dict[str, Any]:
    """What of a backbone's ImageConfig the cached features depend on."""
    return {"size": image.size, "patch_size": image.patch_size, "mean": image.mean, "std": image.std}


def feature_storage(precision: str) -> type:
    """The numpy dtype of cached features: bf16 bits as int16 (numpy has no bf16), or float32."""
    return np.int16 if precision == "bf16" else np.float32


def reuse_or_build(path: Path, key: dict, build: Callable[[], CachedSplit], main: bool, reuse: bool = True):
    """The cache at ``path`` when it is complete and intact for ``key``, else ``build()``'s; each
    said on rank 0. One of other inputs or another format is rebuilt; a damaged one is removed and
    rebuilt with a warning; ``reuse=False`` always builds. Every rank takes the same decision."""
    cache, why = None, None
    if reuse:
        try:
            cache = open_cache(path, key)
        except CacheError as exc:
            why = exc
    if not any_rank(cache is None):
        if main:
            print(f"features: reusing the cache {path} ({cache.num_samples} samples)")
        return cache
    if isinstance(why, DamagedCache):  # said by the rank that found it (ranks check different rows)
        print(f"warning: features: {why}; rebuilding it")
    elif why is not None and main:
        print(f"features: {why}; rebuilding it")
    if any_rank(isinstance(why, DamagedCache)) and main:
        _discard(path)  # before the build: publishing checks only a sample of a large cache
    _barrier()
    cache = build()
    if main:
        print(f"features: cached in {path}")
    return cache


def build_from_loader(path: Path, key: dict, loader, encode, shapes, dtypes, targets, main: bool) -> CachedSplit:
    """``build_cache`` from one eval-order pass of ``loader`` (closed after), with a progress line."""
    progress = Progress(shapes["features"][0], 0, f"features {key['split']}", enabled=main, unit="images")
    try:
        return build_cache(path, key, iter(loader), encode, shapes, dtypes, targets, progress)
    finally:
        progress.close()
        loader.close()


def cache_path(root: Path, key: dict) -> Path:
    digest = hashlib.blake2b(json.dumps(key, sort_keys=True).encode(), digest_size=8).hexdigest()
    return Path(root) / f"{key['dataset']}-{key['split']}-{digest}"


@dataclass
class CachedSplit:
    """An opened cache: read-only memory maps, and the rows' checksums [S, A]."""

    path: Path
    meta: dict
    arrays: dict[str, np.ndarray]
    checksums: np.ndarray | None = None

    @property
    def num_samples(self) -> int:
        return int(self.meta["shape"]["samples"])

    @property
    def usable(self) -> np.ndarray:
        return self.arrays["usable"]

    def rows(self, index: np.ndarray) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Features [B, T, D] and the stored targets of samples ``index`` (host tensors)."""
        features = torch.from_numpy(np.ascontiguousarray(self.arrays["features"][index]))
        if self.meta["key"]["feature_dtype"] == "bfloat16":
            features = features.view(torch.bfloat16)  # stored as int16 bits: numpy has no bf16
        stored = {
            k: torch.from_numpy(np.ascontiguousarray(v[index]))
            for k, v in self.arrays.items()
            if k not in ("features", "usable")
        }
        return features, stored


def open_cache(path: Path, key: dict, verify: bool = True) -> CachedSplit | None:
    """The cache at ``path`` if it is complete and was made for ``key``; None if there is none.
    A cache of another format or key is a ``CacheError``; arrays cut short, unreadable or (with
    ``verify``) whose checked rows do not match their checksums, a ``DamagedCache``."""
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise DamagedCache(f"{meta_path}: unreadable ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise CacheError(
            f"{path}: written by another version of fastloc (cache format {found}, this one reads {FORMAT})"
        )
    if meta.get("key") != key:
        raise CacheError(f"{path}: made for other inputs than this run's")
    shapes = {**meta.get("arrays", {}), CHECKSUMS: [int(meta["shape"]["samples"]), len(meta.get("arrays", {}))]}
    arrays = {name: _load(path, name, shape) for name, shape in shapes.items()}
    cache = CachedSplit(path, meta, arrays, arrays.pop(CHECKSUMS))
    if verify:
        verify_rows(cache)
    return cache


def _load(path: Path, name: str, shape: list[int]) -> np.ndarray:
    """One array of a cache, memory-mapped read-only; a ``DamagedCache`` unless it has ``shape``."""
    file = path / f"{name}.npy"
    try:
        array = np.load(file, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise DamagedCache(f"{file}: unreadable ({exc})") from None
    if list(array.shape) != list(shape):
        raise DamagedCache(f"{file}: shape {list(array.shape)}, meta.json says {list(shape)}")
    return array


def row_checksums(rows: dict[str, np.ndarray]) -> np.ndarray:
    """[B, A] uint32: CRC-32 of each row's bytes in each array (``rows``: name -> [B, ...] as
    stored), the arrays in name order. CRC-32 runs at several GB/s (blake2b about 0.8), so writing
    and checking cost little beside the backbone and the disk."""
    names = sorted(rows)
    count = len(rows[names[0]])
    out = np.empty((count, len(names)), np.uint32)
    for a, name in enumerate(names):
        block = np.ascontiguousarray(rows[name])
        for i in range(count):
            out[i, a] = zlib.crc32(block[i : i + 1])
    return out


def verify_rows(cache: CachedSplit, budget: int = VERIFY_BYTES) -> int:
    """Check rows against their checksums: every row when the arrays hold at most ``budget``
    bytes, else a random sample of that many bytes' worth (another sample on each open). A
    ``DamagedCache`` naming the first file and row that differ; the number of rows checked."""
    n = cache.num_samples
    row_bytes = sum(a.itemsize * math.prod(a.shape[1:]) for a in cache.arrays.values())
    if n * row_bytes <= budget:
        rows = np.arange(n)
    else:
        rows = np.sort(np.random.default_rng().choice(n, max(1, budget // max(row_bytes, 1)), replace=False))
    names = sorted(cache.arrays)
    for start in range(0, len(rows), 64):
        index = rows[start : start + 64]
        found = row_checksums({name: cache.arrays[name][index] for name in names})
        bad = np.argwhere(found != cache.checksums[index])
        if len(bad):
            row, a = bad[0]
            raise DamagedCache(
                f"{cache.path / names[a]}.npy: row {index[row]} does not match the checksum written with it "
                "(the file was changed or damaged since)"
            )
    return len(rows)


def _discard(path: Path) -> None:
    """Remove a cache folder (renamed away first, so that no reader sees it half-deleted)."""
    old = path.parent / f".old-{path.name}-{os.getpid()}"
    try:
        os.rename(path, old)
    except FileNotFoundError:
        return
    shutil.rmtree(old, ignore_errors=True)


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def build_cache(
    path: Path,
    key: dict,
    batches,
    encode: Callable[[torch.Tensor], torch.Tensor],
    shapes: dict[str, tuple[int, ...]],
    dtypes: dict[str, np.dtype],
    targets: Callable[[torch.Tensor], dict[str, torch.Tensor]],
    progress=None,
) -> CachedSplit:
    """Write the cache from ``batches`` (one pass of an eval-order loader over the split; each
    rank its share) and publish it. ``encode`` maps images to features [B, T, D]; ``targets``
    maps label maps [B, S, S] to the other arrays' rows (a ValueError for labels that do not
    fit). ``shapes`` and ``dtypes`` name every array, ``features`` and ``usable`` among them.
    A file-system failure (a full disk) is an OSError naming ``path``; nothing is left behind."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    tmp = _partial(path)
    shapes = {**shapes, CHECKSUMS: (shapes["features"][0], len(shapes))}
    dtypes = {**dtypes, CHECKSUMS: np.uint32}
    try:
        created = None
        if rank == 0:
            try:
                _create(tmp, shapes, dtypes)
            except OSError as exc:
                created = exc
        if any_rank(created is not None):
            raise created or CacheError(f"{path}: rank 0 could not create the feature cache (its error says why)")
        return _fill(path, tmp, key, batches, encode, shapes, targets, progress)
    except BaseException as exc:
        if rank == 0:  # ours, never published (a SIGKILLed build leaves its .partial- folder behind)
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            what = f"{exc.strerror or exc} (writing the feature cache)"
            raise OSError(exc.errno, what, str(path)) from None
        raise


def _create(tmp: Path, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, np.dtype]) -> None:
    """The empty arrays, each given its full size on disk before any row is written: a memory map
    written past the free space dies of SIGBUS, a reservation fails with ENOSPC here."""
    tmp.mkdir(parents=True)
    for name, shape in shapes.items():
        file = tmp / f"{name}.npy"
        np.lib.format.open_memmap(file, mode="w+", dtype=dtypes[name], shape=shape).flush()
        _reserve(file)


def _reserve(file: Path) -> None:
    """Allocate every block of ``file`` (posix_fallocate; zeros written where it is unsupported)."""
    size = file.stat().st_size
    with open(file, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, size)
            return
        except AttributeError:  # no posix_fallocate on this platform (macOS)
            pass
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
        offset, chunk = 0, 1 << 20
        while offset < size:  # rewrite every chunk in place: writing allocates it
            f.seek(offset)
            data = f.read(chunk)
            f.seek(offset)
            f.write(data)
            offset += len(data)
        f.flush()
        os.fsync(f.fileno())


def _fill(path, tmp, key, batches, encode, shapes, targets, progress) -> CachedSplit:
    """This rank's rows (and their checksums) into ``tmp``; rank 0 then merges ``usable``, writes
    meta.json and publishes."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    out = {name: np.load(tmp / f"{name}.npy", mmap_mode="r+") for name in shapes}
    classes = key["num_classes"]
    for batch in batches:
        valid = batch.valid.cpu().numpy()
        rows = batch.index.numpy()[valid]
        features = encode(batch.images)[torch.from_numpy(valid).to(batch.images.device)]
        try:
            stored = targets(batch.labels)
        except ValueError as exc:
            raise CacheError(
                f"{key['dataset']}/{key['split']}: a label map of samples {', '.join(batch.keys[:4])}... does not fit "
                f"the manifest's {classes} classes ({exc})"
            ) from None
        bits = features.view(torch.int16) if features.dtype == torch.bfloat16 else features
        written = {"features": bits.cpu().numpy(), "usable": np.ones(len(rows), bool)}
        for name, value in stored.items():
            written[name] = value[torch.from_numpy(valid).to(value.device)].cpu().numpy()
        written = {name: np.asarray(value, dtype=out[name].dtype) for name, value in written.items()}
        for name, value in written.items():
            out[name][rows] = value
        out[CHECKSUMS][rows] = row_checksums(written)
        if progress is not None:
            progress.update(int(valid.sum()))
    for array in out.values():
        array.flush()
    del out
    usable = torch.from_numpy(np.load(tmp / "usable.npy").astype(np.uint8))
    if dist.is_initialized() and dist.get_world_size() > 1:
        usable = usable.to(collective_device())
        dist.all_reduce(usable, op=dist.ReduceOp.MAX)
        usable = usable.cpu()
    _barrier()
    if rank == 0:
        _finish(tmp, key, shapes, usable.numpy().astype(bool))
        _publish(tmp, path, key)
    _barrier()
    return open_cache(path, key, verify=False)


def _finish(tmp: Path, key: dict, shapes: dict[str, tuple[int, ...]], usable: np.ndarray) -> None:
    """The merged ``usable``, the checksums of the rows no rank wrote (all zeros), and meta.json."""
    np.save(tmp / "usable.npy", usable)
    checksums = np.load(tmp / f"{CHECKSUMS}.npy", mmap_mode="r+")
    names = sorted(n for n in shapes if n != CHECKSUMS)
    blank = {n: np.zeros((1, *shapes[n][1:]), np.load(tmp / f"{n}.npy", mmap_mode="r").dtype) for n in names}
    checksums[~usable] = row_checksums(blank)[0]
    checksums.flush()
    del checksums
    arrays = {n: list(shapes[n]) for n in names}
    meta = {"format": FORMAT, "key": key, "arrays": arrays, "checksums": "CRC-32 per row and array, arrays by name"}
    meta["shape"] = {"samples": shapes["features"][0], "tokens": shapes["features"][1], "dim": shapes["features"][2]}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))


def _partial(path: Path) -> Path:
    """This build's own folder (rank 0 names it, every rank writes into it): jobs that build the
    same cache at once (a sweep's members on one backbone) never share or delete each other's."""
    name = [f".partial-{path.name}-{socket.gethostname()}-{os.getpid()}"]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(name, src=0)
    return path.parent / name[0]


def _publish(tmp: Path, path: Path, key: dict) -> None:
    """Rename the finished build into place. A valid cache another job published first is kept
    (ours is dropped); another format's or a damaged one is replaced now that ours is whole."""
    for _ in range(2):
        if path.exists():
            try:
                theirs = open_cache(path, key)
            except CacheError:
                theirs = None
            if theirs is not None:
                shutil.rmtree(tmp, ignore_errors=True)
                return
            old = path.parent / f".old-{path.name}-{os.getpid()}"
            os.rename(path, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, path)
            return
        except OSError:  # another job published between our check and our rename: check again
            continue
    raise CacheError(f"{path}: could not publish the feature cache (another job keeps replacing it)")
