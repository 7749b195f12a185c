"""What the trainer needs from a post-training objective (``Objective``), and its config's base.

The loop builds the objective registered for ``cfg.method``'s type (``config.OBJECTIVES``), reads
its ``inputs()`` (each split's recipe and image size), wraps ``trainable`` in DDP and optimizes it
(its parameter groups by ``is_head`` and ``decays``), compiles the ``frozen()`` modules, draws each
step's random inputs with ``sample`` (eager) and joins them to the batch's (``step_sample``), calls
``losses`` in the compiled step and ``before_update`` between the backward and the optimizer's step,
and checkpoints the objective's whole ``state_dict()`` (``rebuilt`` leaves out a frozen module the
config rebuilds); export writes ``encoder()`` and what ``export_parts`` adds beside it. An objective
knows nothing of optimizers, precision, compile or ranks (beyond gathering its negatives).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import FlopCounterMode

from fastloc.cli import flowing_help
from fastloc.data.batch import Batch
from fastloc.data.recipes import CenterCrop, Recipe, Rkrc
from fastloc.data.superpixels import Felzenszwalb


@dataclass(frozen=True)
class Inputs:
    """What a loader delivers to an objective: the recipe and the images' side; with ``captions``,
    one caption per sample in ``Batch.captions`` (drawn on the host per seed, epoch and sample);
    with ``superpixels``, each crop's segment ids in ``Batch.labels`` (``data/superpixels.py``)."""

    recipe: Recipe
    size: int
    captions: bool = False
    superpixels: Felzenszwalb | None = None


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

    def encoder_in_checkpoint(self) -> bool:
        """Whether the checkpoints hold the encoder's weights (export then builds the objective from
        random weights); False for a frozen encoder rebuilt from ``weights`` (PACL's)."""
        return True


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

    def inputs(self) -> tuple[Inputs, Inputs]:
        """The training and validation loaders' recipes and sizes. Default (MaskEmbed's): timm's
        rkrc and eval transform at the backbone's size."""
        image = self.image
        val = CenterCrop(crop_pct=image.crop_pct, interpolation=image.interpolation)
        return Inputs(Rkrc(), image.size), Inputs(val, image.size)

    def sample(self, batch: int, generator: torch.Generator) -> Any:
        """The random inputs of one step for ``batch`` images, on ``generator.device``: a tensor
        [batch, ...] or a tuple of them (each sliced by image for micro-batches and ranks)."""
        raise NotImplementedError

    def step_sample(self, batch: Batch, sample: Any) -> Any:
        """What ``losses`` receives as its sample: this rank's rows of ``sample``, joined with what
        the batch carries (a recipe's draws: ``batch.params``). Default: ``sample``."""
        return sample

    def losses(self, images: torch.Tensor, sample: Any, model: nn.Module | None = None) -> torch.Tensor:
        """Per-image losses [B] of uint8 images [B, 3, S, S]; their mean is the training loss.
        ``model`` is ``trainable`` as the loop runs it (DDP-wrapped, compiled)."""
        raise NotImplementedError

    def before_update(self, step: int, total: int) -> None:
        """Once per update, after the backward and before the optimizer's step (update ``step`` of
        ``total``): where the references update an EMA teacher, from the weights that made this
        update's loss. No host sync."""

    def is_head(self, name: str) -> bool:
        """Whether trainable parameter ``name`` is a new part (Leopart's head and prototypes), which
        trains at ``--optim.head-lr``. Default: none."""
        return False

    def decays(self, name: str, param: nn.Parameter) -> bool:
        """Whether weight decay applies to ``name`` under ``--optim.no-decay-norms-and-biases``.
        Default: not 1-d parameters (norms, biases, LayerScale) nor positional embeddings."""
        return not (param.ndim <= 1 or name.endswith("pos_embed"))

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

    def export_parts(self, encoder: Path, source: dict[str, Any]) -> list[Path]:
        """Files written beside the exported ``encoder`` file that an evaluation reads with it (PACL:
        its embedder, the zero-shot head); ``source`` says which run and checkpoint. Default: none."""
        return []

    def example(self, batch: int) -> tuple[torch.Tensor, Any]:
        """Images and the sample of a step of ``batch`` images (zeros, CPU): what the FLOP count
        and the benchmarks feed ``losses``. Default: the training size and ``sample``."""
        size = self.inputs()[0].size
        return torch.zeros(batch, 3, size, size, dtype=torch.uint8), self.sample(batch, torch.Generator())

    def flops_per_image(self) -> float:
        """FLOPs of one training image (forward and backward, every view), counted by torch on a
        copy of the objective on the meta device (no memory, no time, no compiled code in the way)."""
        images, sample = self.example(1)
        sample = tree_map(lambda t: t.to("meta"), sample)
        with torch.device("meta"):
            copy = self.meta_copy()
            with FlopCounterMode(display=False) as counter:
                copy.losses(images.to("meta"), sample).mean().backward()
        return float(counter.get_total_flops())

    def meta_copy(self) -> Objective:
        """The objective on the meta device, for ``flops_per_image`` (called under
        ``torch.device("meta")``). Default: built there from the config, random weights."""
        return type(self)(replace(self.cfg, weights="random"))


def rebuilt(module: nn.Module) -> nn.Module:
    """``module`` out of every state dict: for a frozen module the config rebuilds exactly
    (MaskEmbed's teacher), which checkpoints need not hold. Its parameters become non-persistent
    buffers (no gradient, no optimizer, moved with the objective)."""
    for owner in module.modules():
        for name, param in list(owner.named_parameters(recurse=False)):
            delattr(owner, name)
            owner.register_buffer(name, param.detach(), persistent=False)
    return module
