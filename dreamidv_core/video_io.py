"""Reading and writing video files with PyAV (no ComfyUI needed)."""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from .errors import InputError
from .state_dict_io import atomic_write


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


def write_video(path, frames: np.ndarray, fps: float, crf: int = 18) -> None:
    """Write uint8 [F, H, W, 3] frames as H.264 mp4, atomically (no half-written file on failure)."""
    import av

    path = Path(path)
    rate = Fraction(fps).limit_denominator(1001)

    def write(tmp):
        with av.open(tmp, mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=rate)
            stream.width, stream.height = frames.shape[2], frames.shape[1]
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": str(crf)}
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)

    atomic_write(path, write)
