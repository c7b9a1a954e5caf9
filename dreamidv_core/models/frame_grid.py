"""How video frames map onto the latent and token grids of DreamID-V (the Wan 2.1 VAE and 2x2 patches).

* time: latent frame 0 holds pixel frame 0, latent frame k > 0 pixel frames 4k-3 .. 4k, so a clip of
  4n+1 frames has n+1 latent frames; shorter clips are padded to 4n+1 (last frame repeated);
* space: 8 pixels per latent pixel, 2x2 latent pixels per token, so frames are cropped to multiples of 16;
* the shortest clip is 5 frames (two latent frames).
"""
from __future__ import annotations

from typing import Tuple

TEMPORAL_STRIDE = 4  # pixel frames per latent frame after the first
SPATIAL_STRIDE = 8  # pixels per latent pixel
PATCH = 2  # latent pixels per token side
CROP_MULTIPLE = SPATIAL_STRIDE * PATCH  # frame sizes are cropped to multiples of 16
MIN_FRAMES = 1 + TEMPORAL_STRIDE  # the shortest clip the model (and the training data) takes


def padded_frame_count(frames: int) -> int:
    """The next 4n+1 >= ``frames`` (the clip is padded to it by repeating its last frame)."""
    return (frames + 2) // TEMPORAL_STRIDE * TEMPORAL_STRIDE + 1


def latent_frame_count(frames: int) -> int:
    """Latent frames of a clip of ``frames`` = 4n+1 pixel frames."""
    return (frames - 1) // TEMPORAL_STRIDE + 1


def pixel_span(a: int, b: int) -> Tuple[int, int]:
    """Pixel frames [start, stop) of latent frames [a, b)."""
    return (0 if a == 0 else TEMPORAL_STRIDE * a - (TEMPORAL_STRIDE - 1)), TEMPORAL_STRIDE * (b - 1) + 1
