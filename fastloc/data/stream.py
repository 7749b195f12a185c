"""What both loaders share around the host stage: the plan, the resumable state, the workers.

``EpochLoader`` opens the shard set, builds this rank's ``EpochPlan`` and keeps ``(epoch,
position)``; ``host_batches(t)`` runs ``SampleReader.batch`` for ``t, t + 1, ...`` in DataLoader
workers that live across epochs (in order: the output does not depend on the number of workers).
A subclass opens its stream at batch ``t`` (``_open``) and makes each batch's images (``_next``).
"""

from __future__ import annotations

import gc
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader

from fastloc.data.batch import Batch
from fastloc.data.config import LoaderConfig, Placement
from fastloc.data.order import EpochPlan
from fastloc.data.samples import HostBatch, HostBatches, HostFailure, SampleReader, Skipped, identity, warn_skipped
from fastloc.data.shards import ShardError, ShardSet, open_shards

PREFETCH = 2  # host batches each worker prepares ahead

# The worker streams in use. Held here so that a stream is never garbage together with its
# queues: a loader caught in a reference cycle would otherwise be collected with them, the
# queues closed first, and each worker waited for 5 s. ``release`` stops a stream at once.
_LIVE: set = set()


def release(stream) -> None:
    """Stop a stream's workers now (its last reference is dropped by the caller)."""
    _LIVE.discard(stream)


@dataclass
class LoaderState:
    """Where a loader stands: ``position`` batches of ``epoch`` already yielded."""

    epoch: int = 0
    position: int = 0


