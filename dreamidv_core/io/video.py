"""Reading and writing video files with PyAV (no ComfyUI needed).

* :func:`probe_video`: size, exact frame rate and every frame's time from one pass over the packets;
* :class:`VideoReader`: a file as a lazy, seekable sequence of uint8 frames;
* :class:`VideoWriter`: streaming H.264 mp4 with the exact frame rate and interleaved AAC sound, atomic;
* :func:`remux_video`: a finished mp4 copied to another file or buffer without re-encoding.
"""
from __future__ import annotations

import bisect
import io
import json
import logging
import os
import shutil
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch

from ..errors import InputError
from .files import AtomicFile

log = logging.getLogger(__name__)


PIXEL_RANGE_SLACK = 0.5  # float pixels beyond [-0.5, 1.5] are not a rounding overshoot but another scale


def check_pixels(frames, what: str, chunk: int = 16) -> None:
    """Float frames (torch or numpy, first axis = frames) must be finite and in ComfyUI's 0..1 range; an
    :class:`InputError` naming ``what`` says which frame holds NaN/inf, or that the values look like 0..255
    (or -1..1) pixels, instead of clamping them silently to white (or black). Checked ``chunk`` frames at a
    time (no whole-clip temporary)."""
    is_torch = isinstance(frames, torch.Tensor)
    if not (frames.is_floating_point() if is_torch else np.issubdtype(np.asarray(frames).dtype, np.floating)):
        return
    lo, hi = float("inf"), float("-inf")
    count = frames.shape[0] if getattr(frames, "ndim", 0) > 0 else 1
    for start in range(0, count, chunk):
        part = frames[start:start + chunk]
        part = part.detach() if is_torch else torch.from_numpy(np.asarray(part))
        finite = torch.isfinite(part)
        if not bool(finite.all()):
            first = start + int(torch.nonzero(~finite.reshape(part.shape[0], -1).all(1))[0, 0])
            raise InputError(f"{what}: frame {first} contains NaN or infinite values; give finite pixels (check the "
                             "node that made them)")
        lo, hi = min(lo, float(part.min())), max(hi, float(part.max()))
    if hi > 1 + PIXEL_RANGE_SLACK:
        raise InputError(f"{what}: values go up to {hi:.4g}; IMAGE and MASK values are 0..1 and these look like "
                         "0..255 pixels (they would all turn white): divide them by 255 first")
    if lo < -PIXEL_RANGE_SLACK:
        raise InputError(f"{what}: values go down to {lo:.4g}; IMAGE and MASK values are 0..1 (a -1..1 tensor? map "
                         "it with (x + 1) / 2 first)")


def to_uint8_frames(frames, what: str) -> np.ndarray:
    """[F, H, W, C] uint8 / float-in-[0,1] (numpy or torch), C in {1, 3, 4}, or [F, H, W] -> uint8 [F, H, W, 3].
    Float values must be finite and about 0..1 (:func:`check_pixels`); small overshoots are clamped."""
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu()
        if frames.is_floating_point():
            check_pixels(frames, what)
            frames = (frames.float().clamp(0, 1) * 255).round().to(torch.uint8)
        frames = frames.numpy()
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        if np.issubdtype(frames.dtype, np.floating):
            check_pixels(frames, what)
            frames = np.clip(np.rint(np.clip(frames, 0, 1) * 255), 0, 255).astype(np.uint8)
        else:
            raise InputError(f"{what}: expected uint8 or float frames, got {frames.dtype}")
    if frames.ndim == 3:  # [F, H, W] greyscale / mask
        frames = frames[..., None]
    if frames.ndim != 4 or frames.shape[-1] not in (1, 3, 4):
        raise InputError(f"{what}: expected frames shaped [F, H, W, 3] (or 1 or 4 channels), got {list(frames.shape)}")
    if frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, axis=-1)
    elif frames.shape[-1] == 4:  # drop alpha
        frames = frames[..., :3]
    return frames


def even_size(frames, what: str = "frames"):
    """[F, H, W, ...] frames (torch or numpy) without their last row and/or column when the height or width is
    odd: H.264 in yuv420p (this pack's writer, ComfyUI's Save Video) only encodes even sizes. Logged when
    something is dropped (a contiguous copy); the same object when nothing is."""
    h, w = int(frames.shape[1]), int(frames.shape[2])
    if h % 2 == 0 and w % 2 == 0:
        return frames
    log.info("DreamID-V: %s trimmed from %dx%d to %dx%d (video encoders need an even width and height)", what, w, h,
             w - w % 2, h - h % 2)
    kept = frames[:, :h - h % 2, :w - w % 2]
    return kept.contiguous() if isinstance(kept, torch.Tensor) else np.ascontiguousarray(kept)


