"""ArcFace similarities between an identity image and the frames of a clip.

An *encoder* is any callable ``encoder(images uint8 [N, H, W, 3]) -> list of N embeddings`` (a 1-D
float array each, or ``None`` for an image without a face). :func:`analyzer_encoder` makes one from
:class:`dreamidv_core.preprocess.identity.FaceAnalyzer` (the largest face's ArcFace embedding); tests pass a
controllable stand-in.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import numpy as np

from ..errors import InputError
from ..io.video import to_uint8_frames
from ..preprocess.identity_bundle import cosine

Encoder = Callable[[np.ndarray], Sequence[Optional[np.ndarray]]]


def analyzer_encoder(analyzer) -> Encoder:
    """FaceAnalyzer -> encoder: each image's largest face's L2-normalised embedding, or None."""

    def encode(images: np.ndarray) -> List[Optional[np.ndarray]]:
        out = []
        for img in images:
            faces = analyzer.faces(np.ascontiguousarray(img))
            out.append(max(faces, key=lambda f: f.area).embedding if faces else None)
        return out

    return encode


def embed_image(encoder: Encoder, image, what: str) -> np.ndarray:
    """One image [H, W, C] / [1, H, W, C] -> its embedding; InputError naming ``what`` without a face."""
    img = to_uint8_frames(image if len(image.shape) == 4 else image[None], what)[:1]
    emb = list(encoder(img))
    if len(emb) != 1:
        raise InputError(f"identity encoder returned {len(emb)} embeddings for 1 image")
    if emb[0] is None:
        raise InputError(f"{what}: no face found by the identity encoder (ArcFace); the identity image must show "
                         "one clearly visible face")
    return np.asarray(emb[0], np.float32)


def per_frame_similarity(encoder: Encoder, embedding: np.ndarray, frames, what: str, stride: int = 1,
                         chunk: int = 16) -> List[Optional[float]]:
    """Cosine similarity of ``embedding`` to every ``stride``-th frame of ``frames`` [F, H, W, C]
    -> list of F values (``None`` for frames without a face and for frames not measured)."""
    count = len(frames)
    stride = max(1, int(stride))
    sims: List[Optional[float]] = [None] * count
    picked = list(range(0, count, stride))
    for s in range(0, len(picked), chunk):
        idx = picked[s:s + chunk]
        imgs = np.stack([to_uint8_frames(frames[i:i + 1], what)[0] for i in idx])
        embs = list(encoder(imgs))
        if len(embs) != len(idx):
            raise InputError(f"identity encoder returned {len(embs)} embeddings for {len(idx)} images")
        for i, e in zip(idx, embs):
            sims[i] = None if e is None else round(cosine(embedding, e), 6)
    return sims


def mean_or_none(values: Sequence[Optional[float]]) -> Optional[float]:
    got = [v for v in values if v is not None]
    return round(float(np.mean(got)), 6) if got else None


def identity_similarity(encoder: Encoder, identity, driving, target, stride: int = 1,
                        what: str = "identity image") -> tuple:
    """-> (means, per_frame): ``means`` = {``identity_target``: mean over the target frames with a face,
    ``identity_driving``: the same over the driving frames (should be low)}, each a number or None;
    ``per_frame`` = {``target``: [...], ``driving``: [...]} with None for frames without a face / not
    measured. InputError naming ``what`` when the identity image has no face."""
    emb = embed_image(encoder, identity, what)
    tgt = per_frame_similarity(encoder, emb, target, "target clip", stride)
    drv = per_frame_similarity(encoder, emb, driving, "driving clip", stride)
    return ({"identity_target": mean_or_none(tgt), "identity_driving": mean_or_none(drv)},
            {"target": tgt, "driving": drv})
