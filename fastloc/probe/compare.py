"""Compare two probe results (e.g. a baseline and its aligned backbone): a table and a plot.

``python -m fastloc.probe compare A.json B.json`` prints the headline metrics of both with B - A
and writes a before/after PNG. Two results are only compared when they were measured the same
way (Patch-Seg: dataset, reduction, image size, threshold, epochs, classes; a dense protocol: its
name and every knob); ``--force`` overrides that. The plot's folder is checked before anything is read.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import tyro

from fastloc.cli import check_writable, flowing_help
from fastloc.probe.plots import as_float, class_name, describe, is_dense, plot_comparison

RESULT_FILE = "result.json"


@flowing_help
@dataclass(frozen=True, kw_only=True)
class CompareConfig:
    """Compare two Patch-Seg results: a table of the headline metrics with B - A, and a before/after plot."""

    a: tyro.conf.Positional[Path]
    """The first result (the baseline): a result.json or the run directory holding it."""

    b: tyro.conf.Positional[Path]
    """The second result (e.g. the aligned backbone): a result.json or the run directory holding it."""

    out: Path | None = None
    """The PNG to write (default: compare-A-vs-B.png beside B's result.json; a directory puts it there)."""

    labels: tuple[str, str] | None = None
    """Names for A and B in the table and plot (default: their run directory names)."""

    force: bool = False
    """Compare even when the protocols differ; the table then starts with a warning."""


def run_compare(cfg: CompareConfig) -> int:
    """The CLI command: print the table and the plot's path (its folder checked first)."""
    names = _run_name(cfg.a), _run_name(cfg.b)
    folder = _output_path(cfg.out, _result_file(Path(cfg.b)).parent, names).parent
    if cfg.out is not None or folder.is_dir():  # beside a B that is not there: reading B says so
        check_writable("--out", folder)
    table, png = compare(cfg.a, cfg.b, cfg.out, cfg.labels, force=cfg.force)
    print(table)
    print(f"plot: {png}")
    return 0


def compare(
    a_path: Path, b_path: Path, out: Path | None = None, labels: tuple[str, str] | None = None, *, force: bool = False
) -> tuple[str, Path]:
    """Load, check and compare two results; returns the table text and the PNG written."""
    a, b = load_result(a_path), load_result(b_path)
    differences = comparable(a, b)
    if differences and not force:
        listed = "; ".join(differences)
        raise ValueError(f"{a_path} and {b_path} are not comparable: {listed} (force=True / --force compares anyway)")
    names = _run_name(a_path), _run_name(b_path)
    if labels is None:
        labels = names if names[0] != names[1] else ("A", "B")
    table = compare_table(a, b, labels)
    if differences:
        warnings = "".join(f"warning: not comparable, compared anyway (--force): {line}\n" for line in differences)
        table = warnings + table
    png = _output_path(out, _result_file(Path(b_path)).parent, names)
    return table, plot_comparison(a, b, png, labels=labels)


def load_result(path: Path) -> dict:
    """Read a probe's result.json (or the one in a run directory); ValueError naming the path if it is not one."""
    path = _result_file(Path(path))
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    try:
        result = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(result, dict):
        raise ValueError(f"{path}: not a probe result (a JSON {type(result).__name__}, not an object)")
    missing = [key for key in ("protocol", "selected") if not isinstance(result.get(key), dict)]
    if missing:
        raise ValueError(f"{path}: not a probe result (no {' or '.join(repr(k) for k in missing)})")
    return result


def comparable(a: dict, b: dict) -> list[str]:
    """The differences in how A and B were measured, one readable line each; empty when comparable."""
    if is_dense(a) or is_dense(b):
        return _dense_differences(a, b)
    facts = (
        ("dataset", ("dataset", "name")),
        ("reduction", ("protocol", "reduction")),
        ("image size", ("protocol", "image_size")),
        ("threshold", ("protocol", "threshold")),
        ("epochs", ("protocol", "epochs")),
        ("number of classes", ("dataset", "num_classes")),
    )
    lines = []
    for what, (section, key) in facts:
        value_a, value_b = (r.get(section, {}).get(key) for r in (a, b))
        if value_a != value_b:
            lines.append(f"{what}: {value_a} (A) vs {value_b} (B)")
    valid_a, valid_b = _valid_classes(a), _valid_classes(b)
    if valid_a != valid_b:
        parts = [
            f"{len(only)} only in {side} ({_some_names(r, only)})"
            for side, r, only in (("A", a, valid_a - valid_b), ("B", b, valid_b - valid_a))
            if only
        ]
        lines.append(f"valid classes: {'; '.join(parts)}")
    return lines


# what a dense run measured on, not how: these may differ between comparable runs
_RUN_FACTS = ("bank_size", "seconds")


def _dense_differences(a: dict, b: dict) -> list[str]:
    """A dense protocol's results compare when the protocol (name and every knob), the dataset and
    its classes are the same."""
    pa, pb = a["protocol"], b["protocol"]
    lines = [
        f"protocol {key}: {pa.get(key)} (A) vs {pb.get(key)} (B)"
        for key in sorted(set(pa) | set(pb), key=lambda k: (k != "name", k))
        if key not in _RUN_FACTS and pa.get(key) != pb.get(key)
    ]
    for what, key in (("dataset", "name"), ("number of classes", "num_classes")):
        va, vb = a.get("dataset", {}).get(key), b.get("dataset", {}).get(key)
        if va != vb:
            lines.append(f"{what}: {va} (A) vs {vb} (B)")
    return lines


def compare_table(a: dict, b: dict, labels: tuple[str, str] = ("A", "B")) -> str:
    """A plain-text table of the headline metrics: rows of metrics, columns A, B and B - A."""
    rows = _metric_rows(a, b)
    delta = f"{labels[1]} - {labels[0]}"
    name_width = max(len(name) for name, _, _ in rows)
    width = max(10, len(labels[0]), len(labels[1]), len(delta))
    header = f"{'':<{name_width}}  {labels[0]:>{width}}  {labels[1]:>{width}}  {delta:>{width}}"
    lines = [_run_line(label, r) for label, r in zip(labels, (a, b))]
    lines += ["", header, "-" * len(header)]
    for name, value_a, value_b in rows:
        cells = (number_text(value_a), number_text(value_b), number_text(value_b - value_a, sign=True))
        lines.append(f"{name:<{name_width}}" + "".join(f"  {cell:>{width}}" for cell in cells))
    return "\n".join(lines)


def _metric_rows(a: dict, b: dict) -> list[tuple[str, float, float]]:
    """(name, A, B) for every row of the table; groups and size buckets only where both results have them."""
    sel_a, sel_b = a["selected"], b["selected"]
    if is_dense(a) or is_dense(b):  # a dense protocol's figures, by name
        return [(name, as_float(sel_a.get(name)), as_float(sel_b.get(name))) for name in sel_a if name in sel_b]
    keys = (
        ("macro recall", "macro_recall"),
        ("macro precision", "macro_precision"),
        ("macro precision (nan-safe)", "macro_precision_nansafe"),
        ("macro F1 (nan-safe)", "macro_f1_nansafe"),
        ("macro AP", "macro_ap"),
    )
    rows = [(name, as_float(sel_a.get(key)), as_float(sel_b.get(key))) for name, key in keys]
    last_a, last_b = a.get("last") or {}, b.get("last") or {}
    rows.append(
        ("macro recall, last epoch", as_float(last_a.get("macro_recall")), as_float(last_b.get("macro_recall")))
    )
    groups_a, groups_b = sel_a.get("groups") or {}, sel_b.get("groups") or {}
    for group in (g for g in groups_a if g in groups_b):
        rows.append(
            (
                f"macro recall, {group}",
                as_float(groups_a[group].get("macro_recall")),
                as_float(groups_b[group].get("macro_recall")),
            )
        )
    size_a, size_b = sel_a.get("by_size"), sel_b.get("by_size")
    if size_a and size_b and size_a["edges"] == size_b["edges"]:
        edges = size_a["edges"]
        for i, (lo, hi) in enumerate(itertools.pairwise(edges)):
            name = f"macro recall, size {lo:.1f}-{hi:.1f}"
            rows.append((name, as_float(size_a["macro_recall"][i]), as_float(size_b["macro_recall"][i])))
    return rows


def _run_line(label: str, result: dict) -> str:
    """Which run a column is: backbone, head, reduction, dataset and the selected epoch."""
    if is_dense(result):
        return f"{label}: {describe(result)}"
    selected = result["selected"]
    epoch = selected.get("epoch", result.get("selected_epoch", 0) + 1)
    total = len(result.get("epochs") or []) or result["protocol"].get("epochs", "?")
    return f"{label}: {describe(result)}, selected epoch {epoch} of {total}"


def _valid_classes(result: dict) -> set[int]:
    positives = result["selected"].get("per_class", {}).get("positives") or []
    return {c for c, count in enumerate(positives) if count}


def _some_names(result: dict, ids: set[int], shown: int = 5) -> str:
    ordered = sorted(ids)
    names = [class_name(result, c) for c in ordered[:shown]]
    listed = ", ".join(name if name == f"class {c}" else f"{name} ({c})" for c, name in zip(ordered, names))
    return listed + (", ..." if len(ordered) > shown else "")


def _result_file(path: Path) -> Path:
    """A run directory stands for the result.json inside it."""
    return path / RESULT_FILE if path.is_dir() else path


def _run_name(path: Path) -> str:
    """A run's short name: its directory's for result.json, else the file's stem."""
    path = _result_file(Path(path))
    name = path.parent.resolve().name if path.name == RESULT_FILE else path.stem
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "run"


def _output_path(out: Path | None, beside: Path, names: tuple[str, str]) -> Path:
    default = f"compare-{names[0]}-vs-{names[1]}.png"
    if out is None:
        return beside / default
    out = Path(out)
    return out / default if out.is_dir() else out


def number_text(value: float, sign: bool = False) -> str:
    """A figure as the tables print it: 4 decimals (signed for a difference), nan as nan."""
    if math.isnan(value):
        return "nan"
    return f"{value:+.4f}" if sign else f"{value:.4f}"
