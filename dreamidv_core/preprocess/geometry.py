"""Where the model's frames sit in the source video, and how to put them back.

The reference pipeline area-resizes each source frame (downscale only) and centre-crops it to
multiples of 16 (:mod:`dreamidv_core.preprocess.video_ops`). The generated frames therefore show a box of the
source frame, scaled. :func:`source_crop_box` gives that box in source pixels and :func:`paste_back`
resizes the generated frames to the box and pastes them into the source frames, keeping every source
pixel outside the box.

Worked example (used in the tests): a 1920x1080 source with an 832x480 area is resized to 843x474,
cropped to 832x464 at offset (6, 5) of the resized frame; in source pixels that is x 6*1920/843 =
13.67 -> 14 to 838*1920/843 = 1908.6 -> 1909 and y 5*1080/474 = 11.39 -> 11 to 469*1080/474 =
1068.6 -> 1069, i.e. the box (left 14, top 11, width 1895, height 1058).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import InputError
from .video_ops import cropped_size, resized_size


@dataclass(frozen=True)
class CropBox:
    """A box of the source frame in source pixels (integers; right/bottom exclusive)."""

    left: int
    top: int
    width: int
    height: int

    @property
    def right(self) -> int:
        return self.left + self.width

    @property
    def bottom(self) -> int:
        return self.top + self.height


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def source_crop_box(source_height: int, source_width: int, area_width: int, area_height: int) -> CropBox:
    """The box of a ``source_width`` x ``source_height`` frame that the model's frames show.

    Mirrors the resize and centre crop of :mod:`dreamidv_core.preprocess.video_ops` (crop offsets rounded with
    Python's ``round`` as there), then maps the crop edges back by the resize factors per axis and
    rounds them half up. Without resizing (a source already within the area) the box is exact.
    """
    if min(source_height, source_width, area_width, area_height) <= 0:
        raise InputError(f"sizes must be positive: source {source_width}x{source_height}, area {area_width}x{area_height}")
    rh, rw = resized_size(source_height, source_width, area_width, area_height)
    ch, cw = cropped_size(rh, rw)
    if ch <= 0 or cw <= 0:
        raise InputError(f"a {source_width}x{source_height} source leaves no 16-pixel block at area "
                         f"{area_width}x{area_height}")
    top = int(round((rh - ch) / 2.0))
    left = int(round((rw - cw) / 2.0))
    sx, sy = source_width / rw, source_height / rh
    x0, x1 = _round_half_up(left * sx), _round_half_up((left + cw) * sx)
    y0, y1 = _round_half_up(top * sy), _round_half_up((top + ch) * sy)
    x1, y1 = min(x1, source_width), min(y1, source_height)
    return CropBox(left=x0, top=y0, width=max(1, x1 - x0), height=max(1, y1 - y0))


def resize_frames(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[F, H, W, C] float -> [F, height, width, C] (bicubic, antialiased when shrinking, clamped to [0, 1])."""
    if tuple(frames.shape[1:3]) == (height, width):
        return frames
    x = frames.permute(0, 3, 1, 2).float()
    shrink = height < frames.shape[1] or width < frames.shape[2]
    out = torch.empty(frames.shape[0], frames.shape[3], height, width, dtype=x.dtype, device=x.device)
    for i in range(0, frames.shape[0], 8):  # a few frames at a time: bounded memory for long clips
        out[i:i + 8] = F.interpolate(x[i:i + 8], size=(height, width), mode="bicubic", align_corners=False,
                                     antialias=shrink)
    return out.clamp_(0, 1).permute(0, 2, 3, 1)


def paste_back(source: torch.Tensor, generated: torch.Tensor, box: CropBox) -> torch.Tensor:
    """Put generated frames into the source frames.

    source: [F, H, W, 3] float in [0, 1]; generated: [F, h, w, 3] float in [0, 1] (the model's frames).
    Returns a new [F, H, W, 3] float32 tensor: the source, with ``box`` replaced by the generated
    frames resized to the box. ``F`` must agree.
    """
    if source.dim() != 4 or generated.dim() != 4:
        raise InputError(f"expected frames [F, H, W, C], got source {list(source.shape)} and generated "
                         f"{list(generated.shape)}")
    if source.shape[0] != generated.shape[0]:
        raise InputError(f"source has {source.shape[0]} frames, generated {generated.shape[0]}; they must match")
    h, w = source.shape[1:3]
    if box.left < 0 or box.top < 0 or box.right > w or box.bottom > h:
        raise InputError(f"crop box {box} lies outside the {w}x{h} source frame")
    out = source[..., :3].to(torch.float32).clone()
    patch = resize_frames(generated[..., :3].to(out.device, torch.float32), box.height, box.width)
    out[:, box.top:box.bottom, box.left:box.right] = patch
    return out
