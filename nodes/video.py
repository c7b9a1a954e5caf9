"""ComfyUI's VIDEO type for the pack: what the swap nodes read from a VIDEO input, and the VIDEO they output.

Inputs (:func:`clip_of`): an IMAGE batch (frames in memory), core Load Video's VIDEO (its file, decoded on
demand and seekable; a trimmed VIDEO of newer ComfyUI is read over its trim window), a VIDEO made from
tensors (Create Video: its frames are in memory already), or this pack's own VIDEO (its clip, read exactly).

Output (:class:`DreamIDVVideo`): a VIDEO whose frames are made on demand from a core
:class:`~dreamidv_core.pipelines.clips.Clip` (the swapped frames pasted into the source frames, or the
composite), never held whole. It is encoded to H.264 mp4, with the source's exact frame rate and sound, the
first time it is saved (or, for the composite, when the node runs), into ComfyUI's temporary folder; every
later ``save_to`` copies that file's packets (no decoding, no re-encoding), so Save Video run again with
another prefix, a second Save Video or an API node cost a file copy. ``get_components`` (Get Video
Components) reads every frame into one IMAGE tensor: the memory-hungry path, for other packs.
"""
from __future__ import annotations

import contextlib
import logging
import os
import uuid
import weakref
from fractions import Fraction
from pathlib import Path
from typing import Optional

import torch
from comfy_api.latest import Input, InputImpl, Types

from dreamidv_core.errors import InputError
from dreamidv_core.io.frames import select_frames
from dreamidv_core.io.video import check_pixels, remux_video
from dreamidv_core.pipelines.clips import Clip, SourceClip, clip_tensor, write_clip
from dreamidv_core.preprocess.pose.extract import PoseTrack

from . import common

log = logging.getLogger(__name__)

H264, MP4 = "h264", "mp4"
DEFAULT_CRF = 18  # libx264 constant quality (visually lossless); Save Video's crf input overrides it


