"""Face-crop mode: the swap runs on a window around the target's face instead of the whole frame.

A small face in a large frame reaches the model at a few pixels when the whole frame is resized to the
model's area (a 150-pixel face in a 2160-pixel-high frame is ~33 pixels at 480). In face-crop mode each
frame is cropped to a window around the face first, and the model's frames are pasted back:

* :func:`mask_face_boxes`: the face box of every frame from the mask (its bounding box; NaN where empty);
* :func:`plan_crop_track`: per frame a crop window at the model's aspect ratio that holds the face with
  ``margin`` face sizes on each side, smoothed over time (Gaussian, zero phase: no lag, no jitter; the
  size more strongly than the position), split at shot cuts and jumps, interpolated across frames without
  a face, kept inside the frame (shifted, never padded: the model sees only real pixels; a face at the
  border sits off-centre in its window) -> :class:`CropTrack` (float boxes: sub-pixel, no rounding jitter);
* :func:`prepare_crops`: frames -> the windows resized to the model's size (PIL bicubic on the exact float
  box, antialiased like the whole-frame resize);
* :func:`paste_crops` / :func:`paste_window_`: the model's frames resized into their windows of the source
  frames through a feathered mask (a ramp inside the window's edges, none along a frame border); every pixel outside the
  window, and every pixel of a frame where the face is absent, is the source's, bit for bit;
* :func:`box_jitter`: RMS of the second difference of the window corners (pixels), the smoothness figure.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import InputError
from ..io.video import to_uint8_frames
from ..models.frame_grid import CROP_MULTIPLE

DEFAULT_MARGIN = 1.0  # face sizes of context on each side: the face is a third of the window's height
DEFAULT_SMOOTHING = 4.0  # Gaussian sigma in frames for the window's centre (twice that for its size)
FEATHER = 0.08  # soft edge of the paste, as a fraction of the window's height
MIN_CROP = 32  # smallest window side in source pixels
JUMP = 0.75  # the face moving more than this many face sizes in one frame (or resizing 1.5x) is a cut


@dataclass(frozen=True)
class CropTrack:
    """Crop windows of a clip. boxes: per frame (left, top, width, height) in source pixels (floats, inside
    the frame, aspect = the model's width / height); present: per frame whether the face is there (only
    those frames are pasted back); source_size: (width, height); feather: the paste's soft edge as a
    fraction of the window height; margin, smoothing: how the track was made (for the record)."""

    boxes: Tuple[Tuple[float, float, float, float], ...]
    present: Tuple[bool, ...]
    source_size: Tuple[int, int]
    feather: float = FEATHER
    margin: float = DEFAULT_MARGIN
    smoothing: float = DEFAULT_SMOOTHING

    def __len__(self) -> int:
        return len(self.boxes)

    def box(self, i: int) -> Tuple[float, float, float, float]:
        """Frame i's window; past the end (the padding frames of 4n+1) the last one."""
        return self.boxes[min(i, len(self.boxes) - 1)]

    def is_present(self, i: int) -> bool:
        return self.present[min(i, len(self.present) - 1)]

    @property
    def aspect(self) -> float:
        _, _, w, h = self.boxes[0]
        return w / h

    def region(self, i: int) -> Tuple[int, int, int, int]:
        """(x0, y0, x1, y1): the whole pixels frame i's window touches (the paste region)."""
        left, top, w, h = self.box(i)
        sw, sh = self.source_size
        return (max(0, math.floor(left)), max(0, math.floor(top)), min(sw, math.ceil(left + w)),
                min(sh, math.ceil(top + h)))

    def describe(self) -> str:
        heights = [b[3] for b in self.boxes]
        shown = sum(self.present)
        return (f"face crop: windows {min(heights):.0f}-{max(heights):.0f} px high (median {np.median(heights):.0f}) "
                f"of the {self.source_size[0]}x{self.source_size[1]} frames, margin {self.margin:g}, smoothing "
                f"{self.smoothing:g} frames, jitter {box_jitter(np.array(self.boxes)):.2f} px RMS; pasted back in "
                f"{shown} of {len(self)} frames (the others are the source's)")


