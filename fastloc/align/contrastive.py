"""What the caption objectives (PACL, SegCLIP) and the demo's CLIP training share: CLIP's clamp of
a learnt temperature, and rows gathered from every rank with their gradient (each rank's backward
sums into the rows it computed), so that every rank's captions are every image's negatives."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

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
