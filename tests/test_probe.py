"""The Patch-Seg probe end to end on hand-made colour-block shards with a tiny backbone: outputs,
the feature cache (reused, equal to the live run, rebuilt when stale), a fine-tuned backbone
probed frozen, 2-rank evaluation, bad input; and the heads, schedule and backbone grids."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from fs_faults import in_private_mount, module_command, needs_unshare
from loader_data import PALETTE, block_sample, write_set
from PIL import Image
from safetensors.torch import load_file

from fastloc.models.registry import create_model, image_config
from fastloc.probe import cache as cache_module
from fastloc.probe.__main__ import main
from fastloc.probe.cache import (
    CacheError,
    DamagedCache,
    _publish,
    build_cache,
    open_cache,
    pack_bits,
    unpack_bits,
    verify_rows,
)
from fastloc.probe.config import ProbeConfig
from fastloc.probe.data import class_groups
from fastloc.probe.heads import HEADS, HeadShape, build_head
from fastloc.probe.report import jsonable
from fastloc.probe.run import evaluate, probe, run_name, schedule
from fastloc.probe.sources import CachedSource, plan_batches

REPO = Path(__file__).resolve().parents[1]
CLASSES = len(PALETTE)  # 8: 0 never painted, 1-7 one colour each


@pytest.fixture(scope="session")
def blocks(tmp_path_factory) -> Path:
    """Train (192) and val (48) splits of flat-colour blocks whose class is their colour."""
    root = tmp_path_factory.mktemp("blocks")
    for split, n, seed in (("train", 192, 0), ("val", 48, 1)):
        rng = np.random.default_rng(seed)
        write_set(root / split, [block_sample(rng, i) for i in range(n)], CLASSES, per_shard=32, split=split)
    return root


@pytest.fixture(scope="module")
def few_blocks(blocks, tmp_path_factory) -> Path:
    """``blocks`` with the first 2 of its 6 training shards (64 samples; the 48 validation samples
    all kept), its shards linked: for runs whose checks do not depend on how much the head learns."""
    return doctored(blocks, tmp_path_factory.mktemp("few"), first_shards(blocks / "train", 2), splits=("train",))


def config(data: Path, tmp: Path, **kw) -> ProbeConfig:
    base = dict(
        backbone="tiny",
        weights="random",
        epochs=3,
        batch_size=16,
        eval_batch_size=16,
        warmup_updates=10,
        device="cpu",
        loader="cpu",
        workers=0,
        out=tmp / "runs",
        results=tmp / "results",
        cache_dir=tmp / "cache",
    )
    return ProbeConfig(data=data, **{**base, **kw})


def result_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "result.json").read_text())


@pytest.fixture(scope="module")
def cached_run(blocks, tmp_path_factory):
    """The bf16 default path, shared by every test that reads or reruns it: 2 epochs with a short
    warmup (recall 0.78, AP 0.45 above prevalence; 3 epochs with the longer one: 0.80 and 0.53)
    make a third less training in each rerun."""
    tmp = tmp_path_factory.mktemp("probe")
    cfg = config(blocks, tmp, epochs=2, warmup_updates=4)
    return cfg, probe(cfg)


def test_probe_writes_the_originals_row_a_protocol_json_and_pictures(cached_run):
    cfg, run_dir = cached_run
    result = result_of(run_dir)
    assert (
        result["protocol"] | {"reduction": "union", "image_size": 64, "patch_size": 8, "grid": 8} == result["protocol"]
    )
    assert result["protocol"]["threshold"] == 0.5 and result["protocol"]["feature_dtype"] == "bfloat16"
    epochs = result["epochs"]
    assert len(epochs) == 2 and result["last"] == epochs[-1]
    recalls = [e["macro_recall"] for e in epochs]
    assert (
        result["selected_epoch"] == recalls.index(max(recalls))
        and result["selected"] == epochs[result["selected_epoch"]]
    )
    assert all(e["images"] == 48 and e["patches"] == 48 * 64 for e in epochs)  # every val sample, once
    table = cfg.results / "outputs-t.csv"
    assert table.read_text().startswith("dataset, label_reduction, output_head, backbone, skip_blocks, full_")
    with open(table) as f:
        rows = list(csv.DictReader(f, skipinitialspace=True))
    assert len(rows) == 1
    row, selected = rows[0], result["selected"]
    assert (row["dataset"], row["label_reduction"], row["output_head"], row["backbone"]) == (
        "t",
        "union",
        "transformer",
        "tiny",
    )
    assert (row["skip_blocks"], row["full_finetune"], row["num_epochs"]) == ("0", "False", "2")
    assert float(row["macro_recall"]) == selected["macro_recall"] and float(row["loss"]) == selected["loss"]
    for name in ("recall.png", "predictions.png"):
        assert Image.open(run_dir / name).size[0] > 200
    head = load_file(str(run_dir / "head.safetensors"))
    assert head["pos_embed"].shape == (1, 1 + 64, 96) and head["head.weight"].shape == (CLASSES, 96)


def test_probe_learns_the_colour_classes_clearly_above_the_trivial_predictors(cached_run):
    """Colour is in any ViT's patch embedding, so even random features must be probed far above the
    majority-class predictor (macro recall 1 / valid classes) and above chance AP (the prevalence)."""
    selected = result_of(cached_run[1])["selected"]
    assert selected["valid_classes"] == 7  # class 0 is never painted
    assert selected["macro_recall"] > 1 / 7 + 0.4
    assert selected["macro_ap"] > selected["mean_prevalence"] + 0.3


def test_a_second_run_reuses_the_cache_and_the_live_run_equals_the_cached_one(cached_run, capsys, monkeypatch):
    cfg, first = cached_run
    capsys.readouterr()
    checked = []
    monkeypatch.setattr(cache_module, "verify_rows", lambda cache, *a: checked.append(cache.path.name) or 0)
    again = probe(replace(cfg, name="again", predictions=0))  # pictures: the first test's
    assert capsys.readouterr().out.count("reusing the cache") == 2
    assert len(checked) == 2  # each split's rows checked once when reused, not again per epoch
    live = probe(replace(cfg, name="live", cache=False, predictions=0))
    for other in (again, live):
        assert result_of(other)["epochs"] == result_of(first)["epochs"]  # every figure of every epoch
    assert main(["compare", str(first), str(live), "--out", str(cfg.out / "cmp.png")]) == 0
    assert (cfg.out / "cmp.png").stat().st_size > 0


def test_a_stale_cache_is_rebuilt_with_a_message_and_a_killed_build_leaves_nothing_whole(blocks, tmp_path, capsys):
    """In fp32, about 4 times faster on a CPU than bf16 (whose cache path cached_run's tests cover):
    what is checked here, the cache's bookkeeping, is the same for either dtype."""
    cfg = config(blocks, tmp_path, epochs=1, precision="fp32", predictions=0)
    first = result_of(probe(cfg))["epochs"]
    (train_cache,) = [p for p in cfg.cache_dir.iterdir() if p.name.startswith("t-train")]
    meta = json.loads((train_cache / "meta.json").read_text())
    (train_cache / "meta.json").write_text(json.dumps({**meta, "format": 0}))
    (cfg.cache_dir / ".partial-leftover").mkdir()  # a killed build's folder: never read as a cache
    capsys.readouterr()
    again = result_of(probe(replace(cfg, name="again")))["epochs"]
    out = capsys.readouterr().out
    assert "written by another version of fastloc (cache format 0" in out and "rebuilding it" in out
    assert again == first
    assert json.loads((train_cache / "meta.json").read_text())["format"] == meta["format"]
    assert not any(p.name.startswith(".old-") for p in cfg.cache_dir.iterdir())
    with pytest.raises(CacheError, match="made for other inputs"):
        open_cache(train_cache, {**meta["key"], "skip_blocks": 1})
    (cfg.cache_dir / ".partial-leftover").rmdir()
    concurrent_builds_keep_one_cache_and_leave_no_partial(train_cache, meta["key"])


def concurrent_builds_keep_one_cache_and_leave_no_partial(cache: Path, key: dict) -> None:
    """Two jobs (a sweep's members on one backbone) build one cache at once, each in its own
    folder: the later finds the earlier's published and drops its own; a damaged one is replaced;
    a failed build removes its folder."""
    whole = open_cache(cache, key)
    shapes = {n: a.shape for n, a in whole.arrays.items()}
    dtypes = {n: a.dtype for n, a in whole.arrays.items()}
    for damaged in (False, True):
        theirs = Path(shutil.copytree(cache, cache.parent / f".partial-{cache.name}-other"))
        if damaged:
            (cache / "meta.json").write_text("{")
        _publish(theirs, cache, key)
        assert not theirs.exists() and open_cache(cache, key) is not None

    def failing():
        raise RuntimeError("the loader died")
        yield

    with pytest.raises(RuntimeError, match="the loader died"):
        build_cache(cache.parent / "new", key, failing(), lambda x: x, shapes, dtypes, targets=dict)
    assert sorted(p.name for p in cache.parent.iterdir() if p.name.startswith(".")) == []


def overwrite_rows(file: Path, seed: int = 0) -> int:
    """Random bytes over every row of a cache array, its size and header kept; the file's size."""
    size, offset = file.stat().st_size, np.load(file, mmap_mode="r").offset
    with open(file, "r+b") as f:
        f.seek(offset)
        f.write(np.random.default_rng(seed).bytes(size - offset))
    assert file.stat().st_size == size
    return size


def test_a_cache_file_damaged_at_the_same_size_is_rebuilt_with_a_warning(cached_run, capsys):
    """The outside check's case: random bytes in the validation features, same size; the rerun
    warns, rebuilds and scores what the undamaged run scored (not recall 0 into the CSV)."""
    cfg, first = cached_run
    (val_cache,) = cfg.cache_dir.glob("t-val-*")
    overwrite_rows(val_cache / "features.npy")
    capsys.readouterr()
    again = probe(replace(cfg, name="after-damage", predictions=0))
    out = capsys.readouterr().out
    (warning,) = [line for line in out.splitlines() if line.startswith("warning: features:")]
    assert f"{val_cache}/features.npy: row 0 does not match the checksum" in warning and "rebuilding it" in warning
    assert out.count("reusing the cache") == 1  # the training split's, intact
    assert result_of(again)["epochs"] == result_of(first)["epochs"]
    key = json.loads((val_cache / "meta.json").read_text())["key"]
    assert open_cache(val_cache, key) is not None  # the rebuilt one checks out
    assert sorted(p.name for p in cfg.cache_dir.iterdir() if p.name.startswith(".")) == []
    rows = (cfg.results / "outputs-t.csv").read_text().splitlines()
    assert rows[-1] == rows[1]


class FakeBatch:
    """What build_cache reads of a loader's Batch."""

    def __init__(self, index: np.ndarray, valid: np.ndarray):
        self.index, self.valid = torch.from_numpy(index), torch.from_numpy(valid)
        self.images = torch.from_numpy(index).float().view(-1, 1, 1).expand(-1, 3, 4).contiguous()  # [B, T, D]
        self.labels = torch.from_numpy(index % 5).view(-1, 1).expand(-1, 6).contiguous()
        self.keys = [str(i) for i in index]


def small_cache(root: Path, count: int = 20, batch: int = 8):
    """A cache of ``count`` rows built from fake batches (sample 3 unusable); its key."""
    key = {"dataset": "fake", "split": "val", "num_classes": 5}
    shapes = {"features": (count, 3, 4), "labels": (count, 6), "usable": (count,)}
    dtypes = {"features": np.float32, "labels": np.uint8, "usable": np.bool_}
    index = np.arange(count)
    batches = [FakeBatch(index[i : i + batch], index[i : i + batch] != 3) for i in range(0, count, batch)]
    build_cache(root / "cache", key, batches, lambda x: x, shapes, dtypes, lambda labels: {"labels": labels})
    return root / "cache", key


def test_opening_a_large_cache_checks_a_sample_of_its_rows(tmp_path):
    path, key = small_cache(tmp_path)
    cache = open_cache(path, key)
    assert not cache.usable[3] and cache.usable.sum() == 19
    row = 3 * 4 * 4 + 6 + 1
    assert verify_rows(cache) == 20  # a small cache: every row
    assert verify_rows(cache, budget=5 * row) == 5
    with open(path / "usable.npy", "r+b") as f:  # the unusable sample marked usable: it would be read
        f.seek(np.load(path / "usable.npy", mmap_mode="r").offset + 3)
        f.write(b"\x01")
    with pytest.raises(DamagedCache, match="usable.npy: row 3 does not match"):
        open_cache(path, key)
    assert open_cache(path, key, verify=False) is not None  # what a loader worker opens


@needs_unshare
def test_a_full_cache_disk_is_one_error_that_leaves_nothing_and_a_rerun_works(few_blocks, tmp_path):
    """A real 1 MB tmpfs as --cache-dir (the training split's cache, 64 samples in fp32, is 1.6 MB):
    one error line naming the cache, no Bus error, no .partial- folder; the same command works once
    it is grown."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    args = ["--backbone", "tiny", "--weights", "random", "--epochs", "1", "--batch-size", "16", "--device", "cpu"]
    args += ["--loader", "cpu", "--workers", "0", "--predictions", "0", "--head", "linear", "--cache-dir", mnt]
    args += ["--out", tmp_path / "runs", "--results", tmp_path / "results", "--precision", "fp32"]
    command = module_command("fastloc.probe", few_blocks, *args)
    script = f"""
mount -t tmpfs -o size=1m tmpfs '{mnt}' || exit 99
{command}; echo "rc1=$?" >&2
ls -a '{mnt}' > '{tmp_path}/after-error.txt'
mount -o remount,size=16m tmpfs '{mnt}' || exit 98
{command}; echo "rc2=$?" >&2
"""
    result = in_private_mount(script)
    err = result.stderr
    assert "rc1=2" in err and "rc2=0" in err, err + result.stdout
    assert "Traceback" not in err and "Bus error" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert line.startswith(f"error: {mnt}/t-train-") and "No space left on device" in line, line
    assert "rerun the same command" in line
    assert (tmp_path / "after-error.txt").read_text().split() == [".", ".."]
    assert (tmp_path / "results" / "outputs-t.csv").read_text().count("\n") == 2  # the header and one row


def test_a_finetuned_backbone_saved_by_the_probe_loads_as_weights_and_is_probed_frozen(blocks, few_blocks, tmp_path):
    """The backbone trains in bf16 (the default, backward through it) for one epoch on 64 samples;
    the frozen probe of its file runs in fp32 (the bf16 frozen path is cached_run's), about 4 times
    faster on a CPU."""
    tuned = probe(config(few_blocks, tmp_path, epochs=1, full_finetune=True, lr=3e-4, predictions=0))
    assert result_of(tuned)["config"]["full_finetune"] is True
    weights = tuned / "backbone.safetensors"
    frozen_cfg = config(
        blocks, tmp_path, epochs=2, weights=str(weights), name="frozen", precision="fp32", predictions=0
    )
    frozen = result_of(probe(frozen_cfg))
    assert frozen["backbone"]["weights"] == str(weights)
    assert frozen["selected"]["macro_recall"] > 1 / 7 + 0.4


@pytest.fixture(scope="module")
def reductions_cache(tmp_path_factory) -> Path:
    """One feature cache for the three runs below: it stores every reduction's targets and its key
    holds no reduction, so the first run builds what the others would have built again."""
    return tmp_path_factory.mktemp("reductions-cache")


@pytest.mark.parametrize(
    "reduction,head", [("majority", "mlp"), ("global-union", "linear"), ("union", "transformer-cls")]
)
def test_other_reductions_and_heads_run_end_to_end(few_blocks, tmp_path, reductions_cache, reduction, head):
    cfg = config(
        few_blocks, tmp_path, epochs=1, reduction=reduction, head=head, skip_blocks=1, cache_dir=reductions_cache
    )
    result = result_of(probe(cfg))
    selected = result["selected"]
    assert result["protocol"]["reduction"] == reduction and result["backbone"]["blocks"] == 3
    assert selected["images"] == 48 and 0 <= selected["macro_recall"] <= 1
    assert (selected["by_size"] is None) == (reduction != "union")
    if reduction == "majority":
        assert selected["valid_classes"] == 7


def test_two_ranks_count_every_validation_sample_once_and_agree_with_one(cached_run, tmp_path):
    """torchrun with 2 gloo ranks: the cache built by rank shares equals the 1-rank cache, and the
    last epoch's confusion counts equal those of the same head evaluated on one rank."""
    cfg, _ = cached_run
    out = tmp_path / "runs"
    args = ["--backbone", "tiny", "--weights", "random", "--epochs", "1", "--batch-size", "16", "--eval-batch-size"]
    args += ["16", "--device", "cpu", "--loader", "cpu", "--workers", "0", "--predictions", "0", "--name", "ddp"]
    args += ["--out", str(out), "--results", str(tmp_path / "results"), "--cache-dir", str(tmp_path / "cache")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "fastloc.probe"]
    done = subprocess.run([*command, str(cfg.data), *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    two = result_of(out / "ddp")
    assert two["protocol"]["world_size"] == 2 and two["last"]["images"] == 48
    for split in ("train", "val"):
        (mine,) = (tmp_path / "cache").glob(f"t-{split}-*")
        (theirs,) = cfg.cache_dir.glob(f"t-{split}-*")
        assert mine.name == theirs.name
        for name in ("features", "union", "majority", "global", "usable", "checksum"):  # rows checksummed by rank
            assert np.array_equal(np.load(mine / f"{name}.npy"), np.load(theirs / f"{name}.npy")), (split, name)
    # the 2-rank head, evaluated on one rank
    shape = HeadShape(96, 3, 1, 64, CLASSES, "union")
    head = build_head("transformer", shape)
    head.load_state_dict(load_file(str(out / "ddp" / "head.safetensors")))
    from fastloc.data.order import EpochPlan

    cache = open_cache(theirs, json.loads((theirs / "meta.json").read_text())["key"])
    source = CachedSource(cache, EpochPlan(48, 16, 0, False, 0, 1, False), "union", torch.device("cpu"), 0)
    single = evaluate(head, source, "union", CLASSES, torch.device("cpu"), "bf16")
    assert jsonable(single["per_class"]) == two["last"]["per_class"]
    assert single["images"] == 48 and single["loss"] == pytest.approx(two["last"]["loss"], rel=1e-6)


# ---------------------------------------------------------------- bad input


def doctored(data: Path, out: Path, changes: dict, splits: tuple[str, ...] = ("train", "val")) -> Path:
    """A copy of ``data`` (its shards linked) whose manifests of ``splits`` carry ``changes``."""
    for split in ("train", "val"):
        root = out / split
        root.mkdir(parents=True)
        for f in (data / split).iterdir():
            if f.name != "manifest.json":
                (root / f.name).symlink_to(f)
        manifest = json.loads((data / split / "manifest.json").read_text())
        (root / "manifest.json").write_text(json.dumps({**manifest, **changes} if split in splits else manifest))
    return out


def first_shards(split: Path, count: int) -> dict:
    """The manifest changes that keep a split's first ``count`` shards."""
    shards = json.loads((split / "manifest.json").read_text())["shards"][:count]
    return {"shards": shards, "num_shards": len(shards), "num_samples": sum(s["samples"] for s in shards)}


def test_bad_inputs_are_clear_errors(blocks, tmp_path, capsys):
    common = ["--backbone", "tiny", "--weights", "random", "--device", "cpu", "--loader", "cpu", "--workers", "0"]
    common += ["--out", str(tmp_path / "runs"), "--results", str(tmp_path / "r"), "--cache-dir", str(tmp_path / "c")]

    def error(data, *extra) -> str:
        capsys.readouterr()
        assert main([str(data), *common, *extra]) == 2
        return capsys.readouterr().err

    assert "no such shard set" in error(tmp_path / "nothing-here")
    assert "unknown backbone 'vit-nope'" in error(blocks, "--backbone", "vit-nope")
    # a shard set without label maps
    unlabeled = doctored(blocks, tmp_path / "unlabeled", {"keys": ["jpg", "cls"], "label": None})
    assert "have no label maps (seg.png" in error(unlabeled)
    # a manifest whose class count is below the labels' values
    few = doctored(blocks, tmp_path / "few", {"num_classes": 4, "classes": [None] * 4})
    message = error(few, "--epochs", "1")
    assert "does not fit the manifest's 4 classes" in message and "blocks_" in message
    assert not any((tmp_path / "c").glob("t-*"))  # nothing half-written published
    # void pixels (VOC's 255): the dense protocols' data, not Patch-Seg's
    label = json.loads((blocks / "val" / "manifest.json").read_text())["label"]
    void = doctored(blocks, tmp_path / "void", {"label": {**label, "ignore": 255}})
    assert "mark void pixels (255)" in error(void) and "python -m fastloc.probe overcluster" in error(void)
    assert "--skip-blocks 4: tiny has 4 blocks" in error(blocks, "--skip-blocks", "4")
    assert "union reduction only" in error(blocks, "--head", "transformer-cls", "--reduction", "majority")


def test_the_results_csv_is_never_mixed_with_another_table(blocks, tmp_path, capsys):
    """Refused before any work (it used to be found after training, the figures lost)."""
    cfg = config(blocks, tmp_path, epochs=1, predictions=0)
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "outputs-t.csv").write_text("a, b, c\n")
    with pytest.raises(ValueError, match="not this protocol.s results header"):
        probe(cfg)
    assert (tmp_path / "results" / "outputs-t.csv").read_text() == "a, b, c\n"
    assert not cfg.cache_dir.exists() and not cfg.out.exists()  # no feature computed, no run directory


# ---------------------------------------------------------------- parts


@pytest.mark.parametrize("name", list(HEADS))
@pytest.mark.parametrize("reduction", ["union", "majority", "global-union"])
def test_heads_output_shapes(name, reduction):
    shape = HeadShape(dim=48, num_heads=3, prefix=2, patches=16, classes=5, reduction=reduction)
    if name.startswith("transformer-") and reduction != "union":
        with pytest.raises(ValueError, match="union reduction only"):
            build_head(name, shape)
        return
    out = build_head(name, shape)(torch.randn(3, 18, 48))
    assert out.shape == (3, 1 if reduction == "global-union" else 16, 5)


def test_the_transformer_head_of_vit_b_on_coco_has_the_originals_size():
    """PATCHSEG.md section 5: about 14.5 M parameters at D = 768, 12 heads, 197 tokens, C = 183."""
    with torch.device("meta"):
        head = build_head("transformer", HeadShape(768, 12, 1, 196, 183, "union"))
    block = 4 * 768 + 768 * 2304 + (768 * 768 + 768) + 2 * 768 + (768 * 3072 + 3072) + (3072 * 768 + 768)
    expected = 197 * 768 + 2 * 768 + 2 * block + 2 * 768 + 768 * 183 + 183
    assert sum(p.numel() for p in head.parameters()) == expected == 14_469_303
    small = build_head("transformer", HeadShape(8, 2, 1, 4, 3, "union"))
    assert small.blocks[0].attn.qkv.bias is None and torch.all(small.blocks[0].ls1.gamma == 0.01)
    assert len(small.blocks) == 2 and small.blocks[0].mlp.fc1.out_features == 32
    with torch.device("meta"):
        assert sum(p.numel() for p in build_head("mlp", HeadShape(768, 12, 1, 196, 183, "union")).parameters()) == (
            768 * 1024 + 1024 + 1024 * 183 + 183
        )


def test_global_union_heads_read_the_prefix_mean():
    shape = HeadShape(dim=4, num_heads=1, prefix=2, patches=3, classes=2, reduction="global-union")
    head = build_head("linear", shape)
    x = torch.randn(1, 5, 4)
    assert torch.allclose(head(x), head.net(x[:, :2].mean(1, keepdim=True)))
    no_prefix = build_head("linear", replace(shape, prefix=0))
    assert torch.allclose(no_prefix(x), no_prefix.net(x.mean(1, keepdim=True)))


def test_schedule_is_the_originals_first_update_at_zero_warmup_then_unshifted_cosine():
    cfg = ProbeConfig(data=Path("."), epochs=2, warmup_updates=500)
    params = [torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr)
    scheduler = schedule(optimizer, cfg, 1000)
    lrs = []
    for k in range(2000):
        lrs.append(optimizer.param_groups[0]["lr"])
        scheduler.step_update(num_updates=k + 1)
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(1e-3 / 500) and lrs[499] == pytest.approx(1e-3 * 499 / 500)
    for k in (500, 1000, 1999):
        assert lrs[k] == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * k / 2000)))


