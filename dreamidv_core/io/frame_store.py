"""A clip's frames kept exactly, on disk instead of in memory: uint8 frames appended to a temporary file and
read back by index (a frame sequence, :mod:`.frames`).

The swap decodes its result once into a store at the model's resolution (1.2 MB a frame at 832x464), so the
frames can be pasted into the source frames and encoded whenever, and as often as, the result is saved,
without keeping the clip in memory or running the VAE again. The file lives in the folder given (ComfyUI's
temporary folder for the nodes) and is removed by :meth:`FrameStore.close` or when the store is
garbage-collected.
"""
from __future__ import annotations

import os
import tempfile
import weakref
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import InputError


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class FrameStore:
    """uint8 frames [H, W, 3] on disk: ``append(frames [k, H, W, 3])``, then ``len``, ``[i]``, ``[a:b:s]``."""

    def __init__(self, height: int, width: int, folder: Optional[os.PathLike] = None, what: str = "frames"):
        self.height, self.width, self.what = int(height), int(width), what
        folder = Path(folder) if folder is not None else Path(tempfile.gettempdir())
        folder.mkdir(parents=True, exist_ok=True)
        fd, self.path = tempfile.mkstemp(prefix="dreamidv_frames_", suffix=".u8", dir=str(folder))
        os.close(fd)
        self._finalizer = weakref.finalize(self, _remove, self.path)
        self._count = 0

    @property
    def frame_bytes(self) -> int:
        return self.height * self.width * 3

    def append(self, frames: np.ndarray) -> None:
        frames = np.asarray(frames)
        if frames.ndim == 3:
            frames = frames[None]
        if frames.dtype != np.uint8 or frames.shape[1:] != (self.height, self.width, 3):
            raise InputError(f"{self.what}: the store holds uint8 frames [k, {self.height}, {self.width}, 3], got "
                             f"{frames.dtype} {list(frames.shape)}")
        with open(self._file(), "ab") as fh:
            fh.write(np.ascontiguousarray(frames).tobytes())
        self._count += frames.shape[0]

    def _file(self) -> str:
        if not os.path.exists(self.path):
            raise InputError(f"{self.what}: the temporary file {self.path} holding them is gone (a cleaned temporary "
                             "folder?); run the node that made them again")
        return self.path

    def __len__(self) -> int:
        return self._count

    def _read(self, start: int, count: int) -> np.ndarray:
        data = np.fromfile(self._file(), dtype=np.uint8, count=count * self.frame_bytes,
                           offset=start * self.frame_bytes)
        if data.size != count * self.frame_bytes:
            raise InputError(f"{self.what}: the temporary file {self.path} is shorter than the {self._count} frames "
                             "written to it")
        return data.reshape(count, self.height, self.width, 3)

    def __getitem__(self, index):
        if isinstance(index, slice):
            idx = range(*index.indices(self._count))
            if idx.step == 1:
                return self._read(idx.start, len(idx)) if len(idx) else np.zeros((0, self.height, self.width, 3),
                                                                                  np.uint8)
            return np.stack([self._read(i, 1)[0] for i in idx]) if len(idx) else self[0:0]
        i = int(index)
        if i < 0:
            i += self._count
        if not 0 <= i < self._count:
            raise IndexError(f"{self.what}: frame {index} out of range ({self._count} frames)")
        return self._read(i, 1)[0]

    @property
    def shape(self):
        return (self._count, self.height, self.width, 3)

    def close(self) -> None:
        """Remove the file now (reading afterwards is an error)."""
        self._finalizer()


class MaskStore:
    """Per-frame bool masks [H, W] kept packed and compressed in memory (a 1080p head mask takes a few KB):
    ``store[i] = mask``, ``store[a:b]`` -> bool tensor [k, H, W] (frames never set are empty)."""

    def __init__(self, count: int, height: int, width: int):
        self.count, self.height, self.width = int(count), int(height), int(width)
        self._frames: dict = {}

    def __len__(self) -> int:
        return self.count

    def __setitem__(self, index: int, mask) -> None:
        import zlib

        arr = mask.detach().cpu().numpy() if hasattr(mask, "detach") else np.asarray(mask)
        if arr.shape != (self.height, self.width):
            raise InputError(f"mask {index}: expected [{self.height}, {self.width}], got {list(arr.shape)}")
        self._frames[int(index)] = zlib.compress(np.packbits(arr.astype(bool)).tobytes(), 1)

    def _frame(self, i: int) -> np.ndarray:
        import zlib

        data = self._frames.get(i)
        if data is None:
            return np.zeros((self.height, self.width), bool)
        bits = np.frombuffer(zlib.decompress(data), np.uint8)
        return np.unpackbits(bits, count=self.height * self.width).reshape(self.height, self.width).astype(bool)

    def __getitem__(self, index):
        import torch

        if isinstance(index, slice):
            idx = range(*index.indices(self.count))
            return torch.from_numpy(np.stack([self._frame(i) for i in idx]) if len(idx) else
                                    np.zeros((0, self.height, self.width), bool))
        return torch.from_numpy(self._frame(int(index)))

    def nbytes(self) -> int:
        return sum(len(v) for v in self._frames.values())