def crop_model_size(width: int, height: int) -> Tuple[int, int]:
    """(height, width) of the model's frames in face-crop mode: the area itself, floored to multiples of 16."""
    h, w = height - height % CROP_MULTIPLE, width - width % CROP_MULTIPLE
    if min(h, w) < CROP_MULTIPLE:
        raise InputError(f"face crop: the area {width}x{height} is too small (at least {CROP_MULTIPLE}x{CROP_MULTIPLE})")
    return h, w


# ----------------------------------------------------------------------------- face boxes
def _mask_frame(masks, i: int, what: str) -> np.ndarray:
    """Frame i of a mask clip ([F, H, W] float/uint8, or a video [F, H, W, C]) as bool [H, W] (over half)."""
    return to_uint8_frames(masks[i:i + 1], what)[0, ..., 0] > 127


def mask_face_boxes(masks, count: Optional[int] = None, what: str = "mask") -> np.ndarray:
    """Bounding box (x0, y0, x1, y1; pixel edges) of each mask frame -> float64 [F, 4], NaN rows where the
    mask is empty. Reads one frame at a time."""
    count = len(masks) if count is None else count
    out = np.full((count, 4), np.nan)
    for i in range(count):
        m = _mask_frame(masks, i, what)
        rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        if len(rows):
            out[i] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
    return out


def mask_presence(masks, count: Optional[int] = None, what: str = "mask") -> List[bool]:
    """Per frame: whether the mask marks anything (a face to swap)."""
    count = len(masks) if count is None else count
    return [bool(_mask_frame(masks, i, what).any()) for i in range(count)]


# ----------------------------------------------------------------------------- the track
def _smooth(values: np.ndarray, sigma: float) -> np.ndarray:
    """Zero-phase smoothing of [N] values: at each frame a Gaussian-weighted (``sigma`` frames) straight-line
    fit of its neighbours (no lag, and steady motion is kept exactly, also at the ends of the run)."""
    n = len(values)
    if sigma <= 0 or n < 3:
        return values.astype(np.float64).copy()
    radius = int(math.ceil(3 * sigma))
    out = np.empty(n)
    for i in range(n):
        j = np.arange(max(0, i - radius), min(n, i + radius + 1))
        t = (j - i).astype(np.float64)
        w = np.exp(-0.5 * (t / sigma) ** 2)
        sw, st, stt = w.sum(), (w * t).sum(), (w * t * t).sum()
        sy, sty = (w * values[j]).sum(), (w * t * values[j]).sum()
        det = sw * stt - st * st
        out[i] = (stt * sy - st * sty) / det if det > 1e-9 else sy / sw  # the line's value at t = 0
    return out


def _segments(present: np.ndarray, centre: np.ndarray, face: np.ndarray, cuts: Sequence[int]) -> List[Tuple[int, int]]:
    """Runs [a, b) of consecutive present frames, also split at ``cuts`` and at jumps of the face."""
    breaks = set(cuts)
    out, start = [], None
    for i in range(len(present)):
        if present[i] and start is not None and (i in breaks or not present[i - 1] or (
                np.linalg.norm(centre[i] - centre[i - 1]) > JUMP * max(face[i], face[i - 1])
                or max(face[i], face[i - 1]) > 1.5 * min(face[i], face[i - 1]))):
            out.append((start, i))
            start = None
        if present[i] and start is None:
            start = i
        if not present[i] and start is not None:
            out.append((start, i))
            start = None
    if start is not None:
        out.append((start, len(present)))
    return out


