"""``python -m fastloc.probe zeroshot``: one benchmark of the harness over a shard set's evaluation split.

Every image is read as stored (``slide.read_sample``), normalised with the backbone's mean and std,
segmented at full resolution (segment.py) and counted against its label map mapped to the
benchmark's classes (``label_table``); the counts stay on the device, mIoU is mmseg's (dataset-level
intersections and unions, nanmean over classes) once at the end. Writes result.json (the protocol,
every knob beside the harness's, per-class IoU), rows of results/dense-zeroshot-DATASET.csv and
predictions.png (image, truth, prediction with the class names).
"""

from __future__ import annotations

import os
from dataclasses import asdict, replace
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from fastloc.models.exported import exported_metadata, is_export, load_exported
from fastloc.models.registry import WeightsError, image_config
from fastloc.models.text import TEMPLATES, TINY, NoTextTowerError, class_embeddings, load_text_tower, text_backbones
from fastloc.probe.dense import report
from fastloc.probe.dense.data import VOID, DenseData, LabelSpace, open_dense_data
from fastloc.probe.dense.metrics import SegCounts
from fastloc.probe.dense.slide import image_tensor, read_sample
from fastloc.probe.plots import plot_patch_maps
from fastloc.probe.report import checked_folders
from fastloc.probe.run import seed_everything, timed
from fastloc.probe.zeroshot.config import DEFAULT_BENCHMARK, MANIFEST, ZeroShotConfig, manifest_benchmark
from fastloc.probe.zeroshot.decide import BENCHMARKS, Benchmark
from fastloc.probe.zeroshot.pacl import is_embedder, load_embedder, with_embedder
from fastloc.probe.zeroshot.readout import create_tower
from fastloc.probe.zeroshot.segclip import (
    TOP_K,
    bg_threshold,
    class_texts,
    is_parts,
    load_parts,
    segment_harness,
    segment_segclip,
)
from fastloc.probe.zeroshot.segment import segment
from fastloc.progress import Progress
from fastloc.runtime import autocast, setup

PICTURE_SIDE = 224  # each picture row is shown at this square size
SEGCLIP_SIDE = 224  # SegCLIP's evaluation: short side 224, sliding windows 224 / 224 (main_seg_zeroshot.py)
SEGCLIP_TEMPLATE = "a photo of a {}."  # its one prompt


class ClassNamesError(ValueError):
    """The class-name file does not fit the benchmark's label set."""


def pick_benchmark(cfg: ZeroShotConfig, dataset: str) -> Benchmark:
    """--benchmark, or the one of the shard set's dataset (else the manifest's own classes)."""
    name = cfg.benchmark or DEFAULT_BENCHMARK.get(dataset, MANIFEST)
    return manifest_benchmark() if name == MANIFEST else BENCHMARKS[name]


def class_lines(cfg: ZeroShotConfig, bench: Benchmark, stored: list) -> tuple[list[str], str]:
    """The class-name lines and where they came from: --class-names, the harness's file, or the
    manifest's names (one query each)."""
    if cfg.class_names is not None:
        path = Path(cfg.class_names)
        if not path.is_file():
            raise ClassNamesError(f"--class-names {path}: no such file")
        return path.read_text().splitlines(), str(path)
    if bench.name == MANIFEST:
        return [str(name) for name in stored], "the shard set's manifest"
    repo, _, file = bench.settings(cfg.method).class_names.partition(" configs/")
    folder = "clearclip" if repo == "ClearCLIP" else "sclip"
    text = resources.files("fastloc.probe.zeroshot").joinpath("classes", folder, file).read_text()
    return text.splitlines(), f"{repo} configs/{file}"


