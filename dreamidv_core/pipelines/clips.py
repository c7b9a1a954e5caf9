"""Clips: a video's frames (read when needed), exact frame rate and sound, as the swap reads its source and
hands its results on, so that no stage holds a whole clip at source resolution.

A :class:`Clip` has a size, a frame count, a frame rate (a ``Fraction``: 30000/1001 stays exact) and maybe a
sound (:class:`~dreamidv_core.io.audio.AudioClip`); :meth:`Clip.open` gives its frames as a frame sequence
(:mod:`dreamidv_core.io.frames`) for the duration of a ``with`` block: files are opened there and closed
after, nothing is kept between uses, so a clip can be read any number of times.

* :class:`SourceClip`: a video file (decoded on demand, seekable) or frames in memory (an IMAGE tensor);
* :class:`SwappedClip`: the swap's frames at the model's resolution (kept exactly in a
  :class:`~dreamidv_core.io.frame_store.FrameStore` on disk) pasted back into the source frames they replace;
* :class:`CompositedClip`: generated frames over the original ones inside a feathered face/head mask;
* :func:`write_clip`: a clip encoded as H.264 mp4 with its sound, a chunk of frames at a time;
* :func:`clip_tensor`: every frame as one float32 tensor (the memory-hungry IMAGE form, for interop).

Frame range and sound: a swap of every ``stride``-th source frame plays at ``rate / stride`` and keeps the
source's sound unchanged over the same span of time (VideoHelperSuite's select_every_nth does the same), so
picture and sound stay in sync; a clip shorter than its source keeps the sound of its own span only.
"""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from fractions import Fraction
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import InputError
from ..io.audio import AudioClip, FileAudio, WaveformAudio
from ..io.frame_store import FrameStore, MaskStore
from ..io.frames import LazyFrames, iter_chunks, select_frames
from ..io.video import VideoProbe, VideoReader, VideoWriter, probe_video, source_name, to_uint8_frames
from ..preprocess.composite import composite_chunk
from ..preprocess.segmentation import mask_frame, track_head_iter
from ..progress import Cancel, Progress, check_cancel, reporter
from .plan import ClipPlan

DEFAULT_RATE = Fraction(24)  # frames in memory (an IMAGE batch) carry no frame rate
CHUNK = 8  # frames pasted, composited or encoded at a time


def to_float_frames(frames) -> torch.Tensor:
    """Frames [k, H, W, C] (uint8 -> / 255, as ComfyUI's video loader does; or float) -> float32 [k, H, W, 3]."""
    t = torch.from_numpy(np.ascontiguousarray(frames)) if isinstance(frames, np.ndarray) else frames
    t = t.float() / 255.0 if t.dtype == torch.uint8 else t.float()
    if t.dim() == 3:
        t = t[..., None]
    if t.shape[-1] in (1, 2):
        return t[..., :1].expand(*t.shape[:-1], 3)
    return t[..., :3]


class Clip(ABC):
    """A video: ``width`` x ``height``, ``count`` frames at ``rate`` frames per second, ``audio`` or None."""

    width: int
    height: int
    count: int
    rate: Fraction
    audio: Optional[AudioClip]
    name: str

    def __len__(self) -> int:
        return self.count

    @property
    def duration(self) -> float:
        return float(self.count / self.rate)

    @abstractmethod
    def open(self):
        """Context manager -> the clip's frames as a frame sequence ([k, H, W, 3], uint8 or float in [0, 1])."""

    def part(self, start: int, stop: int) -> "Clip":
        """Frames [start, stop) and their sound."""
        return self.select(range(start, stop))

    def select(self, indices: range) -> "Clip":
        """The frames at ``indices`` (a forward ``range``), playing at ``rate / step`` with the sound of their
        span of time (:func:`sub_audio`)."""
        if len(indices) == 0 or indices.step < 1 or indices[0] < 0 or indices[-1] >= self.count:
            raise InputError(f"{self.name}: frames {indices.start}..{indices.stop - 1} (step {indices.step}) are not "
                             f"in the clip (0..{self.count - 1})")
        if indices == range(self.count):
            return self
        return _Selection(self, indices)