def plan_crop_track(face_boxes: np.ndarray, source_size: Tuple[int, int], model_size: Tuple[int, int],
                    margin: float = DEFAULT_MARGIN, smoothing: float = DEFAULT_SMOOTHING,
                    cuts: Sequence[int] = (), feather: float = FEATHER, what: str = "mask") -> CropTrack:
    """Face boxes [F, 4] (x0, y0, x1, y1; NaN rows where there is no face) -> the clip's crop windows.

    model_size: (height, width) of the model's frames (the windows' aspect ratio). A window holds the face
    box grown by ``margin`` face sizes on each side (its longer side after the aspect ratio). Centre and
    log-height are smoothed per segment (``smoothing`` frames; the height with twice that), frames without
    a face get the windows interpolated between their neighbours (held at the clip's ends), then each
    window is widened if the smoothed one lost the face, limited to the frame and shifted inside it.
    """
    boxes = np.asarray(face_boxes, np.float64).reshape(-1, 4)
    if margin < 0:
        raise InputError(f"crop_margin must be 0 or more (face sizes of context on each side), got {margin}")
    present = np.isfinite(boxes).all(1) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    if not present.any():
        raise InputError(f"face crop: the {what} is empty in all {len(boxes)} frames, so there is no face to crop to; "
                         "check the mask (or turn face crop off)")
    sw, sh = source_size
    mh, mw = model_size
    aspect = mw / mh
    centre = np.where(present[:, None], (boxes[:, :2] + boxes[:, 2:]) / 2, np.nan)
    fw, fh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    height = np.maximum(fh, fw / aspect) * (1 + 2 * margin)
    face = np.sqrt(np.maximum(fw * fh, 1.0))
    cx, cy, lh = np.full(len(boxes), np.nan), np.full(len(boxes), np.nan), np.full(len(boxes), np.nan)
    for a, b in _segments(present, centre, face, cuts):
        cx[a:b] = _smooth(centre[a:b, 0], smoothing)
        cy[a:b] = _smooth(centre[a:b, 1], smoothing)
        lh[a:b] = _smooth(np.log(height[a:b]), 2 * smoothing)
    idx = np.arange(len(boxes))
    for arr in (cx, cy, lh):  # frames without a face: interpolated between neighbours, held at the ends
        arr[~present] = np.interp(idx[~present], idx[present], arr[present])
    h = np.exp(lh)
    # the smoothed window must still hold the face: grow it where needed (never for frames without one)
    need = np.where(present, np.maximum(2 * np.maximum(np.abs(boxes[:, [0, 2]] - cx[:, None]).max(1) / aspect,
                                                       np.abs(boxes[:, [1, 3]] - cy[:, None]).max(1)), 0), 0)
    h = np.maximum(h, np.nan_to_num(need))
    h = np.clip(h, min(MIN_CROP, sh, sw / aspect), min(sh, sw / aspect))
    w = h * aspect
    left = np.clip(cx - w / 2, 0, sw - w)
    top = np.clip(cy - h / 2, 0, sh - h)
    out = tuple((float(l), float(t), float(ww), float(hh)) for l, t, ww, hh in zip(left, top, w, h))
    return CropTrack(out, tuple(bool(p) for p in present), (int(sw), int(sh)), float(feather), float(margin),
                     float(smoothing))


def crop_track_from_masks(masks, source_size: Tuple[int, int], model_size: Tuple[int, int], count: Optional[int] = None,
                          margin: float = DEFAULT_MARGIN, smoothing: float = DEFAULT_SMOOTHING,
                          what: str = "mask") -> CropTrack:
    """:func:`plan_crop_track` on the mask's bounding boxes (the mask describes the target only)."""
    return plan_crop_track(mask_face_boxes(masks, count, what), source_size, model_size, margin, smoothing, what=what)


def box_jitter(boxes: np.ndarray) -> float:
    """RMS over frames and the four corner coordinates of the second difference of (left, top, right,
    bottom) of boxes [F, 4] given as (left, top, width, height), in pixels (0 for fewer than 3 frames)."""
    b = np.asarray(boxes, np.float64)
    if len(b) < 3:
        return 0.0
    corners = np.stack([b[:, 0], b[:, 1], b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]], 1)
    return float(np.sqrt(np.mean(np.diff(corners, n=2, axis=0) ** 2)))