def label_table(bench: Benchmark, manifest: dict) -> tuple[torch.Tensor, int]:
    """A lookup from stored label values to the benchmark's class indices and the number of classes C:
    identity, or reduce_zero_label (0 void, the rest one down); fastloc's 183-id COCO-Stuff space to
    mmseg's 171 used ids in order. The manifest's ignore value is VOID; any other value is C, which
    the counts refuse as out of range (the table's last entry catches every value beyond it)."""
    stored = len(manifest["classes"])
    ignore = (manifest.get("label") or {}).get("ignore")
    if bench.name == "coco_stuff164k" and stored == 183:
        unused = set(manifest.get("source", {}).get("unused_thing_ids", ()))
        ids = torch.tensor([i for i in range(1, stored) if i not in unused])
        classes, values = len(ids), torch.arange(len(ids))
    elif bench.reduce_zero_label:
        ids, classes = torch.arange(1, stored), stored - 1
        values = ids - 1
    else:
        ids, classes = torch.arange(stored), stored
        values = ids
    table = torch.full((max(stored, (ignore or 0) + 1) + 1,), classes, dtype=torch.int64)
    table[ids] = values
    if bench.reduce_zero_label or bench.name == "coco_stuff164k":
        table[0] = VOID
    if ignore is not None:
        table[ignore] = VOID
    return table, classes


def checked_lines(lines: list[str], classes: int, source: str, bench: Benchmark, dataset: str) -> list[str]:
    """The lines, if one per class of the label set (one clear line otherwise)."""
    lines = list(lines)
    while lines and not lines[-1].strip():  # trailing blank lines end the file; a blank line inside is an error
        lines.pop()
    blank = next((n for n, line in enumerate(lines, 1) if not line.strip()), None)
    if blank is not None:
        raise ClassNamesError(
            f"{source}: line {blank} is empty (the line number is the class: it would shift the rest)"
        )
    if len(lines) != classes:
        raise ClassNamesError(
            f"{source}: {len(lines)} class lines, but {dataset} under the {bench.name} benchmark has {classes} "
            "classes (one line each, the line number is the class)"
        )
    return lines


HEADS_BESIDE = (".embedder.safetensors", ".segclip.safetensors")  # what a PACL / SegCLIP export writes beside it


def head_file(cfg: ZeroShotConfig) -> str:
    """--head, or under auto for an export, the head its export wrote beside it (a PACL embedder,
    SegCLIP's parts: ``Objective.export_parts``), else auto."""
    if cfg.head != "auto" or not is_export(cfg.backbone):
        return cfg.head
    encoder = Path(cfg.backbone)
    found = [p for p in (encoder.with_name(encoder.stem + s) for s in HEADS_BESIDE) if p.is_file()]
    return str(found[0]) if found else "auto"


def vision_tower(cfg: ZeroShotConfig, tower: str, device: torch.device) -> tuple[torch.nn.Module, str]:
    """The image tower with its projection into the text space, and what the projection is."""
    head = given = head_file(cfg)
    if is_export(cfg.backbone):
        model = load_exported(Path(cfg.backbone))
        if head == "auto":  # the export dropped the projection: the base backbone's pretrained one, if any
            projection = create_tower(tower, "pretrained").head if tower != TINY else torch.nn.Identity()
            if isinstance(projection, torch.nn.Linear):
                model.reset_classifier(projection.out_features)
                model.head.load_state_dict(projection.state_dict())
            head = f"{tower} pretrained" if isinstance(projection, torch.nn.Linear) else "none"
    else:
        model = create_tower(cfg.backbone, cfg.weights)
        head = "own" if head == "auto" else head
    if head == "none":
        model.reset_classifier(0)
    elif head == given:  # a file
        load_head(model, Path(head))
    return model.to(device).eval().requires_grad_(False), head


def load_head(model: torch.nn.Module, path: Path) -> None:
    """head.weight [D_text, D] (and head.bias) from a safetensors file, or a PACL embedder (its
    file from python -m fastloc.align export): the plain clip readout is then PACL's compatibility."""
    if is_embedder(path):
        try:
            with_embedder(model, load_embedder(path))
        except ValueError as exc:
            raise WeightsError(f"--head {path}: {exc}") from None
        return
    try:
        state = load_file(str(path))
        weight = state["head.weight"]
        model.reset_classifier(weight.shape[0])
        model.head.load_state_dict({"weight": weight, "bias": state.get("head.bias", torch.zeros(weight.shape[0]))})
    except Exception as exc:
        raise WeightsError(
            f"--head {path}: not a projection head of a width-{model.num_features} backbone ({exc})"
        ) from None


