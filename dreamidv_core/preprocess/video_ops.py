"""Frame preparation exactly as the reference pipeline does it.

* area resize: scale so that H*W is at most ``width*height`` of the requested size (downscale only,
  PIL bicubic), sizes rounded with Python's ``round``;
* centre crop to multiples of 16 (offsets rounded with Python's ``round``, as torchvision does);
* reference image: Lanczos-resized to fit the *original* video frame, letterboxed with white, then
  the same resize and crop as the video.

Frames are accepted as uint8 arrays [F, H, W, C] or float tensors in [0, 1] (ComfyUI's IMAGE);
float frames are rounded to uint8 first, which is lossless for frames that came from a video file.
"""
from __future__ import annotations

import math
from typing import Tuple

import numpy as np
import torch
from PIL import Image, ImageOps

from ..errors import InputError
from ..io.video import to_uint8_frames
from ..models.frame_grid import CROP_MULTIPLE



def resized_size(height: int, width: int, max_width: int, max_height: int) -> Tuple[int, int]:
    """(height, width) after the reference's area resize to at most max_width*max_height pixels."""
    resolution = math.sqrt(max_width * max_height)
    scale = math.sqrt(resolution ** 2 / (height * width))
    scale = 1 if scale >= 1 else scale
    return round(height * scale), round(width * scale)


def cropped_size(height: int, width: int, multiple: int = CROP_MULTIPLE) -> Tuple[int, int]:
    return height - height % multiple, width - width % multiple


def output_size(height: int, width: int, max_width: int, max_height: int) -> Tuple[int, int]:
    """(height, width) of the swapped video for a source of height x width."""
    return cropped_size(*resized_size(height, width, max_width, max_height))


def model_frame_size(height: int, width: int, max_width: int, max_height: int, what: str = "the video") -> Tuple[int, int]:
    """:func:`output_size`, or an :class:`InputError` when frames of ``width`` x ``height`` leave less than one
    16-pixel block at the ``max_width`` x ``max_height`` area (checked before anything is encoded)."""
    if min(height, width) <= 0:
        raise InputError(f"{what}: frames of {width}x{height} are empty")
    if min(max_width, max_height) <= 0:
        raise InputError(f"the area must be positive, got {max_width}x{max_height}")
    size = output_size(height, width, max_width, max_height)
    if min(size) < CROP_MULTIPLE:
        raise InputError(f"{what}: frames of {width}x{height} are too small for the {max_width}x{max_height} area: "
                         f"they become {size[1]}x{size[0]}, and the model needs at least {CROP_MULTIPLE}x"
                         f"{CROP_MULTIPLE}; use a larger area (width, height) or a less elongated clip")
    return size


def _crop_box(height: int, width: int, ch: int, cw: int) -> Tuple[int, int, int, int]:
    top = int(round((height - ch) / 2.0))
    left = int(round((width - cw) / 2.0))
    return left, top, left + cw, top + ch


def resize_and_crop(image: Image.Image, max_width: int, max_height: int) -> np.ndarray:
    """One PIL image -> uint8 array [H', W', 3] after the area resize and the centre crop."""
    rh, rw = resized_size(image.height, image.width, max_width, max_height)
    if (rh, rw) != (image.height, image.width):
        image = image.resize((rw, rh), Image.BICUBIC)
    ch, cw = cropped_size(rh, rw)
    return np.array(image.crop(_crop_box(rh, rw, ch, cw)))


def prepare_frames(frames, count: int, max_width: int, max_height: int, what: str) -> torch.Tensor:
    """First ``count`` frames, resized and cropped -> float32 tensor [3, count, H', W'] in [0, 1].

    Frames are converted one at a time into a preallocated tensor.
    """
    first = to_uint8_frames(frames[:1], what)[0]
    h, w = first.shape[:2]
    oh, ow = model_frame_size(h, w, max_width, max_height, what)
    out = torch.empty(3, count, oh, ow)
    for i in range(count):
        frame = to_uint8_frames(frames[i:i + 1], what)[0]
        if frame.shape[:2] != (h, w):
            raise InputError(f"{what}: frame {i} is {frame.shape[1]}x{frame.shape[0]}, frame 0 is {w}x{h}")
        arr = resize_and_crop(Image.fromarray(frame), max_width, max_height)
        out[:, i] = torch.from_numpy(arr).permute(2, 0, 1).float().div_(255)
    return out


def letterbox_reference(reference, video_width: int, video_height: int) -> Image.Image:
    """Fit the reference photo inside the original video frame (Lanczos) and pad it with white."""
    img = Image.fromarray(to_uint8_frames(reference[None] if _is_single(reference) else reference[:1], "reference image")[0])
    ratio = img.width / img.height
    if ratio > video_width / video_height:
        new_w, new_h = video_width, max(1, int(video_width / ratio))
    else:
        new_h, new_w = video_height, max(1, int(video_height * ratio))
    img = img.resize((new_w, new_h), Image.LANCZOS)
    dw, dh = video_width - new_w, video_height - new_h
    return ImageOps.expand(img, (dw // 2, dh // 2, dw - dw // 2, dh - dh // 2), fill=(255, 255, 255))


def _is_single(image) -> bool:
    shape = tuple(image.shape)
    return len(shape) == 3 and shape[-1] in (1, 3, 4) or len(shape) == 2


def prepare_reference(reference, video_width: int, video_height: int, max_width: int, max_height: int) -> torch.Tensor:
    """Reference photo ([H, W, C] or [1, H, W, C]) -> float32 [3, 1, H', W'] in [0, 1]."""
    model_frame_size(video_height, video_width, max_width, max_height, "the video (the reference is letterboxed "
                                                                        "onto its frames)")
    boxed = letterbox_reference(reference, video_width, video_height)
    arr = resize_and_crop(boxed, max_width, max_height)
    return torch.from_numpy(arr).permute(2, 0, 1)[:, None].float().div_(255)
