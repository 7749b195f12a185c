"""The configuration of an alignment run: frozen, keyword-only dataclasses, one per concern,
composed into ``AlignConfig`` and filled in by presets (``presets.py``) and the command line.
``AlignConfig.validate()`` refuses values that make no sense (``BadValue`` naming the option)
before anything is built, read or written."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Union

import tyro

from fastloc.align.leopart import Leopart, LeopartConfig
from fastloc.align.maskembed import MaskEmbed, MaskEmbedConfig
from fastloc.align.neco import Neco, NecoConfig
from fastloc.align.objective import Objective
from fastloc.align.pacl import Pacl, PaclConfig
from fastloc.align.segclip import Segclip, SegclipConfig
from fastloc.cli import check_name, flowing_help, require

# The objectives, by config type: a preset's method config names its objective. One defined
# elsewhere registers itself here (OBJECTIVES[ItsConfig] = Its) before its run is built. --method
# parses the union of their configs; tyro takes the preset's type, with no subcommand.
OBJECTIVES: dict[type, type[Objective]] = {
    MaskEmbedConfig: MaskEmbed,
    LeopartConfig: Leopart,
    NecoConfig: Neco,
    PaclConfig: Pacl,
    SegclipConfig: Segclip,
}
Method = Union[tuple(OBJECTIVES)]  # noqa: UP007 (X | Y is not built from a tuple)


@flowing_help
@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """What the run reads: shard sets of the fastloc format (python -m fastloc.shard)."""

    train: Path = Path("shards/imagenet21k/train")
    """The training split folder."""

    val: Path = Path("shards/imagenet21k/val")
    """The validation split folder: sigma and the validation loss (timm's eval transform)."""

    batch_size: int = 256
    """Images per GPU per update (the micro-batch is batch_size / accumulation)."""

    accumulation: int = 1
    """Micro-batches per update; must divide batch_size."""

    val_batch_size: int = 0
    """Images per validation batch (0: the micro-batch size)."""

    workers: int = 8
    """Host worker processes per GPU (reading, checking, labels; on the CPU also decoding)."""

    threads: int = 4
    """DALI CPU threads per GPU."""

    max_val_batches: int = 0
    """Validate (and fit sigma) on at most this many batches per rank (0: the whole split)."""

    def validate(self) -> None:
        require(self.batch_size >= 1, "--data.batch-size", self.batch_size, "must be at least 1")
        require(self.accumulation >= 1, "--data.accumulation", self.accumulation, "must be at least 1")
        require(
            self.batch_size % self.accumulation == 0,
            "--data.accumulation",
            self.accumulation,
            f"must divide --data.batch-size {self.batch_size}",
        )
        require(
            self.val_batch_size >= 0,
            "--data.val-batch-size",
            self.val_batch_size,
            "must be 0 (the micro-batch) or more",
        )
        require(self.workers >= 0, "--data.workers", self.workers, "must be 0 (read in the main process) or more")
        require(self.threads >= 1, "--data.threads", self.threads, "must be at least 1")
        require(self.max_val_batches >= 0, "--data.max-val-batches", self.max_val_batches, "must be 0 (all) or more")


@flowing_help
@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """AdamW with a per-update cosine schedule, as the reference."""

    epochs: int = 5
    """Passes over the training split."""

    lr: float = 3e-4
    """Peak learning rate (no batch-size scaling)."""

    min_lr_ratio: float = 0.1
    """The cosine ends at lr * min_lr_ratio."""

    warmup_updates: int = 0
    """Linear warmup from lr * min_lr_ratio over this many updates (the cosine is not shifted)."""

    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""

    eps: float = 1e-8
    """AdamW eps."""

    warmup_fraction: float = 0.0
    """Linear warmup from lr * min_lr_ratio over this fraction of the run's updates, the cosine then
    over the rest (SegCLIP's warmup_cosine, 0.15); 0: --optim.warmup-updates' rule."""

    weight_decay: float = 0.01
    """Decoupled weight decay."""

    weight_decay_end: float | None = None
    """None: constant weight decay; else a per-update cosine from weight_decay to this (Leopart, NeCo)."""

    head_lr: float = 0.0
    """Peak learning rate of the objective's new parts (Leopart's head and prototypes); 0: lr."""

    no_decay_norms_and_biases: bool = False
    """Exempt 1-d parameters (norms, biases, LayerScale) and positional embeddings from weight decay;
    the reference decays every parameter."""

    clip_grad_norm: float = 1.0
    """Clip the global gradient norm of the trainable parameters (0: off)."""

    def validate(self) -> None:
        require(self.epochs >= 1, "--optim.epochs", self.epochs, "must be at least 1")
        require(self.lr > 0, "--optim.lr", self.lr, "must be above 0")
        require(0 <= self.min_lr_ratio <= 1, "--optim.min-lr-ratio", self.min_lr_ratio, "must be between 0 and 1")
        require(self.warmup_updates >= 0, "--optim.warmup-updates", self.warmup_updates, "must be 0 or more")
        require(0 <= self.warmup_fraction < 1, "--optim.warmup-fraction", self.warmup_fraction, "must be in [0, 1)")
        both = self.warmup_fraction > 0 and self.warmup_updates > 0
        require(not both, "--optim.warmup-fraction", self.warmup_fraction, "and --optim.warmup-updates: one of them")
        require(all(0 <= b < 1 for b in self.betas), "--optim.betas", self.betas, "must each be in [0, 1)")
        require(self.eps > 0, "--optim.eps", self.eps, "must be above 0")
        require(self.weight_decay >= 0, "--optim.weight-decay", self.weight_decay, "must be 0 or more")
        end = self.weight_decay_end
        require(end is None or end >= 0, "--optim.weight-decay-end", end, "must be 0 or more (or None: constant)")
        require(self.head_lr >= 0, "--optim.head-lr", self.head_lr, "must be 0 (lr) or more")
        require(self.clip_grad_norm >= 0, "--optim.clip-grad-norm", self.clip_grad_norm, "must be 0 (off) or more")


@flowing_help
@dataclass(frozen=True, kw_only=True)
class SystemConfig:
    """How the run executes; none of this changes what it computes beyond float rounding."""

    device: Literal["auto", "cuda", "cpu"] = "auto"
    """cuda when available, else cpu."""

    precision: Literal["bf16", "fp32"] = "bf16"
    """bf16 autocast (the reference) or full float32."""

    compile: bool = True
    """torch.compile the teacher and the (DDP-wrapped) student + decoder."""

    peak_tflops: float = 989.0
    """The device's dense bf16 peak, for the MFU estimate (H100 SXM: 989)."""

    def validate(self) -> None:
        require(self.peak_tflops > 0, "--system.peak-tflops", self.peak_tflops, "must be above 0")


@flowing_help
@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Where the run writes and how often."""

    out: Path = Path("runs/align")
    """Parent folder of run directories."""

    name: str = ""
    """Run directory name under out (default: the preset's name)."""

    seed: int = 42
    """Seed of the model's initialization, the data order, the augmentation and the masks."""

    log_every: int = 20
    """Updates between metric lines (the only host syncs of the step)."""

    checkpoint_every: int = 500
    """Updates between checkpoints (also at the end of every epoch)."""

    progress: bool = True
    """A progress bar on a terminal, periodic lines in a log."""

    def validate(self) -> None:
        if self.name:
            check_name("--run.name", self.name)
        require(self.seed >= 0, "--run.seed", self.seed, "must be 0 or more")
        require(self.log_every >= 1, "--run.log-every", self.log_every, "must be at least 1")
        require(self.checkpoint_every >= 1, "--run.checkpoint-every", self.checkpoint_every, "must be at least 1")


@flowing_help
@dataclass(frozen=True, kw_only=True)
class AlignConfig:
    """An alignment run (MaskEmbed unless the preset's method config names another objective)."""

    method: tyro.conf.AvoidSubcommands[Method] = field(default_factory=MaskEmbedConfig)
    """The method and its backbone."""

    data: DataConfig = field(default_factory=DataConfig)
    """The shards and the batch."""

    optim: OptimConfig = field(default_factory=OptimConfig)
    """The optimizer and schedule."""

    system: SystemConfig = field(default_factory=SystemConfig)
    """Device, precision, compile."""

    run: RunConfig = field(default_factory=RunConfig)
    """Outputs and their frequency."""

    def validate(self) -> None:
        """Every section's rules, then the method's; a ``BadValue`` names the first bad option."""
        for section in (self.data, self.optim, self.system, self.run, self.method):
            section.validate()