def segclip_parts(cfg: ZeroShotConfig):
    """The SegCLIP objective of ``--backbone ENCODER --head ENCODER.segclip.safetensors``, or None;
    a ValueError for --rule segclip without one."""
    head = head_file(cfg)
    if head not in ("auto", "none") and is_parts(head):
        if not is_export(cfg.backbone):
            raise ValueError(f"--head {head}: SegCLIP's parts go with its exported encoder as --backbone")
        return load_parts(Path(cfg.backbone), Path(head))
    if cfg.rule == "segclip":
        raise ValueError("--rule segclip reads SegCLIP's groups: give --head ENCODER.segclip.safetensors (its export)")
    return None


def segclip_settings(cfg: ZeroShotConfig, settings):
    """SegCLIP's protocol (short side 224, windows 224 / 224, its own logit scale and thresholds, no
    PAMR), --short-side and --window still overriding."""
    short = cfg.short_side or SEGCLIP_SIDE
    window = (SEGCLIP_SIDE, SEGCLIP_SIDE) if cfg.window is None else settings.window
    return replace(settings, short_side=short, window=window, pamr=False)


def text_tower_name(cfg: ZeroShotConfig) -> str:
    """--text-tower, else the backbone's registry name (an export's, from its metadata)."""
    if cfg.text_tower:
        return cfg.text_tower
    if is_export(cfg.backbone):
        name = exported_metadata(Path(cfg.backbone)).get("backbone", "")
        if not name:
            raise ValueError(f"{cfg.backbone}: an export without its backbone's name; give --text-tower")
        return name
    return cfg.backbone


def run(cfg: ZeroShotConfig) -> Path:
    """Score the benchmark; returns the run directory."""
    cfg.validate()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("python -m fastloc.probe zeroshot runs in one process: start it without torchrun")
    tower = text_tower_name(cfg)
    if tower not in text_backbones():
        raise NoTextTowerError(
            f"{tower}: no text tower is paired with it, so no zero-shot readout; paired: {', '.join(text_backbones())}"
        )
    device = setup(cfg.device, flag="--device").device
    seed_everything(cfg.seed)
    timings: dict[str, float] = {}
    with checked_folders(*cfg.folders()):
        data = open_dense_data(cfg)
        bench = pick_benchmark(cfg, data.dataset)
        table, classes = label_table(bench, data.val.manifest)
        lines, source = class_lines(cfg, bench, data.classes)
        lines = checked_lines(lines, classes, source, bench, data.dataset)
        report.check_outputs(cfg, data.dataset)
    settings = cfg.settings(bench)
    groups = segclip_parts(cfg)  # a SegCLIP export's objective: its groups and its trained text tower
    if cfg.rule == "segclip":
        settings = segclip_settings(cfg, settings)
    with timed(timings, "text"):
        text, tokenizer = (
            (groups.trainable.text, groups.tokenizer) if groups else load_text_tower(tower, cfg.text_weights)
        )
        templates = [SEGCLIP_TEMPLATE] if cfg.rule == "segclip" else TEMPLATES
        cache = Path(cfg.cache_dir) / "text"
        embeddings, query_class = class_embeddings(text, tokenizer, lines, templates, cache_dir=cache)
        del text
    if groups:
        model, head = groups.trainable.to(device).eval().requires_grad_(False), head_file(cfg)
    else:
        model, head = vision_tower(cfg, tower, device)
    embeddings = embeddings.to(device)
    bg = bg_threshold(bench)
    texts = class_texts(embeddings.cpu(), query_class, bg is not None).to(device) if cfg.rule == "segclip" else None
    counts = SegCounts(classes, device, ignore=VOID)
    pictures: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    total = min(cfg.max_images or data.val.num_samples, data.val.num_samples)
    mean, std = (groups.image.mean, groups.image.std) if groups else (image_config(model).mean, image_config(model).std)
    bar = Progress(total, 0, f"zeroshot {bench.name}", unit="images")
    lut = table.to(device)
    with timed(timings, "segment"):
        try:
            for g in range(total):
                image, label = read_sample(data.val, g)
                x = image_tensor(image, mean, std)[0].to(device, non_blocking=True)
                with autocast(device, cfg.precision):
                    if cfg.rule == "segclip":
                        pred = segment_segclip(model, x, texts, bg, settings.short_side, settings.window)
                    elif groups:
                        pred = segment_harness(model, x, embeddings, query_class, settings, classes)
                    else:
                        pred = segment(model, x, embeddings, query_class, settings, cfg.readout, classes, cfg.std)
                target = torch.from_numpy(label.astype(np.int64)).to(device, non_blocking=True)
                target = lut[target.clamp(max=len(lut) - 1)]
                counts.update(pred, target)
                if len(pictures) < cfg.pictures:
                    pictures.append(picture(image, target, pred))
                bar.update(1)
        finally:
            bar.close()
    return finish(cfg, data, bench, settings, lines, source, counts, model, tower, head, pictures, timings, total)


