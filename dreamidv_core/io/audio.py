"""A clip's sound: read from a video file (or held as a waveform) a time window at a time, sample-exact.

* :class:`FileAudio`: the first audio stream of a video file, decoded on demand (nothing is kept);
* :class:`WaveformAudio`: samples already in memory (ComfyUI's AUDIO: ``{"waveform": [1, C, S], "sample_rate"}``);
* :class:`AudioClip`: a window ``[start, start + duration)`` seconds of either, as the sound of an output
  video (its time 0 is ``start``). The video writer pulls it chunk by chunk as frames are written.

Times are seconds on the source's timeline (a video frame's time is its pts in seconds). A window keeps the
samples whose time lies in it, counted at the source's sample rate: ``round(start * rate)`` to
``round((start + duration) * rate)``.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np

from ..errors import InputError
from .video import open_container

# FFmpeg's default channel layout for each channel count (what the AAC encoder is given)
LAYOUTS = {1: "mono", 2: "stereo", 3: "2.1", 4: "quad", 5: "5.0", 6: "5.1", 7: "6.1", 8: "7.1"}


class AudioSource(ABC):
    """Samples of a sound, float32 planar ``[channels, n]``, on a timeline in seconds."""

    sample_rate: int
    channels: int
    name: str

    @property
    def layout(self) -> str:
        if self.channels not in LAYOUTS:
            raise InputError(f"{self.name}: {self.channels} audio channels; at most 8 can be written")
        return LAYOUTS[self.channels]

    @abstractmethod
    def chunks(self, start: float, stop: Optional[float]) -> Iterator[np.ndarray]:
        """Samples with time in ``[start, stop)`` (``stop`` None: to the end), as float32 ``[channels, n]``."""


def _window(start: float, stop: Optional[float], rate: int):
    first = int(round(start * rate))
    last = None if stop is None else int(round(stop * rate))
    return first, last


class WaveformAudio(AudioSource):
    """Samples in memory: ``waveform`` [C, S] or [1, C, S] (numpy or torch), the first at time ``offset``."""

    def __init__(self, waveform, sample_rate: int, offset: float = 0.0, name: str = "audio"):
        wav = waveform.detach().cpu().numpy() if hasattr(waveform, "detach") else np.asarray(waveform)
        if wav.ndim == 3:
            if wav.shape[0] != 1:
                raise InputError(f"{name}: expected one waveform [1, channels, samples], got {list(wav.shape)}")
            wav = wav[0]
        if wav.ndim != 2 or wav.shape[0] < 1:
            raise InputError(f"{name}: expected a waveform [channels, samples], got {list(wav.shape)}")
        if int(sample_rate) <= 0:
            raise InputError(f"{name}: sample rate must be positive, got {sample_rate}")
        self.wave = wav.astype(np.float32, copy=False)
        self.sample_rate, self.channels = int(sample_rate), int(wav.shape[0])
        self.offset, self.name = float(offset), name

    def chunks(self, start: float, stop: Optional[float]) -> Iterator[np.ndarray]:
        first, last = _window(start - self.offset, None if stop is None else stop - self.offset, self.sample_rate)
        total = self.wave.shape[1]
        last = total if last is None else min(last, total)
        step = self.sample_rate  # a second at a time
        for a in range(max(0, first), last, step):
            yield np.ascontiguousarray(self.wave[:, a:min(a + step, last)])


class FileAudio(AudioSource):
    """The first audio stream of a video file (a path, or the bytes of one), decoded a frame at a time."""

    def __init__(self, source, name: Optional[str] = None):
        self.source = source
        self.name = name or str(source)
        with open_container(source, self.name) as container:
            stream = _audio_stream(container, self.name)
            self.sample_rate = int(stream.codec_context.sample_rate or stream.sample_rate or 0)
            self.channels = int(stream.codec_context.channels or 0)
            self.codec = stream.codec_context.name
        if self.sample_rate <= 0 or self.channels <= 0:
            raise InputError(f"{self.name}: its audio stream has no sample rate or channels")

    @staticmethod
    def of(source, name: Optional[str] = None) -> Optional["FileAudio"]:
        """The file's sound, or None when it has no audio stream."""
        with open_container(source, name or str(source)) as container:
            if not container.streams.audio:
                return None
        return FileAudio(source, name)

    def chunks(self, start: float, stop: Optional[float]) -> Iterator[np.ndarray]:
        import av

        first, last = _window(start, stop, self.sample_rate)
        with open_container(self.source, self.name) as container:
            stream = _audio_stream(container, self.name)
            if first > 0:
                container.seek(max(0, int((start - 1.0) / stream.time_base)), stream=stream, backward=True)
            resampler = av.AudioResampler(format="fltp", layout=self.layout, rate=self.sample_rate)
            position = None  # sample index of the next decoded sample
            try:
                for frame in container.decode(stream):
                    for out in resampler.resample(frame):
                        if out.pts is not None and out.time_base is not None:
                            position = int(round(float(out.pts * out.time_base) * self.sample_rate))
                        elif position is None:
                            position = 0
                        data = out.to_ndarray().astype(np.float32, copy=False)
                        a, b = position, position + data.shape[1]
                        position = b
                        lo, hi = max(a, first), b if last is None else min(b, last)
                        if hi > lo:
                            yield np.ascontiguousarray(data[:, lo - a:hi - a])
                        if last is not None and position >= last:
                            return
            except av.error.FFmpegError as exc:
                raise InputError(f"{self.name}: decoding its audio failed ({exc})") from None


