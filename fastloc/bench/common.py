"""What every benchmark shares: timing, the machine's description, the table, the JSON and the
option checks made before any measurement."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from fastloc.cli import check_writable, require

PACKAGES = ("fastloc", "torch", "triton", "timm", "nvidia-dali-cuda120", "webdataset", "pillow", "numpy")
RESULTS_DIR = Path("runs/bench")  # where the JSON goes without --out


def flag(field: str) -> str:
    """The option of a config field as tyro spells it: batch_size -> --batch-size."""
    return "--" + field.replace("_", "-")


def at_least(cfg: Any, low: int, *fields: str, meaning: str = "") -> None:
    """A ``BadValue`` for the first of ``fields`` of ``cfg`` below ``low`` (``meaning``: what ``low`` means)."""
    rule = f"must be at least {low}" + (f" ({meaning})" if meaning else "")
    for field in fields:
        require(getattr(cfg, field) >= low, flag(field), getattr(cfg, field), rule)


def check_paths(out: Path | None, workdir: Path | None = None) -> None:
    """--out names a file whose folder (default: runs/bench) can be written, and --workdir a folder
    that can be written: checked (the folders created) before any measurement."""
    if out is not None:
        require(not out.is_dir(), "--out", str(out), "must name the JSON file, not a folder")
    if workdir is not None:
        check_writable("--workdir", workdir)
    check_writable("--out", out.parent if out is not None else RESULTS_DIR)


def time_runs(fn: Callable[[], Any], repeats: int, setup: Callable[[], Any] | None = None) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn`` (``setup`` runs untimed before each)."""
    times = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def device() -> dict[str, Any]:
    """CPU model and core count, and the GPU when torch sees one."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform()}
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


@dataclass(frozen=True)
class MissingRow:
    """Rows of a benchmark's table that this machine cannot produce, and why."""

    row: str  # the rows as the table would name them, e.g. "patch_mask / triton"
    reason: str  # e.g. "needs a CUDA device; torch sees none"


def cuda_missing_reason() -> str | None:
    """Why CUDA rows cannot run here (no GPU, or a CPU-only torch); None when a GPU is usable."""
    import torch

    if torch.cuda.is_available():
        return None
    if torch.version.cuda is None:
        return f"needs a CUDA device; this torch {torch.__version__} is a CPU-only build"
    return "needs a CUDA device; torch sees none on this machine"


def print_table(rows: list[dict[str, Any]], columns: list[str], missing: Sequence[MissingRow] = ()) -> None:
    """The rows as aligned columns, then one line per missing row with its reason."""
    cells = [[_fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))
    for m in missing:
        print(f"missing: {m.row}: {m.reason}")


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def write_results(
    name: str, out: Path | None, command: str, payload: dict[str, Any], missing: Sequence[MissingRow] = ()
) -> Path:
    """The JSON record: device, versions, command, date, the benchmark's own payload, and the
    rows this machine could not produce (``missing``: a list of {row, reason}, empty when none)."""
    stamp = datetime.now(timezone.utc)
    path = out or RESULTS_DIR / f"{name}-{stamp.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": name,
        "date": stamp.isoformat(timespec="seconds"),
        "command": command,
        "device": device(),
        "versions": versions(),
        **payload,
        "missing": [asdict(m) for m in missing],
    }
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path
