"""The card's files: card.md (the table, its warnings, how each run came about, the backbones'
differences), card.csv (the same table), card.json (every protocol's knobs, config and result
path) and card.png (grouped bars per protocol).

A row is one protocol's one figure, labelled with the data and resolution it was measured at;
several backbones add a column of differences from the first. Protocols that disagree on data or
resolution (with each other, or between backbones) get a warning under the table. Nothing is
averaged across protocols.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from fastloc.probe.card.run import Cell
from fastloc.probe.compare import comparable, number_text
from fastloc.probe.plots import as_float, is_dense, save_figure
from fastloc.probe.report import write_json

PATCH_SEG_FIGURES = ("macro_recall", "macro_ap", "macro_precision_nansafe")  # of the selected epoch
# knobs that are facts of the backbone, so they differ between backbones measured alike
BACKBONE_FACTS = ("backbone_digest", "feature_layer", "patch_size", "grid")


def figures(result: dict) -> dict[str, float]:
    """A result's headline figures by name: Patch-Seg's of its selected epoch, a dense protocol's all."""
    selected = result["selected"]
    if not is_dense(result):
        return {name: as_float(selected.get(name)) for name in PATCH_SEG_FIGURES}
    return {name: as_float(value) for name, value in selected.items()}


def data_of(result: dict) -> str:
    """The data a result was measured on: DATASET TRAIN -> VAL (split folder names), or DATASET VAL."""
    dataset = result["dataset"]
    val, train = Path(dataset["val"]).name, dataset.get("train")
    return f"{dataset['name']} {Path(train).name} -> {val}" if train else f"{dataset['name']} {val}"


def resolution_of(result: dict) -> str:
    """The backbone's input: its side, dinov3's crops and short side, zero-shot's short side and window."""
    protocol = result["protocol"]
    if protocol.get("name") == "zeroshot":
        settings = protocol["settings"]
        window = settings["window"]
        shown = f"window {window[0]}/{window[1]}" if window else "whole image"
        return f"short side {settings['short_side']}, {shown}"
    if protocol.get("name") == "linear-dinov3-ade20k":
        return f"{protocol['crop_size']} px crops, short side {protocol['evaluation']['short_side']}"
    if not is_dense(result):
        return f"{protocol['image_size']} px"
    side = (result.get("config") or {}).get("image_size") or result["backbone"]["image"]["size"]
    return f"{side} px"


def joined(values: dict[str, str]) -> str:
    """One value when every backbone has it, else each backbone's."""
    if len(set(values.values())) == 1:
        return next(iter(values.values()))
    return "; ".join(f"{label}: {value}" for label, value in values.items())


def table_rows(cells: list[Cell], columns: list[str]) -> list[dict]:
    """One row per protocol and figure, in the card's order: data, resolution and value per backbone,
    and each backbone's difference from the first."""
    rows = []
    for protocol in dict.fromkeys(c.protocol for c in cells):
        done = {c.label: c.result for c in cells if c.protocol == protocol and c.result is not None}
        if not done:
            continue
        names = dict.fromkeys(name for result in done.values() for name in figures(result))
        for name in names:
            values = {
                label: figures(done[label]).get(name, math.nan) if label in done else math.nan for label in columns
            }
            first = values[columns[0]]
            rows.append(
                {
                    "protocol": protocol,
                    "metric": name,
                    "data": {label: data_of(result) for label, result in done.items()},
                    "resolution": {label: resolution_of(result) for label, result in done.items()},
                    "values": values,
                    "differences": {label: values[label] - first for label in columns[1:]},
                }
            )
    return rows


def warnings(cells: list[Cell]) -> list[str]:
    """Where protocols disagree on data or resolution: between the backbones of one protocol, and
    between protocols."""
    lines = []
    done = [c for c in cells if c.result is not None]
    for protocol in dict.fromkeys(c.protocol for c in done):
        mine = [c for c in done if c.protocol == protocol]
        for what, read in (("data", data_of), ("resolution", resolution_of)):
            seen = {c.label: read(c.result) for c in mine}
            if len(set(seen.values())) > 1:
                lines.append(f"warning: {protocol}: the backbones differ in {what} ({joined(seen)})")
    for what, read in (("data", data_of), ("resolution", resolution_of)):
        by_value: dict[str, list[str]] = {}
        for c in done:
            by_value.setdefault(read(c.result), [])
            if c.protocol not in by_value[read(c.result)]:
                by_value[read(c.result)].append(c.protocol)
        if len(by_value) > 1:
            listed = "; ".join(f"{value}: {', '.join(protocols)}" for value, protocols in by_value.items())
            lines.append(f"warning: the protocols differ in {what} ({listed}): read each row on its own")
    return lines


def differences(cells: list[Cell], columns: list[str]) -> list[str]:
    """The backbones' own facts, then how each protocol's runs differ from the first backbone's
    beyond the backbone itself (``compare.comparable``'s lines)."""
    if len(columns) < 2:
        return []
    lines = []
    for label in columns:
        described = next((c.result["backbone"] for c in cells if c.label == label and c.result is not None), None)
        if described:
            facts = f"{described['timm_id']}, {described['blocks']} blocks, width {described['width']}"
            lines.append(f"{label}: {described['name']} ({described['weights']}; {facts})")
    for protocol in dict.fromkeys(c.protocol for c in cells):
        done = {c.label: c.result for c in cells if c.protocol == protocol and c.result is not None}
        first = done.get(columns[0])
        for label in (c for c in columns[1:] if c in done and first is not None):
            for line in comparable(first, done[label]):
                if not line.startswith(tuple(f"protocol {fact}:" for fact in BACKBONE_FACTS)):
                    named = line.replace("(A)", f"({columns[0]})").replace("(B)", f"({label})")
                    lines.append(f"{protocol}: {named}")
    return lines