def _audio_stream(container, name: str):
    if not container.streams.audio:
        raise InputError(f"{name}: has no audio stream")
    return container.streams.audio[0]


@dataclass(frozen=True)
class AudioClip:
    """``duration`` seconds of ``source`` from ``start``: the sound of an output video, its time 0 at ``start``."""

    source: AudioSource
    start: float
    duration: float

    @property
    def sample_rate(self) -> int:
        return self.source.sample_rate

    @property
    def channels(self) -> int:
        return self.source.channels

    @property
    def layout(self) -> str:
        return self.source.layout

    @property
    def samples(self) -> int:
        """Samples in the window (fewer may exist when the source's sound ends early)."""
        first, last = _window(self.start, self.start + self.duration, self.sample_rate)
        return last - first

    def chunks(self) -> Iterator[np.ndarray]:
        return self.source.chunks(self.start, self.start + self.duration)

    def part(self, start: float, duration: float) -> "AudioClip":
        """The window ``[start, start + duration)`` of this clip's time (0 = this clip's start)."""
        start = min(max(0.0, start), self.duration)
        return AudioClip(self.source, self.start + start, max(0.0, min(duration, self.duration - start)))

    def waveform(self) -> np.ndarray:
        """All the window's samples, float32 [channels, n] (the memory-hungry path; fine for sound)."""
        parts = list(self.chunks())
        if not parts:
            return np.zeros((self.channels, 0), np.float32)
        return np.concatenate(parts, axis=1)


def clip_rate_and_sound(source, probe, frames: int, start: int = 0, stride: int = 1, fps: Optional[float] = None,
                        sound: bool = True):
    """The frame rate and sound of a clip made of ``frames`` frames of a video (``probe``, the file or bytes
    ``source``) from frame ``start``, every ``stride``-th -> (Fraction rate, AudioClip or None).

    The rate is the source's exactly, divided by ``stride``, or ``fps``; the sound is the source's over the
    frames' span of time, None without a sound track, when ``sound`` is False, or when ``fps`` changes the
    playing speed (which would put picture and sound out of step)."""
    from fractions import Fraction

    natural = probe.rate / stride
    rate = Fraction(fps).limit_denominator(1001) if fps else natural
    if not sound or not probe.has_audio or rate != natural:
        return rate, None
    return rate, AudioClip(FileAudio(source), probe.frame_time(start), float(frames * stride / probe.rate))
