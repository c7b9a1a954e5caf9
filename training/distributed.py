"""Processes for ``torchrun``: the process group, FSDP2 sharding, gradient averaging (DDP-style).

Used by :mod:`training.trainer`; a single process (no ``WORLD_SIZE``) needs none of it.
"""
from __future__ import annotations

import torch

# the process group, agreement and FSDP sharding live in the core (inference uses them too)
from dreamidv_core.parallel.fsdp import shard_fsdp  # noqa: F401  (re-exported for training)
from dreamidv_core.parallel.process import Dist, agree, init_distributed  # noqa: F401


def average_grads(params, world: int) -> None:
    import torch.distributed as dist

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad.div_(world)