def table(rows: list[dict], columns: list[str]) -> list[list[str]]:
    """The card's table as text cells, header first (Markdown and CSV share it)."""
    head = ["protocol", "metric", "data", "resolution", *columns, *(f"{c} - {columns[0]}" for c in columns[1:])]
    body = [
        [
            row["protocol"],
            row["metric"],
            joined(row["data"]),
            joined(row["resolution"]),
            *(number_text(row["values"][c]) for c in columns),
            *(number_text(row["differences"][c], sign=True) for c in columns[1:]),
        ]
        for row in rows
    ]
    return [head, *body]


def markdown_table(cells_text: list[list[str]]) -> list[str]:
    head, *body = cells_text
    line = lambda cells: "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"  # noqa: E731
    return [line(head), line(["---"] * len(head)), *(line(row) for row in body)]


def markdown(cells: list[Cell], rows: list[dict], columns: list[str]) -> str:
    """card.md: the table, the warnings, each run's status and result, the differences."""
    lines = [f"# Card: {' vs '.join(columns)}", ""]
    lines += markdown_table(table(rows, columns)) if rows else ["no protocol has a result"]
    lines += ["", *(f"- {line}" for line in warnings(cells)), ""]  # a list: each warning its own line when rendered
    lines += ["Nothing is averaged across protocols: each row is one protocol's figure.", ""]
    lines += ["## Runs", ""]
    runs = [["protocol", "backbone", "status", "result"]]
    runs += [[c.protocol, c.label, c.status, str(c.result_path) if c.result is not None else ""] for c in cells]
    lines += markdown_table(runs)
    found = differences(cells, columns)
    if found:
        lines += ["", "## Differences", "", *(f"- {line}" for line in found)]
    return "\n".join(lines) + "\n"


def csv_text(rows: list[dict], columns: list[str]) -> str:
    """card.csv: the table with full-precision numbers (repr; nan where there is none)."""
    out = io.StringIO()
    writer = csv.writer(out)
    head, *body = table(rows, columns)
    writer.writerow(head)
    for row, text in zip(rows, body):
        numbers = [repr(float(row["values"][c])) for c in columns]
        numbers += [repr(float(row["differences"][c])) for c in columns[1:]]
        writer.writerow([*text[:4], *numbers])
    return out.getvalue()


def card_json(options: dict, cells: list[Cell], rows: list[dict], columns: list[str]) -> dict:
    """card.json: the card's options, each run (status, command line, result path, the protocol's
    knobs and full config), the table's rows, the warnings and differences."""
    runs = []
    for c in cells:
        run = {"protocol": c.protocol, "backbone": c.backbone, "label": c.label, "status": c.status}
        if c.plan is not None:
            run |= {"args": list(c.plan.args), "run_dir": str(c.plan.run_dir)}
        if c.result is not None:
            run |= {
                "result": str(c.result_path),
                "data": data_of(c.result),
                "resolution": resolution_of(c.result),
                "figures": figures(c.result),
                "knobs": c.result["protocol"],
                "config": c.result.get("config"),
            }
        runs.append(run)
    backbones = {c.label: c.backbone for c in cells}
    return {
        "card": options,
        "backbones": [{"name": backbones[label], "label": label} for label in columns],
        "runs": runs,
        "rows": rows,
        "warnings": warnings(cells),
        "differences": differences(cells, columns),
    }


def plot(rows: list[dict], columns: list[str], path: Path) -> Path:
    """card.png: one panel per protocol, its figures as groups of bars, one bar per backbone (each
    panel on its own axis: figures of different protocols are never put on one scale)."""
    protocols = list(dict.fromkeys(row["protocol"] for row in rows))
    panels = max(len(protocols), 1)
    across = min(panels, 4)
    down = math.ceil(panels / across)
    fig = Figure(figsize=(4.2 * across, 3.4 * down), layout="constrained")
    axes = np.atleast_1d(fig.subplots(down, across, squeeze=False).ravel())
    width = 0.8 / len(columns)
    for ax, protocol in zip(axes, protocols):
        mine = [row for row in rows if row["protocol"] == protocol]
        x = np.arange(len(mine))
        for k, label in enumerate(columns):
            heights = [0.0 if math.isnan(row["values"][label]) else row["values"][label] for row in mine]
            ax.bar(x + (k - (len(columns) - 1) / 2) * width, heights, width, label=label)
        ax.set_xticks(x, [row["metric"] for row in mine], fontsize=7, rotation=20)
        ax.set_title(f"{protocol}\n{joined(mine[0]['data'])}, {joined(mine[0]['resolution'])}", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=6)
    for ax in axes[len(protocols) :]:
        ax.set_axis_off()
    if not protocols:
        axes[0].text(0.5, 0.5, "no protocol has a result", ha="center", va="center")
    return save_figure(fig, path)


def write_card(folder: Path, cells: list[Cell], columns: list[str], options: dict) -> Path:
    """Write the four files into ``folder`` (``columns``: the backbones' labels in order,
    ``options``: what card.json records of how the card was asked for); card.md's path."""
    rows = table_rows(cells, columns)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "card.md").write_text(markdown(cells, rows, columns))
    (folder / "card.csv").write_text(csv_text(rows, columns))
    write_json(folder / "card.json", card_json(options, cells, rows, columns))
    plot(rows, columns, folder / "card.png")
    return folder / "card.md"