class EpochLoader:
    """The state, host stage and epoch iteration of a loader; subclasses set ``pixels`` and
    implement ``_open``, ``_next`` and ``close``. Batches are delivered on ``device``."""

    pixels: bool  # the workers decode and transform the images too (the torch twin)

    def __init__(self, cfg: LoaderConfig, placement: Placement, device: torch.device):
        self.cfg, self.torch_device = cfg, device
        self.shards: ShardSet = open_shards(cfg.shards)  # ShardError now for missing or truncated shards
        manifest = self.shards.manifest
        self.has_labels = bool(cfg.labels and manifest.get("label") and "seg.png" in manifest["keys"])
        self.has_labels = self.has_labels or cfg.superpixels is not None  # segment ids in the label's place
        self.has_cls = bool(manifest.get("cls") and "cls" in manifest["keys"])
        if cfg.captions and not (manifest.get("txt") and "txt" in manifest["keys"]):
            raise ShardError(
                f"{self.shards.root}: captions asked for, but its samples have no txt member "
                f"(keys {', '.join(manifest['keys'])}): convert the set again with --captions"
            )
        try:
            self.plan = EpochPlan(
                num_samples=self.shards.num_samples,
                batch_size=cfg.batch_size,
                seed=cfg.seed,
                shuffle=cfg.shuffle,
                rank=placement.rank,
                world_size=placement.world_size,
                drop_last=cfg.drop_last,
            )
        except ValueError as exc:
            raise ValueError(f"{self.shards.root}: {exc}") from None
        # label maps leave the workers as int64 for a CPU batch; for a GPU, narrow (widened there)
        self.reader = SampleReader(
            self.shards,
            cfg,
            self.plan,
            self.has_labels,
            self.has_cls,
            self.pixels,
            wide_labels=device.type == "cpu",
            txt=cfg.captions,
        )
        self.state = LoaderState()
        self._stream_t = -1  # global number of the live stream's next batch; -1: no stream
        self.replaced = 0  # replacement events (a bad sample counts again in every epoch that meets it)
        self.skipped_samples: dict[tuple[str, str], str] = {}  # (shard, key) -> reason, each warned once

    # ------------------------------------------------------------ position

    @property
    def epoch(self) -> int:
        return self.state.epoch

    def __len__(self) -> int:
        """Batches per epoch, the same on every rank; every batch has ``batch_size`` samples."""
        return len(self.plan)

    @property
    def next_batch(self) -> int:
        """Global number of the next batch (epoch * len + position)."""
        return self.state.epoch * len(self.plan) + self.state.position

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first batch, unless it is the current epoch (a restored position stays)."""
        if epoch != self.state.epoch:
            self.state = LoaderState(epoch, 0)

    def rewind(self, epoch: int = 0) -> None:
        """Start ``epoch`` from its first batch, wherever the loader stands (an evaluation pass)."""
        self.state = LoaderState(epoch, 0)

    def state_dict(self) -> dict[str, int]:
        """Epoch, position and the plan's fingerprint, as plain ints (``weights_only``-safe). The
        same format for both loaders: a state saved by one restores in the other."""
        epoch, position = self.state.epoch, self.state.position
        if position >= len(self.plan):  # an exhausted epoch is saved as the next one's start
            epoch, position = epoch + 1, 0
        return {"epoch": epoch, "position": position, **self.plan.fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position; refuses one saved with another order or batching."""
        expected = self.plan.fingerprint()
        differ = {k: (state[k], v) for k, v in expected.items() if k in state and int(state[k]) != v}
        if differ:
            raise ValueError(f"loader state was saved with other settings (saved, now): {differ}")
        epoch, position = int(state["epoch"]), int(state["position"])
        if not 0 <= position <= len(self.plan) or epoch < 0:
            raise ValueError(f"saved position {epoch}:{position} is outside the epoch's {len(self.plan)} batches")
        self.close()
        self.state = LoaderState(epoch, position)

    def close(self) -> None:
        """Stop the workers (and pipelines); the next iteration starts them again. Subclasses
        release their stream, then call this."""
        self._stream_t = -1

    def __iter__(self) -> Iterator[Batch]:
        """One epoch from the current position. The live stream goes on across epochs; a new
        position (the first iteration, ``set_epoch`` to another epoch, a restore) restarts it."""
        epoch = self.state.epoch
        if self._stream_t != self.next_batch:
            self.close()
            self._open(self.next_batch)
            self._stream_t = self.next_batch
        while self.state.position < len(self.plan):
            host, images = self._next()
            self._stream_t += 1
            self.state.position += 1  # counted when handed over: a checkpoint taken now resumes after it
            yield self.batch(host, images)
        self.state = LoaderState(epoch + 1, 0)

    def _open(self, t: int) -> None:
        """Start the stream at global batch ``t``."""
        raise NotImplementedError

    def _next(self) -> tuple[HostBatch, torch.Tensor]:
        """The stream's next host batch and its images on the loader's device."""
        raise NotImplementedError

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # ------------------------------------------------------------ host stage

    def host_batches(self, t: int) -> Iterator[HostBatch | HostFailure]:
        """``HostBatch`` ``t``, ``t + 1``, ... without end, from ``cfg.workers`` worker processes
        (a ``HostFailure`` where the shards are broken: the consumer raises it)."""
        workers = max(0, int(self.cfg.workers))
        if workers:
            gc.collect()  # garbage left in this process (a dropped pipeline) must not be collected in a fork
        loader = DataLoader(
            HostBatches(self.reader),
            batch_size=None,
            sampler=itertools.count(t),
            num_workers=workers,
            collate_fn=identity,
            prefetch_factor=PREFETCH if workers else None,
            # the workers' seeds from a generator of their own: opening a stream never draws from
            # the global RNG, so a step that does (drop path) continues exactly after a resume
            generator=torch.Generator().manual_seed(t),
        )
        stream = iter(loader)
        _LIVE.add(stream)
        return stream

    def batch(self, host: HostBatch, images: torch.Tensor) -> Batch:
        """The ``Batch`` of a host batch whose images are ready on the loader's device; notes replacements."""
        self._note(host.skipped)
        device = self.torch_device
        labels = None if host.labels is None else host.labels.to(device, non_blocking=True).to(torch.int64)
        params = self.cfg.recipe.params(host.draws)  # [B, ...] float32 numpy or None
        return Batch(
            images=self.cfg.recipe.finish(images, host.draws),
            views=None if host.views is None else tuple(v.to(device, non_blocking=True) for v in host.views),
            boxes=None if host.boxes is None else torch.from_numpy(host.boxes),
            labels=labels,
            cls=None if host.cls is None else torch.from_numpy(host.cls).to(device, non_blocking=True),
            keys=host.keys,
            captions=host.captions,
            valid=torch.from_numpy(host.valid).to(device, non_blocking=True),
            index=torch.from_numpy(host.g),
            params=None if params is None else torch.from_numpy(params).to(device, non_blocking=True),
        )

    def _note(self, skipped: list[Skipped]) -> None:
        for s in skipped:
            self.replaced += 1
            warn_skipped(s, self.skipped_samples)
