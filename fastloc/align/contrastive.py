"""What the caption objectives (PACL, SegCLIP) and the demo's CLIP training share: CLIP's clamp of
a learnt temperature, rows gathered from every rank with their gradient (each rank's backward sums
into the rows it computed), so that every rank's captions are every image's negatives, and the
caption objectives' config (the paired text tower's weights) and base (their FLOP count's copy)."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fastloc.align.objective import Objective, ObjectiveConfig
from fastloc.cli import flowing_help

MAX_LOGIT_SCALE = math.log(100)  # CLIP clamps the learnt scale exp(logit_scale) at 100


def world() -> tuple[int, int]:
    """(rank, world size) of the process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every rank's rows of ``x`` concatenated in rank order, with gradient, and this rank's offset
    in them; ``x`` itself (offset 0) without a process group."""
    rank, size = world()
    if size == 1:
        return x, 0
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0), rank * x.shape[0]


@flowing_help
@dataclass(frozen=True, kw_only=True)
class CaptionConfig(ObjectiveConfig):
    """What every caption objective trains beside the backbone: the paired text tower."""

    text_weights: str = "auto"
    """The paired text tower's weights: auto (random when --method.weights is random, else
    pretrained), pretrained, random, or an open_clip state dict file."""

    def tower_weights(self) -> str:
        """The text tower's weights as ``load_text_tower`` takes them."""
        if self.text_weights == "auto":
            return "random" if self.weights == "random" else "pretrained"
        return self.text_weights


class CaptionObjective(Objective):
    """An objective with an open_clip text tower, which cannot be built on the meta device."""

    def meta_copy(self) -> Objective:
        """This objective copied and moved to the meta device (its FLOPs are those of a random one)."""
        return copy.deepcopy(self).to("meta")