# ----------------------------------------------------------------------------- crop and paste
def crop_frame(image: np.ndarray, box: Tuple[float, float, float, float], size: Tuple[int, int]) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [h, w, 3] (size = (h, w)): the float window ``box`` resized with PIL bicubic."""
    left, top, w, h = box
    return np.array(Image.fromarray(image).resize((size[1], size[0]), Image.BICUBIC,
                                                  box=(left, top, left + w, top + h)))


def prepare_crops(frames, track: CropTrack, start: int, stop: int, size: Tuple[int, int], what: str) -> torch.Tensor:
    """Frames [start, stop) (``frames[start:stop]`` is read) cropped to their windows -> float32 [3, k, h, w]
    in [0, 1]; frames are converted one at a time into a preallocated tensor."""
    part = frames[start:stop]
    out = torch.empty(3, stop - start, *size)
    sw, sh = track.source_size
    for k in range(stop - start):
        frame = to_uint8_frames(part[k:k + 1], what)[0]
        if frame.shape[:2] != (sh, sw):
            raise InputError(f"{what}: frame {start + k} is {frame.shape[1]}x{frame.shape[0]}, the face-crop track "
                             f"was made for {sw}x{sh} frames")
        out[:, k] = torch.from_numpy(crop_frame(frame, track.box(start + k), size)).permute(2, 0, 1).float().div_(255)
    return out


def _edge_ramp(coords: torch.Tensor, lo: float, hi: float, feather: float, open_lo: bool, open_hi: bool) -> torch.Tensor:
    """Per pixel centre: 0 outside [lo, hi], ramping up to 1 over ``feather`` pixels inside each edge, except
    an edge along the frame border (``open_*``), which stays hard."""
    inf = torch.full_like(coords, float("inf"))
    d_lo = inf if open_lo else coords - lo
    d_hi = inf if open_hi else hi - coords
    d = torch.minimum(d_lo, d_hi)
    inside = (coords >= lo) & (coords <= hi)
    ramp = (d / max(feather, 1e-6)).clamp(0, 1)
    ramp = ramp * ramp * (3 - 2 * ramp)  # smoothstep
    return torch.where(inside, ramp, torch.zeros_like(ramp))


def paste_window_(out: torch.Tensor, generated: torch.Tensor, track: CropTrack, i: int) -> torch.Tensor:
    """One frame, in place: out [H, W, 3] float32 (the source frame), generated [h, w, 3] float (the model's
    frame of window i) blended into the window through the feathered mask; nothing else is written."""
    if not track.is_present(i):
        return out
    left, top, w, h = track.box(i)
    x0, y0, x1, y1 = track.region(i)
    sw, sh = track.source_size
    gen = generated.permute(2, 0, 1)[None].to(out.device, torch.float32)
    # resample in two steps: an antialiased resize to about the window's size, then the sub-pixel placement
    near = (max(1, round(h)), max(1, round(w)))
    if tuple(gen.shape[-2:]) != near:
        shrink = near[0] < gen.shape[-2] or near[1] < gen.shape[-1]
        gen = F.interpolate(gen, size=near, mode="bicubic", align_corners=False, antialias=shrink).clamp_(0, 1)
    xs = torch.arange(x0, x1, dtype=torch.float32, device=out.device) + 0.5
    ys = torch.arange(y0, y1, dtype=torch.float32, device=out.device) + 0.5
    gx = (xs - left) / w * 2 - 1
    gy = (ys - top) / h * 2 - 1
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), -1)[None]
    patch = F.grid_sample(gen, grid, mode="bilinear", padding_mode="border", align_corners=False)[0].permute(1, 2, 0)
    feather = track.feather * h
    ax = _edge_ramp(xs, left, left + w, feather, left <= 0.5, left + w >= sw - 0.5)
    ay = _edge_ramp(ys, top, top + h, feather, top <= 0.5, top + h >= sh - 0.5)
    alpha = torch.minimum(ay[:, None], ax[None, :])[..., None]
    region = out[y0:y1, x0:x1]
    out[y0:y1, x0:x1] = torch.lerp(region, patch.clamp(0, 1), alpha)  # exact at alpha 0 and 1
    return out


def paste_crops(source: torch.Tensor, generated: torch.Tensor, track: CropTrack, start: int = 0) -> torch.Tensor:
    """The model's frames pasted back into the source frames. source: [k, H, W, C] float in [0, 1] (frames
    start..start+k-1 of the clip); generated: [k, h, w, 3]. Returns a new float32 [k, H, W, 3]."""
    if source.dim() != 4 or generated.dim() != 4 or source.shape[0] != generated.shape[0]:
        raise InputError(f"expected source [k, H, W, 3] and generated [k, h, w, 3] with the same k, got "
                         f"{list(source.shape)} and {list(generated.shape)}")
    sw, sh = track.source_size
    if tuple(source.shape[1:3]) != (sh, sw):
        raise InputError(f"source frames are {source.shape[2]}x{source.shape[1]}, the face-crop track was made for "
                         f"{sw}x{sh}")
    out = source[..., :3].to(torch.float32).clone()
    for k in range(source.shape[0]):
        paste_window_(out[k], generated[k, ..., :3], track, start + k)
    return out
