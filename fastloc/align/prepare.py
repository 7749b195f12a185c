"""Turn an objective into something that trains on this machine, in one fixed order.

``fastloc.runtime.setup`` has picked the device and joined the process group; ``prepare`` then,
in this order (each step needs the one before):

1. move the objective to the device; its ``frozen()`` modules stay in eval mode;
2. wrap only the trainable part in DDP (frozen modules need no gradient sync);
3. compile each frozen module and the DDP-wrapped trainable (``torch.compile``);
4. build AdamW over the trainable parameters (all decayed, as the reference, unless asked).

Model code knows nothing of this: precision is the loop's autocast, parallelism is DDP here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fastloc.align.config import OptimConfig, SystemConfig
from fastloc.align.objective import Objective
from fastloc.align.schedule import cosine
from fastloc.runtime import Runtime


@dataclass
class Prepared:
    model: nn.Module  # the trainable part as the step runs it: DDP-wrapped, compiled
    optimizer: torch.optim.Optimizer
    params: list[nn.Parameter]


def prepare(objective: Objective, optim: OptimConfig, system: SystemConfig, runtime: Runtime) -> Prepared:
    objective.to(runtime.device)  # 1
    objective.train()
    model: nn.Module = objective.trainable
    if runtime.distributed:  # 2
        ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=ids)
    if system.compile:  # 3
        for module in objective.frozen():
            module.compile()
        model = torch.compile(model)
    params = [p for p in objective.trainable.parameters() if p.requires_grad]
    return Prepared(model, adamw(objective, optim), params)  # 4


def adamw(objective: Objective, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters in up to four groups, in the references' order: the
    backbone's decayed and exempt parameters, then the head's (``Objective.is_head``), the exempt
    ones only under ``no_decay_norms_and_biases`` (``Objective.decays``). A group carries its
    ``lr_scale`` (head_lr / lr for the head) and whether the weight-decay schedule sets it."""
    named = [(n, p) for n, p in objective.trainable.named_parameters() if p.requires_grad]
    head_scale = (cfg.head_lr or cfg.lr) / cfg.lr
    groups = []
    for head in (False, True):
        for decayed in (True, False):
            params = [
                p
                for n, p in named
                if objective.is_head(n) == head
                and (objective.decays(n, p) or not cfg.no_decay_norms_and_biases) == decayed
            ]
            if params:
                scale = head_scale if head else 1.0
                wd = cfg.weight_decay if decayed else 0.0
                groups.append({"params": params, "weight_decay": wd, "lr_scale": scale, "decayed": decayed})
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def learning_rate(cfg: OptimConfig, update: int, total: int) -> float:
    """Per-update cosine from lr to lr * min_lr_ratio over ``total`` updates; during warmup, linear
    from the minimum, the cosine not shifted (the reference's timm scheduler); under
    ``warmup_fraction``, the cosine over the updates after the warmup (SegCLIP's warmup_cosine)."""
    low = cfg.lr * cfg.min_lr_ratio
    if cfg.warmup_fraction:  # SegCLIP's warmup_cosine: the cosine shifted past the warmup
        warm = cfg.warmup_fraction * total
        if update < warm:
            return low + (cfg.lr - low) * update / warm
        return low + 0.5 * (cfg.lr - low) * (1 + math.cos(math.pi * (update - warm) / (total - warm)))
    if update < cfg.warmup_updates:
        return low + (cfg.lr - low) * update / cfg.warmup_updates
    return cosine(cfg.lr, low, update, total)


def weight_decay(cfg: OptimConfig, update: int, total: int) -> float:
    """The decayed groups' weight decay: constant, or a per-update cosine from weight_decay to
    weight_decay_end (the references' ``cosine_scheduler``, indexed by the update)."""
    if cfg.weight_decay_end is None:
        return cfg.weight_decay
    return cosine(cfg.weight_decay, cfg.weight_decay_end, update, total)
