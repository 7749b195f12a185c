"""The demo's verdict: the gates, the before/after table, the plots and a JSON summary.

Gates, in order (each printed): (1) the ceiling (patch labels) beats the floor (a random-init
ViT) clearly in macro AP, so the probe can see locality at all; (2) the baseline (image-level
labels) beats the floor, so pre-training taught it something; only then (3) aligned against
baseline. AP is threshold-free, so it is the judge; the original's best-epoch macro recall is
printed beside it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file

from fastloc.probe.report import write_json

ROLES = ("floor", "baseline", "aligned", "ceiling")
CLEAR_MARGIN = 0.05  # macro AP: the ceiling must beat the floor by this much for gate 1


def figures(result: dict) -> dict:
    """The row of one probe: the original's headline and the honest figures beside it."""
    selected, last = result["selected"], result["last"]
    row = {
        "recall_best_epoch": selected["macro_recall"],
        "precision": selected["macro_precision_nansafe"],
        "f1": selected["macro_f1_nansafe"],
        "ap_last": last["macro_ap"],
        "recall_last": last["macro_recall"],
        "precision_last": last["macro_precision_nansafe"],
    }
    for group, values in (last.get("groups") or {}).items():
        row[f"ap_{group}"] = values["macro_ap"]
        row[f"recall_{group}"] = values["macro_recall"]
    by_size = last.get("by_size")
    row["recall_by_size"] = by_size["macro_recall"] if by_size else None
    return row


def gates(rows: dict[str, dict]) -> list[tuple[str, bool, str]]:
    floor, ceiling, baseline = (rows[k]["ap_last"] for k in ("floor", "ceiling", "baseline"))
    first = ceiling > floor + CLEAR_MARGIN
    second = baseline > floor
    out = [
        ("1. ceiling beats floor (macro AP)", first, f"{ceiling:.4f} vs {floor:.4f} (margin {CLEAR_MARGIN})"),
        ("2. baseline beats floor (macro AP)", second, f"{baseline:.4f} vs {floor:.4f}"),
    ]
    if first and second:
        aligned = rows["aligned"]["ap_last"]
        out.append(("3. aligned beats baseline (macro AP)", aligned > baseline, f"{aligned:.4f} vs {baseline:.4f}"))
    return out


def table(rows: dict[str, dict]) -> str:
    columns = [
        ("recall (orig.)", "recall_best_epoch"),
        ("precision", "precision"),
        ("F1", "f1"),
        ("AP", "ap_last"),
        ("recall (last)", "recall_last"),
    ]
    groups = sorted({k[3:] for row in rows.values() for k in row if k.startswith("ap_") and k != "ap_last"})
    columns += [(f"AP {g}", f"ap_{g}") for g in groups]
    head = f"{'':10}" + "".join(f"{name:>16}" for name, _ in columns)
    lines = [head, "-" * len(head)]
    for role in ROLES:
        row = rows[role]
        lines.append(f"{role:10}" + "".join(f"{_fmt(row.get(key)):>16}" for _, key in columns))
    sizes_a, sizes_b = rows["baseline"]["recall_by_size"], rows["aligned"]["recall_by_size"]
    if sizes_a and sizes_b:
        lines += ["", "macro recall by object size (share of the image's patches), last epoch:"]
        lines.append(f"{'':10}" + "".join(f"{f'{k / 10:.1f}-{(k + 1) / 10:.1f}':>9}" for k in range(10)))
        for role, sizes in (("baseline", sizes_a), ("aligned", sizes_b)):
            lines.append(f"{role:10}" + "".join(f"{_fmt(v, 3):>9}" for v in sizes))
    return "\n".join(lines)


def _fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "nan"
    return f"{value:.{digits}f}"


def contact_sheet(results: dict[str, dict], backbones: dict[str, tuple[str, str]], path: Path, count: int = 4) -> Path:
    """The first validation images: truth and every probe's most confident class per patch."""
    from fastloc.data.shards import open_shards
    from fastloc.models.registry import image_config
    from fastloc.probe.backbone import load_backbone
    from fastloc.probe.heads import HeadShape, build_head
    from fastloc.probe.plots import plot_patch_maps
    from fastloc.probe.run import first_images, patch_classes, pixels, true_classes

    any_result = results["baseline"]
    val = open_shards(Path(any_result["dataset"]["val"]))
    classes = int(any_result["dataset"]["num_classes"])
    maps, images, image = {}, None, None
    for role in ROLES:
        name, weights = backbones[role]
        model = load_backbone(name, weights)
        image = image_config(model)
        if images is None:
            batch = first_images(val, image, count)
            images, maps["truth"] = batch.images, true_classes(batch.labels, image, classes)
        shape = HeadShape(
            int(model.num_features),
            int(model.blocks[0].attn.num_heads),
            image.prefix_tokens,
            image.grid**2,
            classes,
            "union",
        )
        head = build_head("transformer", shape)
        head.load_state_dict(load_file(str(Path(results[role]["run_dir"]) / "head.safetensors")))
        maps[role] = patch_classes(model, head, images, image, "fp32", torch.device("cpu"))
    title = "validation images: truth and each probe's most confident class per patch"
    return plot_patch_maps(pixels(images, image), maps, any_result["dataset"]["classes"], path, title)


def write_summary(path: Path, cfg_dict: dict, rows: dict, verdict: list, timings: dict) -> Path:
    gates_json = [{"gate": g, "passed": ok, "figures": text} for g, ok, text in verdict]
    config = json.loads(json.dumps(cfg_dict, default=str))
    return write_json(path, {"config": config, "rows": rows, "gates": gates_json, "timings_s": timings})


def load(path: Path) -> dict:
    result = json.loads(Path(path).read_text())
    result["run_dir"] = str(Path(path).parent)
    return result
