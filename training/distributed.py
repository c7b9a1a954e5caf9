"""Processes for ``torchrun``: the process group, FSDP2 sharding, gradient averaging (DDP-style).

Used by :mod:`training.trainer`; a single process (no ``WORLD_SIZE``) needs none of it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List

import torch
import torch.nn as nn


# ---------------------------------------------------------------------------- distributed
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


def init_distributed() -> Dist:
    """Join the process group torchrun describes (WORLD_SIZE/RANK env); single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if world <= 1:
        return Dist(device=device)
    import torch.distributed as dist

    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), device=device, active=True)


def shard_fsdp(model: nn.Module, device: torch.device) -> List[str]:
    """Shard ``model`` with FSDP2 (``fully_shard``) on a 1-D mesh over every process (CPU/gloo or CUDA/NCCL).

    Units, innermost first: every submodule whose weights are used *outside* an FSDP forward of an
    enclosing unit gets its own unit, so its parameters are gathered whenever it runs:

    - each block's ``self_attn`` (``pose_kv`` registered: ``prepare`` computes the pose K/V) and
      ``cross_attn`` (``context_kv`` registered: ``prepare`` computes the text K/V);
    - each block (norms, modulation, FFN);
    - ``project_pose`` (the objectives call the PoseGuider directly so it can train);
    - the root (embeddings, head, ``ref_conv``), with ``prepare`` / ``pose_tokens`` / ``embed_context``
      registered as forward methods.

    Calling any parameter outside these (e.g. ``dit.text_embedding(x)`` from a loss) would mix a
    sharded DTensor with plain tensors; go through a registered method instead. Returns the unit names
    (none when ``model`` is sharded already: a curriculum trains the same model stage after stage).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

    import torch.distributed as dist

    if isinstance(model, FSDPModule):  # sharded by an earlier train() (the previous curriculum stage)
        return []

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    units = []

    def shard(module: nn.Module, name: str, methods=()):
        fully_shard(module, mesh=mesh)
        for m in methods:
            if hasattr(module, m):
                register_fsdp_forward_method(module, m)
        units.append(name)

    for i, blk in enumerate(getattr(model, "blocks", [])):
        if hasattr(blk, "self_attn"):
            shard(blk.self_attn, f"blocks.{i}.self_attn", ("pose_kv",))
        if hasattr(blk, "cross_attn"):
            shard(blk.cross_attn, f"blocks.{i}.cross_attn", ("context_kv",))
        shard(blk, f"blocks.{i}")
    if getattr(model, "project_pose", None) is not None:
        shard(model.project_pose, "project_pose")
    shard(model, "root", ("prepare", "pose_tokens", "embed_context"))
    # FSDP picks its root lazily, as the first unit to run forward; the objectives may call the
    # PoseGuider before the root, so fix the root now (FSDP2 has no public call for this).
    model._get_fsdp_state()._lazy_init()
    return units


def agree(dist_ctx: Dist, flag: bool) -> bool:
    """Cancel when any rank asks (every rank must then save together)."""
    if not dist_ctx.active:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=dist_ctx.device)
    import torch.distributed as dist
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def average_grads(params, world: int) -> None:
    import torch.distributed as dist

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad.div_(world)
