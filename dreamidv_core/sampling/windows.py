"""Windowed sampling for clips of any length: one latent for the whole clip, the DiT evaluated window by window.

Layout (:func:`plan_windows`)
-----------------------------
The clip of N >= 5 frames is padded at the end (last frame repeated) to Np = 4n+1 frames, whose latent has
F' = (Np-1)/4 + 1 frames. Windows of ``window`` frames (4n+1) overlapping by ``overlap`` frames (a multiple
of 4) are latent windows of Lw = (window-1)/4 + 1 frames overlapping by Lo = overlap/4, with stride
Lw - Lo; the last window is aligned to the end of the latent, so every window is full length (a clip no
longer than one window is a single window of Np frames). Latent frame 0 holds pixel frame 0, latent frame
k > 0 pixel frames 4k-3 .. 4k.

Blending (:func:`blend_weights`)
--------------------------------
Inside the overlap with the previous window a window's weight rises linearly, inside the overlap with the
next one it falls linearly; weights are normalised per latent frame (for two windows the ramps already sum
to 1; where the end-aligned last window makes three windows meet, the normalisation fixes it). Frames seen
by one window get weight 1. :class:`WindowedModel` merges the per-window velocity predictions with these
weights at every sampler step, so the sampler steps one coherent latent: no seam, no identity jump.

Per-window conditions
---------------------
Every window shares the text K/V, the reference tokens and (for a model with a trained ArcFace ID-token
projection) every block's ID K/V (one ``DreamIDVTransformer.prepare`` call; copies keep ``id_kv``).
A window's own conditions are its slice of the conditioning latent y and its slice of the clip's pose
tokens (kept on the CPU); they are built when the window is evaluated (a ``DiTConditions`` copy with the
y / pose fields replaced). Per-block pose K/V are cached across steps only when all windows' caches fit
(the ``dit.should_cache_pose_kv`` budget applied to the sum), so device memory stays flat as the clip grows.

Background preservation (:func:`preserve_background`)
-----------------------------------------------------
A model wrapper. Outside the face mask (``m``: the mask video max-pooled to the latent grid) the model's
clean-latent estimate ``x0 = x - sigma * v`` is pulled towards the source latent ``z_src``:
``x0' = x0 + s * (1 - m) * (z_src - x0)`` and the returned velocity is ``(x - x0') / sigma``. Flow samplers
(Euler, UniPC) integrate a constant clean estimate exactly, so with s = 1 a background latent on the
source trajectory ``(1 - sigma) z_src + sigma n`` stays on it at every step and the last step lands on
``z_src`` exactly; 0 < s < 1 pulls part of the way at every step. No sampler internals are touched.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F

from ..errors import InputError
from ..models.frame_grid import MIN_FRAMES, TEMPORAL_STRIDE, latent_frame_count, padded_frame_count, pixel_span
from ..progress import Cancel, Progress, check_cancel
from .guidance import make_guided_model


# ------------------------------------------------------------------------------------------------ layout

def check_window(window: int, overlap: int) -> None:
    if window < MIN_FRAMES or (window - 1) % TEMPORAL_STRIDE:
        raise InputError(f"window must be 4n+1 frames and at least {MIN_FRAMES} (5, 9, ..., 81), got {window}")
    if overlap < 0 or overlap % TEMPORAL_STRIDE:
        raise InputError(f"overlap must be a multiple of {TEMPORAL_STRIDE} frames (0, 4, 8, 16, ...), got {overlap}")
    if overlap >= window:
        raise InputError(f"overlap ({overlap}) must be smaller than the window ({window})")


@dataclass(frozen=True)
class WindowLayout:
    """Windows over the latent of a padded clip. ``starts``: latent start of each window (ascending)."""

    frames: int  # padded pixel frames Np (4n+1)
    window: int
    overlap: int
    latent_window: int  # Lw: latent frames per window (F' when the clip is one window)
    starts: Tuple[int, ...]

    @property
    def latent_frames(self) -> int:
        return latent_frame_count(self.frames)

    @property
    def count(self) -> int:
        return len(self.starts)

    def latent_range(self, i: int) -> Tuple[int, int]:
        return self.starts[i], self.starts[i] + self.latent_window

    def pixel_range(self, i: int) -> Tuple[int, int]:
        """Pixel frames [start, stop) of window i's latent frames (the first window's start at frame 0)."""
        return pixel_span(*self.latent_range(i))

    def weights(self) -> torch.Tensor:
        return blend_weights(self)


def plan_windows(frames: int, window: int = 81, overlap: int = 16) -> WindowLayout:
    """Window layout for a clip of ``frames`` (padded to 4n+1 first)."""
    check_window(window, overlap)
    if frames < MIN_FRAMES:
        raise InputError(f"the clip has {frames} frames; DreamID-V needs at least {MIN_FRAMES}")
    padded = padded_frame_count(frames)
    total = latent_frame_count(padded)
    lw, lo = latent_frame_count(window), overlap // TEMPORAL_STRIDE
    if total <= lw:
        return WindowLayout(padded, window, overlap, total, (0,))
    stride = lw - lo
    n = math.ceil((total - lw) / stride) + 1
    starts = [i * stride for i in range(n - 1)] + [total - lw]
    return WindowLayout(padded, window, overlap, lw, tuple(starts))


def blend_weights(layout: WindowLayout) -> torch.Tensor:
    """Per-window blend weights [count, Lw] float32; over the latent they sum to 1 at every frame."""
    n, lw, total = layout.count, layout.latent_window, layout.latent_frames
    raw = torch.ones(n, lw, dtype=torch.float64)
    pos = torch.arange(lw, dtype=torch.float64)
    for i, a in enumerate(layout.starts):
        end = a + lw
        if i > 0:  # rise over the overlap with the previous window
            o = layout.starts[i - 1] + lw - a
            raw[i] *= torch.where(pos < o, (pos + 1) / (o + 1), torch.ones_like(pos))
        if i < n - 1:  # fall over the overlap with the next window
            o = end - layout.starts[i + 1]
            g = pos + a  # global frame
            raw[i] *= torch.where(g >= layout.starts[i + 1], (end - g) / (o + 1), torch.ones_like(pos))
    total_w = torch.zeros(total, dtype=torch.float64)
    for i, a in enumerate(layout.starts):
        total_w[a:a + lw] += raw[i]
    out = torch.stack([raw[i] / total_w[a:a + lw] for i, a in enumerate(layout.starts)])
    return out.to(torch.float32)


# ------------------------------------------------------------------------------------------------ model

class WindowedModel:
    """``model(x [1, 16, F', h, w], sigma) -> v`` evaluating the guided DiT window by window and blending.

    ``shared``: ``dit.prepare(context, y[:, :Lw], refs, None)`` (text K/V, reference tokens, RoPE table of
    one window); ``y`` [32, F', h, w] (device); ``pose_tokens`` [1, F' * hw, C] for the whole clip (CPU) or
    None; ``cache_pose_kv``: keep every window's per-block pose K/V after its first evaluation.
    ``make_model(dit, cond, guidance, batch) -> model(x, sigma)`` builds a window's guided model (default:
    the swap's identity guidance, :func:`swap.make_guided_model`; the IVS passes its text guidance).
    With one window the call is exactly the single-pass guided model.
    """

    def __init__(self, dit, shared, layout: WindowLayout, y: torch.Tensor, pose_tokens: Optional[torch.Tensor],
                 guidance: float, batch: bool, cache_pose_kv: bool = False, progress: Progress = None,
                 cancel: Cancel = None, make_model: Optional[Callable] = None):
        self._guided = make_model or make_guided_model
        self.dit, self.shared, self.layout, self.y = dit, shared, layout, y
        self.guidance, self.batch, self.cache_pose_kv = guidance, batch, cache_pose_kv
        self.progress, self.cancel = progress, cancel
        self.weights = blend_weights(layout).to(y.device)
        self.pose = None
        if pose_tokens is not None:
            f = layout.latent_frames
            if pose_tokens.shape[-2] % f:
                raise InputError(f"pose tokens ({pose_tokens.shape[-2]}) do not split into {f} latent frames")
            self.pose = pose_tokens.reshape(f, pose_tokens.shape[-2] // f, pose_tokens.shape[-1])
        self._cache: List = [None] * layout.count
        self.evaluations = 0

    def conditions(self, i: int):
        """DiTConditions of window i (the shared ones with this window's y and pose fields)."""
        if self._cache[i] is not None:
            return self._cache[i]
        dit, a, b = self.dit, *self.layout.latent_range(i)
        device, cd = dit.patch_embedding.weight.device, dit.compute_dtype
        cond = replace(self.shared, y=self.y[:, a:b].to(device, cd)[None], pose_tokens=None, pose_kv=None,
                       extra={**self.shared.extra, "window": i})  # per-window state (e.g. the step cache)
        if self.pose is not None:
            tokens = self.pose[a:b].reshape(1, -1, self.pose.shape[-1])
            num_ref_tokens = 0 if cond.ref_tokens is None else cond.ref_tokens.shape[1]
            full = torch.cat([tokens.new_zeros(1, num_ref_tokens, tokens.shape[-1]), tokens], dim=1).to(device, cd)
            if self.cache_pose_kv:
                cond.pose_kv = [blk.self_attn.pose_kv(full, cond.rope, cond.parallel) for blk in dit.blocks]
                self._cache[i] = cond
            else:
                cond.pose_tokens = full
        return cond

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        n = self.layout.count
        out = None
        for i in range(n):
            check_cancel(self.cancel, f"before window {i + 1}/{n}")
            if self.progress is not None:
                self.progress("window", i + 1, n)
            a, b = self.layout.latent_range(i)
            v = self._guided(self.dit, self.conditions(i), self.guidance, self.batch)(x[:, :, a:b], sigma)
            self.evaluations += 1
            if n == 1:
                return v
            if out is None:
                out = torch.zeros(x.shape, dtype=torch.float32, device=v.device)
            out[:, :, a:b] += v.float() * self.weights[i].view(1, 1, -1, 1, 1)
        return out


def preserve_background(model, z_src: torch.Tensor, keep: torch.Tensor):
    """Wrap ``model(x, sigma)``: pull the clean-latent estimate towards ``z_src`` by ``keep`` (module docstring).

    z_src [1, 16, F', h, w]; keep [1, 1, F', h, w] = strength * (1 - face mask), in [0, 1].
    """

    def wrapped(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        v = model(x, sigma)
        s = torch.as_tensor(sigma).to(device=x.device, dtype=torch.float32)
        x0 = x - s * v
        return v + keep * (x0 - z_src) / s

    return wrapped


def latent_face_mask(mask_pixels: torch.Tensor) -> torch.Tensor:
    """Mask frames [k, H, W] in [0, 1] -> [k, H/8, W/8] (max over each 8x8 block); see :func:`group_frames`."""
    return F.max_pool2d(mask_pixels[:, None].float(), 8)[:, 0]


def group_frames(per_frame: torch.Tensor) -> torch.Tensor:
    """[Np, h, w] per pixel frame -> [F', h, w]: frame 0 alone, then the max over each group of 4 frames."""
    rest = per_frame[1:].reshape(-1, TEMPORAL_STRIDE, *per_frame.shape[1:]).amax(dim=1)
    return torch.cat([per_frame[:1], rest])
