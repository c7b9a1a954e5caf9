"""Pose video + face mask + keypoints from a clip, with the three sources.

    track = track_mediapipe(frames, landmarker, reference=ref_image)   # or track_dwpose, track_keypoints
    track.pose[a:b], track.mask[a:b]                                   # drawn on demand
    result = extract_mediapipe(frames, landmarker, reference=ref_image)  # = track_...(...).result()

``frames``: a frame sequence (:mod:`dreamidv_core.io.frames`): uint8 or float 0..1, [H, W, C] with 1, 3 or
4 channels (a ComfyUI IMAGE tensor or a lazy video reader; it is read one frame at a time).

A :class:`PoseTrack` keeps what was found in each frame (retargeted face points, or people) and draws the
pose and mask frames only when they are read: ``pose`` uint8 [k, H, W, 3], ``mask`` uint8 [k, H, W] in
{0, 255}, at the clip's frame size, exactly the drawings of the whole-clip result. A clip of any length
therefore costs its keypoints, not its frames. :meth:`PoseTrack.result` draws everything into a
:class:`PoseResult`: ``pose`` float32 [F, H, W, 3] in 0..1, ``mask`` float32 [F, H, W] in {0, 1}
(preallocated arrays, the memory-hungry form ComfyUI's IMAGE/MASK outputs need), ``keypoints``
(POSE_KEYPOINT list), ``filled`` (indices of frames with no face, filled from the nearest frame with one)
and ``info``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, TypeVar

import numpy as np

from ...errors import InputError
from ...progress import Cancel, Progress, check_cancel, reporter
from ...io.frames import LazyFrames
from ...io.video import to_uint8_frames
from . import render
from .face_geometry import retarget
from .keypoints import face_mesh_to_dict, parse_pose_keypoints, people_to_dict

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


FACE, PEOPLE = "face", "people"


@dataclass
class PoseTrack:
    """What a pose source found in every frame of a clip, and how to draw it (module docstring).

    ``items``: per frame, the retargeted MediaPipe points [478, 2] in pixels (``kind`` "face") or the people
    (``kind`` "people"); ``height`` x ``width``: the frames' size. ``start``/``stride``: which frames of the
    source clip the track's frames are (set by whoever selected them; 0 and 1 for a whole clip).
    """

    kind: str
    items: list
    height: int
    width: int
    filled: List[int] = field(default_factory=list)
    info: str = ""
    start: int = 0
    stride: int = 1
    available: int = 0

    def __len__(self) -> int:
        return len(self.items)

    def pose_frame(self, i: int) -> np.ndarray:
        """uint8 [H, W, 3]: the pose drawing of frame ``i``."""
        if self.kind == FACE:
            return render.draw_face_points(self.items[i], self.height, self.width)
        return render.draw_openpose(self.items[i], self.height, self.width)

    def mask_frame(self, i: int) -> np.ndarray:
        """uint8 [H, W] in {0, 255}: the face mask of frame ``i``."""
        if self.kind == FACE:
            drawn = render.face_oval_mask(self.items[i], self.height, self.width)
        else:
            drawn = render.dwpose_face_mask(self.items[i], self.height, self.width)
        return np.where(drawn > 0, np.uint8(255), np.uint8(0))

    @property
    def pose(self) -> LazyFrames:
        """The pose video, drawn when sliced: uint8 [k, H, W, 3]."""
        return LazyFrames(len(self), lambda idx: np.stack([self.pose_frame(i) for i in idx]), "pose")

    @property
    def mask(self) -> LazyFrames:
        """The face mask video, drawn when sliced: uint8 [k, H, W] in {0, 255}."""
        return LazyFrames(len(self), lambda idx: np.stack([self.mask_frame(i) for i in idx]), "mask")

    def keypoints(self) -> list:
        """POSE_KEYPOINT: one dict per frame, pixel coordinates."""
        if self.kind == FACE:
            return [face_mesh_to_dict(pts, self.width, self.height) for pts in self.items]
        return [people_to_dict(people, self.width, self.height) for people in self.items]

    def result(self, pose: bool = True, mask: bool = True, keypoints: bool = True) -> PoseResult:
        """Every frame drawn: the whole-clip arrays (those not asked for are left empty)."""
        count, h, w = len(self), self.height, self.width
        pose_arr = np.zeros((count if pose else 0, h, w, 3), np.float32)
        mask_arr = np.zeros((count if mask else 0, h, w), np.float32)
        for i in range(count):
            if pose:
                pose_arr[i] = self.pose_frame(i) / np.float32(255)
            if mask:
                mask_arr[i] = self.mask_frame(i) > 0
        return PoseResult(pose_arr, mask_arr, self.keypoints() if keypoints else [], list(self.filled), self.info)


def track_mediapipe(frames, landmarker, reference=None, what: str = "frames",
                    progress: Progress = None, cancel: Cancel = None) -> PoseTrack:
    """MediaPipe source with the reference pipeline's expression retargeting onto ``reference`` (an
    image, uint8 or float [H, W, C] / [1, H, W, C]); without it the driving face itself is drawn."""
    count, h, w = _size(frames, what)
    report = reporter(progress)
    ref_face = None
    if reference is not None:
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
    points = [retarget(face.mesh, neutral, target, face.pose, face.landmarks, w, h) for face in faces]
    info = (f"source: MediaPipe face landmarker; {count} frames {w}x{h}; {_fill_note(filled, count)}; "
            f"most neutral frame: {neutral_frame}; "
            f"expression retargeted onto the reference: {'yes' if ref_face is not None else 'no (no reference)'}")
    return PoseTrack(FACE, points, h, w, filled, info)


def extract_mediapipe(frames, landmarker, reference=None, what: str = "frames",
                      progress: Progress = None, cancel: Cancel = None) -> PoseResult:
    """:func:`track_mediapipe`, every frame drawn."""
    return track_mediapipe(frames, landmarker, reference, what, progress, cancel).result()


def _people_track(per_frame: list, h: int, w: int, filled: List[int], head: str) -> PoseTrack:
    count = len(per_frame)
    people_max = max(len(p) for p in per_frame)
    info = f"{head}; {count} frames {w}x{h}; up to {people_max} people per frame; {_fill_note(filled, count)}"
    return PoseTrack(PEOPLE, per_frame, h, w, filled, info)


def _face_or_none(people: list, h: int, w: int):
    return people if render.largest_face_hull(people, h, w) is not None else None


def track_dwpose(frames, dwpose, what: str = "frames", progress: Progress = None,
                 cancel: Cancel = None) -> PoseTrack:
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
    return _people_track(per_frame, h, w, filled, head)


def extract_dwpose(frames, dwpose, what: str = "frames", progress: Progress = None,
                   cancel: Cancel = None) -> PoseResult:
    """:func:`track_dwpose`, every frame drawn."""
    return track_dwpose(frames, dwpose, what, progress, cancel).result()


def track_keypoints(frames, data, what: str = "keypoints", progress: Progress = None) -> PoseTrack:
    """Keypoints from another node (POSE_KEYPOINT), drawn like DWPose at the frames' size."""
    count, h, w = _size(frames, "frames")
    per_frame, normalised = parse_pose_keypoints(data, count, w, h)
    per_frame, filled = fill_gaps([_face_or_none(p, h, w) for p in per_frame], what)
    reporter(progress)("pose", count, count)
    head = f"source: POSE_KEYPOINT ({'normalised' if normalised else 'pixel'} coordinates)"
    return _people_track(per_frame, h, w, filled, head)


def extract_keypoints(frames, data, what: str = "keypoints", progress: Progress = None) -> PoseResult:
    """:func:`track_keypoints`, every frame drawn."""
    return track_keypoints(frames, data, what, progress).result()
