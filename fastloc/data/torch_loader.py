"""The torch twin of the DALI loader: the same host stage, with the pixels done by PIL in the workers.

It follows the same epoch order (``order.py``), replaces the same unusable samples and yields
the same keys, labels, classes and valid flags as the DALI loader; its images are timm's and
the recipes' exact PIL pipelines (``recipes.py``), which DALI matches within a few grey levels.
It runs on any machine, so the whole data path runs in tests and without a GPU.
"""

from __future__ import annotations

import torch

from fastloc.data.config import LoaderConfig, Placement
from fastloc.data.samples import HostBatch, HostFailure
from fastloc.data.stream import EpochLoader, release


class TorchLoader(EpochLoader):
    """One epoch of ``Batch``es per iteration, for this rank; resumable with ``state_dict``."""

    pixels = True

    def __init__(self, cfg: LoaderConfig, placement: Placement):
        super().__init__(cfg, placement, torch.device("cpu"))
        self._host = None  # the live worker stream

    def close(self) -> None:
        release(self._host)
        self._host = None  # the DataLoader iterator stops its workers when dropped
        super().close()

    def _open(self, t: int) -> None:
        self._host = self.host_batches(t)

    def _next(self) -> tuple[HostBatch, torch.Tensor]:
        host = next(self._host)
        if isinstance(host, HostFailure):
            self.close()
            host.raise_()
        return host, host.images
