"""The reference face: face detection + ArcFace embedding, face choice, identity bundle.

Faces are found and embedded by :mod:`.face_analysis` (onnxruntime on insightface's model pack files,
``models/insightface/models/<pack>/``; nothing is ever downloaded and the insightface package is not
needed). Faces are listed left to right (by box centre); the one used is picked by index, by size
(largest box) or by cosine similarity of its ArcFace embedding to the largest face of another photo.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import InputError
from .face_analysis import (PACK_FILES, PACK_NAMES, FaceAnalyzer, clear_cache, find_pack, load_analyzer,  # noqa: F401
                            sort_left_to_right)
from .identity_bundle import FaceBox, IdentityBundle, cosine, encode_reference
from ..io.video import to_uint8_frames
from .onnx_session import PROVIDER_CHOICES
from .video_ops import letterbox_reference

log = logging.getLogger(__name__)

PROVIDERS = PROVIDER_CHOICES  # onnxruntime provider choices of the nodes ('auto' = the best this build has)
SELECT_MODES = ("largest", "index", "most similar")


def photo(image, what: str) -> np.ndarray:
    """One photo ([H, W, C], [1, H, W, C] or a batch whose first image is used; C in 1/3/4, uint8
    or float 0..1, numpy or torch) -> RGB uint8 [H, W, 3]. Alpha is dropped, greyscale expanded."""
    shape = tuple(image.shape)
    if len(shape) == 2 or (len(shape) == 3 and shape[-1] in (1, 3, 4) and shape[0] > 4):
        image = image[None]
    elif len(shape) == 4 and shape[0] > 1:
        log.info("DreamID-V: %s has %d images; the first one is used", what, shape[0])
        image = image[:1]
    elif len(shape) == 4 and shape[0] == 0:
        raise InputError(f"{what}: the image batch is empty")
    return np.ascontiguousarray(to_uint8_frames(image, what)[0])


def largest(faces: Sequence[FaceBox]) -> int:
    return int(np.argmax([f.area for f in faces]))


@dataclass
class Choice:
    index: int                       # position in the left-to-right list
    similarities: Optional[List[float]] = None


def choose_face(faces: Sequence[FaceBox], mode: str = "largest", index: int = 0,
                target: Optional[np.ndarray] = None, what: str = "reference image") -> Choice:
    """Pick one of ``faces`` (left to right): 'largest' box, 'index' (0 = leftmost; negative counts
    from the right) or 'most similar' to the embedding ``target`` (cosine similarity)."""
    if not faces:
        raise InputError(f"{what}: no face found")
    if mode == "largest":
        return Choice(largest(faces))
    if mode == "index":
        n = len(faces)
        if not -n <= index < n:
            raise InputError(f"{what}: face_index {index} is out of range: {n} face{'s' if n > 1 else ''} found "
                             f"(0 = leftmost, up to {n - 1})")
        return Choice(index % n)
    if mode == "most similar":
        if target is None:
            raise InputError("face selection 'most similar' needs the 'similar_to' image (a photo of the person to pick)")
        sims = [cosine(f.embedding, target) for f in faces]
        return Choice(int(np.argmax(sims)), sims)
    raise InputError(f"face selection must be one of {', '.join(SELECT_MODES)}, got '{mode}'")


def detect(analyzer: FaceAnalyzer, image: np.ndarray, what: str) -> List[FaceBox]:
    """Faces of ``image`` (RGB uint8); a clear :class:`InputError` naming ``what`` when there is none."""
    faces = analyzer.faces(image)
    if not faces:
        h, w = image.shape[:2]
        raise InputError(f"{what}: no face found in the {w}x{h} image (face analysis pack "
                         f"'{analyzer.pack_dir.name}', detection size {analyzer.det_size}, threshold "
                         f"{analyzer.det_thresh}). Use a photo with a clearly visible face, or lower the "
                         "detection threshold")
    return faces


def draw_faces(image: np.ndarray, faces: Sequence[FaceBox], chosen: Optional[int]) -> np.ndarray:
    """The photo with every face box and its index drawn (chosen: green, others: red), uint8 [H, W, 3]."""
    import cv2

    out = np.ascontiguousarray(image.copy())
    thick = max(1, round(max(image.shape[:2]) / 400))
    for i, f in enumerate(faces):
        color = (0, 220, 0) if i == chosen else (230, 40, 40)
        x0, y0, x1, y1 = (int(round(v)) for v in f.bbox)
        cv2.rectangle(out, (x0, y0), (x1, y1), color, thick + (1 if i == chosen else 0))
        if f.landmarks is not None:
            for x, y in f.landmarks:
                cv2.circle(out, (int(round(x)), int(round(y))), thick + 1, color, -1)
        cv2.putText(out, str(i), (x0 + 2, max(y0 - 4, 12)), cv2.FONT_HERSHEY_SIMPLEX, 0.4 * thick + 0.2, color,
                    thick)
    return out


def encode_identity(analyzer: FaceAnalyzer, reference, mode: str = "largest", index: int = 0,
                    similar_to=None, video_size: Optional[Tuple[int, int]] = None, vae=None,
                    area: Tuple[int, int] = (832, 480)) -> Tuple[IdentityBundle, List[FaceBox], int]:
    """Reference photo -> (:class:`IdentityBundle`, all faces left to right, chosen index).

    reference / similar_to: one image ([H, W, C] or [1, H, W, C]); video_size: (width, height) of the
    driving video frames: with it the bundle gets ``letterboxed`` (uint8 [Hv, Wv, 3]) and, with a
    ``vae`` (the swap's protocol: ``encode([B, 3, F, H, W] in [-1, 1]) -> normalised latent``), the
    ``latent`` [1, 16, 1, h, w] for ``area`` = (width, height), keyed by ``((video_w, video_h), area)``.
    """
    image = photo(reference, "reference image")
    target = None
    if mode == "most similar" and similar_to is not None:
        other = detect(analyzer, photo(similar_to, "similar_to image"), "similar_to image")
        target = other[largest(other)].embedding
    faces = detect(analyzer, image, "reference image")
    choice = choose_face(faces, mode, index, target)
    bundle = IdentityBundle(image=image, face=faces[choice.index])
    if vae is not None and video_size is None:
        raise InputError("a VAE was given without the driving video frames: connect the video frames too "
                         "(the identity latent depends on their frame size), or disconnect the VAE")
    if video_size is not None:
        vw, vh = (int(v) for v in video_size)
        bundle.letterboxed = np.array(letterbox_reference(image, vw, vh))
        if vae is not None:
            area = tuple(int(v) for v in area)
            with torch.no_grad():
                bundle.latent = encode_reference(vae, image, (vw, vh), area).detach().cpu()
            bundle.latent_key = ((vw, vh), area)
    return bundle, faces, choice.index
