"""Which sample goes into which shard: decided once, up front, from the item list alone.

Because the plan depends only on the items and the options (never on the number of processes
or on timing), every shard can be written independently, in parallel, and a rerun after an
interruption recomputes the same plan and writes only the shards that are missing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from dataclasses import dataclass

import numpy as np

from fastloc.shard.config import ConvertConfig
from fastloc.shard.errors import ConversionError
from fastloc.shard.manifest import shard_name
from fastloc.shard.sources.base import Item, SourceInfo

# Options that change how the work runs but not what it produces.
_RUN_ONLY = ("processes", "progress", "overwrite", "strict", "out", "fsync", "wait")


@dataclass(frozen=True)
class ShardPlan:
    index: int
    name: str  # tar file name
    items: tuple[Item, ...]


def order_items(items: list[Item], cfg: ConvertConfig) -> list[Item]:
    """Sorted by key, then (optionally) a seeded global shuffle, then the --limit prefix."""
    items = sorted(items, key=lambda item: item.key)
    for a, b in itertools.pairwise(items):
        if a.key == b.key:
            raise ConversionError(f"two samples share the key {a.key!r}: {a.ref!r} and {b.ref!r}")
        if "." in a.key or "/" in a.key:
            raise ConversionError(f"sample key {a.key!r} contains '.' or '/'")
    if cfg.shuffle:
        permutation = np.random.default_rng(cfg.seed).permutation(len(items))
        items = [items[i] for i in permutation]
    if cfg.limit is not None:
        items = items[: cfg.limit]
    return items


def cut_shards(items: list[Item], cfg: ConvertConfig, dataset: str, split: str) -> list[ShardPlan]:
    """Consecutive runs of items: --shard-samples each, or about --shard-bytes of source each."""
    if cfg.shard_samples is not None and cfg.shard_samples < 1:
        raise ConversionError(f"--shard-samples must be at least 1, got {cfg.shard_samples}")
    if cfg.shard_samples is None and cfg.shard_bytes < 1:
        raise ConversionError(f"--shard-bytes must be at least 1, got {cfg.shard_bytes}")
    groups: list[list[Item]] = []
    current: list[Item] = []
    size = 0
    for item in items:
        full = (
            len(current) >= cfg.shard_samples if cfg.shard_samples is not None else size + item.size > cfg.shard_bytes
        )
        if current and full:
            groups.append(current)
            current, size = [], 0
        current.append(item)
        size += item.size
    if current:
        groups.append(current)
    return [ShardPlan(i, shard_name(dataset, split, i), tuple(group)) for i, group in enumerate(groups)]


def fingerprint(cfg: ConvertConfig, info: SourceInfo, plans: list[ShardPlan]) -> str:
    """A digest of everything that determines the output; a resume must match it."""
    options = {k: str(v) for k, v in dataclasses.asdict(cfg).items() if k not in _RUN_ONLY}
    h = hashlib.sha256()
    h.update(
        json.dumps(
            {"options": options, "config": type(cfg).__name__, "info": dataclasses.asdict(info)},
            sort_keys=True,
            default=str,
        ).encode()
    )
    for plan in plans:
        h.update(f"{plan.name}\n".encode())
        for item in plan.items:
            h.update(f"{item.key} {item.size}\n".encode())
    return h.hexdigest()
