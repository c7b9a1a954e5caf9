"""Small building blocks shared by the DiT: casting linear/conv layers, Wan's norms, RoPE, time embedding.

Numerics follow the released model run under bf16 autocast: big matrices compute in the model's
compute dtype, norms, modulation and RoPE in float32. Weights may be *stored* in a narrower dtype
(bf16, fp16, fp8 e4m3fn) than they compute in: the casting layers upcast them at use.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


class CastLinear(nn.Linear):
    """nn.Linear that computes in its input's dtype, whatever dtype its weight is stored in."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        b = None if self.bias is None else (self.bias if self.bias.dtype == x.dtype else self.bias.to(x.dtype))
        return F.linear(x, w, b)


class CastConv1d(nn.Conv1d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight.to(x.dtype), self.bias.to(x.dtype))


class CastConv3d(nn.Conv3d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight.to(x.dtype), self.bias.to(x.dtype))


class CastConv2d(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight.to(x.dtype), self.bias.to(x.dtype))


class RMSNorm(nn.Module):
    """Wan's RMSNorm: normalise in float32, round back to the input dtype, scale by a float32 weight.

    x: [..., C] -> [..., C] in float32 (the float32 weight promotes the product, as in the reference).
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)).to(x.dtype)
        return normed * self.weight.float()


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 and returned in the input dtype (Wan's ``WanLayerNorm``)."""

    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = False):
        super().__init__(dim, eps=eps, elementwise_affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class CastOps:
    """The layer constructors the pack's model parts are built from: ``Linear``, ``Conv1d``, ``Conv2d`` (compute
    in the input's dtype), ``RMSNorm(dim, eps)`` and ``LayerNorm(dim, eps, affine)`` (float32 math).

    The parts that a host may run inside its own model (:class:`~.pose_guider.PoseGuider`,
    :class:`~.id_projection.IDProjection`, :class:`~.pose_branch.PoseBranch`) take an ``operations`` namespace
    with these five names; a host passes its own (e.g. layers its memory manager can cast and offload).
    """

    Linear = CastLinear
    Conv1d = CastConv1d
    Conv2d = CastConv2d
    RMSNorm = RMSNorm
    LayerNorm = LayerNorm


def sinusoidal_embedding(dim: int, timesteps: torch.Tensor) -> torch.Tensor:
    """timesteps [B] -> [B, dim] float32: cos then sin of t * 10000^(-i/half), computed in float64."""
    half = dim // 2
    t = timesteps.to(torch.float64)
    freqs = torch.pow(10000, -torch.arange(half, dtype=torch.float64, device=t.device).div(half))
    angles = torch.outer(t, freqs)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1).float()


def rope_axis_dims(head_dim: int) -> Tuple[int, int, int]:
    """Rotary dimensions per axis (time, height, width): d - 4*(d//6), 2*(d//6), 2*(d//6)."""
    sixth = head_dim // 6
    return head_dim - 4 * sixth, 2 * sixth, 2 * sixth


def _axis_angles(positions: int, dim: int, theta: float, device) -> torch.Tensor:
    inv = 1.0 / torch.pow(theta, torch.arange(0, dim, 2, device=device).div(dim))
    return torch.outer(torch.arange(positions, device=device, dtype=torch.float32), inv.float())


def rope_table(grid: Tuple[int, int, int], head_dim: int, theta: float = 10000.0, device=None):
    """Rotary angles for a (F, H, W) token grid in (f, h, w) order.

    Returns (cos, sin), each [F*H*W, head_dim/2] float32. Token (f, h, w) gets the time angles of
    index f, the height angles of h and the width angles of w, concatenated.
    """
    f, h, w = grid
    dt, dh, dw = rope_axis_dims(head_dim)
    at = _axis_angles(f, dt, theta, device)[:, None, None, :].expand(f, h, w, -1)
    ah = _axis_angles(h, dh, theta, device)[None, :, None, :].expand(f, h, w, -1)
    aw = _axis_angles(w, dw, theta, device)[None, None, :, :].expand(f, h, w, -1)
    angles = torch.cat([at, ah, aw], dim=-1).reshape(f * h * w, head_dim // 2)
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive channel pairs. x: [B, L, N, D]; cos/sin: [L, D/2] -> [B, L, N, D] float32."""
    b, l, n, d = x.shape
    xf = x.float().reshape(b, l, n, d // 2, 2)
    re, im = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack([re * c - im * s, re * s + im * c], dim=-1).reshape(b, l, n, d)
