"""Building blocks of the Wan 2.1 video VAE (causal 3-D encoder and decoder).

Every layer keeps the parameter name and shape of the released ``Wan2.1_VAE.pth`` so its state dict
loads with strict key matching. Where the official model keeps a weightless layer (SiLU, Dropout,
ZeroPad2d, Upsample) inside an ``nn.Sequential``, the weighted layers here live in an
``nn.ModuleDict`` keyed by the position they hold in that Sequential (``residual.0`` is the first
norm, ``residual.2`` the first conv, ...), so the names match without keeping dead modules.

Tensor layout throughout: ``[B, C, T, H, W]`` (batch, channels, frames, height, width).

Temporal causality: a time kernel of 3 sees the current frame and the two before it; the frames
before the first one are zeros. To process a clip in chunks, each causal layer keeps the last input
frames it has seen in a :class:`TemporalCache`; a chunked run then produces exactly the frames a
whole-clip ("one-shot", ``cache=None``) run produces. The layers that change the frame rate treat
the first frame of a clip specially, as the official model does:

* temporal downsampling (encoder) passes frame 0 through unchanged and then maps every two new
  frames to one, each output seeing the previous frame and two new ones (kernel 3, stride 2, no
  padding);
* temporal upsampling (decoder) passes frame 0 through unchanged and maps every later frame to two,
  with a causal kernel-3 conv over frames 1.. (zeros before frame 1, never frame 0).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Set

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TemporalCache", "CausalConv3d", "RMSNorm", "Resample", "ResidualBlock",
           "AttentionBlock", "Encoder3d", "Decoder3d"]


class TemporalCache:
    """State one chunked pass carries from one chunk to the next.

    ``tails[layer]`` holds the last input frames a causal layer has seen (``[B, C, 1 or 2, H, W]``,
    zeros standing in for frames before the clip's start);
    ``started`` holds the temporal-upsampling layers that have already passed frame 0 through.
    A new cache starts a new clip; the same cache must see the chunks of one clip in order.
    """

    def __init__(self) -> None:
        self.tails: Dict[nn.Module, torch.Tensor] = {}
        self.started: Set[nn.Module] = set()


def _conv2d_per_frame(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2-D conv to every frame of ``x`` [B, C, T, H, W] without folding T into the batch.

    The weight ``[O, C, kh, kw]`` is viewed as ``[O, C, 1, kh, kw]``, which saves the two
    transposing copies a ``(B T) C H W`` reshape would need.
    """
    return F.conv3d(x, conv.weight.unsqueeze(2), conv.bias, stride=(1, *conv.stride),
                    padding=(0, *conv.padding))


class CausalConv3d(nn.Conv3d):
    """3-D convolution that is causal in time: ``2 * padding[0]`` frames of left context, none right.

    Spatial padding is ordinary (symmetric zeros). With a :class:`TemporalCache`, the left context
    is taken from the previous chunk's last frames (zeros only before the first frame of the clip).

    Input ``[B, C_in, T, H, W]`` -> output ``[B, C_out, T', H', W']`` with ``T' = T`` for stride 1.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0):
        pad_t, pad_h, pad_w = nn.modules.utils._triple(padding)
        super().__init__(in_channels, out_channels, kernel_size, stride=stride,
                         padding=(0, pad_h, pad_w))
        self.context = 2 * pad_t  # frames of left context the kernel needs

    def forward(self, x: torch.Tensor, cache: Optional[TemporalCache] = None) -> torch.Tensor:
        if self.context == 0:
            return super().forward(x)
        tail = cache.tails.get(self) if cache is not None else None
        if tail is None:  # start of the clip: zeros before frame 0
            b, c, _, h, w = x.shape
            tail = x.new_zeros(b, c, self.context, h, w)
        seq = torch.cat([tail, x], dim=2)
        if cache is not None:  # a clone, so this chunk's activation can be freed
            cache.tails[self] = seq[:, :, -self.context:].clone()
        return super().forward(seq)


class RMSNorm(nn.Module):
    """Channel RMS normalisation: ``x / ||x||_channels * sqrt(C) * gamma`` (no bias).

    ``gamma`` has the official shape ``[C, 1, 1, 1]`` (``images=False``, used on video tensors) or
    ``[C, 1, 1]`` (``images=True``, the attention norm); it is broadcast over ``[B, C, ...]`` inputs
    of any rank.
    """

    def __init__(self, dim: int, images: bool):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if images else torch.ones(dim, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gamma = self.gamma.view(-1, *([1] * (x.dim() - 2)))
        # = F.normalize(x, dim=1), whose CPU norm kernel is several times slower over dim 1
        norm = x.square().sum(dim=1, keepdim=True).sqrt_().clamp_min_(1e-12)
        return torch.div(x, norm).mul_(self.scale).mul_(gamma)


class Resample(nn.Module):
    """Spatial 2x resampling, optionally with temporal 2x resampling.

    Modes (the official names):

    * ``downsample2d``: ``[B, C, T, H, W] -> [B, C, T, H/2, W/2]`` (pad right/bottom by 1, conv 3x3
      stride 2);
    * ``downsample3d``: as above, then ``T = 1 + 2k -> 1 + k`` (frame 0 kept, kernel-3 stride-2 time
      conv ``time_conv`` over the rest);
    * ``upsample2d``: ``[B, C, T, H, W] -> [B, C/2, T, 2H, 2W]`` (nearest 2x, conv 3x3);
    * ``upsample3d``: first ``T = 1 + k -> 1 + 2k`` (``time_conv`` makes 2C channels per frame that
      become two frames), then as ``upsample2d``.

    ``resample["1"]`` is the 2-D conv (index 1 of the official Sequential, after the weightless pad or
    upsample layer).
    """

    MODES = ("upsample2d", "upsample3d", "downsample2d", "downsample3d")

    def __init__(self, dim: int, mode: str):
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"unknown resample mode {mode!r}; expected one of {self.MODES}")
        self.mode = mode
        if mode.startswith("upsample"):
            self.resample = nn.ModuleDict({"1": nn.Conv2d(dim, dim // 2, 3, padding=1)})
        else:
            self.resample = nn.ModuleDict({"1": nn.Conv2d(dim, dim, 3, stride=2)})
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: torch.Tensor, cache: Optional[TemporalCache] = None) -> torch.Tensor:
        if self.mode == "upsample3d":
            x = self._double_frames(x, cache)
        conv = self.resample["1"]
        if self.mode.startswith("upsample"):
            # nearest-exact at an integer factor of 2 copies each pixel into a 2x2 block
            x = F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest-exact")
            return _conv2d_per_frame(conv, x)
        x = _conv2d_per_frame(conv, F.pad(x, (0, 1, 0, 1)))
        if self.mode == "downsample3d":
            x = self._halve_frames(x, cache)
        return x

    def _double_frames(self, x: torch.Tensor, cache: Optional[TemporalCache]) -> torch.Tensor:
        """``[B, C, T, H, W] -> [B, C, T2, H, W]``: frame 0 of the clip once, every later frame twice."""
        first = None
        if cache is None or self not in cache.started:
            first, x = x[:, :, :1], x[:, :, 1:]
            if cache is not None:
                cache.started.add(self)
        if x.shape[2] > 0:
            b, c, t, h, w = x.shape
            y = self.time_conv(x, cache)  # [B, 2C, T, H, W]: channel half j is output frame 2t + j
            x = y.view(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)
        return x if first is None else torch.cat([first, x], dim=2)

    def _halve_frames(self, x: torch.Tensor, cache: Optional[TemporalCache]) -> torch.Tensor:
        """``[B, C, T, H, W] -> [B, C, T2, H, W]``: frame 0 of the clip kept, then one frame per two."""
        tail = cache.tails.get(self) if cache is not None else None
        if cache is not None:
            cache.tails[self] = x[:, :, -1:].clone()
        if tail is None:  # start of the clip
            first, seq = x[:, :, :1], x
        else:
            first, seq = None, torch.cat([tail, x], dim=2)
        if seq.shape[2] == 1:  # nothing but frame 0 so far
            return first
        y = self.time_conv(seq)
        return y if first is None else torch.cat([first, y], dim=2)


class ResidualBlock(nn.Module):
    """``x + shortcut(x)`` around norm, SiLU, causal conv 3x3x3, norm, SiLU, causal conv 3x3x3.

    ``[B, in_dim, T, H, W] -> [B, out_dim, T, H, W]``. The shortcut is a 1x1x1 conv when the channel
    count changes. (The official Dropout at index 5 has rate 0 and no weights.)
    """

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.residual = nn.ModuleDict({
            "0": RMSNorm(in_dim, images=False),
            "2": CausalConv3d(in_dim, out_dim, 3, padding=1),
            "3": RMSNorm(out_dim, images=False),
            "6": CausalConv3d(out_dim, out_dim, 3, padding=1),
        })
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: Optional[TemporalCache] = None) -> torch.Tensor:
        r = self.residual
        h = r["2"](F.silu(r["0"](x), inplace=True), cache)
        h = r["6"](F.silu(r["3"](h), inplace=True), cache)
        return h.add_(self.shortcut(x))


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame separately (no temporal mixing).

    ``[B, C, T, H, W] -> [B, C, T, H, W]``; ``to_qkv`` and ``proj`` are 1x1 ``Conv2d`` as released.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        qkv = _conv2d_per_frame(self.to_qkv, self.norm(x))  # [B, 3C, T, H, W]
        qkv = qkv.permute(0, 2, 3, 4, 1).reshape(b * t, 1, h * w, 3 * c)
        q, k, v = qkv.chunk(3, dim=-1)  # each [B*T, 1, H*W, C]
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.view(b, t, h, w, c).permute(0, 4, 1, 2, 3)  # [B, C, T, H, W]
        return _conv2d_per_frame(self.proj, out).add_(x)


class _MiddleBlock(nn.ModuleList):
    """Residual block, per-frame attention, residual block (``middle.0``, ``middle.1``, ``middle.2``)."""

    def __init__(self, dim: int):
        super().__init__([ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim)])

    def forward(self, x: torch.Tensor, cache: Optional[TemporalCache] = None) -> torch.Tensor:
        x = self[0](x, cache)
        x = self[1](x)
        return self[2](x, cache)


def _head(in_dim: int, out_dim: int) -> nn.ModuleDict:
    """Output block: norm (``head.0``), SiLU, causal conv 3x3x3 (``head.2``)."""
    return nn.ModuleDict({"0": RMSNorm(in_dim, images=False),
                          "2": CausalConv3d(in_dim, out_dim, 3, padding=1)})


def _run_head(head: nn.ModuleDict, x: torch.Tensor, cache: Optional[TemporalCache]) -> torch.Tensor:
    return head["2"](F.silu(head["0"](x), inplace=True), cache)


class Encoder3d(nn.Module):
    """Video ``[B, 3, 1 + 4k, H, W]`` -> ``[B, out_channels, 1 + k, H/8, W/8]`` (for three halvings).

    Stage ``i`` has ``num_res_blocks`` residual blocks to ``dim * dim_mult[i]`` channels, then (except
    after the last stage) a 2x spatial downsampling that also halves time where
    ``temporal_downsample[i]``.
    """

    def __init__(self, dim: int, out_channels: int, dim_mult: Sequence[int], num_res_blocks: int,
                 temporal_downsample: Sequence[bool]):
        super().__init__()
        dims = [dim * m for m in (1, *dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        blocks: List[nn.Module] = []
        for i in range(len(dim_mult)):
            in_dim, out_dim = dims[i], dims[i + 1]
            for _ in range(num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i < len(dim_mult) - 1:
                blocks.append(Resample(out_dim, "downsample3d" if temporal_downsample[i] else "downsample2d"))
        self.downsamples = nn.ModuleList(blocks)
        self.middle = _MiddleBlock(dims[-1])
        self.head = _head(dims[-1], out_channels)

    def forward(self, x: torch.Tensor, cache: Optional[TemporalCache] = None) -> torch.Tensor:
        x = self.conv1(x, cache)
        for block in self.downsamples:
            x = block(x, cache)
        x = self.middle(x, cache)
        return _run_head(self.head, x, cache)


class Decoder3d(nn.Module):
    """Latent ``[B, z_dim, 1 + k, h, w]`` -> video ``[B, 3, 1 + 4k, 8h, 8w]`` (for three doublings).

    Stages run from the deepest width (``dim * dim_mult[-1]``) to ``dim``; each has
    ``num_res_blocks + 1`` residual blocks, then (except the last) a 2x spatial upsampling that halves
    the channels and also doubles time where ``temporal_upsample[i]``.
    """

    def __init__(self, dim: int, z_dim: int, dim_mult: Sequence[int], num_res_blocks: int,
                 temporal_upsample: Sequence[bool]):
        super().__init__()
        dims = [dim * m for m in (dim_mult[-1], *reversed(dim_mult))]
        self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.middle = _MiddleBlock(dims[0])
        blocks: List[nn.Module] = []
        for i in range(len(dim_mult)):
            # every stage after the first receives the halved channels of the upsampling before it
            in_dim, out_dim = (dims[i] if i == 0 else dims[i] // 2), dims[i + 1]
            for _ in range(num_res_blocks + 1):
                blocks.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i < len(dim_mult) - 1:
                blocks.append(Resample(out_dim, "upsample3d" if temporal_upsample[i] else "upsample2d"))
        self.upsamples = nn.ModuleList(blocks)
        self.head = _head(dims[-1], 3)

    def forward(self, x: torch.Tensor, cache: Optional[TemporalCache] = None) -> torch.Tensor:
        x = self.conv1(x, cache)
        x = self.middle(x, cache)
        for block in self.upsamples:
            x = block(x, cache)
        return _run_head(self.head, x, cache)
