"""The demo's one config: sizes of every stage, which objectives run, and the quick variant the tests run.

``validate()`` refuses a value out of its range (a BadValue naming the option) before any stage
runs: a stage that fails minutes in, on a value known wrong from the start, wastes the stages before.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Literal

from fastloc.cli import flowing_help, require
from fastloc.probe.config import at_least, check_seed, field

TRAIN_BATCH = 32  # pre-training and the probes train on full batches of this many images
Objective = Literal["maskembed", "leopart", "neco"]
OBJECTIVES: tuple[Objective, ...] = ("maskembed", "leopart", "neco")  # the order of the table's rows


@flowing_help
@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """Convert, pre-train on image-level labels, post-train with each objective, probe every encoder
    with Patch-Seg and the dense protocols: fastloc's main job in miniature."""

    out: Path = Path("runs/demo")
    """Parent folder of the demo's run directories (one per seed; -quick for --quick)."""

    shards: Path = Path("shards/demo")
    """Where the demo's synthetic shard set is written (or found)."""

    seed: int = 0
    """Seed of every model's initialization and of the training orders (the data are fixed)."""

    quick: bool = False
    """A smaller, shorter run (the test suite's): fewer images and epochs."""

    train_images: int = 2000
    """Training images of the synthetic set."""

    val_images: int = 400
    """Validation images of the synthetic set."""

    pretrain_epochs: int = 24
    """Epochs of the image-level (baseline) and patch-level (ceiling) pre-training."""

    objectives: tuple[Objective, ...] = OBJECTIVES
    """The post-training objectives run on the baseline, each probed as a row of its own
    (--objectives maskembed neco: two of them)."""

    align_epochs: int = 4
    """Epochs of MaskEmbed alignment of the baseline."""

    leopart_epochs: int = 2
    """Epochs of Leopart on the baseline (the leopart-tiny preset's settings otherwise)."""

    neco_epochs: int = 2
    """Epochs of NeCo on the baseline (the neco-tiny preset's settings otherwise)."""

    language: bool = True
    """The language miniature: the baseline and a tiny text tower trained together on the synthetic
    captions (contrastive), then zero-shot segmentation by class name before and after MaskEmbed."""

    contrastive_epochs: int = 16
    """Epochs of the contrastive image-text training of the baseline (--language)."""

    skip_blocks: int = 0
    """Blocks removed from the end of MaskEmbed's teacher. The reference removes 1 (of a ViT-B's
    12); of the demo's 4-block ViT that is a quarter of its depth, and the aligned encoder then
    probed below the baseline (README, the demo's findings): the demo's teacher is the whole
    baseline, the reference's -embed-final ablation."""

    probe_epochs: int = 5
    """Epochs of each Patch-Seg probe (the same for every backbone)."""

    backbone: str = "tiny"
    """The ViT every stage trains from scratch (a registered name)."""

    device: Literal["auto", "cuda", "cpu"] = "auto"
    """cuda when available, else cpu."""

    workers: int = 2
    """Loader worker processes."""

    def validate(self) -> None:
        """A ``BadValue`` for the first option out of its range (nothing is read or written); the
        numbers first, before the backbone registry's import of torch and timm."""
        at_least("--train-images", self.train_images, TRAIN_BATCH, "one training batch")
        at_least("--val-images", self.val_images, 1)
        epochs = ("--pretrain-epochs", "--align-epochs", "--leopart-epochs", "--neco-epochs", "--contrastive-epochs")
        for flag in (*epochs, "--probe-epochs"):
            at_least(flag, getattr(self, field(flag)), 1)
        chosen = self.objectives
        rule = f"must name one or more of {', '.join(OBJECTIVES)}, each once"
        require(bool(chosen) and len(set(chosen)) == len(chosen), "--objectives", " ".join(chosen), rule)
        check_seed(self.seed)
        at_least("--workers", self.workers, 0, "0: in this process")
        at_least("--skip-blocks", self.skip_blocks, 0)
        from fastloc.models.registry import BACKBONES

        require(self.backbone in BACKBONES, "--backbone", self.backbone, "must be a registered name")
        depth = BACKBONES[self.backbone].kwargs.get("depth")
        rule = f"must be less than {depth}, the blocks of {self.backbone}"
        require(depth is None or self.skip_blocks < depth, "--skip-blocks", self.skip_blocks, rule)
        if self.device == "cuda":
            import torch

            require(torch.cuda.is_available(), "--device", self.device, "needs a CUDA device, and torch sees none")

    @property
    def run_dir(self) -> Path:
        return self.out / (f"seed{self.seed}" + ("-quick" if self.quick else ""))

    @property
    def data_dir(self) -> Path:
        return self.shards / ("quick" if self.quick else "full")


QUICK = {
    "train_images": 320,
    "val_images": 96,
    "pretrain_epochs": 3,
    "align_epochs": 1,
    "leopart_epochs": 1,
    "neco_epochs": 1,
    "contrastive_epochs": 1,
    "probe_epochs": 2,
}


def resolved(cfg: DemoConfig) -> DemoConfig:
    """--quick shrinks every stage; a size given on the command line still wins."""
    if not cfg.quick:
        return cfg
    defaults = {f.name: f.default for f in fields(DemoConfig)}
    return replace(cfg, **{k: v for k, v in QUICK.items() if getattr(cfg, k) == defaults[k]})