class _Selection(Clip):
    def __init__(self, clip: Clip, indices: range):
        self.clip, self.indices = clip, indices
        self.width, self.height, self.count = clip.width, clip.height, len(indices)
        self.rate, self.name = clip.rate / indices.step, clip.name
        self.audio = sub_audio(clip.audio, clip.rate, indices)

    @contextlib.contextmanager
    def open(self):
        with self.clip.open() as frames:
            yield select_frames(frames, self.indices)


class SourceClip(Clip):
    """A source video: a file (``probe`` set; decoded on demand by a :class:`VideoReader` per use) or frames in
    memory (a frame sequence such as an IMAGE tensor, read as it is)."""

    def __init__(self, width: int, height: int, count: int, rate: Fraction, name: str, audio=None,
                 source=None, probe: Optional[VideoProbe] = None, frames=None):
        self.width, self.height, self.count, self.rate, self.name = int(width), int(height), int(count), rate, name
        self.audio, self.source, self.probe, self.frames = audio, source, probe, frames

    @classmethod
    def from_file(cls, source, name: Optional[str] = None) -> "SourceClip":
        """A video file (a path, a BytesIO or bytes): probed once (one pass over its packets, no decoding)."""
        name = name or source_name(source)
        probe = probe_video(source, name)
        audio = None
        if probe.has_audio:
            sound = FileAudio(source, name)
            audio = AudioClip(sound, probe.start_time, float(probe.count / probe.rate))
        return cls(probe.width, probe.height, probe.count, probe.rate, name, audio, source=source, probe=probe)

    @classmethod
    def from_frames(cls, frames, rate: Optional[Fraction] = None, audio=None, name: str = "frames") -> "SourceClip":
        """Frames in memory [F, H, W, C]; ``audio``: an :class:`AudioClip`, or a ComfyUI AUDIO dict."""
        if len(frames) == 0 or getattr(frames, "ndim", 4) not in (3, 4):
            raise InputError(f"{name}: expected frames [F, H, W, C], got {list(getattr(frames, 'shape', []))}")
        rate = Fraction(rate).limit_denominator(1001) if rate is not None and not isinstance(rate, Fraction) else rate
        rate = rate or DEFAULT_RATE
        if isinstance(audio, dict):
            audio = AudioClip(WaveformAudio(audio["waveform"], audio["sample_rate"], name=f"{name} audio"), 0.0,
                              float(len(frames) / rate))
        return cls(frames.shape[2], frames.shape[1], len(frames), rate, name, audio, frames=frames)

    @contextlib.contextmanager
    def open(self):
        if self.probe is None:
            yield self.frames
            return
        reader = VideoReader(self.source, probe=self.probe, name=self.name)
        try:
            yield reader
        finally:
            reader.close()

    def frame_time(self, i: int) -> float:
        """Seconds of frame ``i`` on the source's timeline (where its sound is)."""
        return self.probe.frame_time(i) if self.probe is not None else float(i / self.rate)

    def time_window(self, start_s: float, duration_s: float) -> Clip:
        """The frames whose time lies in ``[start_s, start_s + duration_s)`` (0: to the end), from the clip's
        start, as newer ComfyUI trims a VIDEO (``get_active_trim_window``)."""
        t0 = self.frame_time(0)
        times = [self.frame_time(i) - t0 for i in range(self.count)]
        a = next((i for i, t in enumerate(times) if t >= start_s - 1e-6), self.count)
        b = self.count if duration_s <= 0 else next(
            (i for i, t in enumerate(times) if t >= start_s + duration_s - 1e-6), self.count)
        if b <= a:
            raise InputError(f"{self.name}: the trim {start_s:g} s + {duration_s:g} s holds no frame")
        return self.part(a, b)


def sub_audio(audio: Optional[AudioClip], rate: Fraction, indices: range) -> Optional[AudioClip]:
    """The sound of frames ``indices`` of a clip at ``rate`` (VideoHelperSuite-like with a stride: the whole
    span of time from the first frame to one stride past the last, unchanged)."""
    if audio is None or len(indices) == 0:
        return None
    return audio.part(float(indices.start / rate), float(len(indices) * indices.step / rate))


