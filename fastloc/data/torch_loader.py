"""The torch twin of the DALI loader: the same host stage, with the pixels done by PIL in the workers.

It follows the same epoch order (``order.py``), replaces the same unusable samples and yields
the same keys, labels, classes and valid flags as the DALI loader; its images are timm's and
Patch-Seg's exact PIL pipelines (``transforms.py``), which DALI matches within a few grey levels.
It runs on any machine, so the whole data path runs in tests and without a GPU.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from fastloc.data.batch import Batch
from fastloc.data.config import LoaderConfig
from fastloc.data.samples import HostFailure
from fastloc.data.stream import EpochLoader, LoaderState, release


class TorchLoader(EpochLoader):
    """One epoch of ``Batch``es per iteration, for this rank; resumable with ``state_dict``."""

    pixels = True

    def __init__(self, cfg: LoaderConfig):
        super().__init__(cfg, torch.device("cpu"))
        self._host = None  # the live worker stream, positioned at batch self._host_t
        self._host_t = -1

    def close(self) -> None:
        release(self._host)
        self._host, self._host_t = None, -1  # the DataLoader iterator stops its workers when dropped

    def __iter__(self) -> Iterator[Batch]:
        epoch = self.state.epoch
        if self._host is None or self._host_t != self.next_batch:
            self._host, self._host_t = self.host_batches(self.next_batch), self.next_batch
        while self.state.position < len(self.plan):
            host = next(self._host)
            if isinstance(host, HostFailure):
                self.close()
                host.raise_()
            self._host_t += 1
            self.state.position += 1  # counted when handed over: a checkpoint taken now resumes after it
            yield self.batch(host, host.images)
        self.state = LoaderState(epoch + 1, 0)
