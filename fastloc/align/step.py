"""One update: (state, batch) -> metrics, with no host sync.

The batch's images are split into ``accumulation`` micro-batches; each runs the objective's
losses under autocast (the compiled teacher and the compiled, DDP-wrapped student + decoder) and
its backward (gradients averaged: loss / accumulation; DDP syncs on the last micro-batch only);
then the global gradient norm is clipped, the learning rate set, AdamW steps and the objective's
``after_step`` runs. The metrics are device tensors: the loop reads them only at logging steps.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from fastloc.align.objective import Objective
from fastloc.align.prepare import Prepared
from fastloc.runtime import autocast


def train_step(
    objective: Objective,
    prepared: Prepared,
    images: torch.Tensor,  # [B, 3, S, S] uint8 on the device
    sample: torch.Tensor,  # the objective's random inputs for B images (MaskEmbed: masks [B, M, N])
    lr: float,
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
        with contextlib.nullcontext() if sync else model.no_sync(), autocast(device, precision):
            loss = objective.losses(images[part], sample[part], model).mean() / accumulation
        loss.backward()
        total += loss.detach()
    if clip > 0:
        grad_norm = nn.utils.clip_grad_norm_(prepared.params, clip)
    else:
        grad_norm = nn.utils.get_total_norm([p.grad for p in prepared.params if p.grad is not None])
    for group in prepared.optimizer.param_groups:
        group["lr"] = lr
    prepared.optimizer.step()
    prepared.optimizer.zero_grad(set_to_none=True)
    objective.after_step()
    return {"loss": total, "grad_norm": grad_norm}
