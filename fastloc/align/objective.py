"""What the trainer needs from a post-training objective (MaskEmbed first; Leopart, patch-text later).

The loop builds an objective once, wraps ``trainable`` in DDP (the frozen parts stay unwrapped),
optimizes ``trainable``'s parameters, checkpoints ``state_dict()`` (trainable weights and buffers
such as MaskEmbed's sigma), draws each step's random inputs with ``sample`` (eager, from the
loop's seeded generator) and calls ``losses`` inside the compiled step. An objective knows
nothing of optimizers, precision, compile or ranks.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from fastloc.data.batch import Batch


class Objective(nn.Module):
    """Subclasses set ``trainable`` and ``image`` (a ``models.registry.ImageConfig``) in __init__."""

    trainable: nn.Module

    def sample(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """The random inputs of one step for ``batch`` images, on ``generator.device``."""
        raise NotImplementedError

    def losses(self, images: torch.Tensor, sample: torch.Tensor, model: nn.Module | None = None) -> torch.Tensor:
        """Per-image losses [B] of uint8 images [B, 3, S, S]; their mean is the training loss.
        ``model`` is ``trainable`` as the loop runs it (DDP-wrapped, compiled)."""
        raise NotImplementedError

    def calibrate(self, batches: Iterable[tuple[Batch, torch.Tensor]]) -> dict[str, float]:
        """Once, before the first step of a new run (not on resume): fit what the objective derives
        from data (MaskEmbed: sigma) from (batch, sample) pairs of the validation split, and return
        it for the run's record. Default: nothing."""
        return {}

    def encoder(self) -> nn.Module:
        """The aligned backbone, for export and evaluation."""
        raise NotImplementedError