# short name -> (S, p, N, P), PATCHSEG.md section 11
GRIDS = {
    "in1k-vit-b": (224, 16, 196, 1),
    "siglip-vit-b-384px": (384, 16, 576, 0),
    "clip-vit-l": (224, 14, 256, 1),
    "siglip-vit-so400m": (224, 14, 256, 0),
    "ijepa-vit-h": (224, 14, 256, 0),
    "dinov2-vit-l": (224, 14, 256, 5),
    "clip-vit-l-336px": (336, 14, 576, 1),
    "dfn-vit-h-378px": (378, 14, 729, 1),
    "siglip-vit-so400m-384px": (384, 14, 729, 0),
    "eva02-vit-l": (224, 14, 256, 1),
    "mae-vit-h": (224, 14, 256, 1),
}


@pytest.mark.parametrize("name", list(GRIDS))
def test_patchseg_backbones_have_the_originals_grids(name):
    with torch.device("meta"):
        cfg = image_config(create_model(name, "random"))
    assert (cfg.size, cfg.patch_size, cfg.grid**2, cfg.prefix_tokens) == GRIDS[name]


def test_bit_packing_round_trips_odd_class_counts():
    bits = torch.randint(0, 2, (3, 5, 183), dtype=torch.uint8)
    packed = pack_bits(bits)
    assert packed.shape == (3, 5, 23) and torch.equal(unpack_bits(packed, 183), bits)


