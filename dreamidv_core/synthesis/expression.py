"""Expression adaptation: I_g's face shape driven by the real clip's expression and head pose.

This is exactly the MediaPipe source of the pose extraction (:func:`dreamidv_core.preprocess.pose.extract_mediapipe`)
with the generated identity image I_g as its reference: every frame's landmarks are retargeted (the
frame's expression relative to the clip's most neutral frame, moved onto I_g's neutral mesh, then
placed with the frame's head pose). This module only names the stage and its errors.
"""
from __future__ import annotations

from ..errors import InputError
from ..preprocess.pose import extract_mediapipe
from ..preprocess.pose.extract import PoseResult, frame_at


def _reference(identity) -> object:
    shape = tuple(getattr(identity, "shape", ()))
    if len(shape) == 4:
        if shape[0] < 1:
            raise InputError("identity image I_g: the image batch is empty")
        return identity[:1]
    if len(shape) == 3:
        return identity
    raise InputError(f"identity image I_g: expected an image [H, W, C] or [1, H, W, C], got shape {list(shape)}")


def adapt_expression(frames, landmarker, identity, progress=None, cancel=None) -> PoseResult:
    """frames: the real clip [F, H, W, C]; identity: I_g [H, W, C] / [1, H, W, C]; landmarker: a
    :class:`dreamidv_core.preprocess.pose.mediapipe_face.FaceLandmarker` (or any callable RGB uint8 -> face or None).
    -> PoseResult (pose [F, H, W, 3] 0..1 at the clip's size, mask [F, H, W], keypoints, filled, info).
    InputError when I_g shows no face (checked before the clip is read) or the clip shows none."""
    ref = _reference(identity)
    if landmarker(frame_at(ref if len(ref.shape) == 4 else ref[None], 0, "identity image I_g")) is None:
        raise InputError("identity image I_g: no face found by the MediaPipe face landmarker; expression "
                         "adaptation moves the clip's expressions onto I_g's face, so I_g must show one clearly "
                         "visible face (frontal, not too small)")
    result = extract_mediapipe(frames, landmarker, reference=ref, what="real clip", progress=progress, cancel=cancel)
    result.info = "expression adaptation onto I_g; " + result.info
    return result
