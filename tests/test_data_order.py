"""The epoch order (``order.py``) as properties, and reading samples by index (``shards.py``)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastloc.data.order import EpochPlan, candidates, epoch_order
from fastloc.data.shards import open_shards


def plans(n: int, b: int, world: int, seed: int, shuffle: bool, drop_last: bool) -> list[EpochPlan]:
    return [EpochPlan(n, b, seed, shuffle, r, world, drop_last) for r in range(world)]


@given(
    n=st.integers(1, 200),
    b=st.integers(1, 16),
    world=st.integers(1, 9),
    seed=st.integers(0, 5),
    epoch=st.integers(0, 3),
    shuffle=st.booleans(),
    drop_last=st.booleans(),
)
@settings(max_examples=150, deadline=None)
def test_every_rank_gets_the_same_full_batches(n, b, world, seed, epoch, shuffle, drop_last):
    if n < world or (drop_last and n // world < b):  # would yield nothing: refused (next test)
        with pytest.raises(ValueError):
            EpochPlan(n, b, seed, shuffle, 0, world, drop_last)
        return
    ranks = plans(n, b, world, seed, shuffle, drop_last)
    assert len({len(p) for p in ranks}) == 1 and len(ranks[0]) >= 1
    order = epoch_order(n, seed, epoch, shuffle)
    used, valid_used = [], []
    for plan in ranks:
        share, valid = plan.share(epoch)
        batches = [share[list(plan.positions(p))] for p in range(len(plan))]
        assert all(len(x) == b for x in batches)  # full batches, also the last
        flags = np.concatenate([valid[list(plan.positions(p))] for p in range(len(plan))])
        taken = np.concatenate(batches)
        used += taken.tolist()
        valid_used += taken[flags].tolist()
    if drop_last:  # training: nothing twice, all valid, from the first (n // world) * world of the order
        assert len(set(used)) == len(used) == len(valid_used) == (n // world // b) * b * world
        assert set(used) <= set(order[: (n // world) * world].tolist())
    else:  # evaluation: the valid slots hold every sample exactly once
        assert sorted(valid_used) == list(range(n))
        assert len(used) == world * b * math.ceil(n / (world * b))


def test_configurations_that_yield_nothing_are_refused():
    with pytest.raises(
        ValueError, match=r"batch_size 8 is larger than each rank's share of 5 samples \(10 samples over 2 ranks\)"
    ):
        EpochPlan(10, 8, world_size=2)
    with pytest.raises(ValueError, match="3 samples cannot be shared by 4 ranks"):
        EpochPlan(3, 1, world_size=4, drop_last=False)
    with pytest.raises(ValueError, match="0 samples cannot be shared by 1 ranks"):
        EpochPlan(0, 1)
    with pytest.raises(ValueError, match="rank 2"):
        EpochPlan(10, 1, rank=2, world_size=2)
    assert len(EpochPlan(10, 8, world_size=2, drop_last=False)) == 1


def test_the_order_depends_on_seed_and_epoch_only():
    a = EpochPlan(50, 4, seed=1, rank=0, world_size=2)
    assert np.array_equal(a.share(3)[0], epoch_order(50, 1, 3, True)[:50][0::2])
    assert not np.array_equal(a.share(3)[0], a.share(4)[0])
    assert not np.array_equal(a.share(3)[0], EpochPlan(50, 4, seed=2, world_size=2).share(3)[0])
    assert np.array_equal(EpochPlan(50, 4, shuffle=False).share(7)[0], np.arange(50))
    assert a.fingerprint() == EpochPlan(50, 4, seed=1, rank=1, world_size=2).fingerprint()  # ranks share a position


def test_replacement_candidates_follow_the_share_cyclically():
    assert list(candidates(5, 3)) == [3, 4, 0, 1, 2]
    assert list(candidates(1, 0)) == [0]


def test_reads_by_index_match_webdataset(synthetic):
    import webdataset as wds

    shards = open_shards(synthetic)
    streamed = list(wds.WebDataset([str(t) for t in shards.tars], shardshuffle=False, empty_check=False))
    assert len(streamed) == shards.num_samples
    for g, sample in enumerate(streamed):
        _, key, data = shards.read(g, ("jpg", "seg.png", "cls"))
        assert key == sample["__key__"] == shards.name(g)[1] and all(data[ext] == sample[ext] for ext in data)
