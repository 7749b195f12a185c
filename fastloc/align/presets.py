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
from fastloc.align.leopart import LeopartConfig
from fastloc.align.maskembed import MaskEmbedConfig
from fastloc.align.neco import NecoConfig
from fastloc.align.pacl import PaclConfig
from fastloc.align.segclip import SegclipConfig
from fastloc.data.multicrop import MultiCrop


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

# Leopart and NeCo as their references train (OTHER-METHODS.md section 1, NECO-AND-GRAM.md A2):
# AdamW with the backbone's and the head's learning rates, both cosine to 0 per update, weight
# decay cosine 0.04 -> 0.5 on weights only, no clipping, fp32.
DENSE_OPTIM = OptimConfig(
    lr=1e-5,
    head_lr=1e-4,
    min_lr_ratio=0.0,
    betas=(0.9, 0.999),
    weight_decay=0.04,
    weight_decay_end=0.5,
    no_decay_norms_and_biases=True,
    clip_grad_norm=0.0,
)


def dense(method, data: str, batch: int, epochs: int, lr: float) -> AlignConfig:
    """A Leopart or NeCo run on ``data``'s shards (OUT/data/{train,val}), ``batch`` per GPU."""
    return AlignConfig(
        method=method,
        data=DataConfig(train=Path(f"shards/{data}/train"), val=Path(f"shards/{data}/val"), batch_size=batch),
        optim=replace(DENSE_OPTIM, epochs=epochs, lr=lr),
        system=SystemConfig(precision="fp32"),
    )


DENSE = {
    "leopart-vits16-in100": (
        "Leopart's reference run: DINO ViT-S/16, ImageNet-100 shards, 2 GPUs x 32, 50 epochs, fg mask",
        dense(LeopartConfig(backbone="dino-vit-s"), "imagenet100", 32, 50, 1e-5),
    ),
    "leopart-clip-vit-b": (
        "Leopart on CLIP ViT-B/16: COCO shards, 2 GPUs x 32, 50 epochs, loss mask all (its class token "
        "attends to the background)",
        dense(LeopartConfig(backbone="clip-vit-b", loss_mask="all"), "coco", 32, 50, 1e-5),
    ),
    "neco-dinov2-vitb14": (
        "NeCo's published run: DINOv2 ViT-B/14, COCO train2017 shards, 518 + 98 px crops, 1 GPU x 16, 25 epochs",
        dense(NecoConfig(backbone="dinov2-vit-b14", crops=MultiCrop(sizes=(518, 98))), "coco", 16, 25, 5e-6),
    ),
}

PRESETS: dict[str, tuple[str, AlignConfig]] = {
    name: (f"the reference's {name}: IN-21k, 5 epochs, {b}x{a} per GPU, lr {lr:g}", recipe(name, b, a, lr))
    for name, (b, a, lr) in _RECIPES.items()
}
PRESETS["tiny"] = ("a small random ViT on the synthetic shards; CPU, fp32, 1 epoch", TINY)
PRESETS |= DENSE

# Leopart and NeCo on the tiny ViT and the synthetic shards: 32 + 16 px crops (4 x 4 and 2 x 2 patches)
# cut from one 64 px image, a narrow head, pairs compared on 3 x 3 cells (NeCo sorts 9 references,
# not 49: the CPU's cost), a queue that fills in 3 updates of 16.
_TINY_DENSE = {"backbone": "tiny", "weights": "random", "crops": MultiCrop(sizes=(32, 16)), "roi_kernel": 3}
_TINY_DENSE |= {"head_hidden": 64, "head_dim": 32, "queue_length": 480}
_TINY_OPTIM = replace(DENSE_OPTIM, epochs=1, lr=1e-4, head_lr=1e-3)
PRESETS["leopart-tiny"] = (
    "Leopart on the tiny random ViT and the synthetic shards; CPU, fp32, 1 epoch",
    replace(TINY, method=LeopartConfig(**_TINY_DENSE, prototypes=16), optim=_TINY_OPTIM),
)
PRESETS["neco-tiny"] = (
    "NeCo on the tiny random ViT and the synthetic shards; CPU, fp32, 1 epoch",
    replace(TINY, method=NecoConfig(**_TINY_DENSE), optim=_TINY_OPTIM),
)


