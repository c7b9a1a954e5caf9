"""Reading and writing video files with PyAV (no ComfyUI needed)."""
from __future__ import annotations

import logging
from collections import OrderedDict
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


class VideoReader:
    """A video file as a lazy sequence of uint8 RGB frames: ``len(r)``, ``r[i]`` -> [H, W, 3], ``r[a:b]`` ->
    [k, H, W, 3]. Frames are decoded on demand, in order, and only the last ``cache`` frames are kept, so a
    clip of any length costs a few frames of memory when read front to back (as the swap reads it). Going
    back further than the cache restarts decoding from the start of the file.

    ``max_frames`` caps the length. The frame count comes from one pass over the packets (no decoding).
    """

    def __init__(self, path, max_frames: Optional[int] = None, cache: int = 48):
        import av

        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"{self.path}: video file not found")
        self._cache_size = max(1, cache)
        self._cache: "OrderedDict[int, np.ndarray]" = OrderedDict()
        self._container = self._frames = None
        self._next = 0
        try:
            with av.open(str(self.path)) as container:
                if not container.streams.video:
                    raise InputError(f"{self.path}: has no video stream")
                stream = container.streams.video[0]
                self.fps = float(stream.average_rate or stream.guessed_rate or 24)
                count = sum(1 for packet in container.demux(stream) if packet.size)
        except av.error.FFmpegError as exc:
            raise InputError(f"{self.path}: not a readable video ({exc})") from None
        self._count = count if max_frames is None else min(count, max_frames)
        if self._count == 0:
            raise InputError(f"{self.path}: contains no frames")

    def __len__(self) -> int:
        return self._count

    def _restart(self) -> None:
        import av

        self.close()
        self._container = av.open(str(self.path))
        self._frames = self._container.decode(self._container.streams.video[0])
        self._next = 0

    def _frame(self, i: int) -> np.ndarray:
        if i in self._cache:
            return self._cache[i]
        if self._frames is None or i < self._next:
            self._restart()
        import av

        try:
            while self._next <= i:
                frame = next(self._frames, None)
                if frame is None:
                    raise InputError(f"{self.path}: ends after {self._next} frames, {self._count} were counted")
                self._cache[self._next] = frame.to_ndarray(format="rgb24")
                self._next += 1
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        except av.error.FFmpegError as exc:
            raise InputError(f"{self.path}: decoding frame {self._next} failed ({exc})") from None
        return self._cache[i]

    def __getitem__(self, index):
        if isinstance(index, slice):
            idx = range(*index.indices(self._count))
            if len(idx) == 0:
                raise InputError(f"{self.path}: empty frame range {index}")
            return np.stack([self._frame(i) for i in idx])
        i = int(index)
        if i < 0:
            i += self._count
        if not 0 <= i < self._count:
            raise IndexError(f"{self.path}: frame {index} out of range ({self._count} frames)")
        return self._frame(i)

    @property
    def shape(self) -> Tuple[int, int, int, int]:
        h, w = self[0].shape[:2]
        return (self._count, h, w, 3)

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
        self._container = self._frames = None

    def __enter__(self) -> "VideoReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class VideoWriter:
    """Streaming H.264 mp4 writer: ``with VideoWriter(path, fps) as w: w.write(frames)`` with uint8 or float
    [k, H, W, 3] chunks. The file appears under ``path`` only when the block ends without an error (written
    beside it under a hidden temporary name, then renamed, :class:`~.files.AtomicFile`), so a failure leaves no
    half-written video. Frames of an odd width or height lose their last column or row (:func:`even_size`)."""

    def __init__(self, path, fps: float, crf: int = 18):
        self.path = Path(path)
        self.rate = Fraction(fps).limit_denominator(1001)
        self.crf = crf
        self.frames_written = 0
        self._container = self._stream = self._tmp = None

    def __enter__(self) -> "VideoWriter":
        import av

        self._tmp = AtomicFile(self.path, "video")
        try:
            self._container = av.open(str(self._tmp.tmp), mode="w", format="mp4")
        except BaseException:
            self._tmp.discard()
            raise
        return self

    def write(self, frames) -> None:
        """frames: uint8 or float in [0, 1], [k, H, W, 3] (or one [H, W, 3] frame)."""
        import av


        arr = np.asarray(frames) if not hasattr(frames, "detach") else frames
        if getattr(arr, "ndim", 4) == 3:
            arr = arr[None]
        arr = even_size(to_uint8_frames(arr, str(self.path)), str(self.path))
        if self._stream is None:
            self._stream = self._container.add_stream("libx264", rate=self.rate)
            self._stream.width, self._stream.height = arr.shape[2], arr.shape[1]
            self._stream.pix_fmt = "yuv420p"
            self._stream.options = {"crf": str(self.crf)}
        elif (arr.shape[2], arr.shape[1]) != (self._stream.width, self._stream.height):
            raise InputError(f"{self.path}: frame size {arr.shape[2]}x{arr.shape[1]} differs from the first "
                             f"frames' {self._stream.width}x{self._stream.height}")
        for frame in arr:
            for packet in self._stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                self._container.mux(packet)
        self.frames_written += len(arr)

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                if self._stream is None:
                    raise InputError(f"{self.path}: no frames were written")
                for packet in self._stream.encode():
                    self._container.mux(packet)
            self._container.close()
            if exc_type is None:
                self._tmp.commit()
        finally:
            self._tmp.discard()


def write_video(path, frames, fps: float, crf: int = 18) -> None:
    """Write uint8 (or float 0..1) [F, H, W, 3] frames as H.264 mp4, atomically (no half-written file on failure)."""
    with VideoWriter(path, fps, crf) as writer:
        writer.write(frames)