def _name(value) -> str:
    """An enum's value or a string, lower case ("auto", "mp4", "h264")."""
    return str(getattr(value, "value", value) or "auto").lower()


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class DreamIDVVideo(Input.Video):
    """A VIDEO over a :class:`Clip` (module docstring). Re-iterable: every call opens and closes its own files."""

    def __init__(self, clip: Clip):
        self.clip = clip
        self._rendered = {}  # (crf, preset) -> path of the encoded mp4 in ComfyUI's temporary folder
        self._finalizer = weakref.finalize(self, lambda files: [_remove(p) for p in files.values()], self._rendered)

    # ---------------------------------------------------------------- what a VIDEO tells without decoding
    def get_dimensions(self) -> tuple:
        return self.clip.width, self.clip.height

    def get_frame_count(self) -> int:
        return self.clip.count

    def get_frame_rate(self) -> Fraction:
        return self.clip.rate

    def get_duration(self) -> float:
        return self.clip.duration

    def get_container_format(self) -> str:
        return MP4

    def get_ram_usage(self) -> int:
        """For ComfyUI's RAM-pressure cache: nothing clip-sized is held (frames live in files)."""
        return 64 << 10

    # ---------------------------------------------------------------- encoding
    def render(self, crf: Optional[float] = None, preset: Optional[str] = None) -> Path:
        """The clip encoded as H.264 mp4 with its sound (once per setting; later calls reuse the file)."""
        key = (DEFAULT_CRF if crf is None else float(crf), preset or None)
        path = self._rendered.get(key)
        if path is not None and os.path.isfile(path):
            return Path(path)
        folder = common.temp_folder()
        target = folder / f"video_{uuid.uuid4().hex}.mp4"
        write_clip(self.clip, target, crf=key[0], preset=key[1],
                   progress=common.progress_hook(self.clip.count, "write"), cancel=common.cancel_hook())
        self._rendered[key] = str(target)
        return target

    def save_to(self, path, format=Types.VideoContainer.AUTO, codec=Types.VideoCodec.AUTO,
                metadata: Optional[dict] = None, **kwargs):
        """Write the video to ``path`` (a file path or a writable binary buffer) as H.264 mp4. ``crf`` and
        ``preset`` (newer Save Video) are honoured; other newer options (bit depth, colour space) are not:
        the pack writes 8-bit yuv420p."""
        if _name(format) not in ("auto", MP4):
            raise InputError(f"video: DreamID-V writes mp4; Save Video asked for {_name(format)}")
        if _name(codec) not in ("auto", H264):
            raise InputError(f"video: DreamID-V writes H.264; Save Video asked for {_name(codec)}")
        ignored = {k: v for k, v in kwargs.items() if k not in ("crf", "preset") and v not in (None, 8, "auto")}
        if ignored:
            log.warning("DreamID-V video: save options %s are not supported and were ignored", sorted(ignored))
        rendered = self.render(kwargs.get("crf"), kwargs.get("preset"))
        remux_video(rendered, path, metadata)

    def get_stream_source(self) -> str:
        return str(self.render())

    # ---------------------------------------------------------------- the memory-hungry path
    def get_components(self) -> Types.VideoComponents:
        """Every frame as one IMAGE tensor [F, H, W, 3] (float32: ~24 MB a 1080p frame), the sound as AUDIO."""
        images = clip_tensor(self.clip, common.progress_hook(self.clip.count, "frames"), common.cancel_hook())
        audio = None
        if self.clip.audio is not None:
            wave = self.clip.audio.waveform()
            audio = {"waveform": torch.from_numpy(wave)[None], "sample_rate": int(self.clip.audio.sample_rate)}
        return Types.VideoComponents(images=images, audio=audio, frame_rate=self.clip.rate)

    def as_trimmed(self, start_time: Optional[float] = None, duration: Optional[float] = None,
                   strict_duration: bool = False) -> Optional["DreamIDVVideo"]:
        """Newer ComfyUI's trim: the frames from ``start_time`` for ``duration`` seconds (None/0: to the end)."""
        rate = self.clip.rate
        a = max(0, int(round((start_time or 0.0) * rate)))
        b = self.clip.count if not duration else min(self.clip.count, a + int(round(duration * rate)))
        if b <= a or (strict_duration and duration and (b - a) < int(round(duration * rate))):
            return None
        return DreamIDVVideo(self.clip.part(a, b))


# ------------------------------------------------------------------------------------------------ inputs

def _trim_window(video):
    """Newer ComfyUI's lazy trim of a VIDEO ((0, 0) when untrimmed or on 0.3.75)."""
    getter = getattr(video, "get_active_trim_window", None)
    try:
        return tuple(float(v) for v in getter()) if getter is not None else (0.0, 0.0)
    except Exception:  # noqa: BLE001
        return 0.0, 0.0


def clip_of(value, what: str) -> Clip:
    """A node input (IMAGE tensor or VIDEO) as a :class:`Clip`; nothing is decoded here."""
    if isinstance(value, DreamIDVVideo):
        return value.clip
    if isinstance(value, torch.Tensor):
        from dreamidv_core.pipelines.adapters import rgb_frames

        return SourceClip.from_frames(rgb_frames(value, what).detach().cpu(), name=what)
    if isinstance(value, InputImpl.VideoFromComponents):
        parts = value.get_components()  # frames in memory already (Create Video)
        return SourceClip.from_frames(parts.images, rate=Fraction(parts.frame_rate), audio=parts.audio,
                                      name=f"{what} (frames)")
    if isinstance(value, Input.Video):
        source = value.get_stream_source()
        name = source if isinstance(source, str) else f"{what} (in-memory video)"
        clip = SourceClip.from_file(source, name)
        start, duration = _trim_window(value)
        if (start, duration) != (0.0, 0.0):
            clip = clip.time_window(start, duration)
        if tuple(value.get_dimensions()) != (clip.width, clip.height):
            raise InputError(f"{what}: this VIDEO is cropped ({value.get_dimensions()[0]}x{value.get_dimensions()[1]} of "
                             f"{clip.width}x{clip.height}); DreamID-V reads uncropped videos: crop the result instead")
        return clip
    raise InputError(f"{what}: expected IMAGE frames or a VIDEO (e.g. from Load Video), got {type(value).__name__}")


