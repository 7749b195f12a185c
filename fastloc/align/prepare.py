"""Turn an objective into something that trains on this machine, in one fixed order.

``setup`` reads the distributed environment (torchrun or SLURM set RANK, WORLD_SIZE, LOCAL_RANK)
and picks the device. ``prepare`` then, in this order (each step needs the one before):

1. move the objective to the device; the teacher stays frozen and in eval mode;
2. wrap only the trainable part in DDP (the frozen teacher needs no gradient sync);
3. compile the teacher's forward and the DDP-wrapped trainable (``torch.compile``);
4. build AdamW over the trainable parameters (all decayed, as the reference, unless asked).

Model code knows nothing of this: precision is the loop's autocast, parallelism is DDP here.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fastloc.align.config import OptimConfig, SystemConfig
from fastloc.align.objective import Objective
from fastloc.cli import require


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    rank: int
    world_size: int
    local_rank: int

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(cfg: SystemConfig, flag: str = "--system.device") -> Runtime:
    """Device, process group (from the environment) and TF32, once per process. A CUDA device
    asked for where there is none is a ``BadValue`` naming ``flag``."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    require(not cuda or torch.cuda.is_available(), flag, cfg.device, "needs a CUDA device, and torch sees none")
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return Runtime(device, rank, world, local)


def collective_device() -> torch.device:
    """Where the process group reduces: the GPU under NCCL, the CPU under gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` holds on any rank (one process: the flag); every rank gets the same answer,
    so that all go on or all stop, and none waits in a collective for a rank that stopped."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    value = torch.tensor([int(flag)], device=collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


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
        objective.teacher.forward_features = torch.compile(objective.teacher.forward_features)
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