def picture(image, target: torch.Tensor, pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One row of predictions.png at PICTURE_SIDE: image bilinear, maps nearest (VOID shown as -1)."""
    side = (PICTURE_SIDE, PICTURE_SIDE)
    pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None].float() / 255
    pixels = F.interpolate(pixels, size=side, mode="bilinear", align_corners=False)[0]
    maps = torch.stack([target, pred])[:, None].float().cpu()
    maps = F.interpolate(maps, size=side, mode="nearest")[:, 0].long()
    return pixels, maps[0], maps[1]


def finish(cfg, data: DenseData, bench, settings, lines, source, counts, model, tower, head, pictures, timings, total):
    """result.json, the CSV rows and the picture."""
    names = [line.split(", ")[0] for line in lines]
    iou = counts.iou()
    figures = {"miou": counts.miou(), "pixel_accuracy": counts.pixel_accuracy()}
    harness = asdict(bench.settings(cfg.method))
    protocol = {
        "name": "zeroshot",
        "benchmark": bench.name,
        "method": cfg.method,
        "rule": cfg.rule,
        "readout": "segclip groups" if is_parts(head) else cfg.readout,
        "settings": {**asdict(settings), "window": list(settings.window) if settings.window else None},
        "harness_settings": {**harness, "window": list(harness["window"]) if harness["window"] else None},
        "overridden": sorted(k for k, v in asdict(settings).items() if v != harness[k]),
        "class_names": source,
        "background": bench.background,
        "reduce_zero_label": bench.reduce_zero_label,
        "text_tower": tower,
        "text_weights": cfg.text_weights,
        "projection": head,
        "std": cfg.std,
        "images": total,
        "precision": cfg.precision,
        "metric": "mmseg IoUMetric: dataset-level intersections and unions, 255/void ignored, nanmean x 100",
    }
    if cfg.rule == "segclip":  # what decides instead of the settings' logit scale and prob_thd
        protocol["segclip_rule"] = {
            "top_k": TOP_K,
            "bg_thresh": bg_threshold(bench),
            "template": SEGCLIP_TEMPLATE,
            "logit_scale": float(model.text.logit_scale.exp().clamp(max=100)),
        }
    labels = LabelSpace(names, (data.val.manifest.get("label") or {}).get("ignore"), bench.reduce_zero_label)
    per_class = {"miou": [None if np.isnan(v) else float(v) for v in iou.tolist()]}
    extra = {"timings": timings, **report.counted(counts)}
    vision = model.vit if is_parts(head) else model  # SegCLIP's trainable: its timm tower
    out = report.write_result(cfg, protocol, data, labels, vision, figures, per_class, extra)
    if pictures:
        images, truth, pred = (torch.stack(column) for column in zip(*pictures))
        title = f"zero-shot {bench.name} ({cfg.method} knobs, {protocol['readout']} readout, {cfg.rule} rule)"
        title += f": mIoU {100 * figures['miou']:.2f}"
        plot_patch_maps(images, {"ground truth": truth, "prediction": pred}, names, out / "predictions.png", title)
    return out
