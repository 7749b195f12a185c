"""What the trainer needs from a post-training objective (``Objective``), and its config's base.

The loop builds the objective registered for ``cfg.method``'s type (``config.OBJECTIVES``), wraps
``trainable`` in DDP and optimizes it, compiles the ``frozen()`` modules, draws each step's random
inputs with ``sample`` (eager), calls ``losses`` in the compiled step and ``after_step`` after it,
and checkpoints the objective's whole ``state_dict()`` (``rebuilt`` leaves out a frozen module the
config rebuilds). An objective knows nothing of optimizers, precision, compile or ranks.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fastloc.cli import flowing_help
from fastloc.data.batch import Batch


@flowing_help
@dataclass(frozen=True, kw_only=True)
class ObjectiveConfig:
    """What every objective trains: a backbone, from its weights."""

    backbone: str = "clip-vit-b"
    """A registered backbone (python -m fastloc.align --help lists them) or any timm model id."""

    weights: str = "pretrained"
    """pretrained (timm's hub), random, or a weights file (safetensors or a timm checkpoint)."""

    def validate(self) -> None:
        """A ``BadValue`` naming the first bad option, before anything is built (default: none)."""


class Objective(nn.Module):
    """Built from its config alone; sets ``cfg``, ``trainable`` and ``image`` (an ``ImageConfig``)."""

    cfg: ObjectiveConfig
    trainable: nn.Module

    def frozen(self) -> list[nn.Module]:
        """The modules compiled without DDP and kept in eval mode (a teacher): every child but
        ``trainable``. The loss calls them as modules (their ``forward`` is what is compiled)."""
        return [module for module in self.children() if module is not self.trainable]

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self.frozen():
            module.eval()
        return self

    def sample(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """The random inputs of one step for ``batch`` images, on ``generator.device``."""
        raise NotImplementedError

    def losses(self, images: torch.Tensor, sample: torch.Tensor, model: nn.Module | None = None) -> torch.Tensor:
        """Per-image losses [B] of uint8 images [B, 3, S, S]; their mean is the training loss.
        ``model`` is ``trainable`` as the loop runs it (DDP-wrapped, compiled)."""
        raise NotImplementedError

    def after_step(self) -> None:
        """After each optimizer step (an EMA teacher's update, a queue's push); no host sync."""

    def calibrate(self, batches: Iterable[tuple[Batch, torch.Tensor]]) -> dict[str, float]:
        """Once, before the first step of a new run (not on resume): fit what the objective derives
        from data (MaskEmbed: sigma) from (batch, sample) pairs of the validation split, and return
        it for the run's record. Default: nothing."""
        return {}

    def encoder(self) -> nn.Module:
        """The aligned backbone (a timm model), for export and evaluation."""
        raise NotImplementedError

    def export_metadata(self) -> dict[str, float]:
        """What the exported encoder's metadata records of the trained objective (MaskEmbed: sigma)."""
        return {}

    def flops_per_image(self) -> float:
        """FLOPs of one training image (forward and backward, every view), counted by torch on a
        copy of the objective on the meta device (no memory, no time, no compiled code in the way)."""
        sample = self.sample(1, torch.Generator()).to("meta")
        with torch.device("meta"):
            copy = type(self)(replace(self.cfg, weights="random"))
            images = torch.zeros(1, 3, self.image.size, self.image.size, dtype=torch.uint8)
            with FlopCounterMode(display=False) as counter:
                copy.losses(images, sample).mean().backward()
        return float(counter.get_total_flops())


def rebuilt(module: nn.Module) -> nn.Module:
    """``module`` out of every state dict: for a frozen module the config rebuilds exactly
    (MaskEmbed's teacher), which checkpoints need not hold. Its parameters become non-persistent
    buffers (no gradient, no optimizer, moved with the objective)."""
    for owner in module.modules():
        for name, param in list(owner.named_parameters(recurse=False)):
            delattr(owner, name)
            owner.register_buffer(name, param.detach(), persistent=False)
    return module
