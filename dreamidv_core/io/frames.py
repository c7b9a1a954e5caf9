"""Frame sequences: the protocol every stage of the library reads frames through, and lazy views of it.

A *frame sequence* is anything with ``len(frames)`` and slicing ``frames[a:b]`` (also with a step) that gives
``[k, H, W, C]`` frames: a numpy array or torch tensor in memory (uint8, or float in [0, 1]), or a lazy
object that decodes or renders frames only when they are asked for (:class:`~.video.VideoReader`, a pose
track's drawings, a swapped clip's pasted frames). Readers take one frame at a time (``frames[i:i + 1]``),
so a lazy sequence costs a few frames of memory however long the clip is.

* :func:`select_frames`: the frames of a sequence at the indices of a ``range`` (start, stride, count), as a
  lazy view (nothing is read);
* :class:`LazyFrames`: a sequence whose frames are made by a function of the frame indices.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from ..errors import InputError


class FrameSelection:
    """``frames`` at ``indices`` (a ``range``), read only when sliced: ``len``, ``[i]``, ``[a:b:s]``."""

    def __init__(self, frames, indices: range):
        if len(indices) and (indices[0] < 0 or indices[-1] >= len(frames)):
            raise InputError(f"frames {indices.start}..{indices[-1]} asked of a clip of {len(frames)} frames")
        self.frames, self.indices = frames, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index):
        if isinstance(index, slice):
            sub = self.indices[index]
            if len(sub) == 0:
                return self.frames[0:0]
            if sub.step < 0:
                raise InputError("frame selections are read forward (no negative steps)")
            return self.frames[sub.start:sub.stop:sub.step]
        return self.frames[self.indices[index]]

    @property
    def shape(self):
        return (len(self),) + tuple(self[0:1].shape[1:])


def select_frames(frames, indices: range):
    """The frames of ``frames`` at ``indices`` (a ``range`` with a positive step); ``frames`` itself when that
    is all of it in order. Nothing is read until the result is sliced."""
    if indices.step < 1:
        raise InputError(f"frame selection must step forward, got step {indices.step}")
    if indices == range(len(frames)):
        return frames
    return FrameSelection(frames, indices)


class LazyFrames:
    """A frame sequence made on demand: ``make(indices) -> array [k, ...]`` for a list of frame indices.

    ``frames[i]`` is one frame, ``frames[a:b:s]`` the stacked frames; nothing is kept between calls.
    """

    def __init__(self, count: int, make: Callable[[Sequence[int]], np.ndarray], what: str = "frames"):
        self.count, self.make, self.what = int(count), make, what

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.make(list(range(*index.indices(self.count))))
        i = int(index)
        if i < 0:
            i += self.count
        if not 0 <= i < self.count:
            raise IndexError(f"{self.what}: frame {index} out of range ({self.count} frames)")
        return self.make([i])[0]

    @property
    def shape(self):
        return (self.count,) + tuple(self[0:1].shape[1:])


def iter_chunks(frames, size: int = 8, start: int = 0, stop: int = None):
    """``(start, frames[a:b])`` chunks of a frame sequence, in order."""
    stop = len(frames) if stop is None else stop
    for a in range(start, stop, max(1, int(size))):
        yield a, frames[a:min(a + size, stop)]