class SwappedClip(Clip):
    """The swap's result in its source: frame i is the plan's i-th source frame with frame i of ``store``
    (the model's frames, uint8) pasted back by :meth:`ClipPlan.paste_back` (whole frame: the paste-back box
    replaced by the frame resized to it; face crop: the frame's window blended in through its feathered
    mask; frames with ``present`` False, or absent from the crop track: the source's). Plays at the source's
    rate divided by the plan's stride, with the source's sound over the same span."""

    def __init__(self, source: Clip, plan: ClipPlan, store: FrameStore, name: Optional[str] = None,
                 present: Optional[Sequence[bool]] = None):
        if len(store) < plan.frames:
            raise InputError(f"{name or source.name}: {len(store)} swapped frames for a plan of {plan.frames}")
        if (source.width, source.height) != plan.source_size:
            raise InputError(f"{source.name}: frames are {source.width}x{source.height}, the swap was planned for "
                             "{}x{}".format(*plan.source_size))
        self.source, self.plan, self.store, self.present = source, plan, store, present
        self.width, self.height, self.count = source.width, source.height, plan.frames
        self.rate = source.rate / plan.stride
        self.name = name or f"{source.name} (swapped)"
        self.audio = sub_audio(source.audio, source.rate, plan.source_frames)

    def paste(self, source_frames, index: Sequence[int]) -> np.ndarray:
        """uint8 [k, H, W, 3]: source frames (already those of ``index``) with the swapped frames pasted in."""
        index = list(index)
        src = to_float_frames(source_frames)
        gen = to_float_frames(take(self.store, index))
        out = torch.empty(len(index), self.height, self.width, 3)
        for j, i in enumerate(index):  # one frame at a time: the indices need not be consecutive
            out[j:j + 1] = self.plan.paste_back(src[j:j + 1], gen[j:j + 1], i, self.present)
        return to_uint8_frames(out, self.name)

    @contextlib.contextmanager
    def open(self):
        with self.source.open() as frames:
            picked = self.plan.select(frames)
            yield LazyFrames(self.count, lambda index: self.paste(take(picked, index), index), self.name)


def take(frames, index: Sequence[int]):
    """Frames ``index`` of a frame sequence, stacked (one slice when the indices are consecutive)."""
    index = list(index)
    if index == list(range(index[0], index[0] + len(index))):
        return frames[index[0]:index[-1] + 1]
    parts = [frames[i:i + 1] for i in index]
    return torch.cat(parts) if isinstance(parts[0], torch.Tensor) else np.concatenate(parts)


class StoreSink:
    """The swap's ``sink``: decoded frames [k, h, w, 3] float -> a :class:`FrameStore` (rounded to uint8,
    exactly what an encoder would get) and, when ``keep`` is set, a float32 tensor of every frame too."""

    def __init__(self, plan: ClipPlan, folder=None, store: bool = True, keep: bool = False):
        h, w = plan.size
        self.store = FrameStore(h, w, folder, "the swapped frames") if store else None
        self.kept = torch.empty(plan.frames, h, w, 3, dtype=torch.float32) if keep else None
        self.written = 0

    def __call__(self, frames: torch.Tensor, start: int) -> None:
        if start != self.written:
            raise InputError(f"decoded frames arrive out of order ({start} after {self.written})")
        if self.store is not None:
            self.store.append(to_uint8_frames(frames, "swapped frames"))
        if self.kept is not None:
            self.kept[start:start + frames.shape[0]] = frames.cpu()
        self.written += frames.shape[0]


def track_heads(predictor, frames: Clip, face_mask, prompt_frames: int = 4, progress: Progress = None,
                cancel: Cancel = None) -> MaskStore:
    """SAM 2 head masks of every frame of ``frames`` (a clip), prompted by ``face_mask`` (a mask sequence of the
    same frames), kept compressed in memory (:class:`MaskStore`)."""
    with frames.open() as seq:
        store = MaskStore(frames.count, frames.height, frames.width)
        for idx, mask in track_head_iter(predictor, seq, face_mask, prompt_frames, progress, cancel):
            store[idx] = mask
    return store


