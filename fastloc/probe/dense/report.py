"""What a dense protocol run leaves behind: result.json (the protocol's name and every knob, the
figures, per-class IoU) and rows of ``results/dense-PROTOCOL-DATASET.csv``, one per figure.

``python -m fastloc.probe compare`` reads these results beside Patch-Seg's: ``selected`` holds
the headline figures by name and ``per_class_iou`` the class table of each.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fastloc.probe.backbone import backbone_tag, describe
from fastloc.probe.dense.config import DenseConfig
from fastloc.probe.report import append_csv, check_csv, check_run_dir, write_json

COLUMNS = ("protocol", "dataset", "backbone", "weights", "skip_blocks", "image_size", "figure", "value", "knobs")
SEPARATOR = ", "


def run_dir(cfg: DenseConfig, dataset: str) -> Path:
    """RUN_DIR: --out/--name, or --out/PROTOCOL-DATASET-BACKBONE-sizeS-skipK (BACKBONE: an export's
    or a weights file's stem with a digest of its path, so two exports never share one)."""
    if cfg.name:
        return Path(cfg.out) / cfg.name
    backbone = backbone_tag(cfg.backbone, cfg.weights)
    return Path(cfg.out) / f"{cfg.protocol_name()}-{dataset}-{backbone}-size{cfg.image_size}-skip{cfg.skip_blocks}"


def results_csv(cfg: DenseConfig, dataset: str) -> Path:
    return Path(cfg.results) / f"dense-{cfg.protocol_name()}-{dataset}.csv"


def check_outputs(cfg: DenseConfig, dataset: str) -> None:
    """Before any work: the run directory's path is free for a folder and the results CSV takes
    this protocol's rows (a BadValue otherwise)."""
    check_run_dir("--name" if cfg.name else "--out", run_dir(cfg, dataset))
    check_csv(results_csv(cfg, dataset), COLUMNS)


def write_result(
    cfg: DenseConfig,
    protocol: dict[str, Any],
    data,
    labels,
    model,
    figures: dict[str, float],
    per_class_iou: dict[str, list[float]],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write result.json and the CSV rows; returns the run directory. ``protocol`` holds ``name``
    and every knob; ``figures`` the headline numbers (mIoU in [0, 1]) by name."""
    out = run_dir(cfg, data.dataset)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "protocol": protocol,
        "dataset": {
            "name": data.dataset,
            "train": str(data.train.root) if data.train is not None else None,
            "val": str(data.val.root),
            "num_classes": labels.num_classes,
            "classes": labels.names,
            "ignore": labels.ignore,
            "zero_is_ignore": labels.zero_is_ignore,
        },
        "backbone": describe(cfg.backbone, cfg.weights, model),
        "config": json.loads(json.dumps(asdict(cfg), default=str)),
        "selected": figures,
        "per_class_iou": per_class_iou,
        **(extra or {}),
    }
    write_json(out / "result.json", result)
    csv = results_csv(cfg, data.dataset)
    knobs = json.dumps({k: v for k, v in protocol.items() if k != "name"}, sort_keys=True, default=str)
    given = [protocol["name"], data.dataset, cfg.backbone, cfg.weights, str(cfg.skip_blocks), str(cfg.image_size)]
    rows = [[*given, figure, repr(float(value)), _quoted(knobs)] for figure, value in figures.items()]
    append_csv(csv, rows[0], COLUMNS, *rows[1:])
    for figure, value in figures.items():
        print(f"{protocol['name']} {figure}: {100 * value:.2f}")
    print(f"results: {out / 'result.json'}, {len(figures)} rows appended to {csv}")
    return out


def counted(counts) -> dict[str, int]:
    """How many pixels a SegCounts scored and how many were void: the figures' denominators."""
    return {"pixels_counted": int(counts.checked_counts().sum()), "pixels_void": int(counts.ignored)}


def _quoted(text: str) -> str:
    """The knobs' JSON as one CSV field (double quotes doubled)."""
    return '"' + text.replace('"', '""') + '"'
