"""The plan of one clip: everything about where its frames go, worked out once from the inputs.

A :class:`ClipPlan` is built once (by the sampler node, the command line or :func:`~.swap.swap_face`) and
handed down to everything that needs the geometry, so no stage works it out again from the raw sizes:

* the source: frame size and which of its frames are swapped: from ``start``, every ``stride``-th frame, at
  most ``frame_num`` of them (:func:`frame_range`; the whole clip by default);
* the model's frames: the area setting and the resulting size (area-resized, centre-cropped to multiples
  of 16, :mod:`dreamidv_core.preprocess.video_ops`);
* the paste-back box: which box of the source frame the model's frames show
  (:func:`dreamidv_core.preprocess.geometry.source_crop_box`);
* the window layout of the padded clip (:func:`dreamidv_core.sampling.windows.plan_windows`);
* face-crop mode (optional): a crop window per frame around the target's face
  (:class:`dreamidv_core.preprocess.face_crop.CropTrack`); the model's frames are then those windows at the
  area's own size, :class:`~.clip_stream.FrameSource` crops every stream (video, mask, pose) with them and
  :meth:`ClipPlan.paste_back` puts the result back per frame.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

from ..errors import InputError
from ..io.frames import select_frames
from ..models.frame_grid import CROP_MULTIPLE, MIN_FRAMES, PATCH, SPATIAL_STRIDE
from ..preprocess.face_crop import (DEFAULT_MARGIN, DEFAULT_SMOOTHING, CropTrack, crop_model_size,
                                    crop_track_from_masks, paste_crops)
from ..preprocess.geometry import CropBox, paste_back, source_crop_box
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


def _ordinal(n: int) -> str:
    return {1: "every frame", 2: "every 2nd frame", 3: "every 3rd frame"}.get(n, f"every {n}th frame")


def frame_range(available: int, frame_num: Optional[int] = None, start: int = 0, stride: int = 1,
                minimum: int = MIN_FRAMES) -> range:
    """The source frames a swap reads: from ``start``, every ``stride``-th frame, at most ``frame_num`` of them
    (None or 0: all), as a ``range`` of indices into the ``available`` frames of the clip. At least
    ``minimum`` must remain (VideoHelperSuite's skip_first_frames, select_every_nth, frame_load_cap)."""
    start, stride = int(start), int(stride)
    if start < 0:
        raise InputError(f"start_frame must be 0 or more, got {start}")
    if stride < 1:
        raise InputError(f"select_every_nth must be 1 or more, got {stride}")
    if start >= available:
        raise InputError(f"start_frame {start} is past the end of the clip, which has {available} frames "
                         f"(0..{available - 1})")
    picked = range(start, available, stride)
    if minimum < MIN_FRAMES:  # e.g. pose extraction, which works on any number of frames
        if frame_num and frame_num < minimum:
            raise InputError(f"frame_num must be at least {minimum} (or 0 for all frames), got {frame_num}")
        return picked[:frame_num or None]
    if (start, stride) != (0, 1) and len(picked) < minimum:
        raise InputError(f"the frame range (start_frame {start}, {_ordinal(stride)}) leaves {len(picked)} of the "
                         f"clip's {available} frames; DreamID-V needs at least {minimum} frames: lower start_frame "
                         "or select_every_nth, or use a longer clip")
    return picked[:clip_frame_count(len(picked), frame_num or None)]


class SourceRange:
    """What a node reads of a source clip: ``frames`` frames from ``start``, every ``stride``-th
    (attributes of the dataclasses below)."""

    start: int
    stride: int
    frames: int

    @property
    def source_frames(self) -> range:
        """Indices in the source clip of the frames read (swapped)."""
        return range(self.start, self.start + self.frames * self.stride, self.stride)

    def select(self, frames):
        """These frames of a source frame sequence (all of the clip's frames), lazily (nothing is read)."""
        return select_frames(frames, self.source_frames)

    def indices_in(self, start: int, stride: int, count: int, what: str) -> range:
        """Where these source frames are in a sequence made from source frames ``start, start + stride, ...``
        (``count`` of them): e.g. a pose track extracted over the whole clip, used for a sub-range."""
        src, last = self.source_frames, start + (count - 1) * stride
        if src.start < start or src[-1] > last or (src.start - start) % stride or src.step % stride:
            raise InputError(f"{what} covers source frames {start}..{last} ({_ordinal(stride)}) but this node reads "
                             f"{self.range_text()}: give the node that made {what} the same start_frame and "
                             "select_every_nth (and a frame_num at least as large), or 0, 0 and 1 for the whole clip")
        first, step = (src.start - start) // stride, src.step // stride
        return range(first, first + self.frames * step, step)

    def range_text(self) -> str:
        """The frame range in words, for messages: "frames 10..49 (every 2nd frame)"."""
        last = self.start + (self.frames - 1) * self.stride
        return f"source frames {self.start}..{last} ({_ordinal(self.stride)}, {self.frames} frames)"


@dataclass(frozen=True)
class FrameSpan(SourceRange):
    """A frame range of a ``source_size`` (width, height) clip without the model's geometry (e.g. what the
    composite reads)."""

    source_size: Tuple[int, int]
    frames: int
    start: int = 0
    stride: int = 1

    @classmethod
    def of(cls, width: int, height: int, picked: range) -> "FrameSpan":
        return cls((int(width), int(height)), len(picked), picked.start, picked.step)


@dataclass(frozen=True)
class ClipPlan(SourceRange):
    """Source size, frame range, model frame size, paste-back box and window layout of one clip.

    ``source_size`` and ``area`` are (width, height); ``size`` is the model's frame (height, width). The
    clip's ``frames`` frames are the source frames ``start, start + stride, ...`` (:attr:`source_frames`).
    ``crop`` is the whole-frame mode's paste-back box; with a ``track`` (face-crop mode, one window per frame
    of the range) the model's frames are the track's windows and ``crop`` is not used: paste back with
    :meth:`paste_back`, which knows both.
    """

    source_size: Tuple[int, int]
    frames: int
    area: Tuple[int, int]
    size: Tuple[int, int]
    crop: CropBox
    layout: WindowLayout
    start: int = 0  # first source frame swapped
    stride: int = 1  # every stride-th source frame from start
    track: Optional[CropTrack] = None

    @classmethod
    def build(cls, source_width: int, source_height: int, available: int, frame_num: Optional[int] = None,
              width: int = 832, height: int = 480, window: int = 81, overlap: int = 16, start: int = 0,
              stride: int = 1, track: Optional[CropTrack] = None) -> "ClipPlan":
        """The plan of a clip of ``available`` frames of ``source_width`` x ``source_height``, swapped whole
        (``frame_num`` None) or at most ``frame_num`` frames from ``start`` every ``stride``-th frame
        (:func:`frame_range`), at a ``width`` x ``height`` area; with a face crop ``track`` (made for the
        frames of this range and :func:`~dreamidv_core.preprocess.face_crop.crop_model_size` of this area)
        the model sees the track's windows at ``width`` x ``height``."""
        picked = frame_range(available, frame_num, start, stride)
        frames = len(picked)
        if track is None:  # the whole frame: a clip too thin for the area is said here, before any encoding
            size = model_frame_size(source_height, source_width, width, height)
        else:
            if min(source_width, source_height) <= 0:
                raise InputError(f"the video's frames are {source_width}x{source_height}; they must not be empty")
            if min(width, height) <= 0:
                raise InputError(f"the area must be positive, got {width}x{height}")
            size = crop_model_size(width, height)
            _check_track(track, (source_width, source_height), frames, size)
            if min(size) < CROP_MULTIPLE:
                raise InputError(f"the {width}x{height} area makes {size[1]}x{size[0]} face windows, and the model "
                                 f"needs at least {CROP_MULTIPLE}x{CROP_MULTIPLE}")
        return cls(source_size=(source_width, source_height), frames=frames, area=(width, height), size=size,
                   crop=source_crop_box(source_height, source_width, width, height),
                   layout=plan_windows(frames, window, overlap), start=picked.start, stride=picked.step,
                   track=track)

    @property
    def reference_size(self) -> Tuple[int, int]:
        """(width, height) of the frame the reference photo is letterboxed onto: the source frame, or in
        face-crop mode the window (at the model's size: same aspect ratio)."""
        return self.source_size if self.track is None else (self.size[1], self.size[0])

    def paste_back(self, source: torch.Tensor, generated: torch.Tensor, start: int = 0,
                   present: Optional[Sequence[bool]] = None) -> torch.Tensor:
        """The model's frames put back into the source frames -> new float32 [k, H, W, 3].

        source: frames ``start``..``start+k-1`` of the clip [k, H, W, C] float in [0, 1]; generated: the
        same frames from the model [k, h, w, 3]. Whole frame: ``crop`` replaced by the resized frames. Face
        crop: each window blended in through its feathered mask. Either way the frames where the face is
        absent (``present`` False for frame start+j; in face-crop mode the track's) are the source's, and so
        is every pixel outside the paste region, bit for bit.
        """
        if self.track is not None:
            return paste_crops(source, generated, self.track, start)
        out = paste_back(source, generated, self.crop)
        if present is not None:
            for j in range(out.shape[0]):
                if not present[start + j]:
                    out[j] = source[j, ..., :3].to(out.dtype)
        return out

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


def face_crop_plan(mask, source_width: int, source_height: int, available: int, frame_num: Optional[int] = None,
                   width: int = 832, height: int = 480, window: int = 81, overlap: int = 16,
                   margin: float = DEFAULT_MARGIN, smoothing: float = DEFAULT_SMOOTHING, start: int = 0,
                   stride: int = 1) -> ClipPlan:
    """The plan of a clip in face-crop mode: crop windows around the face of ``mask`` (frames [F, H, W] or a
    mask video, the target only, one mask per frame of the range: ``start``, every ``stride``-th,
    :func:`frame_range`), ``margin`` face sizes on each side, smoothed over ``smoothing`` frames."""
    frames = len(frame_range(available, frame_num, start, stride))
    if len(mask) < frames:
        raise InputError(f"mask has {len(mask)} frames but the clip swaps {frames}; they must have the same length")
    track = crop_track_from_masks(mask, (source_width, source_height), crop_model_size(width, height), frames,
                                  margin, smoothing)
    return ClipPlan.build(source_width, source_height, available, frame_num, width, height, window, overlap, start,
                          stride, track)


def _check_track(track: CropTrack, source_size: Tuple[int, int], frames: int, size: Tuple[int, int]) -> None:
    if tuple(track.source_size) != tuple(source_size):
        raise InputError("the face-crop track was made for {}x{} frames, the video is {}x{}".format(
            *track.source_size, *source_size))
    if len(track) < frames:
        raise InputError(f"the face-crop track covers {len(track)} frames, the clip swaps {frames}")
    if abs(track.aspect - size[1] / size[0]) > 1e-3 * track.aspect:
        raise InputError(f"the face-crop track's windows have the aspect ratio {track.aspect:.4f}, the model's frames "
                         f"{size[1]}x{size[0]} ({size[1] / size[0]:.4f}): make the track for the same width and height")