def read_video(path, max_frames: Optional[int] = None) -> Tuple[np.ndarray, float]:
    """-> (frames uint8 [F, H, W, 3], fps). Reads at most ``max_frames`` frames."""
    import av

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: video file not found")
    frames = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise InputError(f"{path}: has no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 24)
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24"))
                if max_frames is not None and len(frames) >= max_frames:
                    break
    except av.error.FFmpegError as exc:
        raise InputError(f"{path}: not a readable video ({exc})") from None
    if not frames:
        raise InputError(f"{path}: contains no frames")
    return np.stack(frames), fps


def read_image(path) -> np.ndarray:
    """-> uint8 [H, W, 3] (alpha dropped, greyscale expanded)."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: image file not found")
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB")).copy()
    except OSError as exc:
        raise InputError(f"{path}: not a readable image ({exc})") from None


# ------------------------------------------------------------------------------------------------ reading

class open_container:
    """``with open_container(source, name) as container``: a PyAV input container on a path or on the bytes of a
    video (``bytes`` or a BytesIO, of which each container gets a private copy so that readers never share a
    position), with the errors a user can act on (a missing or unreadable file) as :class:`InputError`."""

    def __init__(self, source, name: str):
        self.source, self.name, self.container = source, name, None

    def __enter__(self):
        import av

        src = self.source
        if isinstance(src, (bytes, bytearray, memoryview)):
            src = io.BytesIO(bytes(src))
        elif isinstance(src, io.BytesIO):
            src = io.BytesIO(src.getvalue())
        else:
            if not Path(src).is_file():
                raise InputError(f"{self.name}: the video file is missing (moved or deleted while it was in use?)")
            src = str(src)
        try:
            self.container = av.open(src)
        except (av.error.FFmpegError, OSError) as exc:
            raise InputError(f"{self.name}: not a readable video ({exc})") from None
        return self.container

    def __exit__(self, *exc) -> None:
        self.container.close()


def source_name(source) -> str:
    """How messages name a video source: its path, or "<in-memory video>"."""
    return "<in-memory video>" if isinstance(source, (bytes, bytearray, memoryview, io.BytesIO)) else str(source)


@dataclass(frozen=True)
class VideoProbe:
    """What one pass over a video file's packets (no decoding) tells: size, frame rate, every frame's time.

    ``pts``: the display-order timestamps of the frames (in ``time_base`` units; empty when the stream has
    none, then frames are found by counting); ``keyframes``: display-order indices of the frames decoding
    can start at.
    """

    name: str
    width: int
    height: int
    rate: Fraction
    time_base: Fraction
    count: int
    pts: Tuple[int, ...]
    keyframes: Tuple[int, ...]
    has_audio: bool

    def frame_time(self, i: int) -> float:
        """Seconds of frame ``i`` on the file's timeline (its pts; ``i / rate`` past the end or without pts)."""
        if self.pts and 0 <= i < len(self.pts):
            return float(self.pts[i] * self.time_base)
        base = float(self.pts[0] * self.time_base) if self.pts else 0.0
        return base + float(i / self.rate)

    @property
    def start_time(self) -> float:
        return self.frame_time(0)


def probe_video(source, name: Optional[str] = None) -> VideoProbe:
    """Probe ``source`` (a path, a BytesIO or bytes). Raises :class:`InputError` for a missing, unreadable,
    empty or truncated file (one whose header lists more frames than its data holds)."""
    import av

    name = name or source_name(source)
    with open_container(source, name) as container:
        if not container.streams.video:
            raise InputError(f"{name}: has no video stream")
        stream = container.streams.video[0]
        rate = Fraction(stream.average_rate or stream.guessed_rate or stream.base_rate or 24)
        pts, key_pts, packets, seekable = [], [], 0, True
        try:
            for packet in container.demux(stream):
                if packet.pts is None and packet.dts is None:
                    continue  # the demuxer's end-of-stream marker
                packets += 1
                if not packet.size:
                    continue
                if packet.pts is None:
                    seekable = False
                else:
                    pts.append(packet.pts)
                    if packet.is_keyframe:
                        key_pts.append(packet.pts)
        except av.error.FFmpegError as exc:
            raise InputError(f"{name}: reading its packets failed ({exc}): the file is truncated or damaged") from None
        declared = int(stream.frames or 0)
        count = len(pts) if seekable else packets
        if declared and packets < declared:
            raise InputError(f"{name}: the file is truncated or damaged: its header lists {declared} frames but "
                             f"only {packets} are in the file")
        if count == 0:
            raise InputError(f"{name}: contains no frames")
        pts = sorted(pts) if seekable else []
        index = {p: i for i, p in enumerate(pts)}
        keyframes = sorted(index[p] for p in key_pts if p in index) if seekable else []
        return VideoProbe(name=name, width=int(stream.width), height=int(stream.height), rate=rate,
                          time_base=Fraction(stream.time_base or Fraction(1, 90000)), count=count, pts=tuple(pts),
                          keyframes=tuple(keyframes), has_audio=bool(container.streams.audio))


CACHE_BYTES = 96 << 20  # decoded frames a reader keeps for going back a little (a few 1080p frames)


class VideoReader:
    """A video as a lazy sequence of uint8 RGB frames: ``len(r)``, ``r[i]`` -> [H, W, 3], ``r[a:b:s]`` ->
    [k, H, W, 3]. Frames are decoded on demand, in order; the last ``cache`` decoded frames are kept (at most
    ~96 MB of them), so reading front to back costs a few frames of memory however long the clip is. A frame
    far ahead, or behind the cache, is reached by seeking to the key frame before it (no decoding from the
    start). ``source``: a path, a BytesIO or bytes; ``max_frames`` caps the length; ``probe`` skips the packet
    pass when the caller has one. The file is opened at the first frame asked for and closed by
    :meth:`close` (or ``with``).

    A file that disappears, is cut short or fails to decode while being read raises :class:`InputError`
    naming it.
    """

    def __init__(self, source, max_frames: Optional[int] = None, cache: int = 48, probe: Optional[VideoProbe] = None,
                 name: Optional[str] = None):
        self.source = source
        self.name = name or (probe.name if probe is not None else source_name(source))
        self.path = None if isinstance(source, (bytes, bytearray, memoryview, io.BytesIO)) else Path(source)
        self.probe = probe or probe_video(source, self.name)
        self.rate = self.probe.rate
        self.fps = float(self.rate)
        self._count = self.probe.count if max_frames is None else min(self.probe.count, max_frames)
        yuv_bytes = self.probe.width * self.probe.height * 3 // 2
        self._cache_size = max(1, min(int(cache), max(4, CACHE_BYTES // max(1, yuv_bytes))))
        self._cache: "OrderedDict[int, object]" = OrderedDict()  # index -> decoded av.VideoFrame
        self._index = {p: i for i, p in enumerate(self.probe.pts)}
        self._opener = self._container = self._frames = None
        self._next = 0
        self._seekable = bool(self.probe.pts)

    def __len__(self) -> int:
        return self._count

    def _open(self) -> None:
        if self._container is None:
            opener = open_container(self.source, self.name)
            self._container = opener.__enter__()
            self._opener = opener
            stream = self._container.streams.video[0]
            stream.thread_type = "AUTO"

    def _start_at(self, key: int) -> None:
        """Decode from key frame ``key`` (0: the start of the file)."""
        import av

        if key > 0 and self._seekable:
            self._open()
            stream = self._container.streams.video[0]
            try:
                self._container.seek(self.probe.pts[key], stream=stream, backward=True)
            except av.error.FFmpegError as exc:
                raise InputError(f"{self.name}: seeking to frame {key} failed ({exc})") from None
        else:
            self.close()
            self._open()
        self._frames = self._container.decode(self._container.streams.video[0])
        self._next = key

    def _key_before(self, i: int) -> int:
        keys = self.probe.keyframes
        k = bisect.bisect_right(keys, i) - 1
        return keys[k] if k >= 0 else 0

    def _frame(self, i: int) -> np.ndarray:
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i].to_ndarray(format="rgb24")
        key = self._key_before(i)
        if self._frames is None or i < self._next or (self._seekable and key > self._next):
            self._start_at(key if self._seekable else 0)
        return self._decode_until(i).to_ndarray(format="rgb24")

    def _decode_until(self, i: int):
        import av

        while True:
            try:
                frame = next(self._frames, None)
            except av.error.FFmpegError as exc:
                raise InputError(f"{self.name}: decoding frame {self._next} failed ({exc}); the file is damaged") from None
            if frame is None:
                raise InputError(f"{self.name}: the video ends after {self._next} frames but {self.probe.count} were "
                                 "counted when it was opened: the file is truncated, or was changed while it was read")
            idx = self._index.get(frame.pts, self._next) if self._seekable else self._next
            self._next = idx + 1
            if idx >= i - self._cache_size:
                self._cache[idx] = frame
                self._cache.move_to_end(idx)
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
            if idx == i:
                return frame
            if idx > i:  # the seek landed past the frame (an odd file): decode from the start instead
                self._seekable = False
                self._start_at(0)

    def __getitem__(self, index):
        if isinstance(index, slice):
            idx = range(*index.indices(self._count))
            if len(idx) == 0:
                raise InputError(f"{self.name}: empty frame range {index}")
            return np.stack([self._frame(i) for i in idx])
        i = int(index)
        if i < 0:
            i += self._count
        if not 0 <= i < self._count:
            raise IndexError(f"{self.name}: frame {index} out of range ({self._count} frames)")
        return self._frame(i)

    @property
    def shape(self) -> Tuple[int, int, int, int]:
        return (self._count, self.probe.height, self.probe.width, 3)

    def close(self) -> None:
        self._cache.clear()
        if self._opener is not None:
            self._opener.__exit__(None, None, None)
        self._opener = self._container = self._frames = None

    def __enter__(self) -> "VideoReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


# ------------------------------------------------------------------------------------------------ writing

def _frame_rate(fps) -> Fraction:
    """A Fraction stays exact (30000/1001); a float is read as the nearest rate with a denominator <= 1001."""
    rate = fps if isinstance(fps, Fraction) else Fraction(fps).limit_denominator(1001)
    if rate <= 0:
        raise InputError(f"frame rate must be positive, got {fps}")
    return rate


class _Target:
    """Where a finished mp4 goes, without half-written results: a path (an :class:`~.files.AtomicFile`: written
    beside it under a hidden temporary name, then renamed, with the user's umask) or a writable binary file
    object (filled only once the video is complete, from a temporary file)."""

    def __init__(self, target):
        self.target = target
        self.is_path = not hasattr(target, "write")
        self.name = str(target) if self.is_path else "<video buffer>"
        self._atomic = None
        self.tmp = None

    def open(self) -> str:
        """A temporary path to write the mp4 to."""
        if self.is_path:
            self._atomic = AtomicFile(self.target, "video")
            self.tmp = str(self._atomic.tmp)
        else:
            fd, self.tmp = tempfile.mkstemp(prefix=".video.", suffix=".partial.mp4")
            os.close(fd)
        return self.tmp

    def commit(self) -> None:
        if self.is_path:
            self._atomic.commit()
            return
        with open(self.tmp, "rb") as fh:
            shutil.copyfileobj(fh, self.target)

    def discard(self) -> None:
        if self._atomic is not None:
            self._atomic.discard()
        elif self.tmp is not None and os.path.exists(self.tmp):
            os.unlink(self.tmp)


def _container_options(target: _Target) -> dict:
    return {"movflags": "use_metadata_tags+faststart" if target.is_path else "use_metadata_tags"}


def _set_metadata(container, metadata: Optional[dict]) -> None:
    for key, value in (metadata or {}).items():
        container.metadata[str(key)] = value if isinstance(value, str) else json.dumps(value)


class VideoWriter:
    """Streaming H.264 mp4 writer: ``with VideoWriter(target, fps) as w: w.write(frames)`` with uint8 or float
    [k, H, W, 3] chunks. The result appears only when the block ends without an error: ``target`` is a path
    (written beside it under a hidden temporary name, then renamed, with normal file permissions) or a
    writable binary file object such as a BytesIO (filled once the video is complete).

    ``fps``: a Fraction is kept exactly (30000/1001 stays 30000/1001); a float is read as the nearest rate
    with a denominator up to 1001. ``audio``: an :class:`~.audio.AudioClip`, encoded as AAC and interleaved
    as the frames are written (its sound from time 0 to its duration). ``metadata``: container tags
    (non-strings are written as JSON), as ComfyUI's Save Video does. ``preset``: libx264's (default medium).
    Frames of an odd width or height lose their last column or row (:func:`even_size`: H.264 in yuv420p
    encodes even sizes only).
    """

    def __init__(self, path, fps, crf: Optional[float] = 18, audio=None, preset: Optional[str] = None,
                 metadata: Optional[dict] = None):
        self.path = path if hasattr(path, "write") else Path(path)
        self.rate = _frame_rate(fps)
        self.crf, self.preset, self.audio, self.metadata = crf, preset, audio, metadata
        self.frames_written = 0
        self._target = _Target(path)
        self._container = self._stream = self._audio_stream = self._audio_iter = None
        self._audio_sent, self._audio_pending = 0, None

    def __enter__(self) -> "VideoWriter":
        import av

        tmp = self._target.open()
        try:
            self._container = av.open(tmp, mode="w", format="mp4", options=_container_options(self._target))
            _set_metadata(self._container, self.metadata)
            if self.audio is not None and self.audio.duration > 0:
                self._audio_stream = self._container.add_stream("aac", rate=self.audio.sample_rate)
                self._audio_stream.layout = self.audio.layout
                self._audio_iter = self.audio.chunks()
        except BaseException:
            if self._container is not None:
                try:
                    self._container.close()
                except Exception:  # noqa: BLE001  (already failing; the original error is what matters)
                    pass
                self._container = None
            self._target.discard()
            raise
        return self

    def write(self, frames) -> None:
        """frames: uint8 or float in [0, 1], [k, H, W, 3] (or one [H, W, 3] frame)."""
        import av

        arr = np.asarray(frames) if not hasattr(frames, "detach") else frames
        if getattr(arr, "ndim", 4) == 3:
            arr = arr[None]
        arr = even_size(to_uint8_frames(arr, self._target.name), self._target.name)
        if self._stream is None:
            self._stream = self._container.add_stream("libx264", rate=self.rate)
            self._stream.width, self._stream.height = arr.shape[2], arr.shape[1]
            self._stream.pix_fmt = "yuv420p"
            options = {} if self.crf is None else {"crf": f"{float(self.crf):g}"}
            if self.preset:
                options["preset"] = str(self.preset)
            self._stream.options = options
        elif (arr.shape[2], arr.shape[1]) != (self._stream.width, self._stream.height):
            raise InputError(f"{self._target.name}: frame size {arr.shape[2]}x{arr.shape[1]} differs from the first "
                             f"frames' {self._stream.width}x{self._stream.height}")
        for frame in arr:
            for packet in self._stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                self._container.mux(packet)
        self.frames_written += len(arr)
        self._write_audio(float(self.frames_written / self.rate))

    def _write_audio(self, until: Optional[float]) -> None:
        """Encode the sound up to ``until`` seconds (None: all of it)."""
        import av

        if self._audio_iter is None:
            return
        total = self.audio.samples
        goal = total if until is None else min(total, int(round(until * self.audio.sample_rate)))
        while self._audio_sent < goal:
            chunk, self._audio_pending = self._audio_pending, None
            if chunk is None:
                chunk = next(self._audio_iter, None)
                if chunk is None:  # the sound ends before the window does
                    self._audio_iter = None
                    break
            take = min(chunk.shape[1], goal - self._audio_sent)
            if take < chunk.shape[1]:
                self._audio_pending = chunk[:, take:]
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk[:, :take], dtype=np.float32),
                                               format="fltp", layout=self.audio.layout)
            frame.sample_rate, frame.pts = self.audio.sample_rate, self._audio_sent
            frame.time_base = Fraction(1, self.audio.sample_rate)
            for packet in self._audio_stream.encode(frame):
                self._container.mux(packet)
            self._audio_sent += take

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                if self._stream is None:
                    raise InputError(f"{self._target.name}: no frames were written")
                for packet in self._stream.encode():
                    self._container.mux(packet)
                self._write_audio(None)
                if self._audio_stream is not None:
                    for packet in self._audio_stream.encode():
                        self._container.mux(packet)
            self._container.close()
            self._container = None
            if exc_type is None:
                self._target.commit()
        finally:
            if self._audio_iter is not None and hasattr(self._audio_iter, "close"):
                self._audio_iter.close()
            if self._container is not None:
                try:
                    self._container.close()
                except Exception:  # noqa: BLE001  (already failing; the original error is what matters)
                    pass
            self._target.discard()


def write_video(path, frames, fps, crf: int = 18, audio=None) -> None:
    """Write uint8 (or float 0..1) [F, H, W, 3] frames as H.264 mp4, atomically (no half-written file on failure)."""
    with VideoWriter(path, fps, crf, audio=audio) as writer:
        writer.write(frames)


def remux_video(source, target, metadata: Optional[dict] = None) -> None:
    """Copy the video and audio streams of ``source`` (a path) into a new mp4 at ``target`` (a path or a writable
    file object) without re-encoding, with ``metadata`` tags added; atomic like :class:`VideoWriter`."""
    import av

    out = _Target(target)
    tmp = out.open()
    try:
        with open_container(source, source_name(source)) as src, \
                av.open(tmp, mode="w", format="mp4", options=_container_options(out)) as dst:
            _set_metadata(dst, metadata)
            streams = {s: dst.add_stream_from_template(s) for s in src.streams if s.type in ("video", "audio")}
            for packet in src.demux(*streams):
                if packet.dts is None:
                    continue
                packet.stream = streams[packet.stream]
                dst.mux(packet)
        out.commit()
    finally:
        out.discard()