def video_size(value, what: str) -> tuple:
    """(width, height) of an IMAGE batch or a VIDEO, without decoding."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 4 or value.shape[0] == 0:
            raise InputError(f"{what}: expected frames [F, H, W, C], got {list(value.shape)}")
        return int(value.shape[2]), int(value.shape[1])
    if isinstance(value, Input.Video):
        return tuple(int(v) for v in value.get_dimensions())
    raise InputError(f"{what}: expected IMAGE frames or a VIDEO, got {type(value).__name__}")




# ------------------------------------------------------------------------------------------------ clip inputs

def source_geometry(value, what: str) -> tuple:
    """(width, height, frame count of the source clip) of an IMAGE, a VIDEO or a DREAMIDV_POSE_MASK."""
    if isinstance(value, PoseTrack):
        return value.width, value.height, value.available or value.start + len(value) * value.stride
    clip = clip_of(value, what)
    return clip.width, clip.height, clip.count


def mask_tensor(mask) -> torch.Tensor:
    """MASK [F, H, W] (or [H, W] for one frame; an IMAGE wired as mask: its first channel), as a view; NaN or
    0..255 values are an InputError."""
    if not isinstance(mask, torch.Tensor):
        raise InputError(f"mask: expected a MASK tensor [frames, height, width], got {type(mask).__name__}")
    if mask.dim() == 2:
        mask = mask[None]
    if mask.dim() == 4 and mask.shape[-1] in (1, 3, 4):
        mask = mask[..., 0]
    if mask.dim() != 3:
        raise InputError(f"mask: expected [frames, height, width], got {list(mask.shape)}")
    check_pixels(mask, "mask")  # NaN or 0..255 values are said, not clamped
    return mask


@contextlib.contextmanager
def plan_frames(value, plan, what: str, layer: str = "pose", source_count: Optional[int] = None):
    """The frames of ``plan`` from a node input, lazily: a DREAMIDV_POSE_MASK (its ``layer``: "pose" or "mask",
    drawn on demand; it may cover more of the source than the plan), a MASK tensor, IMAGE frames or a VIDEO
    (these hold the whole source clip: the plan's frame range is taken from them)."""
    w, h = plan.source_size
    if isinstance(value, PoseTrack):
        if (value.width, value.height) != (w, h):
            raise InputError(f"{what} was made from {value.width}x{value.height} frames, the video is {w}x{h}; "
                             "connect the pose node that read this video")
        if source_count is not None and value.available and value.available != source_count:
            raise InputError(f"{what} was made from a clip of {value.available} frames but the video has "
                             f"{source_count}; connect the pose node that read this video")
        indices = plan.indices_in(value.start, value.stride, len(value), what)
        yield select_frames(value.mask if layer == "mask" else value.pose, indices)
        return
    if isinstance(value, torch.Tensor) and layer == "mask":
        value = mask_tensor(value)
        count, size = value.shape[0], (int(value.shape[2]), int(value.shape[1]))
        frames = value
    else:
        frames = None
        clip = clip_of(value, what)
        count, size = clip.count, (clip.width, clip.height)
    if source_count is not None and count != source_count:
        raise InputError(f"{what} has {count} frames but the video has {source_count}; they must have the same length")
    if size != (w, h):
        raise InputError(f"{what} is {size[0]}x{size[1]}, the video is {w}x{h}; they must have the same size")
    if frames is not None:
        yield plan.select(frames)
        return
    with clip.open() as seq:
        yield plan.select(seq)
