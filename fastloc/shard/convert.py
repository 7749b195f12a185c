"""Run a conversion: plan, resume what an earlier run left, write shards in parallel, report.

The output of ``convert`` depends only on the source and the options, never on the number of
processes: the plan fixes every shard's samples, each shard is written by one process, and the
manifest lists shards in plan order. An interrupted run (Ctrl-C, SIGKILL, a requeued job)
leaves only complete shards behind; rerunning the same command writes the missing ones.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import platform
import shutil
import signal
import sys
import threading
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import PIL
from tqdm import tqdm

import fastloc
from fastloc.shard.config import ConvertConfig
from fastloc.shard.encode import label_dtype
from fastloc.shard.errors import ConversionError
from fastloc.shard.jsonfile import read_json_object
from fastloc.shard.manifest import FORMAT, FORMAT_VERSION, MANIFEST, read_manifest, write_manifest
from fastloc.shard.plan import ShardPlan, cut_shards, fingerprint, order_items
from fastloc.shard.sources.base import SourceInfo
from fastloc.shard.tario import atomic_write
from fastloc.shard.writer import (
    WORK_DIR, ShardRecord, StrictStop, Ticker, partial_path, record_path, write_shard,
)  # fmt: skip

tqdm.monitor_interval = 0  # no monitor thread: worker pools are forked after bars existed


def convert(cfg: ConvertConfig, command: str | None = None) -> dict[str, Any]:
    """Convert the dataset ``cfg`` describes; returns the manifest (also written to disk)."""
    started = time.perf_counter()
    source = cfg.source()
    info = source.info()
    dataset = cfg.name or info.dataset
    split_dir = Path(cfg.out) / dataset / info.split
    items = order_items(source.items(), cfg)
    if not items:
        raise ConversionError(f"{info.source}: no samples found")
    plans = cut_shards(items, cfg, dataset, info.split)
    digest = fingerprint(cfg, info, plans)

    done = _prepare_output(split_dir, digest, cfg, len(plans))
    if done is None:
        print(f"{split_dir}: already converted with these options (manifest present); nothing to do")
        return read_manifest(split_dir)
    pending = [p for p in plans if p.name not in done]
    initial = sum(len(p.items) for p in plans if p.name in done)
    if done:
        print(f"{split_dir}: resuming, {len(done)} of {len(plans)} shards already complete")

    try:
        records = _run(pending, source, info, cfg, split_dir, len(items), initial)
    except StrictStop as stop:
        _remove_output(split_dir)
        raise ConversionError(
            f"--strict: {stop.path}: {stop.reason}; stopped and removed the partial output in {split_dir}"
        ) from None
    except KeyboardInterrupt:
        for plan in pending:
            partial_path(split_dir, plan.name).unlink(missing_ok=True)
        finished = sum(1 for p in plans if record_path(split_dir, p.name).exists())
        raise ConversionError(
            f"interrupted with {finished} of {len(plans)} shards complete in {split_dir}; "
            "rerun the same command to resume"
        ) from None
    done.update(records)
    ordered = [done[p.name] for p in plans]
    manifest = _manifest(dataset, info, cfg, ordered, digest, len(items), command)
    write_manifest(split_dir, manifest)
    shutil.rmtree(split_dir / WORK_DIR)
    _print_report(manifest, ordered, split_dir, time.perf_counter() - started)
    return manifest


# --- output folder: fresh, resumed, finished or conflicting -------------------------------------


def _prepare_output(split_dir: Path, digest: str, cfg: ConvertConfig, num_shards: int) -> dict | None:
    """Records of shards already complete (empty for a fresh start), or None if all is done."""
    work = split_dir / WORK_DIR
    plan_file = work / "plan.json"
    if (split_dir / MANIFEST).exists() and not cfg.overwrite:
        manifest = read_manifest(split_dir)
        if manifest.get("conversion", {}).get("fingerprint") == digest:
            return None
        raise ConversionError(
            f"{split_dir} holds a finished conversion made with other options or data; "
            "pass --overwrite to replace it, or choose another --out/--name"
        )
    if plan_file.exists() and not cfg.overwrite:
        try:
            plan = read_json_object(plan_file, "work plan")
        except ConversionError as exc:
            raise ConversionError(f"{exc}; pass --overwrite to start again") from None
        if plan.get("fingerprint") != digest:
            raise ConversionError(
                f"{split_dir} holds an unfinished conversion made with other options or data; "
                "rerun it with its original options to resume, or pass --overwrite"
            )
    elif cfg.overwrite:
        _remove_output(split_dir)
    elif split_dir.exists() and any(split_dir.glob("*.tar")):
        raise ConversionError(f"{split_dir} already holds tar files not made by this conversion; pass --overwrite")

    work.mkdir(parents=True, exist_ok=True)
    atomic_write(plan_file, json.dumps({"fingerprint": digest, "shards": num_shards}))
    for stale in split_dir.glob(".*.partial"):  # left by a killed run
        stale.unlink()
    done = {}
    for path in work.glob("*.tar.json"):
        try:
            record = ShardRecord.load(path)
        except (OSError, ValueError, TypeError, KeyError):
            continue  # an unreadable record: that shard is simply written again
        tar = split_dir / record.name
        if record.samples == 0 or (tar.exists() and tar.stat().st_size == record.bytes):
            done[record.name] = record
    return done


def _remove_output(split_dir: Path) -> None:
    """Delete what a conversion writes in ``split_dir`` (and nothing else)."""
    if not split_dir.exists():
        return
    for pattern in ("*.tar", "*.idx", MANIFEST, ".*.partial"):
        for path in split_dir.glob(pattern):
            path.unlink()
    shutil.rmtree(split_dir / WORK_DIR, ignore_errors=True)
    for folder in (split_dir, split_dir.parent):  # the split folder, then the dataset folder
        if folder.exists() and not any(folder.iterdir()):
            folder.rmdir()


# --- running the shards ------------------------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _init_worker(source, info, cfg, split_dir, queue) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops the pool
    _WORKER.update(source=source, info=info, cfg=cfg, split_dir=split_dir, queue=queue)


def _work(plan: ShardPlan) -> ShardRecord:
    ticker = Ticker(_WORKER["queue"].put)
    try:
        return write_shard(plan, _WORKER["source"], _WORKER["info"], _WORKER["cfg"],
                           _WORKER["split_dir"], ticker)  # fmt: skip
    finally:
        ticker.flush()


def _run(pending, source, info, cfg, split_dir, total, initial) -> dict[str, ShardRecord]:
    processes = min(cfg.processes or os.cpu_count() or 1, max(len(pending), 1))
    records: dict[str, ShardRecord] = {}
    pool = queue = None
    if processes > 1:
        # fork (before any thread starts): workers inherit the source and its loaded
        # annotations without pickling them.
        ctx = mp.get_context("fork")
        queue = ctx.Queue()
        pool = ctx.Pool(processes, _init_worker, (source, info, cfg, split_dir, queue))
    bar = tqdm(total=total, initial=initial, unit="img", desc=split_dir.name, file=sys.stderr,
               disable=not cfg.progress, mininterval=0.5, smoothing=0.05)  # fmt: skip
    try:
        if pool is None:
            ticker = Ticker(bar.update)
            for plan in pending:
                records[plan.name] = write_shard(plan, source, info, cfg, split_dir, ticker)
            ticker.flush()
            return records
        listener = threading.Thread(target=_listen, args=(queue, bar), daemon=True)
        listener.start()
        try:
            for record in pool.imap_unordered(_work, pending):
                records[record.name] = record
            pool.close()
        except BaseException:
            pool.terminate()
            raise
        finally:
            pool.join()
            queue.put(None)
            listener.join()
        return records
    finally:
        bar.close()


def _listen(queue, bar) -> None:
    while (n := queue.get()) is not None:
        bar.update(n)


# --- manifest and report -----------------------------------------------------------------------


def _manifest(dataset: str, info: SourceInfo, cfg: ConvertConfig, records: list[ShardRecord],
              digest: str, planned: int, command: str | None) -> dict[str, Any]:  # fmt: skip
    published = [r for r in records if r.samples]
    keys = ["jpg"] + ["seg.png"] * info.has_label + ["cls"] * info.has_cls + ["txt"] * info.has_txt + ["json"]
    reencoded = [x for r in records for x in r.reencoded]
    skipped = [x for r in records for x in r.skipped]
    label = None
    if info.has_label:
        dtype = label_dtype(info.num_classes).name
        label = {"key": "seg.png", "format": f"single-channel {dtype} PNG", "dtype": dtype,
                 **info.label_encoding}  # fmt: skip
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dataset": dataset,
        "split": info.split,
        "num_samples": sum(r.samples for r in published),
        "num_shards": len(published),
        "shards": [
            {"tar": r.name, "index": r.index, "samples": r.samples, "bytes": r.bytes, "sha256": r.sha256}
            for r in published
        ],
        "keys": keys,
        "num_classes": info.num_classes,
        "classes": info.classes,
        "label": label,
        "cls": {"key": "cls", "format": "ASCII decimal index into classes"} if info.has_cls else None,
        "txt": {"key": "txt", "format": "UTF-8 text; captions separated by newlines"} if info.has_txt else None,
        "source": {"path": info.source, **info.extra},
        "conversion": {
            "command": command,
            "subcommand": type(cfg).__name__,
            "options": {k: str(v) for k, v in dataclasses.asdict(cfg).items()},
            "fingerprint": digest,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "fastloc": fastloc.__version__,
            "python": platform.python_version(),
            "pillow": PIL.__version__,
            "numpy": np.__version__,
        },
        "report": {
            "planned": planned,
            "converted": sum(r.samples for r in records),
            "reencoded": len(reencoded),
            "reencoded_by_reason": dict(sorted(Counter(reason for _, reason in reencoded).items())),
            "reencoded_samples": [{"path": p, "reason": why} for p, why in reencoded],
            "skipped": len(skipped),
            "skipped_samples": [{"path": p, "reason": why} for p, why in skipped],
            "unreachable": [{"path": p, "reason": why} for p, why in info.unreachable],
        },
    }


def _print_report(manifest: dict[str, Any], records: list[ShardRecord], split_dir: Path, seconds: float) -> None:
    report = manifest["report"]
    size = sum(s["bytes"] for s in manifest["shards"])
    print(f"{split_dir}: {manifest['num_samples']} samples in {manifest['num_shards']} shards "
          f"({size / 1e6:.1f} MB) in {seconds:.1f} s")  # fmt: skip
    print(f"  converted {report['converted']}, re-encoded {report['reencoded']}, skipped {report['skipped']}")
    for reason, count in report["reencoded_by_reason"].items():
        print(f"  re-encoded {count}: {reason}")
    for entry in report["skipped_samples"]:
        print(f"  skipped {entry['path']}: {entry['reason']}")
    for entry in report["unreachable"]:
        print(f"  unreachable {entry['path']}: {entry['reason']}")
