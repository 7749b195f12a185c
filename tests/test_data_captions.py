"""Captions through the data path (``LoaderConfig.captions``): each sample's `txt` lines in
``Batch.captions``, the same from both loaders and in the same slots as the keys (replacements and
an evaluation epoch's repeats included); a set without `txt` refused; a `txt` that is not UTF-8
makes its sample unusable."""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from loader_data import LOADERS, all_keys, block_sample, run_epochs, same_samples, spoil, write_set

from fastloc.data.config import SOLO, LoaderConfig
from fastloc.data.recipes import CentreSquare, Rkrc
from fastloc.data.samples import SkippedSampleWarning
from fastloc.data.shards import ShardError

S = 16
NAMES = list(LOADERS)

# per sample of the hand-made set: its captions, written with stray blanks, CRLF and empty lines
CAPTIONS = [
    ("a red square", "two blocks side by side", "café au lait"),
    ("one caption",),
    (),  # an empty txt: no captions
]
BAD = 5  # the sample whose txt is not UTF-8
UNDECODABLE = 9  # the sample whose JPEG passes the host's checks but no decoder takes (DALI's recovery)


def config(root: Path, **kw) -> LoaderConfig:
    return LoaderConfig(
        **{"shards": root, "batch_size": 8, "size": S, "workers": 2, "threads": 1, "captions": True, **kw}
    )


def tar_captions(root: Path) -> dict[str, tuple[str, ...]]:
    """key -> captions of every sample whose txt is UTF-8, read with ``tarfile`` (no loader code)."""
    out = {}
    for tar in sorted(root.glob("*.tar")):
        with tarfile.open(tar) as f:
            for m in f.getmembers():
                key, _, ext = Path(m.name).name.partition(".")
                if ext == "txt":
                    try:
                        text = f.extractfile(m).read().decode("utf-8")
                    except UnicodeDecodeError:
                        continue
                    out[key] = tuple(line.strip() for line in text.split("\n") if line.strip())
    return out


def check_slots(batches, expected: dict[str, tuple[str, ...]]) -> None:
    """Every slot's captions are those of the sample in it, host-only, and survive ``Batch.to``."""
    for b in batches:
        assert isinstance(b.captions, tuple) and len(b.captions) == len(b) == len(b.keys)
        assert list(b.captions) == [expected[k] for k in b.keys]
        assert all(isinstance(c, tuple) and all(isinstance(s, str) for s in c) for c in b.captions)
        assert b.to("cpu").captions is b.captions


@pytest.fixture(scope="module")
def captioned(tmp_path_factory) -> Path:
    """13 samples in shards of 6 (an evaluation epoch of batch 4 ends with 3 repeats); sample ``BAD``'s txt
    is Latin-1, not UTF-8."""
    rng = np.random.default_rng(0)
    samples = [block_sample(rng, i) for i in range(13)]
    txt = {}
    for i, (key, *_) in enumerate(samples):
        caps = CAPTIONS[i % len(CAPTIONS)]
        txt[key] = ("  " + " \r\n\n".join(caps) + "\n\n").encode("utf-8")
    txt[samples[BAD][0]] = "un caf\xe9".encode("latin-1")
    return write_set(tmp_path_factory.mktemp("captions") / "train", samples, num_classes=8, txt=txt)


@pytest.mark.parametrize(("name", "workers"), [("torch", 0), ("torch", 2), ("dali-cpu", 2)])
def test_captions_are_the_shards_txt(synthetic, name, workers):
    """The converter's synthetic set (one caption a sample), shuffled training batches."""
    expected = tar_captions(synthetic)
    assert len(expected) == 40 and all(len(c) == 1 for c in expected.values())
    batches = run_epochs(LOADERS[name](config(synthetic, recipe=Rkrc(), seed=1, workers=workers), SOLO))
    check_slots(batches, expected)
    assert sorted(all_keys(batches)) == sorted(expected)


