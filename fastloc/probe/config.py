"""The probe's one config: what to probe on which data, the original's recipe as the defaults."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import tyro

from fastloc.cli import flowing_help


@flowing_help
@dataclass(frozen=True, kw_only=True)
class ProbeConfig:
    """Train a Patch-Seg head on a frozen backbone and score it on the validation split."""

    data: Annotated[tyro.conf.Positional[Path], tyro.conf.arg(metavar="DATA")]
    """The shard set (e.g. shards/coco), holding a train and a validation split with label maps."""

    backbone: str = "clip-vit-b"
    """A registered short name (python -m fastloc.probe --help lists them), a timm id, or a file
    written by python -m fastloc.align export."""

    weights: str = "pretrained"
    """pretrained (timm's hub), random, or a local weights file (safetensors or a timm checkpoint)."""

    reduction: Literal["union", "majority", "global-union"] = "union"
    """Per-patch target: union (the classes present in a patch), majority (its most frequent
    class) or global-union (the classes present in the image)."""

    head: Literal["transformer", "transformer-cls", "transformer-separate", "mlp", "linear"] = "transformer"
    """The output head; the transformer-* intervention heads read the CLS token only (cls) or all
    tokens (separate) and exist for union only."""

    skip_blocks: int = 0
    """Drop the backbone's last k blocks (its final norm is kept)."""

    full_finetune: bool = False
    """Train the backbone too (no feature cache then)."""

    epochs: int = 5
    """Passes over the training split; the validation split is scored after each."""

    batch_size: int = 32
    """Training batch per rank (the original: 32 on one GPU)."""

    eval_batch_size: int = 32
    """Validation and feature-extraction batch per rank."""

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

    precision: Literal["bf16", "fp32"] = "bf16"
    """bf16 autocast, as the original (cached features are then bf16); fp32 for everything."""

    seed: int = 0
    """Seed of the head's initialization and of the training order."""

    cache: bool = True
    """Compute the frozen backbone's features once and train from that cache."""

    cache_dir: Path = Path("runs/probe/cache")
    """Where feature caches live, one folder per backbone, split, image size and skip-blocks."""

    out: Path = Path("runs/probe")
    """Parent folder of run directories (config, result JSON, plots)."""

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

    predictions: int = 4
    """Validation images drawn in predictions.png (0: none)."""