def test_cached_batches_follow_the_loaders_replacement_rule():
    from fastloc.data.order import EpochPlan

    plan = EpochPlan(10, 4, seed=0, shuffle=False, drop_last=False)
    usable = np.ones(10, bool)
    usable[[1, 9]] = False
    (a, va), _, (c, vc) = plan_batches(plan, 0, usable)
    assert a.tolist() == [0, 2, 2, 3] and va.tolist() == [True, False, True, True]
    assert c.tolist() == [8, 0, 0, 0] and vc.tolist() == [True, False, False, False]


def test_class_groups_of_coco_and_the_synthetic_set():
    coco = class_groups({"label": {"space": "coco-stuff-183"}})
    assert coco["things"][0] == 1 and coco["things"][-1] == 91 and coco["stuff"] == list(range(92, 183))
    synthetic = {"dataset": "synthetic", "source": {"region_classes": [0, 1, 2], "object_classes": [3, 4]}}
    assert class_groups(synthetic) == {"texture": [1, 2], "shape": [3, 4]}
    assert class_groups({"dataset": "ade20k", "label": {"space": "ade20k-151"}}) == {}


def test_an_aligned_export_is_probed_with_its_soft_cap_and_norm_eps(few_blocks, tmp_path):
    """A file as ``python -m fastloc.align export`` writes it (timm keys plus fastloc metadata)."""
    from safetensors.torch import save_file

    from fastloc.models.attention import SoftCapAttention
    from fastloc.models.exported import is_export
    from fastloc.models.registry import backbone
    from fastloc.probe.backbone import load_backbone

    entry = backbone("tiny")
    meta = {"timm_id": entry.timm_id, "timm_kwargs": entry.kwargs, "soft_cap": 30.0, "norm_eps": 1e-5}
    path = tmp_path / "encoder-best.safetensors"
    state = {k: v.contiguous() for k, v in create_model("tiny", "random").state_dict().items()}
    save_file(state, str(path), metadata={"fastloc": json.dumps({**meta, "untrained": [], "step": 1})})
    assert is_export(str(path))
    model = load_backbone(str(path), "pretrained")
    assert all(isinstance(b.attn, SoftCapAttention) for b in model.blocks) and model.norm.eps == 1e-5
    result = result_of(probe(config(few_blocks, tmp_path, epochs=1, backbone=str(path), weights="pretrained")))
    assert result["backbone"]["weights"] == "export" and result["selected"]["images"] == 48
    (run,) = (tmp_path / "runs").iterdir()
    assert re.fullmatch(r"t-union-transformer-encoder-best-[0-9a-f]{8}-skip0", run.name), run.name
    with pytest.raises(ValueError, match="holds its own weights"):
        load_backbone(str(path), "random")


