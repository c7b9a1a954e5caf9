"""controlnet_aux's POSE_KEYPOINT format, read and written.

POSE_KEYPOINT is a list with one dict per frame::

    {"people": [{"pose_keypoints_2d": [x, y, c] * 18, "face_keypoints_2d": [x, y, c] * 68 (or 70),
                 "hand_left_keypoints_2d": [...], "hand_right_keypoints_2d": [...]}, ...],
     "canvas_width": W, "canvas_height": H}

Coordinates are either normalised (0..1) or pixels of the canvas; which one is decided once for the
whole input (normalised when no visible coordinate exceeds 1). A point with confidence 0 (controlnet_aux
writes missing points as 0, 0, 0) or negative coordinates is missing.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np

from ...errors import InputError
from .landmark_sets import BODY_POINTS, FACE_POINTS

WHAT = "keypoints"


def _points(person: dict, key: str, count: int, frame: int) -> np.ndarray:
    flat = person.get(key) or []
    try:
        arr = np.asarray(flat, np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise InputError(f"{WHAT}: frame {frame}: '{key}' must be a list of numbers [x, y, confidence, ...], got "
                         f"{type(flat).__name__} {str(flat)[:40]!r}") from None
    if arr.size == 0:
        return np.zeros((count, 3))
    if arr.size % 3:
        raise InputError(f"{WHAT}: frame {frame}: '{key}' has {arr.size} numbers, expected [x, y, confidence] triples")
    pts = arr.reshape(-1, 3)
    if key == "pose_keypoints_2d" and len(pts) != BODY_POINTS:
        raise InputError(f"{WHAT}: frame {frame}: {len(pts)} body points; only the OpenPose/COCO 18-point "
                         "body (as DWPose/OpenPose preprocessors output) is supported")
    if len(pts) < count:
        pts = np.concatenate([pts, np.zeros((count - len(pts), 3))])
    pts = pts[:count].copy()  # 70-point OpenPose faces: the 68 face points (pupils dropped)
    pts[~np.isfinite(pts).all(1)] = 0.0  # NaN/inf/None coordinates: a point that was not found
    return pts


def _people(frame: dict, i: int) -> list:
    people = frame.get("people") or []
    if not isinstance(people, (list, tuple)) or not all(isinstance(p, dict) for p in people):
        raise InputError(f"{WHAT}: frame {i}: 'people' must be a list of per-person dicts (with "
                         f"'pose_keypoints_2d' / 'face_keypoints_2d'), got {type(people).__name__}")
    return list(people)


def _canvas(frame: dict, key: str, default: int, i: int) -> float:
    value = frame.get(key) or default
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{WHAT}: frame {i}: '{key}' must be a number of pixels, got {value!r}") from None
    if not (np.isfinite(value) and value > 0):
        raise InputError(f"{WHAT}: frame {i}: '{key}' must be a positive number of pixels, got {value!r}")
    return value


def parse_pose_keypoints(data, frame_count: int, width: int, height: int) -> Tuple[List[list], bool]:
    """POSE_KEYPOINT -> (per frame a list of people (body [18, 3], face [68, 3]) normalised to 0..1,
    whether the input was normalised). width/height: the frames' size (used when pixel coordinates
    come without a canvas size)."""
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, (list, tuple)) or not all(isinstance(d, dict) for d in data):
        raise InputError(f"{WHAT}: expected POSE_KEYPOINT (a list of per-frame dicts with 'people'), "
                         f"got {type(data).__name__}")
    if len(data) != frame_count:
        raise InputError(f"{WHAT}: {len(data)} frames of keypoints for {frame_count} video frames; "
                         "they must come from the same frames")
    frames = []
    peak = 0.0
    for i, d in enumerate(data):
        people = []
        for person in _people(d, i):
            body = _points(person, "pose_keypoints_2d", BODY_POINTS, i)
            face = _points(person, "face_keypoints_2d", FACE_POINTS, i)
            for pts in (body, face):
                missing = (pts[:, 2] <= 0) | (pts[:, 0] < 0) | (pts[:, 1] < 0)
                pts[missing] = (-1.0, -1.0, 0.0)
                if (~missing).any():
                    peak = max(peak, float(pts[~missing, :2].max()))
            people.append((body, face))
        frames.append(people)
    normalised = peak <= 1.0
    if not normalised:
        for i, (d, people) in enumerate(zip(data, frames)):
            cw = _canvas(d, "canvas_width", width, i)
            ch = _canvas(d, "canvas_height", height, i)
            for pts in (p for person in people for p in person):
                ok = pts[:, 2] > 0
                pts[ok, 0] /= cw
                pts[ok, 1] /= ch
    return frames, normalised


def _flat(pts: np.ndarray, width: int, height: int, threshold: float) -> list:
    out = []
    for x, y, s in pts:
        out.extend([float(x * width), float(y * height), float(s)] if s >= threshold and x >= 0 and y >= 0
                   else [0.0, 0.0, 0.0])
    return out


def people_to_dict(people: Sequence, width: int, height: int, threshold: float = 0.3) -> dict:
    """One frame's people (normalised) -> a POSE_KEYPOINT frame dict in pixel coordinates; points
    under ``threshold`` are written as 0, 0, 0."""
    return {
        "people": [{"pose_keypoints_2d": _flat(body, width, height, threshold),
                    "face_keypoints_2d": _flat(face, width, height, threshold),
                    "hand_left_keypoints_2d": [], "hand_right_keypoints_2d": []} for body, face in people],
        "canvas_width": int(width), "canvas_height": int(height),
    }


def face_mesh_to_dict(points: np.ndarray, width: int, height: int) -> dict:
    """One frame's retargeted MediaPipe landmarks [478, 2] (pixels) -> a POSE_KEYPOINT frame dict; the
    478 points go under 'face_mesh_keypoints_2d' (the OpenPose keys stay empty)."""
    flat = np.concatenate([points, np.ones((len(points), 1))], 1).reshape(-1)
    return {"people": [{"pose_keypoints_2d": [], "face_keypoints_2d": [], "hand_left_keypoints_2d": [],
                        "hand_right_keypoints_2d": [], "face_mesh_keypoints_2d": [float(v) for v in flat]}],
            "canvas_width": int(width), "canvas_height": int(height)}
