"""The probe's configs: what every evaluation shares (``EvalConfig``), and Patch-Seg's own, the
original's recipe as the defaults.

``validate()`` refuses a value that makes no sense (a BadValue naming the option) before any
work: a run that fails only after training loses its figures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import tyro

from fastloc.cli import check_name, flowing_help, require

MAX_SEED = 2**32 - 1  # numpy's seed range, which seed_everything also seeds


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """What every evaluation shares (Patch-Seg and the dense protocols): the data, the frozen
    backbone, the device and loaders, where results go; Patch-Seg's defaults."""

    data: Annotated[tyro.conf.Positional[Path], tyro.conf.arg(metavar="DATA")]
    """The shard set (python -m fastloc.shard converts one), holding the splits named below with label maps."""

    backbone: str = "clip-vit-b"
    """A registered short name (python -m fastloc.probe --help lists them), a timm id, or a file
    written by python -m fastloc.align export."""

    weights: str = "pretrained"
    """pretrained (timm's hub), random, or a local weights file (safetensors or a timm checkpoint)."""

    skip_blocks: int = 0
    """Drop the backbone's last k blocks (its final norm is kept)."""

    precision: Literal["bf16", "fp32"] = "bf16"
    """bf16 autocast (cached features are then bf16); fp32 for everything."""

    eval_batch_size: int = 32
    """Validation and feature-extraction batch per rank."""

    seed: int = 0
    """Seed of everything random (the head's initialization, the training order, k-means, sampling)."""

    cache: bool = True
    """Compute the frozen backbone's features once, keep them in the feature cache and reuse them."""

    cache_dir: Path = Path("runs/probe/cache")
    """Where feature caches live, one folder per backbone, split, image size and skip-blocks."""

    out: Path = Path("runs/probe")
    """Parent folder of run directories (each holds result.json)."""

    name: str = ""
    """Run directory name under out (default: dataset-reduction-head-backbone-skipK)."""

    results: Path = Path("results")
    """Folder of the results CSV (outputs-DATASET.csv, appended, the original's columns)."""

    train_split: str = ""
    """The training split's folder under data (default: train or training)."""

    val_split: str = ""
    """The validation split's folder under data (default: val or validation)."""

    device: Literal["auto", "cuda", "cpu"] = "auto"
    """cuda when available, else cpu."""

    loader: Literal["auto", "gpu", "cpu"] = "auto"
    """gpu = DALI decoding on the GPU, cpu = the torch twin; auto = gpu when CUDA is present."""

    workers: int = 4
    """Host worker processes of the loaders and of the cache reader (0: in this process)."""

    def validate(self) -> None:
        """A ``BadValue`` for the first shared option out of its range (nothing is read or written);
        each evaluation adds its own knobs' rules."""
        at_least("--eval-batch-size", self.eval_batch_size, 1)
        at_least("--skip-blocks", self.skip_blocks, 0)
        check_seed(self.seed)
        at_least("--workers", self.workers, 0, "0: in this process")
        check_names(self)


@flowing_help
@dataclass(frozen=True, kw_only=True)
class ProbeConfig(EvalConfig):
    """Train a Patch-Seg head on a frozen backbone and score it on the validation split."""

    reduction: Literal["union", "majority", "global-union"] = "union"
    """Per-patch target: union (the classes present in a patch), majority (its most frequent
    class) or global-union (the classes present in the image)."""

    head: Literal["transformer", "transformer-cls", "transformer-separate", "mlp", "linear"] = "transformer"
    """The output head; the transformer-* intervention heads read the CLS token only (cls) or all
    tokens (separate) and exist for union only."""

    full_finetune: bool = False
    """Train the backbone too (no feature cache then)."""

    epochs: int = 5
    """Passes over the training split; the validation split is scored after each."""

    batch_size: int = 32
    """Training batch per rank (the original: 32 on one GPU)."""

    lr: float = 1e-3
    """AdamW peak learning rate."""

    min_lr: float = 1e-4
    """The cosine schedule's floor."""

    weight_decay: float = 0.01
    """AdamW weight decay, on every head parameter."""

    warmup_updates: int = 500
    """Linear warmup from 0 over this many updates (the first update runs at lr 0)."""

    num_layers: int = 2
    """Blocks of the transformer heads."""

    hidden_size: int = 1024
    """Width of the mlp head's hidden layer."""

    predictions: int = 4
    """Validation images drawn in predictions.png (0: none)."""

    def folders(self) -> list[tuple[str, Path]]:
        """(flag, folder) of every folder the run writes into, in the order they are checked."""
        cache = [("--cache-dir", self.cache_dir)] if self.cache and not self.full_finetune else []
        return [*cache, ("--out", self.out), ("--results", self.results)]

    def validate(self) -> None:
        """A ``BadValue`` for the first option out of its range (nothing is read or written)."""
        super().validate()
        for flag in ("--epochs", "--batch-size", "--num-layers", "--hidden-size"):
            at_least(flag, getattr(self, field(flag)), 1)
        positive(self.lr, "--lr")
        require(0 <= self.min_lr <= self.lr, "--min-lr", self.min_lr, f"must be in [0, --lr {self.lr}]")
        require(
            math.isfinite(self.weight_decay) and self.weight_decay >= 0,
            "--weight-decay",
            self.weight_decay,
            "must be >= 0",
        )
        at_least("--warmup-updates", self.warmup_updates, 0)
        at_least("--predictions", self.predictions, 0, "0: none")
        intervention = self.head in ("transformer-cls", "transformer-separate")
        rule = f"is defined for the union reduction only, not {self.reduction}"
        require(not intervention or self.reduction == "union", "--head", self.head, rule)


def field(flag: str) -> str:
    """The config field of a flag: --eval-batch-size -> eval_batch_size."""
    return flag[2:].replace("-", "_")


def at_least(flag: str, value: int, low: int, meaning: str = "") -> None:
    """``require(value >= low)``, the rule worded as the CLIs' other checks."""
    rule = f"must be at least {low}" if low else "must be >= 0"
    require(value >= low, flag, value, rule + (f" ({meaning})" if meaning else ""))


def positive(value: float, flag: str) -> None:
    """A finite number above 0 (tyro reads 'nan' and 'inf' as floats)."""
    require(math.isfinite(value) and value > 0, flag, value, "must be a positive number")


def check_seed(seed: int) -> None:
    require(0 <= seed <= MAX_SEED, "--seed", seed, f"must be in [0, {MAX_SEED}]")


def check_names(cfg) -> None:
    """--name and the split folders, where given: each one plain path component (no '/', no '..')."""
    for flag in ("--name", "--train-split", "--val-split"):
        if getattr(cfg, field(flag)):
            check_name(flag, getattr(cfg, field(flag)))
