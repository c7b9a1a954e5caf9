"""The first and last frames of a clip: the conditioning frames of the IVS."""
from __future__ import annotations

from typing import Tuple

import torch

from ..errors import InputError
from ..models.frame_grid import MIN_FRAMES



def check_clip(frames, what: str = "clip", min_frames: int = MIN_FRAMES) -> int:
    """Frames [F, H, W, C] with F >= ``min_frames`` -> F; InputError naming ``what`` otherwise."""
    shape = tuple(getattr(frames, "shape", ()))
    if len(shape) != 4 or shape[-1] not in (1, 3, 4):
        raise InputError(f"{what}: expected frames [F, H, W, C] (C = 1, 3 or 4), got shape {list(shape)}")
    if shape[0] < min_frames:
        raise InputError(f"{what} has {shape[0]} frame{'s' if shape[0] != 1 else ''}; at least {min_frames} are "
                         "needed (DreamID-V and the training dataset work on clips of 5 frames or more)")
    return int(shape[0])


def first_last_frames(frames: torch.Tensor, what: str = "clip") -> Tuple[torch.Tensor, torch.Tensor, int]:
    """frames [F, H, W, C] (F >= 5) -> (first [1, H, W, C], last [1, H, W, C], F), copies of the frames."""
    count = check_clip(frames, what)
    return frames[:1].clone(), frames[count - 1:].clone(), count


def check_pair(first, last, what: str = "first/last frames") -> Tuple[int, int]:
    """Two images [1, H, W, C] / [H, W, C] of the same size -> (H, W); InputError otherwise."""
    sizes = []
    for name, img in (("first", first), ("last", last)):
        shape = tuple(getattr(img, "shape", ()))
        if len(shape) == 3:
            shape = (1,) + shape
        if len(shape) != 4 or shape[0] < 1:
            raise InputError(f"{what}: the {name} frame must be an image [1, H, W, C], got shape {list(shape)}")
        sizes.append(shape[1:3])
    if sizes[0] != sizes[1]:
        raise InputError(f"{what}: the first frame is {sizes[0][1]}x{sizes[0][0]} but the last is "
                         f"{sizes[1][1]}x{sizes[1][0]}; both must have the same size (the clip's frame size)")
    return int(sizes[0][0]), int(sizes[0][1])
