"""Pose video + face mask + keypoints from a clip, with the three sources.

    result = extract_mediapipe(frames, landmarker, reference=ref_image)
    result = extract_dwpose(frames, dwpose)
    result = extract_keypoints(frames, pose_keypoint_data)

``frames``: anything indexable with ``len`` whose items (or 1-frame slices) are frames: uint8 or float
0..1, [H, W, C] with 1, 3 or 4 channels (ComfyUI's IMAGE tensor works; it is read one frame at a time).
Results: ``pose`` float32 [F, H, W, 3] in 0..1, ``mask`` float32 [F, H, W] in {0, 1} (written frame by
frame into preallocated arrays: no other whole-video copy), ``keypoints`` (POSE_KEYPOINT list),
``filled`` (indices of frames with no face, filled from the nearest frame with one) and ``info``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, TypeVar

import numpy as np

from ...errors import InputError
from ...progress import Cancel, Progress, check_cancel, reporter
from ...io.video import to_uint8_frames
from . import render
from .face_geometry import retarget
from .keypoints import face_mesh_to_dict, parse_pose_keypoints, people_to_dict
from .mediapipe_face import FaceFrame

T = TypeVar("T")


@dataclass
class PoseResult:
    pose: np.ndarray  # float32 [F, H, W, 3], 0..1
    mask: np.ndarray  # float32 [F, H, W], 0/1
    keypoints: list  # POSE_KEYPOINT, one dict per frame
    filled: List[int] = field(default_factory=list)
    info: str = ""


def frame_at(frames, i: int, what: str) -> np.ndarray:
    """Frame i as uint8 RGB [H, W, 3] (converted alone, never the whole clip)."""
    return to_uint8_frames(frames[i:i + 1], what)[0]


def _size(frames, what: str):
    if len(frames) == 0:
        raise InputError(f"{what}: no frames")
    h, w = frame_at(frames, 0, what).shape[:2]
    return len(frames), h, w


def fill_gaps(items: Sequence[Optional[T]], what: str, thing: str = "face") -> tuple:
    """Replace each None by the nearest non-None item (the earlier one on ties) ->
    (list, indices that were filled). All None: InputError naming ``what``."""
    valid = [i for i, it in enumerate(items) if it is not None]
    if not valid:
        raise InputError(f"{what}: no {thing} found in any of the {len(items)} frames; use a clip where "
                         f"the {thing} is visible (frontal, not too small) or another pose source")
    out, filled = list(items), []
    vi = np.asarray(valid)
    for i, it in enumerate(items):
        if it is None:
            out[i] = items[int(vi[np.argmin(np.abs(vi - i))])]
            filled.append(i)
    return out, filled


def _fill_note(filled: List[int], total: int) -> str:
    if not filled:
        return f"face found in all {total} frames"
    shown = ", ".join(str(i) for i in filled[:20]) + (" ..." if len(filled) > 20 else "")
    return f"face found in {total - len(filled)} of {total} frames; filled {len(filled)} from neighbours: [{shown}]"


def extract_mediapipe(frames, landmarker, reference=None, what: str = "frames",
                      progress: Progress = None, cancel: Cancel = None) -> PoseResult:
    """MediaPipe source with the reference pipeline's expression retargeting onto ``reference`` (an
    image, uint8 or float [H, W, C] / [1, H, W, C], or the reference face already found: a
    :class:`~.mediapipe_face.FaceFrame`); without it the driving face itself is drawn."""
    count, h, w = _size(frames, what)
    report = reporter(progress)
    ref_face = None
    if isinstance(reference, FaceFrame):
        ref_face = reference
    elif reference is not None:
        ref = reference if getattr(reference, "ndim", 3) == 4 else reference[None]
        ref_face = landmarker(frame_at(ref, 0, "reference"))
        if ref_face is None:
            raise InputError("reference: no face found by the MediaPipe face landmarker; use a photo with one "
                             "clearly visible face (or leave 'reference' unconnected to skip retargeting)")
    faces = []
    for i in range(count):
        check_cancel(cancel, "pose extraction")
        faces.append(landmarker(frame_at(frames, i, what)))
        report("pose", i + 1, count)
    detected = [i for i, f in enumerate(faces) if f is not None]
    faces, filled = fill_gaps(faces, what)
    neutral_frame = min(detected, key=lambda i: faces[i].expression)  # first minimum, as argmin
    neutral = faces[neutral_frame].mesh
    target = ref_face.mesh if ref_face is not None else neutral
    pose = np.zeros((count, h, w, 3), np.float32)
    mask = np.zeros((count, h, w), np.float32)
    keypoints = []
    for i, face in enumerate(faces):
        pts = retarget(face.mesh, neutral, target, face.pose, face.landmarks, w, h)
        pose[i] = render.draw_face_points(pts, h, w) / np.float32(255)
        mask[i] = render.face_oval_mask(pts, h, w) > 0
        keypoints.append(face_mesh_to_dict(pts, w, h))
    info = (f"source: MediaPipe face landmarker; {count} frames {w}x{h}; {_fill_note(filled, count)}; "
            f"most neutral frame: {neutral_frame}; "
            f"expression retargeted onto the reference: {'yes' if ref_face is not None else 'no (no reference)'}")
    return PoseResult(pose, mask, keypoints, filled, info)


def _render_people(per_frame: list, count: int, h: int, w: int, filled: List[int], head: str) -> PoseResult:
    pose = np.zeros((count, h, w, 3), np.float32)
    mask = np.zeros((count, h, w), np.float32)
    keypoints = []
    for i, people in enumerate(per_frame):
        pose[i] = render.draw_openpose(people, h, w) / np.float32(255)
        mask[i] = render.dwpose_face_mask(people, h, w) > 0
        keypoints.append(people_to_dict(people, w, h))
    people_max = max(len(p) for p in per_frame)
    info = f"{head}; {count} frames {w}x{h}; up to {people_max} people per frame; {_fill_note(filled, count)}"
    return PoseResult(pose, mask, keypoints, filled, info)


def _face_or_none(people: list, h: int, w: int):
    return people if render.largest_face_hull(people, h, w) is not None else None


def extract_dwpose(frames, dwpose, what: str = "frames", progress: Progress = None,
                   cancel: Cancel = None) -> PoseResult:
    """DWPose source: each frame resized to the 1024 canvas (Lanczos up / area down), people found
    there, drawn as the reference does. Frames without a usable face copy the nearest one's people."""
    import cv2

    count, h, w = _size(frames, what)
    report = reporter(progress)
    ch, cw = render.canvas_size(h, w)
    per_frame = []
    for i in range(count):
        check_cancel(cancel, "pose extraction")
        img = frame_at(frames, i, what)
        if (ch, cw) != (h, w):
            interp = cv2.INTER_LANCZOS4 if min(h, w) < render.CANVAS_SHORT_SIDE else cv2.INTER_AREA
            img = cv2.resize(img, (cw, ch), interpolation=interp)
        per_frame.append(_face_or_none(dwpose(img), h, w))
        report("pose", i + 1, count)
    per_frame, filled = fill_gaps(per_frame, what)
    head = "source: DWPose" + (f" ({dwpose.note})" if getattr(dwpose, "note", "") else "")
    return _render_people(per_frame, count, h, w, filled, head)


def extract_keypoints(frames, data, what: str = "keypoints", progress: Progress = None) -> PoseResult:
    """Keypoints from another node (POSE_KEYPOINT), drawn like DWPose at the frames' size."""
    count, h, w = _size(frames, "frames")
    per_frame, normalised = parse_pose_keypoints(data, count, w, h)
    per_frame, filled = fill_gaps([_face_or_none(p, h, w) for p in per_frame], what)
    reporter(progress)("pose", count, count)
    head = f"source: POSE_KEYPOINT ({'normalised' if normalised else 'pixel'} coordinates)"
    return _render_people(per_frame, count, h, w, filled, head)