# PACL as the paper trains it (OTHER-METHODS.md section 3): frozen CLIP towers, the embedder by
# AdamW (0.9, 0.98), eps 1e-6, weight decay 0.2 (not on biases and the temperature: CLIP's rule),
# cosine to 0, 10 epochs, 1,024 per GPU x 4 GPUs; on COCO captions (the paper: 30 M web pairs).
# Warmup and clipping are not stated: none.
PACL_OPTIM = OptimConfig(
    epochs=10,
    lr=5e-4,
    min_lr_ratio=0.0,
    betas=(0.9, 0.98),
    eps=1e-6,
    weight_decay=0.2,
    no_decay_norms_and_biases=True,
    clip_grad_norm=0.0,
)
PRESETS["pacl-clip-vit-b"] = (
    "PACL's recipe on CLIP ViT-B/16: frozen towers, COCO caption shards, 4 GPUs x 1024, 10 epochs",
    AlignConfig(
        method=PaclConfig(backbone="clip-vit-b"),
        data=DataConfig(train=Path("shards/coco/train"), val=Path("shards/coco/val"), batch_size=1024),
        optim=PACL_OPTIM,
    ),
)
PRESETS["pacl-tiny"] = (
    "PACL on the tiny random ViT and text tower and the synthetic captions; CPU, fp32, 1 epoch",
    replace(
        TINY,
        method=PaclConfig(backbone="tiny", weights="random", text_chunk=4),
        optim=replace(PACL_OPTIM, epochs=1, lr=1e-3),
    ),
)


# SegCLIP's run (OTHER-METHODS.md section 2; main_task_align.py and its README command): AdamW
# (0.9, 0.98), eps 1e-6, weight decay 0.05 (not on biases and norms), clipping at 1, lr 4e-6 for the
# CLIP-pretrained parts and 4e-3 for the new ones, linear warmup over 15% of the updates from 0, then
# cosine to 0 over the rest (warmup_cosine); 8 GPUs x 96, 10 epochs, fp32, COCO caption shards.
SEGCLIP_OPTIM = OptimConfig(
    epochs=10,
    lr=4e-6,
    head_lr=4e-3,
    min_lr_ratio=0.0,
    warmup_fraction=0.15,
    betas=(0.9, 0.98),
    eps=1e-6,
    weight_decay=0.05,
    no_decay_norms_and_biases=True,
    clip_grad_norm=1.0,
)
PRESETS["segclip-clip-vit-b"] = (
    "SegCLIP's recipe on CLIP ViT-B/16: 8 centres, ITC + superpixel KL + MAE, COCO caption shards, "
    "8 GPUs x 96, 10 epochs, fp32",
    AlignConfig(
        method=SegclipConfig(backbone="clip-vit-b"),
        data=DataConfig(train=Path("shards/coco/train"), val=Path("shards/coco/val"), batch_size=96),
        optim=SEGCLIP_OPTIM,
        system=SystemConfig(precision="fp32"),
    ),
)
PRESETS["segclip-tiny"] = (
    "SegCLIP on the tiny random ViT and text tower and the synthetic captions; CPU, fp32, 1 epoch",
    replace(
        TINY,
        method=SegclipConfig(backbone="tiny", weights="random"),
        optim=replace(SEGCLIP_OPTIM, epochs=1, lr=1e-4, head_lr=1e-3),
    ),
)


def parse_train(args: Sequence[str], prog: str) -> tuple[AlignConfig, str]:
    """The config and preset name of ``PRESET [--section.field VALUE ...]`` (SystemExit on a usage
    error): one parser for ``python -m fastloc.align train`` and the launcher."""
    cfg = tyro.extras.overridable_config_cli(PRESETS, args=list(args), prog=prog)
    return cfg, next((a for a in args if a in PRESETS), "")
