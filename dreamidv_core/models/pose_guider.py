"""PoseGuider: the released ``project_pose`` branch that turns a pose video into one token per video token.

Its output does not depend on the diffusion timestep, so it is computed once per video and reused by
every sampling step and both identity-guidance passes.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn

from .layers import CastOps


class PoseTokenProjection(nn.Module):
    """(1, 2, 2) patchify followed by a linear layer; the patch features are ordered (t, h, w, c)."""

    def __init__(self, in_channels: int, dim: int, patch_size=(1, 2, 2), operations=None):
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.proj = (operations or CastOps).Linear(in_channels * self.patch_size[0] * self.patch_size[1] * self.patch_size[2], dim)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """feats: [F', C, H', W'] (one clip, frames first) -> tokens [F' * H'/2 * W'/2, dim]."""
        pt, ph, pw = self.patch_size
        f, c, h, w = feats.shape
        if pt != 1 or f % pt:
            raise ValueError("the pose patch size must be 1 along time")
        x = feats.permute(0, 2, 3, 1)  # f h w c
        x = x.reshape(f, h // ph, ph, w // pw, pw, c).permute(0, 1, 3, 2, 4, 5)
        x = x.reshape(f * (h // ph) * (w // pw), ph * pw * c)
        return self.proj(x)


class PoseGuider(nn.Module):
    """Pose video [B, 3, F, H, W] in [0, 1] (not normalised) -> pose tokens [B, F' * H/16 * W/16, dim].

    Two stride-2 Conv1d along time per pixel (F = 4n+1 -> 2n+1 -> n+1, the VAE's latent frame count),
    then per frame four 3x3 convs (SiLU + 2x max-pool after the first three: H/8, W/8), then a (1, 2, 2)
    patchify and a linear layer: one pose token per video token of the DiT. ``operations``: the layer
    constructors (:class:`~.layers.CastOps` by default).
    """

    def __init__(self, dim: int = 1536, in_channels: int = 3, widths: Sequence[int] = (128, 256, 512, 512),
                 patch_size=(1, 2, 2), operations=None):
        super().__init__()
        ops = operations or CastOps
        self.time_down = nn.Sequential(
            ops.Conv1d(in_channels, in_channels, kernel_size=3, stride=2, padding=1),
            ops.Conv1d(in_channels, in_channels, kernel_size=3, stride=2, padding=1),
        )
        layers = []
        prev = in_channels
        for i, width in enumerate(widths):
            layers.append(ops.Conv2d(prev, width, kernel_size=3, padding=1))
            if i < len(widths) - 1:
                layers += [nn.SiLU(), nn.MaxPool2d(2)]
            prev = width
        self.convs = nn.Sequential(*layers)
        self.out = PoseTokenProjection(prev, dim, patch_size, ops)

    @staticmethod
    def latent_frames(num_frames: int) -> int:
        """Frames left after the two temporal stride-2 convs (81 -> 21)."""
        for _ in range(2):
            num_frames = (num_frames - 1) // 2 + 1
        return num_frames

    def forward(self, pose: torch.Tensor, frames_per_chunk: Optional[int] = 8) -> torch.Tensor:
        """pose: [B, 3, F, H, W], H and W multiples of 16 -> [B, L, dim] with L = F' * H/16 * W/16,
        computed in the dtype of ``pose``.

        The per-frame convs run ``frames_per_chunk`` frames at a time so that peak memory does not
        grow with the clip (the full-resolution 128-channel maps are the largest activation).
        """
        b, c, f, h, w = pose.shape
        if h % 16 or w % 16:
            raise ValueError(f"pose video size {h}x{w} must be a multiple of 16")
        x = pose.permute(0, 3, 4, 1, 2).reshape(b * h * w, c, f)  # per-pixel time series
        x = self.time_down(x)
        f2 = x.shape[-1]
        x = x.reshape(b, h, w, c, f2).permute(0, 4, 3, 1, 2)  # b f' c h w
        step = f2 if not frames_per_chunk else frames_per_chunk
        out = []
        for i in range(b):
            feats = torch.cat([self.convs(x[i, s:s + step]) for s in range(0, f2, step)], dim=0)
            out.append(self.out(feats))
        return torch.stack(out)