class CompositedClip(Clip):
    """``generated`` over ``original`` (clips of the same size; the first ``generated.count`` frames) inside the
    blend mask of :func:`dreamidv_core.preprocess.composite.blend_mask` (face mask, united with the head masks
    when given, dilated and feathered). Frame rate and sound are ``original``'s over those frames."""

    def __init__(self, original: Clip, generated: Clip, face_mask, heads: Optional[MaskStore] = None,
                 dilation: int = 0, feather: int = 0, device="cpu", name: Optional[str] = None):
        if (original.width, original.height) != (generated.width, generated.height):
            raise InputError(f"generated frames are {generated.width}x{generated.height} but the original frames are "
                             f"{original.width}x{original.height}: map the generated frames back to the source first")
        if generated.count > original.count:
            raise InputError(f"generated has {generated.count} frames but the original clip only {original.count}")
        self.original, self.generated, self.face_mask, self.heads = original, generated, face_mask, heads
        self.dilation, self.feather, self.device = dilation, feather, device
        self.width, self.height, self.count, self.rate = original.width, original.height, generated.count, original.rate
        self.name = name or f"{original.name} (composited)"
        self.audio = sub_audio(original.audio, original.rate, range(generated.count))

    def _compose(self, orig, gen, face, index: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
        masks = torch.stack([mask_frame(face, i) for i in index])
        heads = None if self.heads is None else torch.stack([self.heads[i] for i in index])
        return composite_chunk(to_float_frames(take(orig, index)), to_float_frames(take(gen, index)), masks, heads,
                               self.dilation, self.feather, self.device)

    @contextlib.contextmanager
    def chunks(self, size: int = CHUNK):
        """Context manager -> an iterator of ``(start, frames float32 [k, H, W, 3], blend mask [k, H, W])``."""
        with self.original.open() as orig, self.generated.open() as gen, opened(self.face_mask) as face:
            yield ((a, *self._compose(orig, gen, face, range(a, min(a + size, self.count))))
                   for a in range(0, self.count, size))

    @contextlib.contextmanager
    def open(self):
        with self.original.open() as orig, self.generated.open() as gen, opened(self.face_mask) as face:
            yield LazyFrames(self.count, lambda index: to_uint8_frames(self._compose(orig, gen, face, index)[0],
                                                                       self.name), self.name)


def opened(value):
    """``value.open()`` for a clip, else the frame sequence itself (a context manager either way)."""
    return value.open() if hasattr(value, "open") else contextlib.nullcontext(value)


def clip_tensor(clip: Clip, progress: Progress = None, cancel: Cancel = None) -> torch.Tensor:
    """Every frame of ``clip`` as float32 [F, H, W, 3] in [0, 1] (ComfyUI's IMAGE): the memory-hungry form,
    filled a chunk at a time into one preallocated tensor (never two copies of the clip)."""
    out = torch.empty(clip.count, clip.height, clip.width, 3, dtype=torch.float32)
    report = reporter(progress)
    with clip.open() as frames:
        for a, chunk in iter_chunks(frames, CHUNK):
            check_cancel(cancel, f"reading {clip.name}")
            out[a:a + len(chunk)] = to_float_frames(chunk)
            report("frames", a + len(chunk), clip.count)
    return out


def write_clip(clip: Clip, target, crf: Optional[float] = 18, preset: Optional[str] = None,
               metadata: Optional[dict] = None, progress: Progress = None, cancel: Cancel = None) -> None:
    """Encode ``clip`` as H.264 mp4 with its sound into ``target`` (a path or a writable file object), a chunk
    of frames at a time, atomically: on any error (the source gone or cut short, a cancel) nothing is left."""
    report = reporter(progress)
    with clip.open() as frames, VideoWriter(target, clip.rate, crf, audio=clip.audio, preset=preset,
                                            metadata=metadata) as writer:
        for a, chunk in iter_chunks(frames, CHUNK):
            check_cancel(cancel, f"writing {clip.name}")
            writer.write(chunk)
            report("write", a + len(chunk), clip.count)
