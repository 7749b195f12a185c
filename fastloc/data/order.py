"""The epoch order: which sample fills which batch slot on which rank. Both loaders follow it.

Plain numpy arithmetic on (number of samples, seed, epoch, shuffle, rank, world size, batch size,
drop_last), nothing else: the DALI loader and its torch twin yield the same samples in the same
batches, and a position saved by one resumes in the other. The rules (training and evaluation
shares, replacements) are the README's "Loaders" section.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


def epoch_order(num_samples: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """[N] int64: the global sample indices of an epoch, before the rank split."""
    if shuffle:
        return np.random.default_rng([seed, epoch]).permutation(num_samples).astype(np.int64)
    return np.arange(num_samples, dtype=np.int64)


def _share(
    n: int, seed: int, epoch: int, shuffle: bool, rank: int, world: int, slots: int
) -> tuple[np.ndarray, np.ndarray]:
    order = epoch_order(n, seed, epoch, shuffle)
    if slots <= n:  # training: the last n mod world of the order are left out
        taken, valid = order[:slots], np.ones(slots, bool)
    else:  # evaluation: cycled to fill every slot, the repeats not valid
        taken, valid = order[np.arange(slots) % n], np.arange(slots) < n
    indices, valid = taken[rank::world], valid[rank::world]
    indices.flags.writeable = valid.flags.writeable = False
    return indices, valid


@dataclass(frozen=True)
class EpochPlan:
    """One rank's batches of every epoch, by the rules above."""

    num_samples: int
    batch_size: int
    seed: int = 0
    shuffle: bool = True
    rank: int = 0
    world_size: int = 1
    drop_last: bool = True

    def __post_init__(self):
        object.__setattr__(self, "_shares", {})  # epoch -> share: the current epoch and the next
        n, b, world = self.num_samples, self.batch_size, self.world_size
        if b < 1 or world < 1 or not 0 <= self.rank < world:
            raise ValueError(
                f"need batch_size >= 1 and 0 <= rank < world_size, got batch_size {b}, "
                f"rank {self.rank}, world_size {world}"
            )
        if n < world:
            raise ValueError(f"{n} samples cannot be shared by {world} ranks: every rank needs at least one")
        if self.drop_last and n // world < b:
            raise ValueError(
                f"batch_size {b} is larger than each rank's share of {n // world} samples ({n} samples over "
                f"{world} ranks): with drop_last no batch would be yielded; lower batch_size or use drop_last=False"
            )

    def __len__(self) -> int:
        """Batches per epoch, the same on every rank."""
        per_rank = self.num_samples // self.world_size
        if self.drop_last:
            return per_rank // self.batch_size
        return math.ceil(self.num_samples / (self.world_size * self.batch_size))

    def share(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """This rank's share of ``epoch``: global indices [n] int64 and valid [n] bool (read-only).
        Batch ``p`` takes positions ``[p * batch_size, (p + 1) * batch_size)``; the positions
        after the last batch (training) serve only as replacements."""
        if epoch not in self._shares:
            if self.drop_last:
                slots = (self.num_samples // self.world_size) * self.world_size
            else:
                slots = len(self) * self.world_size * self.batch_size
            share = _share(self.num_samples, self.seed, epoch, self.shuffle, self.rank, self.world_size, slots)
            self._shares.update({e: v for e, v in self._shares.items() if e == epoch - 1} | {epoch: share})
            for stale in [e for e in self._shares if e not in (epoch - 1, epoch)]:
                del self._shares[stale]
        return self._shares[epoch]

    def __getstate__(self) -> dict:  # pickled without the cached shares
        return {k: v for k, v in self.__dict__.items() if k != "_shares"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _shares={})

    def positions(self, position: int) -> range:
        """Share positions of batch ``position``."""
        return range(position * self.batch_size, (position + 1) * self.batch_size)

    def fingerprint(self) -> dict[str, int]:
        """What a saved position depends on (rank excluded: all ranks share one position)."""
        return {
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "shuffle": int(self.shuffle),
            "world_size": self.world_size,
            "drop_last": int(self.drop_last),
        }


def candidates(share_size: int, position: int) -> Iterator[int]:
    """The share positions that may fill slot ``position``, in order: itself, then the next ones
    cyclically (the replacement rule)."""
    for k in range(share_size):
        yield (position + k) % share_size
