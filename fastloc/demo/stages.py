"""The demo's stages, each built from fastloc's own parts and reused when already done.

A stage records what it was made from in ``stage-NAME.json`` (written last); a re-run with the
same inputs reuses its output and says so, other inputs redo it. The stages:

1. ``data``: the synthetic set (``--difficulty demo``), train and val, via ``fastloc.shard``;
2. ``pretrain-image`` / ``pretrain-patch``: the baseline (image-level labels) and the ceiling
   (patch labels), ViTs trained from scratch (``fastloc.demo.pretrain``);
3. ``probe-*``: Patch-Seg (``fastloc.probe``) of the floor (the random-init ViT), the ceiling,
   the baseline and, after ``align`` (``fastloc.align``, the ``tiny`` preset on the baseline),
   the aligned export; one probe recipe for all four.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from fastloc.demo.config import DemoConfig
from fastloc.demo.pretrain import PretrainConfig, pretrain
from fastloc.probe.config import ProbeConfig


def tag(inputs: dict[str, Any]) -> str:
    """A short digest of a stage's inputs: it names the stage's outputs, so that a later stage
    whose inputs name them is redone whenever an earlier one is."""
    text = json.dumps(inputs, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=4).hexdigest()


def run_stage(run_dir: Path, name: str, inputs: dict[str, Any], work: Callable[[], dict]) -> dict:
    """``work()`` unless ``stage-NAME.json`` says it was done with these ``inputs``; its record."""
    path = run_dir / f"stage-{name}.json"
    inputs = json.loads(json.dumps(inputs, default=str))
    if path.is_file():
        record = json.loads(path.read_text())
        if record.get("inputs") == inputs:
            print(f"[{name}] done before: reusing {path.parent}")
            return record
    print(f"[{name}] running")
    record = {"inputs": inputs, "outputs": json.loads(json.dumps(work(), default=str))}
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)
    return record


IMAGE_SIZES = {"min_size": 96, "max_size": 160}  # at 64 px input, a 1/12-1/6 texture period is 5-11 px


def make_data(cfg: DemoConfig) -> dict:
    """The synthetic shard set (its converter reuses finished shards)."""
    from fastloc.shard.convert import convert
    from fastloc.shard.sources.synthetic import SyntheticConfig

    sizes = {"train": cfg.train_images, "val": cfg.val_images}
    for split, count in sizes.items():
        convert(
            SyntheticConfig(
                out=cfg.data_dir,
                split=split,
                num_samples=count,
                difficulty="demo",
                **IMAGE_SIZES,
                processes=max(1, cfg.workers),
                progress=True,
            )
        )
    return {split: str(cfg.data_dir / "synthetic" / split) for split in sizes}


def device_of(cfg: DemoConfig) -> torch.device:
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if cuda else "cpu")


def precision(cfg: DemoConfig) -> str:
    """bf16 on a GPU; fp32 on a CPU, where bf16 matmuls are several times slower."""
    return "bf16" if device_of(cfg).type == "cuda" else "fp32"


def pretrained(cfg: DemoConfig, supervision: str, train: Path, common: dict) -> tuple[dict, Callable[[], dict]]:
    """(inputs, work) of a pre-training stage; its weights file is named by the inputs' digest."""
    settings = PretrainConfig(
        supervision=supervision,
        backbone=cfg.backbone,
        epochs=cfg.pretrain_epochs,
        seed=cfg.seed,
        workers=cfg.workers,
        precision=precision(cfg),
    )

    inputs = {**common, "pretrain": asdict(settings)}
    out = cfg.run_dir / "backbones" / f"{supervision}-{tag(inputs)}.safetensors"

    def work() -> dict:
        return {"weights": str(out), **pretrain(settings, train, out, device_of(cfg))}

    return inputs, work


def probe_config(cfg: DemoConfig, name: str, backbone: str, weights: str) -> ProbeConfig:
    """One recipe for every backbone: union, transformer head, the same seed and epochs; warmup a
    tenth of the updates (the original's 500 would be most of this short run)."""
    probe = ProbeConfig(
        data=cfg.data_dir / "synthetic",
        backbone=backbone,
        weights=weights,
        epochs=cfg.probe_epochs,
        precision=precision(cfg),
        seed=cfg.seed,
        device=cfg.device,
        loader="cpu" if device_of(cfg).type == "cpu" else "auto",
        workers=0 if device_of(cfg).type == "cpu" else cfg.workers,
        cache_dir=cfg.run_dir / "cache",
        out=cfg.run_dir / "probes",
        name=name,
        results=cfg.run_dir / "results",
        predictions=0,
    )
    updates = cfg.probe_epochs * (cfg.train_images // probe.batch_size)
    return replace(probe, warmup_updates=max(1, updates // 10))


def probed(probe_cfg: ProbeConfig) -> Callable[[], dict]:
    def work() -> dict:
        from fastloc.probe.run import probe

        run = probe(probe_cfg)
        return {"run": str(run), "result": str(run / "result.json")}

    return work


def aligned(cfg: DemoConfig, weights: str, common: dict) -> tuple[dict, Callable[[], dict]]:
    """MaskEmbed's ``tiny`` preset on the baseline (its teacher less ``cfg.skip_blocks`` blocks),
    then its best encoder exported; the run directory is named by the inputs' digest (a killed
    run with the same inputs resumes)."""
    from fastloc.align.presets import PRESETS

    base = PRESETS["tiny"][1]
    data = cfg.data_dir / "synthetic"
    align = replace(
        base,
        method=replace(base.method, backbone=cfg.backbone, weights=weights, skip_blocks=cfg.skip_blocks),
        data=replace(base.data, train=data / "train", val=data / "val", workers=cfg.workers),
        optim=replace(base.optim, epochs=cfg.align_epochs),
        system=replace(base.system, device=cfg.device, precision=precision(cfg)),
        run=replace(base.run, out=cfg.run_dir, name="align", seed=cfg.seed),
    )
    inputs = {**common, "align": asdict(align)}
    align = replace(align, run=replace(align.run, name=f"align-{tag(inputs)}"))

    def work() -> dict:
        from fastloc.align.export import export
        from fastloc.align.loop import train

        run = train(align, "tiny")
        return {"run": str(run), "export": str(export(run, "best"))}

    return inputs, work
