"""Where the probe's batches come from: the feature cache, or the loader and the backbone live.

Both yield ``(x, targets, valid)`` per batch and follow the loaders' epoch order and replacement
rule (``fastloc.data.order``), so a run from the cache trains and scores on exactly the batches
a live run would. ``x`` is the features [B, T, D], or the images when the backbone trains too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fastloc.data.order import EpochPlan, candidates
from fastloc.data.stream import EpochLoader
from fastloc.probe.cache import CachedSplit, open_cache, pool_targets, targets_for

Batches = Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def plan_batches(plan: EpochPlan, epoch: int, usable: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """(index [B], valid [B]) of each batch of ``epoch`` on this rank: the loaders' order, an
    unusable sample replaced by the next usable one of the share (``SampleReader.fill``)."""
    share, valid = plan.share(epoch)
    out = []
    for p in range(len(plan)):
        index, ok = [], []
        for pos in plan.positions(p):
            pick = next((c for c in candidates(len(share), pos) if usable[share[c]]), None)
            if pick is None:
                raise ValueError(f"no usable sample in rank {plan.rank}'s share of epoch {epoch}")
            index.append(share[pick])
            ok.append(bool(valid[pos]) and pick == pos)
        out.append((np.asarray(index, np.int64), np.asarray(ok, bool)))
    return out


class _Rows(Dataset):
    """Batch number -> (features, stored targets, valid), read in a worker; the memory maps are
    opened in the worker, never pickled."""

    def __init__(self, cache: CachedSplit, batches: list[tuple[np.ndarray, np.ndarray]]):
        self.path, self.key, self.batches, self.cache = cache.path, cache.meta["key"], batches, None

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int):
        if self.cache is None:  # checked when the run opened it: not again per worker and epoch
            self.cache = open_cache(self.path, self.key, verify=False)
        index, valid = self.batches[i]
        features, stored = self.cache.rows(index)
        return features, stored, torch.from_numpy(valid)

    def __getstate__(self):
        return {**self.__dict__, "cache": None}


class CachedSource:
    """Batches read from a feature cache."""

    def __init__(self, cache: CachedSplit, plan: EpochPlan, reduction: str, device: torch.device, workers: int):
        if plan.num_samples != cache.num_samples:
            raise ValueError(f"{cache.path}: {cache.num_samples} samples, the plan has {plan.num_samples}")
        self.cache, self.plan, self.reduction, self.device, self.workers = cache, plan, reduction, device, workers
        self.classes = int(cache.meta["key"]["num_classes"])

    def __len__(self) -> int:
        return len(self.plan)

    def batches(self, epoch: int) -> Batches:
        rows = _Rows(self.cache, plan_batches(self.plan, epoch, self.cache.usable))
        pin = self.device.type == "cuda"
        loader = DataLoader(rows, batch_size=None, num_workers=self.workers, pin_memory=pin, shuffle=False)
        for features, stored, valid in loader:
            stored = {k: v.to(self.device, non_blocking=True) for k, v in stored.items()}
            yield (
                features.to(self.device, non_blocking=True),
                targets_for(self.reduction, stored, self.classes),
                valid.to(self.device, non_blocking=True),
            )


class LiveSource:
    """Batches from a loader: labels pooled on the fly, features from ``encode`` (the frozen
    backbone; the identity when the backbone trains). ``pool`` is the label pooling (the kernel;
    the benchmark swaps in the original's loop)."""

    def __init__(
        self,
        loader: EpochLoader,
        encode: Callable[[torch.Tensor], torch.Tensor],
        reduction: str,
        patch: int,
        classes: int,
        pool: Callable[[torch.Tensor, int, int], dict[str, torch.Tensor]] = pool_targets,
    ):
        self.loader, self.encode, self.reduction, self.patch, self.classes, self.pool = (
            loader,
            encode,
            reduction,
            patch,
            classes,
            pool,
        )

    def __len__(self) -> int:
        return len(self.loader)

    def batches(self, epoch: int) -> Batches:
        self.loader.rewind(epoch)
        for batch in self.loader:
            stored = self.pool(batch.labels, self.patch, self.classes)
            yield self.encode(batch.images), targets_for(self.reduction, stored, self.classes), batch.valid
