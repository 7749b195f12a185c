"""Named alignment runs: the reference's recipes (MASKEMBED.md section 10), and ``tiny`` for a CPU.

Each preset is an ``AlignConfig`` built with ``dataclasses.replace``; the command line overrides
any field (``python -m fastloc.align train clip-vit-b --optim.lr 1e-4``). Image size, mean/std and
crop_pct come from the backbone's pretrained config at run time, not from here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import tyro

from fastloc.align.config import AlignConfig, DataConfig, OptimConfig, RunConfig, SystemConfig
from fastloc.align.maskembed import MaskEmbedConfig


def recipe(backbone: str, batch: int, accumulation: int, lr: float) -> AlignConfig:
    """The reference's IN-21k run of MaskEmbed: 5 epochs, ``batch`` x ``accumulation`` images per
    GPU and update, ``lr`` to ``lr`` / 10, no warmup."""
    base = AlignConfig()
    return replace(
        base,
        method=MaskEmbedConfig(backbone=backbone),
        data=replace(base.data, batch_size=batch * accumulation, accumulation=accumulation),
        optim=replace(base.optim, lr=lr),
    )


_RECIPES = {  # name: (micro-batch, accumulation, lr), as the reference's configs/
    "clip-vit-b": (256, 1, 3e-4),
    "clip-vit-l": (128, 2, 2e-4),
    "clip-vit-l-336": (32, 8, 2e-4),
    "openclip-vit-b": (256, 1, 3e-4),
    "dfn-vit-b": (256, 1, 3e-4),
    "siglip-vit-b": (256, 1, 3e-4),
    "siglip-vit-so400m": (64, 4, 2e-4),
    "siglip-vit-so400m-384": (16, 16, 2e-4),
    "dinov2-vit-b": (256, 1, 3e-4),
    "eva02-vit-b": (256, 1, 3e-4),
    "beit-vit-b": (256, 1, 3e-4),
    "beitv2-vit-b": (256, 1, 3e-4),
    "in1k-vit-t": (256, 1, 3e-4),
    "in1k-vit-s": (256, 1, 3e-4),
    "in1k-vit-b": (256, 1, 3e-4),
    "in1k-vit-l": (128, 2, 2e-4),
}

# A small random-initialized ViT on the synthetic shards (python -m fastloc.shard synthetic, train
# and val splits): the same code path as a ViT-B run, sized for 2 CPU cores.
TINY = AlignConfig(
    method=MaskEmbedConfig(backbone="tiny", weights="random"),
    data=DataConfig(
        train=Path("shards/synthetic/train"),
        val=Path("shards/synthetic/val"),
        batch_size=16,
        workers=2,
        threads=2,
        max_val_batches=4,
    ),
    optim=OptimConfig(epochs=1, lr=1e-3),
    system=SystemConfig(precision="fp32", compile=False),
    run=RunConfig(log_every=5, checkpoint_every=20),
)

PRESETS: dict[str, tuple[str, AlignConfig]] = {
    name: (f"the reference's {name}: IN-21k, 5 epochs, {b}x{a} per GPU, lr {lr:g}", recipe(name, b, a, lr))
    for name, (b, a, lr) in _RECIPES.items()
}
PRESETS["tiny"] = ("a small random ViT on the synthetic shards; CPU, fp32, 1 epoch", TINY)


def parse_train(args: Sequence[str], prog: str) -> tuple[AlignConfig, str]:
    """The config and preset name of ``PRESET [--section.field VALUE ...]`` (SystemExit on a usage
    error): one parser for ``python -m fastloc.align train`` and the launcher."""
    cfg = tyro.extras.overridable_config_cli(PRESETS, args=list(args), prog=prog)
    return cfg, next((a for a in args if a in PRESETS), "")
