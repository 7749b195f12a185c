"""The feature cache: a frozen backbone's tokens and the pooled labels of one split, on disk.

Preprocessing is deterministic (the eval recipe), so the backbone's features are computed once
and every epoch and head reads them back. One folder per (backbone fingerprint, split manifest,
image size, normalization, skip-blocks, feature dtype), holding numpy ``.npy`` files opened as
memory maps, so RAM stays bounded whatever the split's size:

    features.npy  [S, T, D]   bf16 bits as int16 (--precision bf16) or float32
    union.npy     [S, N, C8]  the union targets, bit-packed (C8 = ceil(C / 8))
    majority.npy  [S, N]      uint8 or int16
    global.npy    [S, C8]     the global-union targets, bit-packed
    usable.npy    [S]         False for a sample the loaders could not use
    meta.json                 the key, the shapes, the format version; written last

The dense evaluations (``fastloc.probe.dense``) keep the same folder with other target arrays
(the label maps themselves, ``labels.npy`` [S, H, W]): ``meta.json`` lists a cache's arrays.

It is built in a hidden ``.partial-*`` folder that is renamed into place when complete, so a
killed build leaves no cache that looks whole. With several ranks each writes its share of the
rows into the same files (a shared file system, as SLURM clusters have).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from fastloc.kernels.label_pool import label_pool
from fastloc.progress import Progress

FORMAT = 1


class CacheError(RuntimeError):
    """A cache folder that cannot be used; the message says which and why."""


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
    """The cache at ``path`` when it is complete for ``key``, else ``build()``'s; each said on rank 0.
    One of other inputs, another format or damaged is rebuilt; ``reuse=False`` always builds."""
    cache = None
    if reuse:
        try:
            cache = open_cache(path, key)
        except CacheError as exc:
            if main:
                print(f"features: {exc}; rebuilding it")
        if cache is not None:
            if main:
                print(f"features: reusing the cache {path} ({cache.num_samples} samples)")
            return cache
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
    """An opened cache: read-only memory maps."""

    path: Path
    meta: dict
    arrays: dict[str, np.ndarray]

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


def open_cache(path: Path, key: dict) -> CachedSplit | None:
    """The cache at ``path`` if it is complete and was made for ``key``; None if there is none.
    A cache of another format or key, or with arrays cut short, is a ``CacheError``."""
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise CacheError(f"{meta_path}: unreadable ({exc}); delete {path} to rebuild it") from None
    if meta.get("format") != FORMAT:
        raise CacheError(
            f"{path}: written by another version of fastloc (cache format {meta.get('format')}, this one reads "
            f"{FORMAT}); delete it to rebuild it"
        )
    if meta.get("key") != key:
        raise CacheError(f"{path}: made for other inputs than this run's; delete it to rebuild it")
    arrays = {}
    for name in meta.get("arrays", {}):
        try:
            arrays[name] = np.load(path / f"{name}.npy", mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise CacheError(f"{path / name}.npy: unreadable ({exc}); delete {path} to rebuild it") from None
        if list(arrays[name].shape) != meta["arrays"][name]:
            raise CacheError(
                f"{path / name}.npy: shape {list(arrays[name].shape)}, meta.json says {meta['arrays'][name]}; "
                f"delete {path} to rebuild it"
            )
    return CachedSplit(path, meta, arrays)


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
    fit). ``shapes`` and ``dtypes`` name every array, ``features`` and ``usable`` among them."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    tmp = _partial(path)
    if rank == 0:
        tmp.mkdir(parents=True)
        for name in shapes:
            np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=dtypes[name], shape=shapes[name]).flush()
    _barrier()
    try:
        return _fill(path, tmp, key, batches, encode, shapes, targets, progress)
    except BaseException:
        if rank == 0:  # ours, never published (a SIGKILLed build leaves its .partial- folder behind)
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fill(path, tmp, key, batches, encode, shapes, targets, progress) -> CachedSplit:
    """This rank's rows into ``tmp``; rank 0 then merges ``usable``, writes meta.json and publishes."""
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
        out["features"][rows] = bits.cpu().numpy()
        for name, value in stored.items():
            out[name][rows] = value[torch.from_numpy(valid).to(value.device)].cpu().numpy()
        out["usable"][rows] = True
        if progress is not None:
            progress.update(int(valid.sum()))
    for array in out.values():
        array.flush()
    del out
    usable = torch.from_numpy(np.load(tmp / "usable.npy").astype(np.uint8))
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(usable, op=dist.ReduceOp.MAX)
    _barrier()
    if rank == 0:
        np.save(tmp / "usable.npy", usable.numpy().astype(bool))
        meta = {"format": FORMAT, "key": key, "arrays": {n: list(s) for n, s in shapes.items()}}
        meta["shape"] = {
            "samples": shapes["features"][0],
            "tokens": shapes["features"][1],
            "dim": shapes["features"][2],
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        _publish(tmp, path, key)
    _barrier()
    return open_cache(path, key)


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
