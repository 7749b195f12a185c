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
    return Prepared(model, adamw(objective.trainable, optim), params)  # 4


def adamw(module: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if cfg.no_decay_norms_and_biases:
        exempt = [p for n, p in named if p.ndim <= 1 or n.endswith("pos_embed")]
        decay = [p for n, p in named if not (p.ndim <= 1 or n.endswith("pos_embed"))]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": exempt, "weight_decay": 0.0}]
    else:
        groups = [{"params": [p for _, p in named], "weight_decay": cfg.weight_decay}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def learning_rate(cfg: OptimConfig, update: int, total: int) -> float:
    """Per-update cosine from lr to lr * min_lr_ratio over ``total`` updates; during warmup, linear
    from the minimum, the cosine not shifted (the reference's timm scheduler)."""
    low = cfg.lr * cfg.min_lr_ratio
    if update < cfg.warmup_updates:
        return low + (cfg.lr - low) * update / cfg.warmup_updates
    return low + 0.5 * (cfg.lr - low) * (1 + math.cos(math.pi * min(update, total) / max(total, 1)))
