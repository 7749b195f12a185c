"""The demo's stages, each built from fastloc's own parts and reused when already done.

A stage records what it was made from in ``stage-NAME.json`` (written last); a re-run with the
same inputs reuses its output and says so, other inputs redo it. The stages:

1. ``data``: the synthetic set (``--difficulty demo``), train and val, via ``fastloc.shard``;
2. ``pretrain-image`` / ``pretrain-patch``: the baseline (image-level labels) and the ceiling
   (patch labels), ViTs trained from scratch (``fastloc.demo.pretrain``);
3. ``align`` (MaskEmbed, the ``tiny`` preset), ``align-leopart`` and ``align-neco`` (the
   ``leopart-tiny`` and ``neco-tiny`` presets), each from the baseline's weights via
   ``fastloc.align``, its encoder exported;
4. per role (floor: the random-init ViT, baseline, each objective's export, ceiling) ``probe-ROLE``
   (Patch-Seg, one recipe for all) and ``overcluster-ROLE``, ``hummingbird-ROLE``, ``knn-ROLE``
   (``fastloc.probe``'s dense protocols, their published recipes at the demo's scale: ``DENSE``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fastloc.demo.config import DemoConfig
from fastloc.demo.pretrain import PretrainConfig, pretrain
from fastloc.probe.config import ProbeConfig

if TYPE_CHECKING:
    from fastloc.probe.dense.config import DenseConfig


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


PRESETS = {"maskembed": "tiny", "leopart": "leopart-tiny", "neco": "neco-tiny"}  # objective -> align preset
ALIGN_STAGES = {"maskembed": "align", "leopart": "align-leopart", "neco": "align-neco"}  # objective -> stage


def aligned(cfg: DemoConfig, objective: str, weights: str, common: dict) -> tuple[dict, Callable[[], dict]]:
    """(inputs, work) of an objective's stage: its preset on the baseline's ``weights``, then its
    encoder exported; the run directory is named by the inputs' digest (a killed run with the same
    inputs resumes).

    MaskEmbed: the ``tiny`` preset, its teacher less ``cfg.skip_blocks`` blocks, ``cfg.align_epochs``,
    the best encoder by validation loss. Leopart and NeCo: the ``leopart-tiny`` / ``neco-tiny``
    presets unchanged (crops 32 + 16 px cut from the 64 px base: 4 x 4 and 2 x 2 patches of the
    tiny ViT; lr 1e-4, head 1e-3; 16 images per update) but for the epochs (``cfg.leopart_epochs``,
    ``cfg.neco_epochs``), and the last encoder: their losses chase a moving EMA teacher, so a lower
    validation loss is no better model (the references evaluate their last one)."""
    from fastloc.align.presets import PRESETS as ALIGN

    base = ALIGN[PRESETS[objective]][1]
    data = cfg.data_dir / "synthetic"
    if objective == "maskembed":
        method = replace(base.method, backbone=cfg.backbone, weights=weights, skip_blocks=cfg.skip_blocks)
        epochs, which, name = cfg.align_epochs, "best", "align"
    else:
        method = replace(base.method, backbone=cfg.backbone, weights=weights)
        epochs, which, name = getattr(cfg, f"{objective}_epochs"), "last", ALIGN_STAGES[objective]
    align = replace(
        base,
        method=method,
        data=replace(base.data, train=data / "train", val=data / "val", workers=cfg.workers),
        optim=replace(base.optim, epochs=epochs),
        system=replace(base.system, device=cfg.device, precision=precision(cfg)),
        run=replace(base.run, out=cfg.run_dir, name=name, seed=cfg.seed),
    )
    inputs = {**common, "align": asdict(align)}
    align = replace(align, run=replace(align.run, name=f"{name}-{tag(inputs)}"))

    def work() -> dict:
        from fastloc.align.export import export
        from fastloc.align.loop import train

        run = train(align, PRESETS[objective])
        return {"run": str(run), "export": str(export(run, which)), "checkpoint": which}

    return inputs, work


DENSE_PROTOCOLS = ("overcluster", "hummingbird", "knn")

# The dense protocols' published recipes at the demo's scale: the backbone's own input side (64 px:
# the synthetic images are 96-160 px) and label maps at that side (overcluster's 100 x 100 would
# only upsample them). Overclustering: K scaled from VOC's 21 classes to the demo's 8 (100 -> 38,
# many-to-one; 21 -> 8, one-to-one; the protocol's 300 and 500, 114 and 190 here, would cost
# about a minute per encoder on 2 cores), the protocol's PCA-50, 5 seeds x 5 restarts x 100
# iterations and batches of 60 with drop_last (360 of 400 val images). Hummingbird's bank of
# 102,400 patches (51 of each of the 2,000 training images' 64), 30 neighbours at 0.02; DINO's
# k-NN (k 20, T 0.07) on the class token, the train split as the bank.
HUMMINGBIRD_MEMORY = 102_400  # the reference script's bank; a smaller training split banks every patch
DENSE: dict[str, dict[str, Any]] = {
    "overcluster": {"clusters": (38, 8)},
    "hummingbird": {},
    "knn": {},
}
# --quick (the tests'): one short clustering per K, Hummingbird's bank from the first 64 training images
QUICK_DENSE = {"overcluster": {"seeds": 1, "restarts": 1, "iterations": 20}, "hummingbird": {"train_images": 64}}


def dense_config(cfg: DemoConfig, protocol: str, role: str, backbone: str, weights: str) -> DenseConfig:
    """A dense protocol's config for one role: the demo's data, device and folders (results under
    ``probes/PROTOCOL-ROLE``, the feature cache beside Patch-Seg's), ``DENSE``'s settings."""
    from fastloc.models.registry import create_model, image_config
    from fastloc.probe.dense.config import PROTOCOLS

    image = image_config(create_model(cfg.backbone, "random"))  # knn's size 0 is already the backbone's own
    sides = {
        "overcluster": {"image_size": image.size, "mask_size": image.size},
        "hummingbird": {"image_size": image.size},
    }
    knobs = sides.get(protocol, {}) | DENSE[protocol] | (QUICK_DENSE.get(protocol, {}) if cfg.quick else {})
    if protocol == "hummingbird":  # the reference's bank where the training images hold it, else every patch
        patches = (knobs.get("train_images") or cfg.train_images) * image.grid**2
        knobs["memory_size"] = HUMMINGBIRD_MEMORY if patches >= HUMMINGBIRD_MEMORY else 0  # it refuses a larger bank
    cpu = device_of(cfg).type == "cpu"
    return PROTOCOLS[protocol](
        data=cfg.data_dir / "synthetic",
        backbone=backbone,
        weights=weights,
        precision=precision(cfg),
        seed=cfg.seed,
        device=cfg.device,
        loader="cpu" if cpu else "auto",
        workers=0 if cpu else cfg.workers,
        cache_dir=cfg.run_dir / "cache",
        out=cfg.run_dir / "probes",
        name=f"{protocol}-{role}",
        results=cfg.run_dir / "results",
        **knobs,
    )


def dense_probed(dense_cfg: DenseConfig) -> Callable[[], dict]:
    def work() -> dict:
        from fastloc.probe.dense import hummingbird, knn, overcluster

        runs = {"overcluster": overcluster.run, "hummingbird": hummingbird.run, "knn": knn.run}
        run = runs[dense_cfg.protocol_name()](dense_cfg)
        return {"run": str(run), "result": str(run / "result.json")}

    return work
