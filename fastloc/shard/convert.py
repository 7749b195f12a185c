"""Run a conversion: plan, resume what an earlier run left, write shards in parallel, report.

The output of ``convert`` depends only on the source and the options, never on the number of
processes: the plan fixes every shard's samples, each shard is written by one process, and the
manifest lists shards in plan order. An interrupted run (Ctrl-C, SIGKILL, a requeued job, a full
disk) leaves only complete shards behind; rerunning the same command writes the missing ones.

Safety rules: the split folder never overlaps the input (it is refused before anything is
written); one conversion at a time holds the split folder's lock; and fastloc deletes only the
files it writes (the manifest, its work folder, and tar, index and partial files named like this
split's shards), so nothing a user put there is ever removed.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import multiprocessing as mp
import os
import platform
import re
import signal
import threading
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import PIL

import fastloc
from fastloc.progress import Progress
from fastloc.shard.config import ConvertConfig, check_path_name
from fastloc.shard.encode import label_dtype, label_space
from fastloc.shard.errors import ConversionError
from fastloc.shard.jsonfile import read_json_object
from fastloc.shard.lock import split_lock
from fastloc.shard.manifest import FORMAT, FORMAT_VERSION, MANIFEST, read_manifest, shard_problem, write_manifest
from fastloc.shard.plan import ShardPlan, cut_shards, fingerprint, order_items
from fastloc.shard.sources.base import SourceInfo
from fastloc.shard.tario import atomic_write
from fastloc.shard.words import plural
from fastloc.shard.writer import (
    WORK_DIR,
    ShardRecord,
    StrictStop,
    Ticker,
    partial_path,
    record_path,
    write_shard,
)

PLAN_FILE = "plan.json"


def convert(cfg: ConvertConfig, command: str | None = None) -> dict[str, Any]:
    """Convert the dataset ``cfg`` describes; returns the manifest (also written to disk)."""
    started = time.perf_counter()
    cfg.validate()
    source = cfg.source()
    info = source.info()
    dataset = cfg.name or info.dataset
    check_path_name("the dataset name", dataset)
    check_path_name("--split", info.split)
    split_dir = Path(cfg.out) / dataset / info.split
    refuse_overlap(split_dir, info.inputs)
    items = order_items(source.items(), cfg)
    if not items:
        raise ConversionError(f"{info.source}: no samples found")
    plans = cut_shards(items, cfg, dataset, info.split)
    run = _Run(cfg, source, info, dataset, split_dir, plans, fingerprint(cfg, info, plans), len(items), command)
    run.started = started  # the report's time includes listing the source

    created: list[Path] = []  # folders this run made: removed again if they end up empty
    try:
        _make_dirs(split_dir, created)
        with split_lock(split_dir, cfg.wait):
            try:
                manifest = run.locked()
            except OSError as error:
                run.discard_partials()
                raise _output_error(error, run) from None
    except OSError as error:  # making the folders or the lock file
        raise _output_error(error, run) from None
    finally:
        _remove_empty(created)
    return manifest


# --- overlap, names, folders -------------------------------------------------------------------


def refuse_overlap(split_dir: Path, inputs: tuple[str, ...]) -> None:
    """The split folder must not be, hold, or lie inside any input (symbolic links resolved):
    writing or --overwrite there could destroy source data."""
    out = Path(split_dir).resolve()
    for given in inputs:
        src = Path(given).resolve()
        if out == src:
            how = "is the input"
        elif out.is_relative_to(src):
            how = "lies inside the input"
        elif src.is_relative_to(out):
            how = "holds the input"
        else:
            continue
        raise ConversionError(
            f"the output split folder {split_dir} {how} {given}: writing there could overwrite or delete "
            "source data; choose an --out (or --name) outside the input"
        )


class ShardNames:
    """The names of the files a conversion of one split writes, and nothing else."""

    def __init__(self, dataset: str, split: str):
        stem = re.escape(f"{dataset}-{split}-")
        self._shard = re.compile(rf"{stem}\d{{6,}}\.(?:tar|idx)")
        self._partial = re.compile(rf"\.(?:{stem}\d{{6,}}\.(?:tar|idx)|{re.escape(MANIFEST)})\.partial")

    def is_shard(self, name: str) -> bool:
        return self._shard.fullmatch(name) is not None

    def owns(self, name: str) -> bool:
        return name == MANIFEST or self.is_shard(name) or self.is_partial(name)

    def is_partial(self, name: str) -> bool:
        return self._partial.fullmatch(name) is not None


def _make_dirs(split_dir: Path, created: list[Path]) -> None:
    missing = []
    for folder in (split_dir, *split_dir.parents):
        if folder.is_dir():
            break
        missing.append(folder)
    for folder in reversed(missing):
        folder.mkdir(exist_ok=True)
        created.append(folder)


def _remove_empty(created: list[Path]) -> None:
    for folder in reversed(created):  # deepest first
        try:
            folder.rmdir()
        except OSError:
            break  # not empty (the conversion wrote something), or already gone


def _remove_files(folder: Path, owned) -> None:
    """Delete the plain files (or links) of ``folder`` whose name ``owned`` accepts."""
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if owned(path.name) and (path.is_symlink() or not path.is_dir()):
            path.unlink(missing_ok=True)


def _is_work_file(name: str) -> bool:
    """What writer.py and this module keep in the work folder (records, plan, their partials)."""
    return re.fullmatch(r"\.?(?:plan\.json|.+\.tar\.json)(?:\.partial)?", name) is not None


def _remove_work(split_dir: Path) -> None:
    work = split_dir / WORK_DIR
    _remove_files(work, _is_work_file)
    try:
        work.rmdir()
    except FileNotFoundError:
        pass
    except OSError:  # it holds something fastloc did not write: leave it
        pass


def remove_output(split_dir: Path, names: ShardNames) -> None:
    """Delete what a conversion of this split writes in ``split_dir``, and nothing else."""
    _remove_files(split_dir, names.owns)
    _remove_work(split_dir)


# --- one conversion, holding the split folder's lock ------------------------------------------------


@dataclasses.dataclass
class _Run:
    cfg: ConvertConfig
    source: Any
    info: SourceInfo
    dataset: str
    split_dir: Path
    plans: list[ShardPlan]
    digest: str
    planned: int
    command: str | None

    def __post_init__(self):
        self.names = ShardNames(self.dataset, self.info.split)
        self.started = time.perf_counter()

    def locked(self) -> dict[str, Any]:
        done = self.prepare()
        if done is None:
            return self.finished()
        pending = [p for p in self.plans if p.name not in done]
        initial = sum(len(p.items) for p in self.plans if p.name in done)
        if done:
            print(f"{self.split_dir}: resuming, {len(done)} of {plural(len(self.plans), 'shard')} already complete")
        done.update(self.write(pending, initial))
        ordered = [done[p.name] for p in self.plans]
        manifest = _manifest(self.dataset, self.info, self.cfg, ordered, self.digest, self.planned, self.command)
        if manifest["num_samples"] == 0:
            _print_report(manifest, self.split_dir, time.perf_counter() - self.started)
            remove_output(self.split_dir, self.names)  # a rerun starts afresh
            raise ConversionError(_empty_result(manifest, self.split_dir))
        write_manifest(self.split_dir, manifest)
        _remove_work(self.split_dir)
        _print_report(manifest, self.split_dir, time.perf_counter() - self.started)
        return manifest

    def prepare(self) -> dict[str, ShardRecord] | None:
        """Records of the shards already complete (empty for a fresh start), or None when a finished
        conversion with these options is there."""
        cfg, split_dir, names = self.cfg, self.split_dir, self.names
        work = split_dir / WORK_DIR
        plan_file = work / PLAN_FILE
        foreign = sorted(p.name for p in split_dir.glob("*.tar") if not names.is_shard(p.name))
        if foreign:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise ConversionError(
                f"{split_dir} holds tar files that this conversion does not write ({shown}); fastloc leaves "
                "them alone (--overwrite too): move them away or choose another --out or --name"
            )
        if cfg.overwrite:
            remove_output(split_dir, names)
        if (split_dir / MANIFEST).exists():
            try:
                manifest = read_manifest(split_dir)
            except ConversionError as exc:
                raise ConversionError(f"{exc}; pass --overwrite to convert this split again") from None
            if manifest.get("conversion", {}).get("fingerprint") == self.digest:
                return None
            raise ConversionError(
                f"{split_dir} holds a finished conversion made with other options or data; pass --overwrite "
                "to replace it (only the files fastloc wrote are deleted), or choose another --out/--name"
            )
        if plan_file.exists():
            try:
                plan = read_json_object(plan_file, "work plan")
            except ConversionError as exc:
                raise ConversionError(f"{exc}; pass --overwrite to start again") from None
            if plan.get("fingerprint") != self.digest:
                raise ConversionError(
                    f"{split_dir} holds an unfinished conversion made with other options or data; "
                    "rerun it with its original options to resume, or pass --overwrite"
                )
        elif any(names.is_shard(p.name) for p in split_dir.glob("*.tar")):
            raise ConversionError(
                f"{split_dir} already holds shards of another, unrecorded conversion; pass --overwrite to "
                "replace them (only files named like this split's shards and its manifest are deleted)"
            )
        return self.start_work()

    def start_work(self) -> dict[str, ShardRecord]:
        split_dir = self.split_dir
        work = split_dir / WORK_DIR
        work.mkdir(exist_ok=True)
        atomic_write(work / PLAN_FILE, json.dumps({"fingerprint": self.digest, "shards": len(self.plans)}))
        _remove_files(split_dir, self.names.is_partial)  # left by a killed run
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

    def finished(self) -> dict[str, Any]:
        """A finished set with these options: nothing to do, unless shards it lists are gone."""
        manifest = read_manifest(self.split_dir)
        if not manifest["shards"] or not manifest["num_samples"]:  # written by an older fastloc
            raise ConversionError(
                f"{self.split_dir}: the conversion there holds no samples (an empty result is not a result); "
                "pass --overwrite to convert the split again"
            )
        damaged = [s for s in manifest["shards"] if shard_problem(self.split_dir, s)]
        if not damaged:
            print(f"{self.split_dir}: already converted with these options (manifest present); nothing to do")
            return manifest
        shown = ", ".join(s["tar"] for s in damaged[:5]) + (", ..." if len(damaged) > 5 else "")
        print(
            f"{self.split_dir}: already converted, but {plural(len(damaged), 'shard')} of the manifest "
            f"{'is' if len(damaged) == 1 else 'are'} missing or not of the recorded size ({shown}); "
            "writing them again"
        )
        by_name = {p.name: p for p in self.plans}
        unknown = [s["tar"] for s in damaged if s["tar"] not in by_name]
        if unknown:
            raise ConversionError(
                f"{self.split_dir}: the manifest lists shards this conversion does not plan "
                f"({', '.join(unknown[:3])}); pass --overwrite to convert the split again"
            )
        todo = [by_name[s["tar"]] for s in damaged]
        self.start_work()
        records = self.write(todo, self.planned - sum(len(p.items) for p in todo))
        _remove_work(self.split_dir)
        changed = [
            s["tar"]
            for s in damaged
            if (records[s["tar"]].samples, records[s["tar"]].bytes, records[s["tar"]].sha256)
            != (s["samples"], s["bytes"], s["sha256"])
        ]
        if changed:
            raise ConversionError(
                f"{self.split_dir}: rewritten {', '.join(changed[:3])} differ{'s' if len(changed) == 1 else ''} "
                "from the manifest: the source changed since the conversion; pass --overwrite to convert it again"
            )
        print(f"{self.split_dir}: {plural(len(todo), 'shard')} written again; the set matches its manifest")
        return manifest

    def write(self, pending: list[ShardPlan], initial: int) -> dict[str, ShardRecord]:
        """Write the pending shards; Ctrl-C and --strict stops become ConversionErrors."""
        split_dir = self.split_dir
        try:
            return _run(pending, self.source, self.info, self.cfg, split_dir, self.planned, initial)
        except StrictStop as stop:
            remove_output(split_dir, self.names)
            raise ConversionError(
                f"--strict: {stop.path}: {stop.reason}; stopped and removed the partial output in {split_dir}"
            ) from None
        except KeyboardInterrupt:
            self.discard_partials()
            finished = sum(1 for p in self.plans if record_path(split_dir, p.name).exists())
            raise ConversionError(
                f"interrupted with {finished} of {plural(len(self.plans), 'shard')} complete in {split_dir}; "
                "rerun the same command to resume"
            ) from None

    def discard_partials(self) -> None:
        """Delete the half-written shards of workers that were stopped (they also hold disk space)."""
        for plan in self.plans:
            try:
                partial_path(self.split_dir, plan.name).unlink(missing_ok=True)
            except OSError:
                pass


def _output_error(error: OSError, run: _Run) -> ConversionError:
    """``PATH: PROBLEM`` of a failed write, what to do, and that a rerun resumes."""
    where = error.filename or run.split_dir
    problem = error.strerror or str(error)
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        todo = "free some space there"
    elif error.errno == errno.EROFS:
        todo = "choose another --out (or make it writable)"
    elif error.errno in (errno.EACCES, errno.EPERM):
        todo = "fix the permissions or choose another --out"
    else:
        todo = "fix this"
    try:
        complete = sum(1 for p in run.plans if record_path(run.split_dir, p.name).exists())
    except OSError:
        complete = 0
    if complete:
        resume = (
            f"then rerun the same command to resume: the {complete} of {plural(len(run.plans), 'shard')} "
            "already complete are kept"
        )
    else:
        resume = "then rerun the same command"
    return ConversionError(f"{where}: {problem}; {todo}, {resume}")


def _empty_result(manifest: dict[str, Any], split_dir: Path) -> str:
    report = manifest["report"]
    skipped = report["skipped_samples"]
    reasons = Counter(entry["reason"] for entry in skipped)
    why = ""
    if reasons:
        reason, count = reasons.most_common(1)[0]
        if count == len(skipped):
            why = f", all for one reason: {reason}"
        elif count > 1:
            why = f"; the most common reason ({count} of {len(skipped)}): {reason}"
        else:
            why = f", each for its own reason, e.g. {skipped[0]['path']}: {skipped[0]['reason']}"
    return (
        f"{split_dir}: no sample could be converted: all {plural(report['planned'], 'planned sample')} "
        f"were skipped{why}. Nothing was published (an empty set is not a result); the skipped samples are "
        "listed above"
    )


# --- running the shards ------------------------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _init_worker(source, info, cfg, split_dir, queue) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops the pool
    _WORKER.update(source=source, info=info, cfg=cfg, split_dir=split_dir, queue=queue)


def _work(plan: ShardPlan) -> ShardRecord:
    ticker = Ticker(_WORKER["queue"].put)
    try:
        return write_shard(plan, _WORKER["source"], _WORKER["info"], _WORKER["cfg"], _WORKER["split_dir"], ticker)
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
    progress = Progress(total, initial, f"{split_dir.parent.name}/{split_dir.name}", enabled=cfg.progress)
    try:
        if pool is None:
            ticker = Ticker(progress.update)
            for plan in pending:
                records[plan.name] = write_shard(plan, source, info, cfg, split_dir, ticker)
            ticker.flush()
            return records
        listener = threading.Thread(target=_listen, args=(queue, progress), daemon=True)
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
        progress.close()


def _listen(queue, progress) -> None:
    while (n := queue.get()) is not None:
        progress.update(n)


# --- manifest and report -----------------------------------------------------------------------


def _manifest(
    dataset: str,
    info: SourceInfo,
    cfg: ConvertConfig,
    records: list[ShardRecord],
    digest: str,
    planned: int,
    command: str | None,
) -> dict[str, Any]:
    published = [r for r in records if r.samples]
    keys = ["jpg"] + ["seg.png"] * info.has_label + ["cls"] * info.has_cls + ["txt"] * info.has_txt + ["json"]
    reencoded = [x for r in records for x in r.reencoded]
    skipped = [x for r in records for x in r.skipped]
    label = None
    if info.has_label:
        dtype = label_dtype(label_space(info.num_classes, info.label_encoding.get("ignore"))).name
        label = {"key": "seg.png", "format": f"single-channel {dtype} PNG", "dtype": dtype, **info.label_encoding}
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


def _print_report(manifest: dict[str, Any], split_dir: Path, seconds: float) -> None:
    report = manifest["report"]
    size = sum(s["bytes"] for s in manifest["shards"])
    print(
        f"{split_dir}: {plural(manifest['num_samples'], 'sample')} in {plural(manifest['num_shards'], 'shard')} "
        f"({size / 1e6:.1f} MB) in {seconds:.1f} s"
    )
    print(f"  converted {report['converted']}, re-encoded {report['reencoded']}, skipped {report['skipped']}")
    for reason, count in report["reencoded_by_reason"].items():
        print(f"  re-encoded {count}: {reason}")
    for entry in report["skipped_samples"]:
        print(f"  skipped {entry['path']}: {entry['reason']}")
    for entry in report["unreachable"]:
        print(f"  unreachable {entry['path']}: {entry['reason']}")
