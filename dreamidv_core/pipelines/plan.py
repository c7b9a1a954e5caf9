"""The plan of one clip: everything about where its frames go, worked out once from the inputs.

A :class:`ClipPlan` is built once (by the sampler node, the command line or :func:`~.swap.swap_face`) and
handed down to everything that needs the geometry, so no stage works it out again from the raw sizes:

* the source: frame size and how many frames are swapped (the whole clip, or its first ``frame_num``);
* the model's frames: the area setting and the resulting size (area-resized, centre-cropped to multiples
  of 16, :mod:`dreamidv_core.preprocess.video_ops`);
* the paste-back box: which box of the source frame the model's frames show
  (:func:`dreamidv_core.preprocess.geometry.source_crop_box`);
* the window layout of the padded clip (:func:`dreamidv_core.sampling.windows.plan_windows`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from ..errors import InputError
from ..models.frame_grid import MIN_FRAMES, PATCH, SPATIAL_STRIDE
from ..preprocess.geometry import CropBox, source_crop_box
from ..preprocess.video_ops import model_frame_size
from ..sampling.windows import WindowLayout, plan_windows


def clip_frame_count(available: int, frame_num: Optional[int] = None) -> int:
    """Frames swapped (and returned): the whole clip, or its first ``frame_num`` frames (no flooring)."""
    if frame_num is not None and frame_num < MIN_FRAMES:
        raise InputError(f"frame_num must be at least {MIN_FRAMES} (or None for the whole clip), got {frame_num}")
    n = available if frame_num is None else min(available, frame_num)
    if n < MIN_FRAMES:
        raise InputError(f"the video has {available} frames; DreamID-V needs at least {MIN_FRAMES}")
    return n


@dataclass(frozen=True)
class ClipPlan:
    """Source size, frame count, model frame size, paste-back box and window layout of one clip.

    ``source_size`` and ``area`` are (width, height); ``size`` is the model's frame (height, width).
    """

    source_size: Tuple[int, int]
    frames: int
    area: Tuple[int, int]
    size: Tuple[int, int]
    crop: CropBox
    layout: WindowLayout

    @classmethod
    def build(cls, source_width: int, source_height: int, available: int, frame_num: Optional[int] = None,
              width: int = 832, height: int = 480, window: int = 81, overlap: int = 16) -> "ClipPlan":
        """The plan of a clip of ``available`` frames of ``source_width`` x ``source_height``, swapped whole
        (``frame_num`` None) or its first ``frame_num`` frames, at a ``width`` x ``height`` area."""
        size = model_frame_size(source_height, source_width, width, height)
        frames = clip_frame_count(available, frame_num)
        return cls(source_size=(source_width, source_height), frames=frames, area=(width, height), size=size,
                   crop=source_crop_box(source_height, source_width, width, height),
                   layout=plan_windows(frames, window, overlap))

    @property
    def window(self) -> Tuple[int, int]:
        """(window, overlap) in frames."""
        return self.layout.window, self.layout.overlap

    @property
    def latent_grid(self) -> Tuple[int, int, int]:
        """(latent frames of the padded clip, latent height, latent width)."""
        return self.layout.latent_frames, self.size[0] // SPATIAL_STRIDE, self.size[1] // SPATIAL_STRIDE

    @property
    def tokens_per_latent_frame(self) -> int:
        return (self.size[0] // (SPATIAL_STRIDE * PATCH)) * (self.size[1] // (SPATIAL_STRIDE * PATCH))
