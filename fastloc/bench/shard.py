"""``python -m fastloc.bench shard``: conversion throughput against PIL and ``cp``.

Workloads: the synthetic set (generated, encoded) and an ImageNet-style folder of real JPEGs
(passed through). Baselines on the same JPEG folder: a plain single-process loop that decodes
and re-encodes every image with PIL into a tar, and ``cp -r`` of the same bytes, alone and
followed by ``sync`` (fastloc's runs include the fsync of every shard). Every run
starts from a warm page cache, an empty output folder and no pending writeback (untimed).
On machines with a slow or shared disk the rates of every writer swing from run to run: the
table shows the fastest of --repeats runs and the JSON keeps every timing.
Aims: pass-through conversion at >= 50% of cp's rate; >= 1.8x from 1 to 2 processes.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

import fastloc
from fastloc.bench.common import at_least, check_paths, print_table, time_runs, write_results
from fastloc.cli import flowing_help, require
from fastloc.shard.convert import convert
from fastloc.shard.sources.imagenet import ImagenetConfig
from fastloc.shard.sources.synthetic import SyntheticConfig, draw_scene

CLASSES = 10  # class folders in the generated ImageNet-style layout
JPEG_SUFFIXES = (".jpeg", ".jpg")


@flowing_help
@dataclass(frozen=True, kw_only=True)
class ShardBench:
    """Conversion throughput of python -m fastloc.shard against PIL re-encoding and cp."""

    images: int = 4000
    """JPEG files in the ImageNet-style folder (copies of the source JPEGs, round-robin)."""

    synthetic: int = 1000
    """Samples of the synthetic set (default image sizes, 192-320 px)."""

    jpeg_source: Path | None = None
    """Folder of real JPEGs to copy (default: the fixtures' ImageNet excerpt; without it, generated JPEGs)."""

    processes: int = 0
    """Process count of the parallel runs (0 = all cores)."""

    repeats: int = 5
    """Timed runs per row; the table shows the fastest, the JSON keeps them all."""

    workdir: Path | None = None
    """Scratch folder (default: a temporary folder, deleted afterwards)."""

    out: Path | None = None
    """JSON results path (default: runs/bench/shard-DATE.json)."""

    def validate(self) -> None:
        """A ``BadValue`` for the first option out of its range, before any work."""
        at_least(self, 1, "images", "synthetic", "repeats")
        at_least(self, 0, "processes", meaning="0: all cores")
        if self.jpeg_source is not None:
            has = self.jpeg_source.is_dir() and any(_is_jpeg(p) for p in self.jpeg_source.rglob("*"))
            require(has, "--jpeg-source", str(self.jpeg_source), "must be a folder holding .jpeg or .jpg files")
        check_paths(self.out, self.workdir)


def run(cfg: ShardBench, command: str) -> Path:
    processes = cfg.processes or os.cpu_count() or 1
    with tempfile.TemporaryDirectory(dir=cfg.workdir) as scratch:
        work = Path(scratch)
        src, source_note = _build_jpeg_folder(work / "jpegs", cfg)
        nbytes = sum(p.stat().st_size for p in src.rglob("*.JPEG"))
        _read_all(src)  # warm the page cache for every contender alike
        out = work / "out"

        def clear():  # untimed: empty output, and no dirty pages of the last run left to flush
            shutil.rmtree(out, ignore_errors=True)
            os.sync()

        per_shard = max(1, math.ceil(cfg.images / (4 * processes)))
        rows = []

        def row(workload, method, procs, count, times, size=None):
            best = min(times)
            rows.append(
                {
                    "workload": workload,
                    "method": method,
                    "processes": procs,
                    "images": count,
                    "best_s": best,
                    "images_per_s": count / best,
                    "MB_per_s": size / best / 1e6 if size else None,
                    "times_s": times,
                }
            )

        for method, fsync in (("fastloc pass-through", True), ("fastloc pass-through --no-fsync", False)):
            for procs in sorted({1, processes}):
                folder = ImagenetConfig(
                    src=src, out=out, processes=procs, shard_samples=per_shard, progress=False, fsync=fsync
                )
                row(
                    "jpeg-folder",
                    method,
                    procs,
                    cfg.images,
                    time_runs(lambda c=folder: _quiet(convert, c), cfg.repeats, clear),
                    nbytes,
                )
        row(
            "jpeg-folder",
            "PIL decode+re-encode",
            1,
            cfg.images,
            time_runs(lambda: _pil_baseline(src, out), cfg.repeats, clear),
            nbytes,
        )
        copy = ["cp", "-r", str(src), str(out)]
        row(
            "jpeg-folder",
            "cp -r",
            1,
            cfg.images,
            time_runs(lambda: subprocess.run(copy, check=True), cfg.repeats, clear),
            nbytes,
        )
        # like for like: fastloc waits for its bytes to reach the disk (fsync), so does this one
        row(
            "jpeg-folder",
            "cp -r; sync",
            1,
            cfg.images,
            time_runs(lambda: (subprocess.run(copy, check=True), os.sync()), cfg.repeats, clear),
            nbytes,
        )
        synth_per_shard = max(1, math.ceil(cfg.synthetic / (4 * processes)))
        for procs in sorted({1, processes}):
            synth = SyntheticConfig(
                num_samples=cfg.synthetic, out=out, processes=procs, shard_samples=synth_per_shard, progress=False
            )
            row(
                "synthetic",
                "fastloc generate+encode",
                procs,
                cfg.synthetic,
                time_runs(lambda c=synth: _quiet(convert, c), cfg.repeats, clear),
            )

    cp_rate = next(r["images_per_s"] for r in rows if r["method"] == "cp -r")
    for r in rows:
        r["vs_cp"] = r["images_per_s"] / cp_rate if r["workload"] == "jpeg-folder" else None
    print(f"JPEG folder: {cfg.images} files, {nbytes / 1e6:.0f} MB ({source_note}); shards of {per_shard}")
    print_table(rows, ["workload", "method", "processes", "images", "best_s", "images_per_s", "MB_per_s", "vs_cp"])
    summary = _summary(rows, processes)
    for line in summary:
        print(line)
    return write_results(
        "shard",
        cfg.out,
        command,
        {
            "config": {k: str(v) for k, v in cfg.__dict__.items()},
            "jpeg_folder": {"files": cfg.images, "bytes": nbytes, "source": source_note},
            "processes": processes,
            "rows": rows,
            "summary": summary,
        },
    )


def _summary(rows: list[dict], processes: int) -> list[str]:
    rate = {(r["workload"], r["method"], r["processes"]): r["images_per_s"] for r in rows}
    cp = rate[("jpeg-folder", "cp -r", 1)]
    cp_sync = rate[("jpeg-folder", "cp -r; sync", 1)]
    lines = []
    for method, baseline, name in (
        ("fastloc pass-through", cp_sync, "cp + sync"),
        ("fastloc pass-through --no-fsync", cp, "cp"),
    ):
        for procs in sorted({1, processes}):
            ratio = rate[("jpeg-folder", method, procs)]
            lines.append(
                f"{method}, {procs} process(es): {ratio / cp:.0%} of cp's rate (aim >= 50%), "
                f"{ratio / baseline:.0%} of {name}"
            )
    if processes > 1:
        for workload, method in (
            ("jpeg-folder", "fastloc pass-through"),
            ("jpeg-folder", "fastloc pass-through --no-fsync"),
            ("synthetic", "fastloc generate+encode"),
        ):
            speedup = rate[(workload, method, processes)] / rate[(workload, method, 1)]
            lines.append(f"{workload}, {method}: {speedup:.2f}x from 1 to {processes} processes (aim >= 1.8x for 2)")
    return lines


def _quiet(fn, *args):
    """Run without the converter's report lines in the benchmark's output."""
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        return fn(*args)


def _pil_baseline(src: Path, out: Path) -> None:
    """What a plain script does: decode and re-encode every image with PIL into one tar."""
    out.mkdir(parents=True)
    with tarfile.open(out / "baseline.tar", "w") as tar:
        for path in sorted(src.rglob("*.JPEG")):
            buffer = io.BytesIO()
            Image.open(path).convert("RGB").save(buffer, format="JPEG", quality=95)
            info = tarfile.TarInfo(path.stem + ".jpg")
            info.size = buffer.tell()
            buffer.seek(0)
            tar.addfile(info, buffer)


def _read_all(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            path.read_bytes()


def _is_jpeg(path: Path) -> bool:
    return path.suffix.lower() in JPEG_SUFFIXES


def _find_jpegs(cfg: ShardBench) -> list[Path]:
    candidates = [cfg.jpeg_source] if cfg.jpeg_source else []
    if not candidates:
        env = os.environ.get("FASTLOC_FIXTURES")
        repo = Path(fastloc.__file__).resolve().parents[1]
        candidates = [Path(env) / "imagenet-sample" if env else None, repo.parent / "shared/fixtures/imagenet-sample"]
    for folder in candidates:
        if folder and folder.is_dir():
            files = sorted(p for p in folder.rglob("*") if _is_jpeg(p))
            if files:
                return files
    return []


def _build_jpeg_folder(root: Path, cfg: ShardBench) -> tuple[Path, str]:
    """<root>/<wnid>/<wnid>_<i>.JPEG, CLASSES folders, cfg.images files in all."""
    files = _find_jpegs(cfg)
    if files:
        blobs = [p.read_bytes() for p in files]
        note = f"copies of {len(files)} JPEGs from {files[0].parent}"
    else:
        blobs = []
        for i in range(16):
            scene = draw_scene(np.random.default_rng(i), 375, 500)
            buffer = io.BytesIO()
            Image.fromarray(scene.pixels).save(buffer, format="JPEG", quality=90)
            blobs.append(buffer.getvalue())
        note = "16 generated 500x375 JPEGs (no real JPEG folder found)"
    for i in range(cfg.images):
        wnid = f"n{i % CLASSES:08d}"
        folder = root / wnid
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{wnid}_{i}.JPEG").write_bytes(blobs[i % len(blobs)])
    return root, note
