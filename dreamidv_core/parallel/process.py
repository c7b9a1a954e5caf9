"""Joining the process group ``torchrun`` describes (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ...).

NCCL on CUDA (each process on ``cuda:LOCAL_RANK``), gloo on CPUs. Without ``WORLD_SIZE`` (or with 1) it is a
single process and nothing is initialised. Used by inference (:mod:`.mesh`) and by training.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    active: bool = False

    def barrier(self):
        if self.active:
            import torch.distributed as dist
            dist.barrier()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.active:
            import torch.distributed as dist
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
            value = value / self.world
        return value


def torchrun_world() -> int:
    """Processes torchrun started (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(timeout: Optional[timedelta] = None) -> Dist:
    """Join the process group torchrun describes (WORLD_SIZE/RANK env); single process otherwise.
    ``timeout``: how long a collective may wait for the other ranks (None: torch's default)."""
    world = torchrun_world()
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if world <= 1:
        return Dist(device=device)
    import torch.distributed as dist

    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(device)
        kwargs = {} if timeout is None else {"timeout": timeout}
        dist.init_process_group(backend="nccl" if cuda else "gloo", **kwargs)
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), device=device, active=True)


def agree(dist_ctx: Dist, flag: bool) -> bool:
    """True when any rank says True (e.g. cancel: every rank must then save together)."""
    if not dist_ctx.active:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=dist_ctx.device)
    import torch.distributed as dist
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)
