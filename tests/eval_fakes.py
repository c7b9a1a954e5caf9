"""Deterministic stand-ins for the evaluation's face models, for the procedural faces of
tests/synthetic_data.py (used by tests/test_evaluate.py and benchmarks/eval_sanity.py).

* :func:`palette_embedder`: an identity embedder (uint8 [n, H, W, 3] -> n unit vectors or None): the share of
  pixels within ``tol`` of each of the 6 face colours. Two faces of the same face colour embed alike, of
  different colours nearly orthogonally; an image without a face colour has no face.
* :func:`ellipse_observer`: a face observer (frame -> FaceObservation or None): the pixels of the most
  frequent face colour are the face; their centroid, size (from the second moments: the face is an ellipse
  with axes 0.8 r and r) and in-plane turn (the major axis' angle) give the pose; landmarks are the
  generator's 68 keypoints at that pose plus 16 points of the face ellipse (:func:`face_landmarks`),
  rotation Rz(roll), and the expression vector is the measured aspect ratio of the face (0.8 undistorted).
"""
from __future__ import annotations

import math
from typing import List, Optional

import numpy as np

from dreamidv_core.eval.face_metrics import FaceObservation
from tests.synthetic_data import FACE_COLOURS, face_keypoints

PALETTE = np.asarray(FACE_COLOURS, np.float64)


def _face_pixels(image: np.ndarray, tol: float):
    d = np.linalg.norm(image.astype(np.float64)[:, :, None, :] - PALETTE[None, None], axis=-1)  # [H, W, 6]
    return d < tol


def palette_embedder(tol: float = 30.0, min_pixels: int = 12):
    def embed(images: np.ndarray) -> List[Optional[np.ndarray]]:
        out = []
        for image in np.asarray(images):
            counts = _face_pixels(image, tol).sum(axis=(0, 1)).astype(np.float64)
            out.append(None if counts.max() < min_pixels else counts / np.linalg.norm(counts))
        return out

    return embed


def face_landmarks(cx: float, cy: float, r: float, roll: float) -> np.ndarray:
    """The generator's 68 keypoints plus 16 points on the face ellipse (like MediaPipe's face oval, so the
    landmarks' hull covers the forehead too) -> [84, 2]."""
    a = np.linspace(0, 2 * math.pi, 16, endpoint=False)
    oval = np.stack([cx + 0.8 * r * np.cos(a), cy + r * np.sin(a)], axis=1)
    t = math.radians(roll)
    rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    oval = (oval - (cx, cy)) @ rot.T + (cx, cy)
    return np.concatenate([face_keypoints(cx, cy, r, roll), oval])


def rotation_z(degrees: float) -> np.ndarray:
    a = math.radians(degrees)
    return np.array([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]])


def ellipse_observer(tol: float = 30.0, min_pixels: int = 12):
    def observe(frame: np.ndarray) -> Optional[FaceObservation]:
        hits = _face_pixels(np.asarray(frame), tol)
        counts = hits.sum(axis=(0, 1))
        k = int(np.argmax(counts))
        if counts[k] < min_pixels:
            return None
        ys, xs = np.nonzero(hits[:, :, k])
        cx, cy = xs.mean(), ys.mean()
        cov = np.cov(np.stack([xs - cx, ys - cy]))
        vals, vecs = np.linalg.eigh(cov)  # ascending: the last is the major (vertical) axis
        major = vecs[:, 1]
        if major[1] < 0:
            major = -major
        roll = math.degrees(math.atan2(-major[0], major[1]))  # 0 when the major axis points down the image
        r = 2.0 * math.sqrt(max(vals[1], 1e-9))  # a filled ellipse's variance along an axis is (axis/2)^2
        aspect = math.sqrt(max(vals[0], 0.0) / max(vals[1], 1e-9))
        return FaceObservation(face_landmarks(cx, cy, r, roll), rotation_z(roll), np.array([aspect]))

    return observe