def test_two_exports_or_weights_files_of_one_name_get_their_own_run_directories(tmp_path, monkeypatch):
    """Two align runs' encoder-best.safetensors (Patch-Seg and the dense protocols) and two weights
    files of one architecture: one run directory each, the same one for a path however written."""
    from fastloc.probe.dense.config import OverclusterConfig
    from fastloc.probe.dense.report import run_dir

    monkeypatch.chdir(tmp_path)
    a, b = "run-a/encoder-best.safetensors", "run-b/encoder-best.safetensors"
    for make in (
        lambda backbone: run_name(ProbeConfig(data=Path("d"), backbone=backbone), "t"),
        lambda backbone: run_dir(OverclusterConfig(data=Path("d"), backbone=backbone), "voc").name,
        lambda weights: run_name(ProbeConfig(data=Path("d"), backbone="tiny", weights=weights), "t"),
    ):
        assert make(a) != make(b) and make(a) == make(str(tmp_path / a)) == make(f"./{a}")
        assert "encoder-best-" in make(a)
    assert (
        run_name(ProbeConfig(data=Path("d"), backbone="tiny", weights="random"), "t")
        == "t-union-transformer-tiny-skip0"
    )


@pytest.mark.gpu
def test_on_a_gpu_the_cached_run_equals_the_live_one_in_bf16(blocks, tmp_path):
    """The CUDA path: DALI where installed, Triton label pooling, bf16 features and logits."""
    loader = "gpu" if __import__("importlib").util.find_spec("nvidia.dali") else "cpu"
    cfg = config(blocks, tmp_path, epochs=2, device="cuda", loader=loader, workers=2)
    cached = result_of(probe(cfg))
    live = result_of(probe(replace(cfg, cache=False, name="live")))
    assert cached["selected"]["images"] == 48 and cached["selected"]["macro_recall"] > 1 / 7 + 0.3
    assert [e["per_class"]["positives"] for e in cached["epochs"]] == [
        e["per_class"]["positives"] for e in live["epochs"]
    ]
    for a, b in zip(cached["epochs"], live["epochs"]):
        assert a["macro_recall"] == pytest.approx(b["macro_recall"], abs=0.02)  # GPU kernels may pick other orders
