"""DreamID-V's additions to a Wan2.1 DiT as one module of their own, and the tensor math they add.

A host that runs its own Wan2.1 implementation (ComfyUI's Wan model loads a DreamID-V checkpoint and drops
the pose tensors) gets them from :class:`PoseBranch`: the PoseGuider, every block's pose K/V layers and gate,
and (when the checkpoint or an extra file has one) the ArcFace ID-token projection. Parameter names equal the
released checkpoint's (``project_pose.*``, ``blocks.<i>.self_attn.{k_pose,v_pose,norm_k_pose,pose_gate}``,
``id_projection.*``), so the branch loads straight from the checkpoint's tensors
(:func:`~dreamidv_core.weights.checkpoints.load_pose_branch`).

What a block's self-attention gains (the same functions serve :class:`~.dit.DreamIDVTransformer`):

* :func:`pose_sequence`: pose tokens [B, Lv, C] -> [B, Lr + Lv, C] with zeros at the Lr reference-token
  positions (their pose K/V then come from the layers' biases alone);
* :func:`pose_keys_values`: that sequence -> K = rope(RMSNorm(k_pose(P))), V = v_pose(P) [B, L, N, D], with
  the RoPE of the whole token sequence (reference tokens at temporal index 0);
* :func:`add_gated`: ``out + gate * term`` in float32 (``term`` = Attn(q, K_pose, V_pose), or the ID tokens'
  attention, whose query is taken before RoPE).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch
import torch.nn as nn

from ..errors import InputError
from .configs import DiTConfig
from .id_projection import PREFIX as ID_PREFIX, IDProjection
from .layers import CastOps
from .pose_guider import PoseGuider

KV = Tuple[torch.Tensor, torch.Tensor]
POSE_GUIDER_PREFIX = "project_pose."
POSE_LAYER_NAMES = ("self_attn.k_pose.", "self_attn.v_pose.", "self_attn.norm_k_pose.", "self_attn.pose_gate")


def is_branch_tensor(name: str) -> bool:
    """True for the tensors of a DreamID-V checkpoint that belong to :class:`PoseBranch` (names without prefix)."""
    if name.startswith((POSE_GUIDER_PREFIX, ID_PREFIX)):
        return True
    return name.startswith("blocks.") and any(part in name for part in POSE_LAYER_NAMES)


def pose_sequence(pose_tokens: torch.Tensor, num_ref_tokens: int) -> torch.Tensor:
    """Pose tokens [Lv, C] or [B, Lv, C] -> [B, num_ref_tokens + Lv, C]: zeros in front, at the reference tokens."""
    if pose_tokens.dim() == 2:
        pose_tokens = pose_tokens[None]
    b, _, c = pose_tokens.shape
    return torch.cat([pose_tokens.new_zeros(b, num_ref_tokens, c), pose_tokens], dim=1)


def pose_keys_values(layers: nn.Module, sequence: torch.Tensor, num_heads: int,
                     rope: Callable[[torch.Tensor], torch.Tensor]) -> KV:
    """One block's pose K/V: ``layers`` holds ``k_pose``, ``v_pose``, ``norm_k_pose``; ``sequence`` [B, L, C] from
    :func:`pose_sequence`; ``rope`` rotates [B, L, N, D] by the positions of the whole token sequence.
    -> K (roped), V, each [B, L, N, D] in the sequence's dtype."""
    k = layers.norm_k_pose(layers.k_pose(sequence)).unflatten(-1, (num_heads, -1))
    v = layers.v_pose(sequence).unflatten(-1, (num_heads, -1))
    return rope(k).to(sequence.dtype), v.to(sequence.dtype)


def add_gated(out: torch.Tensor, gate: torch.Tensor, term: torch.Tensor) -> torch.Tensor:
    """``out + gate * term`` computed in float32 (the attention output the released model adds its pose term to)."""
    return out.float() + gate.float() * term.float()


class PoseLayers(nn.Module):
    """One block's pose layers, named as in the released self-attention: k_pose, v_pose [C -> C], RMSNorm on
    the keys, the scalar gate."""

    def __init__(self, dim: int, eps: float, operations=None):
        super().__init__()
        ops = operations or CastOps
        self.k_pose, self.v_pose = ops.Linear(dim, dim), ops.Linear(dim, dim)
        self.norm_k_pose = ops.RMSNorm(dim, eps)
        self.pose_gate = nn.Parameter(torch.zeros(1))


class _BlockPoseLayers(nn.Module):
    """Holds a block's :class:`PoseLayers` under ``self_attn`` so the names are the checkpoint's."""

    def __init__(self, dim: int, eps: float, operations=None):
        super().__init__()
        self.self_attn = PoseLayers(dim, eps, operations)


class PoseBranch(nn.Module):
    """The PoseGuider, every block's pose layers and (``cfg.id_tokens > 0``) the ID-token projection of a
    DreamID-V DiT of config ``cfg``, without the Wan2.1 part. ``operations``: the layer constructors
    (:class:`~.layers.CastOps` by default)."""

    def __init__(self, cfg: DiTConfig, operations=None):
        super().__init__()
        self.cfg = cfg
        if cfg.has_pose:
            self.project_pose = PoseGuider(cfg.dim, cfg.pose_channels, cfg.pose_widths, cfg.patch_size, operations)
            self.blocks = nn.ModuleList([_BlockPoseLayers(cfg.dim, cfg.eps, operations) for _ in range(cfg.num_layers)])
        if cfg.id_tokens > 0:
            self.id_projection = IDProjection(cfg.dim, cfg.num_heads, cfg.num_layers, cfg.id_tokens, cfg.id_embed_dim,
                                              cfg.eps, operations)

    @property
    def has_pose(self) -> bool:
        return self.cfg.has_pose

    @property
    def id_projection_active(self) -> bool:
        proj = getattr(self, "id_projection", None)
        return proj is not None and not proj.is_noop()

    @torch.no_grad()
    def pose_tokens(self, pose_video: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Pose video [1, 3, F, H, W] in [0, 1] -> PoseGuider tokens [1, Lv, C] in ``dtype`` (default: the video's)."""
        if not self.has_pose:
            raise InputError("this DreamID-V checkpoint (faster variant) has no pose branch")
        dtype = dtype or pose_video.dtype
        return self.project_pose(pose_video.to(dtype)).to(dtype)

    def pose_kv(self, i: int, sequence: torch.Tensor, rope: Callable[[torch.Tensor], torch.Tensor]) -> KV:
        """Block ``i``'s pose K/V for a :func:`pose_sequence` (see :func:`pose_keys_values`)."""
        return pose_keys_values(self.blocks[i].self_attn, sequence, self.cfg.num_heads, rope)

    def pose_gate(self, i: int) -> torch.Tensor:
        return self.blocks[i].self_attn.pose_gate

    def id_kv(self, embedding: torch.Tensor, dtype: torch.dtype, device=None) -> List[KV]:
        """ArcFace embedding rows [R, E] -> every block's ID K/V [R, T, N, D] (zeros rows: the pass without the
        identity)."""
        if getattr(self, "id_projection", None) is None:
            raise InputError("this model has no ArcFace ID-token projection")
        return self.id_projection.all_kv(embedding, dtype, device)

