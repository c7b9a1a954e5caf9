"""A clip streamed through the VAE and the PoseGuider window by window: frames are read, prepared and
encoded a piece at a time, so memory stays that of one window however long the clip is.

* :class:`FrameSource`: frames [start, stop) of a clip, resized and cropped to the model's size (in face-crop
  mode: each frame's crop window of the plan's track, resized), padded at the end to 4n+1 frames;
* :func:`encode_clip` / :func:`decode_clip`: the whole clip's latent from / to frames, streaming;
* :func:`clip_pose_tokens`: the PoseGuider tokens of the whole clip, window piece by piece;
* :func:`clip_face_mask`: the mask video on the latent grid (for background preservation).
"""
from __future__ import annotations

from typing import Callable

import torch

from ..errors import InputError, NonFiniteError
from ..io.frames import select_frames
from ..models.frame_grid import TEMPORAL_STRIDE, latent_frame_count
from ..preprocess.face_crop import prepare_crops
from ..preprocess.video_ops import prepare_frames
from ..progress import Cancel, check_cancel
from ..sampling.windows import group_frames, latent_face_mask
from .plan import ClipPlan


ENCODE_CHUNK = 16  # pixel frames prepared (resized, cropped) and handed to a streaming VAE at a time


class FrameSource:
    """Frames [start, stop) of the clip of ``plan`` (``plan.frames`` frames, padded at the end by repeating the
    last) -> [3, k, H, W] float32 in [0, 1], H x W = ``plan.size``.

    ``frames``: anything :func:`video_ops.prepare_frames` accepts that supports ``len`` and slicing (uint8 or
    float arrays/tensors, or a lazy reader); only the requested frames are read and prepared.
    """

    def __init__(self, frames, plan: ClipPlan, what: str):
        self.frames, self.plan, self.what = frames, plan, what
        self.n = plan.frames
        self._last = None

    @property
    def size(self):
        return self.plan.size

    def _prepare(self, start: int, stop: int) -> torch.Tensor:
        if self.plan.track is not None:  # face-crop mode: every frame's own window, at the model's size
            return prepare_crops(self.frames, self.plan.track, start, stop, self.plan.size, self.what)
        # a lazy view: prepare_frames reads one source frame at a time, never the whole piece at source size
        out = prepare_frames(select_frames(self.frames, range(start, stop)), stop - start, *self.plan.area, self.what)
        if tuple(out.shape[-2:]) != self.plan.size:
            raise InputError(f"{self.what}: frames {start}..{stop - 1} become {out.shape[-1]}x{out.shape[-2]} at the "
                             f"model's area, the clip's plan is {self.plan.size[1]}x{self.plan.size[0]} (frames of "
                             "another size than the video's?)")
        return out

    def __call__(self, start: int, stop: int) -> torch.Tensor:
        real = min(stop, self.n)
        parts = [self._prepare(start, real)] if start < real else []
        pad = stop - max(start, real)
        if pad > 0:
            if self._last is None:
                self._last = self._prepare(self.n - 1, self.n)
            parts.append(self._last.expand(-1, pad, -1, -1))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def encode_clip(vae, source: FrameSource, transform: Callable, device, cancel: Cancel = None) -> torch.Tensor:
    """Prepared frames -> normalised latent [16, F', h, w] float32 on ``device``, window-sized memory.

    A VAE with ``encode_iter`` (:class:`dreamidv_core.models.vae.WanVAE`) gets the clip as one causal stream of
    ``ENCODE_CHUNK``-frame chunks: exactly the whole-clip encoding. A VAE with only ``encode`` (ComfyUI's,
    through :class:`adapters.PixelSpaceVAE`) encodes window-sized pieces; a piece after the first starts one
    latent frame early (4 frames) and that extra latent is dropped, so the causal cache restarts with one
    frame of context at each piece border (a small difference from a whole-clip encoding there).
    """
    layout = source.plan.layout
    np_, total, lw = layout.frames, layout.latent_frames, layout.latent_window
    if hasattr(vae, "encode_iter"):
        def chunks():
            for s in range(0, np_, ENCODE_CHUNK):
                check_cancel(cancel, f"while encoding {source.what}")
                yield transform(source(s, min(s + ENCODE_CHUNK, np_)))[None]

        out = None
        for i, lat in enumerate(vae.encode_iter(chunks())):
            if out is None:
                out = torch.empty(lat.shape[1], total, *lat.shape[-2:], dtype=torch.float32, device=device)
            out[:, i] = lat[0, :, 0]
        return out
    if layout.count == 1:
        return vae.encode(transform(source(0, np_))[None])[0].to(device)
    out = None
    for a in range(0, total, lw):
        check_cancel(cancel, f"while encoding {source.what}")
        b = min(a + lw, total)
        p0 = 0 if a == 0 else TEMPORAL_STRIDE * (a - 1)
        lat = vae.encode(transform(source(p0, TEMPORAL_STRIDE * (b - 1) + 1))[None])[0]
        if out is None:
            out = torch.empty(lat.shape[0], total, *lat.shape[-2:], dtype=torch.float32, device=device)
        out[:, a:b] = lat[:, (0 if a == 0 else 1):]
    return out


