"""The ground floor every job stands on: which device, which rank, which precision.

``setup`` reads the distributed environment (torchrun or SLURM set RANK, WORLD_SIZE, LOCAL_RANK),
picks the device and joins the process group, once per process; ``autocast`` is the one mixed-
precision context; ``any_rank`` lets every rank take the same decision. The trainer, the probe
and the dense evaluations stand side by side on this module.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

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


def setup(device: str = "auto", flag: str = "--system.device") -> Runtime:
    """Device (auto, cuda or cpu), process group (from the environment) and TF32, once per process.
    A CUDA device asked for where there is none is a ``BadValue`` naming ``flag``."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    require(not cuda or torch.cuda.is_available(), flag, device, "needs a CUDA device, and torch sees none")
    chosen = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(chosen)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=chosen if cuda else None)
    return Runtime(chosen, rank, world, local)


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


def autocast(device: torch.device, precision: str):
    """bf16 autocast on ``device`` (the reference's mixed precision), or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def full_precision(device: torch.device):
    """Autocast off on ``device``, for the steps the references run in fp32 inside a bf16 step
    (Sinkhorn, sorting, the Gram matrix); nothing on a device without autocast (meta, where the
    FLOPs are counted)."""
    if device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()
