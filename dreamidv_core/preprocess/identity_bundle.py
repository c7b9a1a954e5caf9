"""The identity bundle passed from the ID-token encoder to the sampler.

The released model's identity tokens are the VAE latent of the reference photo letterboxed onto the
driving video's frame size; the ArcFace embedding describes the same face for selection, checks and
training. A latent is only valid for the geometry it was made for, which the bundle records.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch

from .video_ops import prepare_reference



def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two embeddings of any shape (flattened), in float64; 0 where one is zero."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))

@dataclass
class FaceBox:
    """One detected face in the reference photo (pixel coordinates of that photo)."""

    bbox: Tuple[float, float, float, float]  # x0, y0, x1, y1
    score: float
    landmarks: Optional[np.ndarray] = None  # [5, 2] eye, eye, nose, mouth corner, mouth corner
    embedding: Optional[np.ndarray] = None  # [512] float32, L2-normalised ArcFace embedding

    @property
    def area(self) -> float:
        x0, y0, x1, y1 = self.bbox
        return max(0.0, x1 - x0) * max(0.0, y1 - y0)


@dataclass
class IdentityBundle:
    """image: the reference photo, uint8 [H, W, 3] (alpha dropped, greyscale expanded).
    face: the chosen face (None when detection was skipped).
    letterboxed: the photo letterboxed in white onto the video frame size, uint8 [Hv, Wv, 3] (or None).
    latent: its VAE latent [1, 16, 1, h, w] (normalised Wan 2.1 latent) or None.
    latent_key: ((video_width, video_height), (area_width, area_height)) the latent was made for.
    """

    image: np.ndarray
    face: Optional[FaceBox] = None
    letterboxed: Optional[np.ndarray] = None
    latent: Optional[torch.Tensor] = None
    latent_key: Optional[Tuple[Tuple[int, int], Tuple[int, int]]] = None

    @property
    def embedding(self) -> Optional[np.ndarray]:
        return None if self.face is None else self.face.embedding

    def latent_for(self, video_size: Tuple[int, int], area: Tuple[int, int]) -> Optional[torch.Tensor]:
        """The stored latent if it was made for frames of ``video_size`` at ``area`` (both (width, height)),
        else None (the caller encodes anew)."""
        if self.latent is not None and self.latent_key == (tuple(video_size), tuple(area)):
            return self.latent
        return None


def encode_reference(vae, reference, video_size: Tuple[int, int], area: Tuple[int, int]) -> torch.Tensor:
    """Reference photo -> its VAE latent [1, 16, 1, h, w]: letterboxed in white onto the video's frame size
    (width, height), then resized and cropped to ``area`` like the video (the released model's identity
    tokens). ``vae``: the swap's protocol (``encode([B, 3, F, H, W] in [-1, 1]) -> normalised latent``)."""
    ref = prepare_reference(reference, *video_size, *area)
    return vae.encode(ref.mul(2).sub(1)[None])
