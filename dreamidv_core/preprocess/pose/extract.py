"""Pose video + face mask + keypoints from a clip, with the three sources, for one target person.

    track = track_mediapipe(frames, landmarker, reference=ref_image, target=TargetSpec("index", 1))
    track.pose[a:b], track.mask[a:b]                                   # drawn on demand
    result = extract_mediapipe(frames, landmarker, reference=ref_image)  # = track_mediapipe(...).result()
    result = extract_dwpose(frames, dwpose, target=TargetSpec("similar", photo_embedding=emb), embed_face=embed)
    result = extract_keypoints(frames, pose_keypoint_data)

``frames``: a frame sequence (:mod:`dreamidv_core.io.frames`): uint8 or float 0..1, [H, W, C] with 1, 3 or
4 channels (a ComfyUI IMAGE tensor or a lazy video reader; it is read one frame at a time).
Every face of every frame is found and tracked through the clip (:mod:`dreamidv_core.preprocess.tracking`);
the target person is chosen once for the clip (``target``: largest over the clip, by index left to right,
or most similar to a photo, which needs ``embed_face``, an ArcFace ``embed(image, box) -> vector``, which
also re-identifies people after an occlusion or a cut). Pose, mask and keypoints describe the target only.
A :class:`PoseTrack` (``track_*``) keeps the target's points in each frame and draws the pose and mask
frames only when they are read: ``pose`` uint8 [k, H, W, 3], ``mask`` uint8 [k, H, W] in {0, 255}, at the
clip's frame size, exactly the drawings of the whole-clip result; a clip of any length therefore costs its
keypoints, not its frames. :meth:`PoseTrack.result` (``extract_*``) draws everything into a
:class:`PoseResult`: ``pose`` float32 [F, H, W, 3] in 0..1, ``mask`` float32 [F, H, W] in {0, 1} (written
frame by frame into preallocated arrays: the memory-hungry form ComfyUI's IMAGE/MASK outputs need),
``keypoints`` (POSE_KEYPOINT list),
``filled`` (frames where the target was missed for at most ``target.bridge`` frames, filled from its
nearest detection), ``absent`` (frames without the target: empty pose and mask, no keypoints: the swap
passes them through unchanged), ``track`` (the :class:`~dreamidv_core.preprocess.tracking.TargetTrack`) and
``info``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, TypeVar

import numpy as np

from ...errors import InputError
from ...progress import Cancel, Progress, check_cancel, reporter
from ...io.frames import LazyFrames
from ...io.video import to_uint8_frames
from ..tracking import (Detection, TargetSpec, TargetTrack, frame_embedder, frame_signature, scene_cuts,
                        track_target)
from . import render
from .face_geometry import retarget
from .keypoints import face_mesh_to_dict, parse_pose_keypoints, people_to_dict
from .landmark_sets import SCORE_THRESHOLD
from .mediapipe_face import FaceFrame

T = TypeVar("T")


@dataclass
class PoseResult:
    pose: np.ndarray  # float32 [F, H, W, 3], 0..1
    mask: np.ndarray  # float32 [F, H, W], 0/1
    keypoints: list  # POSE_KEYPOINT, one dict per frame
    filled: List[int] = field(default_factory=list)
    info: str = ""
    absent: List[int] = field(default_factory=list)  # frames without the target (empty pose and mask)
    track: Optional[TargetTrack] = None

    @property
    def present(self) -> List[bool]:
        """Per frame: the target is there (detected or bridged)."""
        absent = set(self.absent)
        return [i not in absent for i in range(len(self.keypoints))]


FACE, PEOPLE = "face", "people"


@dataclass
class PoseTrack:
    """What a pose source found of the target in every frame of a clip, and how to draw it (module docstring).

    ``items``: per frame, the target's retargeted MediaPipe points [478, 2] in pixels (``kind`` "face") or its
    person (``kind`` "people"), None where the target is absent (drawn empty); ``height`` x ``width``: the
    frames' size. ``start``/``stride``/``available``: which frames of the source clip the track's frames are
    (set by whoever selected them; 0, 1 and the track's length for a whole clip).
    """

    kind: str
    items: list
    height: int
    width: int
    filled: List[int] = field(default_factory=list)
    info: str = ""
    absent: List[int] = field(default_factory=list)
    target: Optional[TargetTrack] = None
    start: int = 0
    stride: int = 1
    available: int = 0

    def __len__(self) -> int:
        return len(self.items)

    def pose_frame(self, i: int) -> np.ndarray:
        """uint8 [H, W, 3]: the pose drawing of frame ``i`` (black where the target is absent)."""
        item = self.items[i]
        if item is None:
            return np.zeros((self.height, self.width, 3), np.uint8)
        if self.kind == FACE:
            return render.draw_face_points(item, self.height, self.width)
        return render.draw_openpose([item], self.height, self.width)

    def mask_frame(self, i: int) -> np.ndarray:
        """uint8 [H, W] in {0, 255}: the target's face mask in frame ``i`` (empty where it is absent)."""
        item = self.items[i]
        if item is None:
            return np.zeros((self.height, self.width), np.uint8)
        if self.kind == FACE:
            drawn = render.face_oval_mask(item, self.height, self.width)
        else:
            drawn = render.dwpose_face_mask([item], self.height, self.width)
        return np.where(drawn > 0, np.uint8(255), np.uint8(0))

    @property
    def pose(self) -> LazyFrames:
        """The pose video, drawn when sliced: uint8 [k, H, W, 3]."""
        return LazyFrames(len(self), lambda idx: np.stack([self.pose_frame(i) for i in idx]), "pose")

    @property
    def mask(self) -> LazyFrames:
        """The face mask video, drawn when sliced: uint8 [k, H, W] in {0, 255}."""
        return LazyFrames(len(self), lambda idx: np.stack([self.mask_frame(i) for i in idx]), "mask")

    @property
    def present(self) -> List[bool]:
        """Per frame: the target is there (detected or bridged)."""
        return [item is not None for item in self.items]

    def keypoints(self) -> list:
        """POSE_KEYPOINT: one dict per frame, pixel coordinates (no people where the target is absent)."""
        out = []
        for item in self.items:
            if item is None:
                out.append(_empty_keypoints(self.width, self.height))
            elif self.kind == FACE:
                out.append(face_mesh_to_dict(item, self.width, self.height))
            else:
                out.append(people_to_dict([item], self.width, self.height))
        return out

    def result(self, pose: bool = True, mask: bool = True, keypoints: bool = True) -> PoseResult:
        """Every frame drawn: the whole-clip arrays (those not asked for are left empty)."""
        count, h, w = len(self), self.height, self.width
        pose_arr = np.zeros((count if pose else 0, h, w, 3), np.float32)
        mask_arr = np.zeros((count if mask else 0, h, w), np.float32)
        for i in range(count):
            if self.items[i] is None:
                continue
            if pose:
                pose_arr[i] = self.pose_frame(i) / np.float32(255)
            if mask:
                mask_arr[i] = self.mask_frame(i) > 0
        return PoseResult(pose_arr, mask_arr, self.keypoints() if keypoints else [], list(self.filled), self.info,
                          list(self.absent), self.target)


EmbedFace = Callable[[np.ndarray, np.ndarray], Optional[np.ndarray]]  # (image uint8 [H, W, 3], box [4]) -> vector


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


def _empty_keypoints(width: int, height: int) -> dict:
    return {"people": [], "canvas_width": int(width), "canvas_height": int(height)}


def _track_target(detections: List[list], signatures: list, frames, target: Optional[TargetSpec],
                  embed_face: Optional[EmbedFace], what: str) -> TargetTrack:
    """Everyone tracked, the target chosen, with shot cuts from the frames' thumbnails."""
    embed = frame_embedder(frames, embed_face, lambda fr, i: frame_at(fr, i, what)) if embed_face else None
    return track_target(detections, target or TargetSpec(), embed, what=what, cuts=scene_cuts(signatures))


SEARCH_EVERY = 12  # frames between full tile searches for new small faces (tracked ones are looked at every frame)


def mediapipe_faces(landmarker, image: np.ndarray, frame: int = 0, previous: Sequence[Detection] = ()) -> list:
    """Every face MediaPipe finds in ``image`` (``detect_all`` when the landmarker has it): the faces of the
    previous frame are looked for around where they were; the tiles for new small faces are searched on
    the first frame, every ``SEARCH_EVERY`` frames and whenever the previous frame had no face."""
    if not hasattr(landmarker, "detect_all"):
        face = landmarker(image)
        return [] if face is None else [face]
    if not getattr(landmarker, "tile_levels", 0):
        return list(landmarker.detect_all(image))
    search = frame % SEARCH_EVERY == 0 or not previous
    return list(landmarker.detect_all(image, hints=[d.box for d in previous], search=search))


def face_detection(face, width: int, height: int) -> Optional[Detection]:
    """A MediaPipe face (normalised landmarks [478, 3]) as a tracking detection in pixels."""
    pts = np.asarray(face.landmarks, np.float64)[:, :2] * (width, height)
    return Detection.from_points(pts, payload=face)


def person_detection(person, width: int, height: int) -> Optional[Detection]:
    """A DWPose / POSE_KEYPOINT person (body, face normalised) as a tracking detection of its face points
    (None when fewer than 4 face points are visible, as the mask would have none)."""
    face = person[1]
    if face is None:
        return None
    ok = (face[:, 2] >= SCORE_THRESHOLD) & (face[:, 0] >= 0) & (face[:, 1] >= 0)
    pts = np.where(ok[:, None], face[:, :2] * (width, height), np.nan)
    return Detection.from_points(pts, payload=person)


def track_mediapipe(frames, landmarker, reference=None, what: str = "frames",
                    progress: Progress = None, cancel: Cancel = None, target: Optional[TargetSpec] = None,
                    embed_face: Optional[EmbedFace] = None) -> PoseTrack:
    """MediaPipe source with the reference pipeline's expression retargeting onto ``reference`` (an
    image, uint8 or float [H, W, C] / [1, H, W, C], or the reference face already found: a
    :class:`~.mediapipe_face.FaceFrame`); without it the driving face itself is drawn. The target's most
    neutral frame (fewest blendshapes) is the expression origin."""
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
    detections, signatures = [], []
    for i in range(count):
        check_cancel(cancel, "pose extraction")
        img = frame_at(frames, i, what)
        signatures.append(frame_signature(img))
        previous = detections[-1] if detections else []
        detections.append([d for f in mediapipe_faces(landmarker, img, i, previous) if (d := face_detection(f, w, h))])
        report("pose", i + 1, count)
    track = _track_target(detections, signatures, frames, target, embed_face, what)
    filled = set(track.filled)
    seen = [i for i, d in enumerate(track.detections) if d is not None and i not in filled]
    neutral_frame = min(seen, key=lambda i: track.detections[i].payload.expression)  # first minimum, as argmin
    neutral = track.detections[neutral_frame].payload.mesh
    ref_mesh = ref_face.mesh if ref_face is not None else neutral
    points = [None if det is None else retarget(det.payload.mesh, neutral, ref_mesh, det.payload.pose,
                                                det.payload.landmarks, w, h) for det in track.detections]
    info = (f"source: MediaPipe face landmarker; {count} frames {w}x{h}; most neutral frame of the target: "
            f"{neutral_frame}; expression retargeted onto the reference: "
            f"{'yes' if ref_face is not None else 'no (no reference)'}; {track.describe()}")
    return PoseTrack(FACE, points, h, w, list(track.filled), info, list(track.absent), track)


def extract_mediapipe(frames, landmarker, reference=None, what: str = "frames",
                      progress: Progress = None, cancel: Cancel = None, target: Optional[TargetSpec] = None,
                      embed_face: Optional[EmbedFace] = None) -> PoseResult:
    """:func:`track_mediapipe`, every frame drawn."""
    return track_mediapipe(frames, landmarker, reference, what, progress, cancel, target, embed_face).result()


def _people_track(track: TargetTrack, h: int, w: int, head: str) -> PoseTrack:
    """The target person per frame (others are not drawn; absent frames stay empty)."""
    people = [None if det is None else det.payload for det in track.detections]
    info = f"{head}; {len(people)} frames {w}x{h}; {track.describe()}"
    return PoseTrack(PEOPLE, people, h, w, list(track.filled), info, list(track.absent), track)


def track_dwpose(frames, dwpose, what: str = "frames", progress: Progress = None,
                 cancel: Cancel = None, target: Optional[TargetSpec] = None,
                 embed_face: Optional[EmbedFace] = None) -> PoseTrack:
    """DWPose source: each frame resized to the 1024 canvas (Lanczos up / area down), people found
    there, the target drawn as the reference does."""
    import cv2

    count, h, w = _size(frames, what)
    report = reporter(progress)
    ch, cw = render.canvas_size(h, w)
    detections, signatures = [], []
    for i in range(count):
        check_cancel(cancel, "pose extraction")
        img = frame_at(frames, i, what)
        signatures.append(frame_signature(img))
        if (ch, cw) != (h, w):
            interp = cv2.INTER_LANCZOS4 if min(h, w) < render.CANVAS_SHORT_SIDE else cv2.INTER_AREA
            img = cv2.resize(img, (cw, ch), interpolation=interp)
        detections.append([d for p in dwpose(img) if (d := person_detection(p, w, h))])
        report("pose", i + 1, count)
    track = _track_target(detections, signatures, frames, target, embed_face, what)
    head = "source: DWPose" + (f" ({dwpose.note})" if getattr(dwpose, "note", "") else "")
    return _people_track(track, h, w, head)


def extract_dwpose(frames, dwpose, what: str = "frames", progress: Progress = None,
                   cancel: Cancel = None, target: Optional[TargetSpec] = None,
                   embed_face: Optional[EmbedFace] = None) -> PoseResult:
    """:func:`track_dwpose`, every frame drawn."""
    return track_dwpose(frames, dwpose, what, progress, cancel, target, embed_face).result()


def track_keypoints(frames, data, what: str = "keypoints", progress: Progress = None,
                    target: Optional[TargetSpec] = None, embed_face: Optional[EmbedFace] = None) -> PoseTrack:
    """Keypoints from another node (POSE_KEYPOINT), the target drawn like DWPose at the frames' size."""
    count, h, w = _size(frames, "frames")
    per_frame, normalised = parse_pose_keypoints(data, count, w, h)
    detections = [[d for p in people if (d := person_detection(p, w, h))] for people in per_frame]
    signatures = [frame_signature(frame_at(frames, i, "frames")) for i in range(count)]
    track = _track_target(detections, signatures, frames, target, embed_face, what)
    reporter(progress)("pose", count, count)
    head = f"source: POSE_KEYPOINT ({'normalised' if normalised else 'pixel'} coordinates)"
    return _people_track(track, h, w, head)


def extract_keypoints(frames, data, what: str = "keypoints", progress: Progress = None,
                      target: Optional[TargetSpec] = None, embed_face: Optional[EmbedFace] = None) -> PoseResult:
    """:func:`track_keypoints`, every frame drawn."""
    return track_keypoints(frames, data, what, progress, target, embed_face).result()