def test_replacements_and_repeats_carry_their_own_captions(captioned, tmp_path):
    """An evaluation epoch: the unusable samples' slots and the repeats that fill the last batch hold
    the captions of the sample actually there; both loaders give the same captions in the same order."""
    expected = {f"blocks_{i:04d}": CAPTIONS[i % len(CAPTIONS)] for i in range(13) if i != BAD}
    assert tar_captions(captioned) == expected
    root = Path(shutil.copytree(captioned, tmp_path / "train"))
    spoil(root, UNDECODABLE, "sampling")
    cfg = config(root, batch_size=4, recipe=CentreSquare(), shuffle=False, drop_last=False)
    runs = {}
    for name in NAMES:
        with pytest.warns(SkippedSampleWarning) as caught:
            runs[name] = run_epochs(LOADERS[name](cfg, SOLO))
        messages = sorted(str(w.message) for w in caught if issubclass(w.category, SkippedSampleWarning))
        assert len(messages) == 2
        assert f"blocks_{BAD:04d}" in messages[0] and "txt is not UTF-8" in messages[0]
        assert f"blocks_{UNDECODABLE:04d}" in messages[1] and "jpg does not decode" in messages[1]
    torch_batches, dali_batches = runs.values()
    assert same_samples(torch_batches, dali_batches)
    assert [b.captions for b in torch_batches] == [b.captions for b in dali_batches]
    check_slots(torch_batches, expected)
    keys = all_keys(torch_batches)
    assert len(torch_batches) == 4 and f"blocks_{BAD:04d}" not in keys
    for g in (BAD, UNDECODABLE):  # replaced by the next usable one
        assert keys[g] == keys[g + 1] == f"blocks_{g + 1:04d}"
    assert keys[13:] == keys[:3]  # the repeats: the epoch cycled
    valid = torch.cat([b.valid for b in torch_batches]).tolist()
    assert valid == [i not in (BAD, UNDECODABLE) and i < 13 for i in range(16)]
    assert torch_batches[0].captions[:3] == tuple(CAPTIONS)  # several, one, none


@pytest.mark.parametrize("name", NAMES)
def test_a_set_without_txt_is_refused(tmp_path, name):
    rng = np.random.default_rng(1)
    root = write_set(tmp_path / "train", [block_sample(rng, i) for i in range(4)], num_classes=8)
    with pytest.raises(ShardError) as caught:
        LOADERS[name](config(root), SOLO)
    message = str(caught.value)
    assert "\n" not in message and str(root) in message and "no txt" in message and "--captions" in message


def test_captions_off_leaves_none(synthetic):
    loader = LOADERS["torch"](config(synthetic, captions=False, workers=0), SOLO)
    batch = next(iter(loader))
    loader.close()
    assert batch.captions is None and len(batch.keys) == 8


@pytest.mark.parametrize("name", NAMES)
def test_one_caption_is_drawn_per_seed_epoch_and_sample(captioned, name):
    """``one_caption``: each slot holds one of its sample's lines, the same draw from both loaders and
    on every pass over the epoch, another draw in another epoch; a sample with no caption is replaced."""
    cfg = config(captioned, batch_size=4, recipe=CentreSquare(), shuffle=False, drop_last=False, one_caption=True)
    with pytest.warns(SkippedSampleWarning) as caught:
        epochs = run_epochs(LOADERS[name](cfg, SOLO), epochs=6)
    reasons = {str(w.message) for w in caught if issubclass(w.category, SkippedSampleWarning)}
    assert any("txt holds no caption" in r for r in reasons) and any("not UTF-8" in r for r in reasons)
    per_epoch = [epochs[i * 4 : (i + 1) * 4] for i in range(6)]
    picks = []
    for batches in per_epoch:
        pick = {}
        for b in batches:
            for key, lines in zip(b.keys, b.captions):
                assert len(lines) == 1 and lines[0] in CAPTIONS[int(key[-4:]) % len(CAPTIONS)]
                assert pick.setdefault(key, lines[0]) == lines[0]  # a repeat in the epoch: the same draw
        assert not any(int(k[-4:]) % len(CAPTIONS) == 2 for k in pick)  # the empty txt's samples: replaced
        picks.append(pick)
    again = run_epochs(LOADERS[name](cfg, SOLO), epochs=1)
    assert [b.captions for b in again] == [b.captions for b in per_epoch[0]]  # a rerun draws the same
    three = [k for k in picks[0] if int(k[-4:]) % len(CAPTIONS) == 0]  # the samples with three captions
    assert len({p[k] for p in picks for k in three}) == 3  # the draw moves with the epoch


def test_the_draw_leaves_the_recipes_draws_as_they_were(synthetic):
    """The caption stream is apart from the recipe's: the same crops with and without ``one_caption``."""
    runs = [
        run_epochs(LOADERS["torch"](config(synthetic, recipe=Rkrc(), seed=3, workers=0, one_caption=one), SOLO))
        for one in (False, True)
    ]
    assert [b.keys for b in runs[0]] == [b.keys for b in runs[1]]
    assert all(torch.equal(x.images, y.images) for x, y in zip(*runs))
    assert [b.captions for b in runs[0]] == [b.captions for b in runs[1]]  # one line a sample here
