"""FSDP2 (``fully_shard``) weight sharding of the DiT, for training and for inference.

Units, innermost first: every submodule whose weights are used *outside* an FSDP forward of an enclosing
unit gets its own unit, so its parameters are gathered whenever it runs:

- each block's ``self_attn`` (``pose_kv`` registered: ``prepare`` computes the pose K/V) and ``cross_attn``
  (``context_kv`` registered: ``prepare`` computes the text K/V);
- each block (norms, modulation, FFN);
- training (``replicate_root=False``): ``project_pose`` (the objectives call the PoseGuider directly so it
  can train) and the root (embeddings, head, ``ref_conv``), all sharded;
- inference (``replicate_root=True``): only the blocks are sharded (~95% of the 1.3B model's weights); the
  root's own weights (embeddings, head, ``ref_conv``, PoseGuider, ID projection: ~60 MB in bf16) stay whole on
  every rank, so one rank can run the PoseGuider or the text embedding alone while the others wait.

``prepare`` / ``pose_tokens`` / ``embed_context`` / ``embed_condition`` (the windows' conditioning latent
embedded once) are registered on the root. Calling a sharded parameter outside these (e.g.
``dit.blocks[0].modulation`` from the step cache) would mix a sharded DTensor with plain tensors; go through a
registered method instead.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn as nn


def shard_fsdp(model: nn.Module, device: torch.device, mesh=None, replicate_root: bool = False) -> List[str]:
    """Shard ``model`` with FSDP2 over ``mesh`` (a 1-D ``DeviceMesh``; default: every process) on CPU/gloo or
    CUDA/NCCL. Returns the unit names (none when ``model`` is sharded already: a curriculum trains the same
    model stage after stage). Every rank of ``mesh`` must then call the sharded modules together."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

    import torch.distributed as dist

    if isinstance(model, FSDPModule):  # sharded by an earlier train() (the previous curriculum stage)
        return []

    if mesh is None:
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    units = []

    def shard(module: nn.Module, name: str, methods=(), **kwargs):
        fully_shard(module, mesh=mesh, **kwargs)
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
    root_methods = ("prepare", "pose_tokens", "embed_context", "embed_condition")
    if replicate_root:
        whole = {p for n, p in model.named_parameters() if not n.startswith("blocks.")}
        shard(model, "root (weights outside the blocks kept whole)", root_methods, ignored_params=whole)
    else:
        if getattr(model, "project_pose", None) is not None:
            shard(model.project_pose, "project_pose")
        shard(model, "root", root_methods)
    # FSDP picks its root lazily, as the first unit to run forward; the objectives may call the
    # PoseGuider (and prepare the pose K/V) before the root, so fix the root now (FSDP2 has no public call).
    model._get_fsdp_state()._lazy_init()
    return units


def group_mesh(device: torch.device, groups: int, group_size: int):
    """The 1-D ``DeviceMesh`` of this rank's group when the world is ``groups`` consecutive groups of
    ``group_size`` ranks (every rank must call it)."""
    from torch.distributed.device_mesh import init_device_mesh

    if groups == 1:
        return init_device_mesh(device.type, (group_size,))
    return init_device_mesh(device.type, (groups, group_size), mesh_dim_names=("data", "shard"))["shard"]


def sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard_for_inference(model: nn.Module, device: torch.device, groups: int, group_size: int,
                        mesh=None) -> Optional[List[str]]:
    """Shard the blocks of ``model`` (loaded on the CPU) over this rank's group of ``group_size`` ranks
    (:func:`shard_fsdp` with ``replicate_root``): each rank's share of the blocks goes to ``device``, and so does
    everything outside the blocks, whole. Returns the unit names."""
    for name, child in model.named_children():
        if name != "blocks":
            child.to(device)
    return shard_fsdp(model, device, mesh or group_mesh(device, groups, group_size), replicate_root=True)
