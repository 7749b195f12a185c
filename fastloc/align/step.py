"""One update: (state, batch) -> metrics, with no host sync.

The batch's images are split into ``accumulation`` micro-batches; each runs the objective's
losses under autocast (the compiled teacher and the compiled, DDP-wrapped student + decoder) and
its backward (gradients averaged: loss / accumulation; DDP syncs on the last micro-batch only);
then the global gradient norm is clipped, the objective's ``before_update`` runs (an EMA teacher),
each parameter group takes the update's learning rate (times its scale) and weight decay, and AdamW
steps. The metrics are device tensors: the loop reads them only at logging steps.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from fastloc.align.objective import Objective
from fastloc.align.prepare import Prepared
from fastloc.runtime import autocast


@dataclass(frozen=True)
class Update:
    """Where an update stands in the run, and its schedules' values."""

    step: int  # updates done before this one
    total: int  # updates in the run
    lr: float  # the learning rate (of --optim.lr; a head group's is scaled)
    weight_decay: float  # of the decayed groups


def train_step(
    objective: Objective,
    prepared: Prepared,
    images: torch.Tensor,  # [B, 3, S, S] uint8 on the device
    sample: Any,  # the step's inputs for B images (MaskEmbed: masks [B, M, N]); a tensor or a tuple of them
    update: Update,
    accumulation: int,
    clip: float,
    precision: str,
) -> dict[str, torch.Tensor]:
    B = images.shape[0]
    if B % accumulation:
        raise ValueError(f"batch of {B} does not split into {accumulation} micro-batches")
    micro = B // accumulation
    model, device = prepared.model, images.device
    total = torch.zeros((), device=device)
    for i in range(accumulation):
        part = slice(i * micro, (i + 1) * micro)
        sync = i == accumulation - 1 or not hasattr(model, "no_sync")
        rows = tree_map(lambda t, part=part: t[part], sample)
        with contextlib.nullcontext() if sync else model.no_sync(), autocast(device, precision):
            loss = objective.losses(images[part], rows, model).mean() / accumulation
        loss.backward()
        total += loss.detach()
    if clip > 0:
        grad_norm = nn.utils.clip_grad_norm_(prepared.params, clip)
    else:
        grad_norm = nn.utils.get_total_norm([p.grad for p in prepared.params if p.grad is not None])
    objective.before_update(update.step, update.total)
    for group in prepared.optimizer.param_groups:
        group["lr"] = update.lr * group["lr_scale"]
        if group["decayed"]:
            group["weight_decay"] = update.weight_decay
    prepared.optimizer.step()
    prepared.optimizer.zero_grad(set_to_none=True)
    return {"loss": total, "grad_norm": grad_norm}