def decode_clip(vae, latent: torch.Tensor, plan: ClipPlan, write: Callable[[torch.Tensor, int], None],
                cancel: Cancel = None, **tiles) -> None:
    """Latent [16, F', h, w] -> ``write(frames [k, H, W, 3] float32 in [0, 1], start)`` for the plan's frames.

    Streams with ``decode_iter`` when the VAE has it (exactly the whole-clip decoding), else decodes
    window-sized latent pieces, each after the first with one latent frame of context whose 1 decoded frame
    is dropped (the causal cache restarts at piece borders, as for :func:`encode_clip`). ``tiles``
    (``tile``, ``overlap`` in latent pixels) are handed to the VAE's decode for spatial tiling.
    """

    def emit(chunk: torch.Tensor, start: int) -> None:
        stop = min(start + chunk.shape[2], frames)
        if stop > start:
            if not bool(torch.isfinite(chunk).all()):
                raise NonFiniteError(f"the VAE decoded NaN/inf pixels (frames {start}-{stop - 1}) from a finite "
                                     "latent: the VAE file holds NaN or infinite weights, or overflows in fp16; "
                                     "load the VAE again (or in fp32)")
            out = chunk[0, :, :stop - start].add(1).div(2).clamp(0, 1).permute(1, 2, 3, 0)
            write(out, start)

    layout, frames = plan.layout, plan.frames
    total, lw = layout.latent_frames, layout.latent_window
    if hasattr(vae, "decode_iter"):
        start = 0
        # on a GPU the idle tiles' temporal caches wait in host memory (one tile's cache on the device)
        opts = dict(tiles, offload_caches=True) if tiles and latent.device.type == "cuda" else tiles
        for chunk in vae.decode_iter(latent[None], **opts):
            emit(chunk, start)
            start += chunk.shape[2]
            if start >= frames:
                break
            check_cancel(cancel, "while decoding")
        return
    for a in range(0, total, lw):
        check_cancel(cancel, "while decoding")
        b = min(a + lw, total)
        if a == 0:
            emit(vae.decode(latent[None, :, :b], **tiles), 0)
        else:
            emit(vae.decode(latent[None, :, a - 1:b], **tiles)[:, :, 1:], TEMPORAL_STRIDE * a - 3)


def clip_pose_tokens(dit, source: FrameSource, cancel: Cancel = None) -> torch.Tensor:
    """PoseGuider tokens of the whole padded clip [1, F' * hw, C] on the CPU, computed window piece by piece.

    The PoseGuider's only temporal layers are two stride-2 convolutions (kernel 3) along time, so latent
    frames [a, b) depend on pixel frames 4a-3 .. 4b-1 only: each piece runs on pixel frames
    [4(a-1), 4b] (clipped to the clip) and keeps its latent frames a .. b-1, which equal the tokens of a
    whole-clip pass while memory stays that of one window.
    """
    layout = source.plan.layout
    np_, total, lw = layout.frames, layout.latent_frames, layout.latent_window
    if layout.count == 1:
        return dit.pose_tokens(source(0, np_)[None]).cpu()
    pieces = []
    for a in range(0, total, lw):
        check_cancel(cancel, "while computing pose tokens")
        b = min(a + lw, total)
        p0, p1 = max(0, TEMPORAL_STRIDE * (a - 1)), min(np_, TEMPORAL_STRIDE * b + 1)
        tok = dit.pose_tokens(source(p0, p1)[None])
        tok = tok.reshape(latent_frame_count(p1 - p0), -1, tok.shape[-1])
        pieces.append(tok[a - p0 // TEMPORAL_STRIDE:b - p0 // TEMPORAL_STRIDE].cpu())
    c = pieces[0].shape[-1]
    return torch.cat(pieces).reshape(1, -1, c)


def clip_face_mask(source: FrameSource) -> torch.Tensor:
    """The mask video on the latent grid [F', h, w] (max over 8x8 pixels and each 4-frame group), CPU."""
    padded = source.plan.layout.frames
    per_frame = [latent_face_mask(source(s, min(s + ENCODE_CHUNK, padded))[0]) for s in range(0, padded, ENCODE_CHUNK)]
    return group_frames(torch.cat(per_frame))
