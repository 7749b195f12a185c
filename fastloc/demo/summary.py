"""The demo's verdict: the gates, the table (one row per role, a column per figure), the plots
and a JSON summary.

Gates, in order (each printed): (1) the ceiling (patch labels) beats the floor (a random-init
ViT) clearly in Patch-Seg macro AP, so the probe can see locality at all; (2) the baseline
(image-level labels) beats the floor, so pre-training taught it something; only then (3, 4, ...)
each objective against the baseline. AP is threshold-free, so it is the judge; the original's
best-epoch macro recall, the dense protocols' mIoU and the k-NN accuracy are printed beside it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file

from fastloc.demo.config import OBJECTIVES  # the roles post-trained from the baseline
from fastloc.probe.report import write_json

ROLES = ("floor", "baseline", "maskembed", "leopart", "neco", "ceiling")  # the table's rows, in order
CLEAR_MARGIN = 0.05  # macro AP: the ceiling must beat the floor by this much for gate 1


def roles(objectives: tuple[str, ...]) -> tuple[str, ...]:
    """The roles a run with these objectives probes, in the table's order."""
    return tuple(r for r in ROLES if r not in OBJECTIVES or r in objectives)


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


def dense_figures(protocol: str, result: dict) -> dict:
    """Every headline figure of a dense protocol's result, keyed PROTOCOL_FIGURE (overcluster_miou_k38,
    hummingbird_miou, knn_top1, ...)."""
    return {f"{protocol}_{name}": value for name, value in result["selected"].items()}


def gates(rows: dict[str, dict]) -> list[tuple[str, bool, str]]:
    floor, ceiling, baseline = (rows[k]["ap_last"] for k in ("floor", "ceiling", "baseline"))
    first = ceiling > floor + CLEAR_MARGIN
    second = baseline > floor
    out = [
        ("1. ceiling beats floor (macro AP)", first, f"{ceiling:.4f} vs {floor:.4f} (margin {CLEAR_MARGIN})"),
        ("2. baseline beats floor (macro AP)", second, f"{baseline:.4f} vs {floor:.4f}"),
    ]
    if first and second:
        for number, role in enumerate((r for r in OBJECTIVES if r in rows), start=3):
            ap = rows[role]["ap_last"]
            out.append((f"{number}. {role} beats baseline (macro AP)", ap > baseline, f"{ap:.4f} vs {baseline:.4f}"))
    return out


def columns(rows: dict[str, dict]) -> list[tuple[str, str]]:
    """(heading, key) of the table: Patch-Seg's AP (all, then each class group) and best-epoch recall,
    then whichever dense figures the rows hold: overclustering mIoU per K, Hummingbird mIoU, k-NN top-1."""
    keys = {k for row in rows.values() for k in row}
    groups = sorted(k[3:] for k in keys if k.startswith("ap_") and k != "ap_last")
    out = [("AP", "ap_last"), *((f"AP {g}", f"ap_{g}") for g in groups), ("rec. orig.", "recall_best_epoch")]
    clusters = sorted((int(k.rsplit("_k", 1)[1]) for k in keys if k.startswith("overcluster_miou_k")), reverse=True)
    out += [(f"oc K={k}", f"overcluster_miou_k{k}") for k in clusters]
    dense = (("Hb mIoU", "hummingbird_miou"), ("k-NN top1", "knn_top1"))
    return out + [(name, key) for name, key in dense if key in keys]


def table(rows: dict[str, dict]) -> str:
    """One line per role (ROLES' order): Patch-Seg AP and the original's best-epoch recall (rec. orig.),
    overclustering (oc) and Hummingbird (Hb) mIoU, k-NN top-1; then the macro recall by object size of
    the baseline and each objective."""
    cols = columns(rows)
    head = f"{'':10}" + "".join(f"{name:>11}" for name, _ in cols)
    lines = [head, "-" * len(head)]
    for role in (r for r in ROLES if r in rows):
        lines.append(f"{role:10}" + "".join(f"{_fmt(rows[role].get(key)):>11}" for _, key in cols))
    sized = [r for r in ("baseline", *OBJECTIVES) if (rows.get(r) or {}).get("recall_by_size")]
    if len(sized) > 1:
        lines += ["", "Patch-Seg macro recall by object size (share of the image's patches), last epoch:"]
        lines.append(f"{'':10}" + "".join(f"{f'{k / 10:.1f}-{(k + 1) / 10:.1f}':>9}" for k in range(10)))
        for role in sized:
            lines.append(f"{role:10}" + "".join(f"{_fmt(v, 3):>9}" for v in rows[role]["recall_by_size"]))
    return "\n".join(lines)


def _fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "nan"
    return f"{value:.{digits}f}"


def contact_sheet(results: dict[str, dict], backbones: dict[str, tuple[str, str]], path: Path, count: int = 4) -> Path:
    """The first validation images: truth and every Patch-Seg probe's most confident class per patch
    (``results`` by role, in the table's order)."""
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
    for role in results:
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


def write_summary(path: Path, cfg_dict: dict, rows: dict, verdict: list, timings: dict, language: dict) -> Path:
    """summary.json: the config, the rows, the gates, the stages' seconds and the language miniature's
    zero-shot rows ({role: {readout: figures}}, empty without it)."""
    gates_json = [{"gate": g, "passed": ok, "figures": text} for g, ok, text in verdict]
    config = json.loads(json.dumps(cfg_dict, default=str))
    body = {"config": config, "rows": rows, "gates": gates_json, "timings_s": timings, "zeroshot": language}
    return write_json(path, body)


def load(path: Path) -> dict:
    result = json.loads(Path(path).read_text())
    result["run_dir"] = str(Path(path).parent)
    return result
