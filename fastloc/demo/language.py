"""The demo's language miniature: the baseline and a tiny text tower trained together on the
synthetic captions (contrastive, ``fastloc.demo.contrastive``), then zero-shot segmentation of the
synthetic classes by name (``python -m fastloc.probe zeroshot``, the manifest's class names) before
and after MaskEmbed aligns that encoder. Stages:

- ``contrastive``: from the image-level baseline's weights, both towers saved;
- ``align-clip``: MaskEmbed (the demo's ``align`` settings) on the contrastive image tower, exported;
- ``zeroshot-ROLE-READOUT`` for ROLE clip (before) and clip-maskembed (after), each readout of
  ``READOUTS``: NACLIP's knobs at the demo's scale (``ZEROSHOT``), its text tower the contrastive one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fastloc.demo.config import DemoConfig
from fastloc.demo.stages import aligned, device_of, precision, tag

ROLES = ("clip", "clip-maskembed")  # before and after MaskEmbed, the table's rows
READOUTS = ("clip", "maskclip", "naclip")  # the table's columns
# The harness's NACLIP knobs scaled to the demo's images as the harness's to VOC's: short side 96 and
# windows of 64 (the tiny ViT's side) every 32, as 336 with 224 every 112; PAMR off (its dilations 8
# and 16 are sized for 336-px images); no background rule (the set's background is a class).
ZEROSHOT: dict[str, Any] = {"benchmark": "manifest", "method": "naclip", "short_side": 96, "window": (64, 32)}
ZEROSHOT_PAMR = "off"
QUICK_IMAGES = 24  # --quick scores the first 24 validation images


def contrasted(cfg: DemoConfig, image_weights: str, train: Path, common: dict) -> tuple[dict, Callable[[], dict]]:
    """(inputs, work) of the contrastive stage; its files are named by the inputs' digest."""
    from fastloc.demo.contrastive import ContrastiveConfig

    settings = ContrastiveConfig(
        backbone=cfg.backbone,
        epochs=cfg.contrastive_epochs,
        seed=cfg.seed,
        workers=cfg.workers,
        precision=precision(cfg),
    )
    inputs = {**common, "image_weights": image_weights, "contrastive": asdict(settings)}
    folder = cfg.run_dir / "backbones"
    out_image, out_text = (folder / f"clip-{part}-{tag(inputs)}.safetensors" for part in ("image", "text"))

    def work() -> dict:
        from fastloc.demo.contrastive import contrastive

        record = contrastive(settings, train, Path(image_weights), out_image, out_text, device_of(cfg))
        return {"weights": str(out_image), "text_weights": str(out_text), **record}

    return inputs, work


def zeroshot_config(cfg: DemoConfig, role: str, readout: str, backbone: str, weights: str, text_weights: str):
    """A zero-shot run of one encoder and readout: the demo's data, device and folders, ``ZEROSHOT``'s knobs."""
    from fastloc.probe.zeroshot.config import ZeroShotConfig

    return ZeroShotConfig(
        data=cfg.data_dir / "synthetic",
        backbone=backbone,
        weights=weights,
        text_tower=cfg.backbone,
        text_weights=text_weights,
        readout=readout,
        pamr=ZEROSHOT_PAMR,
        max_images=QUICK_IMAGES if cfg.quick else 0,
        precision=precision(cfg),
        seed=cfg.seed,
        device=cfg.device,
        cache_dir=cfg.run_dir / "cache",
        out=cfg.run_dir / "probes",
        name=f"zeroshot-{role}-{readout}",
        results=cfg.run_dir / "results",
        **ZEROSHOT,
    )


def run_language(cfg: DemoConfig, stage: Callable[[str, dict, Callable[[], dict]], dict], image_weights: str, common):
    """Every language stage (each reused when done before); the rows {role: {readout: figures}}."""
    train = Path(common["data"]["train"])
    clip = stage("contrastive", *contrasted(cfg, image_weights, train, common))
    after = stage("align-clip", *aligned(cfg, "maskembed", clip["weights"], common))
    encoders = {"clip": (cfg.backbone, clip["weights"]), "clip-maskembed": (after["export"], "pretrained")}
    rows: dict[str, dict] = {}
    for role, (backbone, weights) in encoders.items():
        rows[role] = {}
        for readout in READOUTS:
            zcfg = zeroshot_config(cfg, role, readout, backbone, weights, clip["text_weights"])
            inputs = {**common, "role": role, "encoder": (backbone, weights), "zeroshot": asdict(zcfg)}
            record = stage(f"zeroshot-{role}-{readout}", inputs, scored(zcfg))
            rows[role][readout] = record["figures"]
    return rows


def scored(zcfg) -> Callable[[], dict]:
    def work() -> dict:
        import json

        from fastloc.probe.zeroshot.run import run

        out = run(zcfg)
        result = json.loads((out / "result.json").read_text())
        return {"run": str(out), "result": str(out / "result.json"), "figures": result["selected"]}

    return work


def table(rows: dict[str, dict]) -> str:
    """Zero-shot mIoU (and pixel accuracy) of each encoder under each readout."""
    head = f"{'':16}" + "".join(f"{f'{r} mIoU':>15}{f'{r} acc':>14}" for r in READOUTS)
    lines = [head, "-" * len(head)]
    for role in (r for r in ROLES if r in rows):
        cells = "".join(f"{rows[role][r]['miou']:>15.4f}{rows[role][r]['pixel_accuracy']:>14.4f}" for r in READOUTS)
        lines.append(f"{role:16}{cells}")
    return "\n".join(lines)
