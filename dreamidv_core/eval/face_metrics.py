"""Per-frame numbers of the video face-swap evaluation (:mod:`dreamidv_core.eval.benchmark`), pure numpy/OpenCV.

Faces are seen through an **observer**: any callable ``frame uint8 [H, W, 3] -> FaceObservation or None``
(:func:`mediapipe_observer` wraps the MediaPipe face landmarker; tests use deterministic fakes). A
:class:`FaceObservation` holds landmarks (pixels), optionally the head rotation and an expression vector.

* **Head-pose error** (degrees): the geodesic angle of ``R_swapped R_driving^T`` (the rotation that takes
  one head orientation to the other), and the absolute yaw / pitch / roll differences
  (:func:`yaw_pitch_roll`). With MediaPipe the rotation is that of its facial transformation matrix.
* **Expression error**: the mean absolute difference of the two expression vectors (MediaPipe: the 51
  blendshape scores in [0, 1], ``_neutral`` excluded).
* **Landmark error**: :func:`dreamidv_core.eval.identity_report.landmark_error` (translation and scale
  removed, rotation kept; 0 = same pose and expression).
* **Face motion** (Magic Mirror, Zhang et al. 2025, arXiv:2501.03931: FM_ref and FM_inter). The paper
  measures the facial motion of a generated video as the relative distance of facial landmarks to the
  reference image (FM_ref) and between frames (FM_inter), to catch "copy-paste" results that keep the
  identity by freezing the face. Here both use the same normalised landmark distance as the landmark
  error (:func:`motion_distance`): FM_ref = mean over frames of the distance to the reference photo's
  landmarks, FM_inter = mean over consecutive frame pairs. The paper's exact landmark detector and
  normalisation are not given in what we could read: this normalisation is our interpretation.
* **Background**: PSNR and SSIM of the swapped frame against the driving frame over the pixels outside
  the (dilated) face mask; PSNR of identical pixels is reported as :data:`PSNR_CAP` dB. SSIM is the
  standard one (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03) on the luma,
  averaged over the background pixels.
* **Flicker**: mean absolute difference between consecutive frames (0..1 scale); the evaluation reports
  the swapped video's, the driving video's and their difference (the temporal change the swap adds).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from ..errors import InputError
from .identity_report import landmark_error

PSNR_CAP = 100.0  # dB reported for identical pixels (MSE 0)


@dataclass
class FaceObservation:
    """landmarks: [K, 2] (x, y) pixels; rotation: [3, 3] head rotation (camera frame) or None;
    expression: [E] expression coefficients (e.g. blendshape scores) or None."""

    landmarks: np.ndarray
    rotation: Optional[np.ndarray] = None
    expression: Optional[np.ndarray] = None


Observer = Callable[[np.ndarray], Optional[FaceObservation]]


# --------------------------------------------------------------------------------------------- pose
def orthonormal(matrix) -> np.ndarray:
    """The rotation nearest to the upper-left 3x3 of ``matrix`` (SVD; removes scale and shear)."""
    m = np.asarray(matrix, np.float64)[:3, :3]
    u, _, vt = np.linalg.svd(m)
    r = u @ vt
    if np.linalg.det(r) < 0:
        u[:, -1] *= -1
        r = u @ vt
    return r


def rotation_angle_deg(a, b) -> float:
    """Geodesic angle (degrees, 0..180) between two rotations [3, 3]."""
    rel = orthonormal(a) @ orthonormal(b).T
    cos = (np.trace(rel) - 1.0) / 2.0
    return math.degrees(math.acos(min(1.0, max(-1.0, cos))))


def yaw_pitch_roll(rotation) -> np.ndarray:
    """[yaw, pitch, roll] in degrees of a rotation R = Rz(roll) Ry(yaw) Rx(pitch) (x right, y down, z into
    the scene, as OpenCV / MediaPipe camera frames)."""
    r = orthonormal(rotation)
    yaw = math.degrees(math.asin(max(-1.0, min(1.0, -r[2, 0]))))
    pitch = math.degrees(math.atan2(r[2, 1], r[2, 2]))
    roll = math.degrees(math.atan2(r[1, 0], r[0, 0]))
    return np.array([yaw, pitch, roll])


def angle_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a - b| of angles in degrees, wrapped to 0..180."""
    d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)) % 360.0
    return np.minimum(d, 360.0 - d)


def expression_error(a, b) -> float:
    """Mean absolute difference of two expression vectors (NaN if their sizes differ or one is empty)."""
    a, b = np.asarray(a, np.float64).reshape(-1), np.asarray(b, np.float64).reshape(-1)
    if a.size == 0 or a.shape != b.shape:
        return float("nan")
    return float(np.abs(a - b).mean())


def motion_distance(a: Optional[FaceObservation], b: Optional[FaceObservation]) -> float:
    """Normalised landmark distance between two observations (NaN when either is missing or the landmark
    sets differ in size): the unit of FM_ref and FM_inter."""
    if a is None or b is None or np.shape(a.landmarks) != np.shape(b.landmarks):
        return float("nan")
    return landmark_error(a.landmarks, b.landmarks)


def pose_errors(swapped: Optional[FaceObservation], driving: Optional[FaceObservation]) -> dict:
    """{"pose": geodesic degrees, "yaw", "pitch", "roll": absolute differences, "expression", "landmarks"}
    for one frame (NaN where the observations lack the part)."""
    out = dict.fromkeys(("pose", "yaw", "pitch", "roll", "expression", "landmarks"), float("nan"))
    if swapped is None or driving is None:
        return out
    if swapped.rotation is not None and driving.rotation is not None:
        out["pose"] = rotation_angle_deg(swapped.rotation, driving.rotation)
        out["yaw"], out["pitch"], out["roll"] = (float(v) for v in angle_difference(
            yaw_pitch_roll(swapped.rotation), yaw_pitch_roll(driving.rotation)))
    if swapped.expression is not None and driving.expression is not None:
        out["expression"] = expression_error(swapped.expression, driving.expression)
    out["landmarks"] = motion_distance(swapped, driving)
    return out


def mediapipe_observer(landmarker) -> Observer:
    """An observer on :class:`dreamidv_core.preprocess.pose.mediapipe_face.FaceLandmarker`: landmarks =
    the 478 image landmarks in pixels, rotation = the facial transformation matrix's (else the pose of the
    metric face mesh), expression = the 51 blendshape scores."""

    def observe(frame: np.ndarray) -> Optional[FaceObservation]:
        face = landmarker(np.ascontiguousarray(frame))
        if face is None:
            return None
        pts = np.asarray(face.landmarks, np.float64)[:, :2] * np.array([face.width, face.height], np.float64)
        matrix = face.matrix if getattr(face, "matrix", None) is not None else face.pose
        shapes = getattr(face, "blendshapes", None)
        return FaceObservation(pts, orthonormal(matrix), None if shapes is None else np.asarray(shapes, np.float64))

    return observe


# ------------------------------------------------------------------------------------ pixels
def _float(frame) -> np.ndarray:
    return np.asarray(frame, np.float64)


def masked_psnr(a, b, keep: np.ndarray) -> float:
    """PSNR (dB, 8-bit peak 255) of two frames [H, W, 3] (0..255) over the pixels where ``keep`` [H, W] is
    True; NaN when no pixel is kept, :data:`PSNR_CAP` when they are identical there."""
    keep = np.asarray(keep, bool)
    if not keep.any():
        return float("nan")
    mse = float(((_float(a) - _float(b)) ** 2)[keep].mean())
    return PSNR_CAP if mse <= 0 else min(PSNR_CAP, 10.0 * math.log10(255.0 ** 2 / mse))


def luma(frame) -> np.ndarray:
    """[H, W, 3] RGB 0..255 -> [H, W] float64 luma (BT.601)."""
    f = _float(frame)
    return f[..., 0] * 0.299 + f[..., 1] * 0.587 + f[..., 2] * 0.114


def ssim_map(a, b) -> np.ndarray:
    """Per-pixel SSIM [H, W] of two RGB frames (0..255) on their luma (Wang et al. 2004 constants)."""
    import cv2

    x, y = luma(a), luma(b)
    blur = lambda im: cv2.GaussianBlur(im, (11, 11), 1.5, borderType=cv2.BORDER_REFLECT)  # noqa: E731
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))


def masked_ssim(a, b, keep: np.ndarray) -> float:
    """Mean SSIM over the pixels where ``keep`` [H, W] is True (NaN when none is)."""
    keep = np.asarray(keep, bool)
    if not keep.any():
        return float("nan")
    return float(ssim_map(a, b)[keep].mean())


def frame_change(a, b, keep: Optional[np.ndarray] = None) -> float:
    """Mean absolute difference (0..1) between two frames [H, W, 3] (0..255), over ``keep`` when given."""
    d = np.abs(_float(a) - _float(b)).mean(axis=-1) / 255.0
    if keep is None:
        return float(d.mean())
    keep = np.asarray(keep, bool)
    return float(d[keep].mean()) if keep.any() else float("nan")


def dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    """bool [H, W] grown by ``pixels`` (elliptical structuring element)."""
    import cv2

    mask = np.asarray(mask, bool)
    if pixels <= 0:
        return mask
    k = 2 * int(pixels) + 1
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    return cv2.dilate(mask.astype(np.uint8), kernel) > 0


def hull_mask(landmarks: np.ndarray, height: int, width: int) -> np.ndarray:
    """bool [H, W]: the convex hull of landmark points [K, 2] (pixels)."""
    import cv2

    pts = np.asarray(landmarks, np.float64).reshape(-1, 2)
    out = np.zeros((height, width), np.uint8)
    if len(pts) >= 3 and np.isfinite(pts).all():
        hull = cv2.convexHull(np.round(pts).astype(np.int32))
        cv2.fillConvexPoly(out, hull, 1)
    return out > 0


def face_margin(mask: np.ndarray, share: float = 0.1) -> int:
    """Dilation (pixels) for a face mask: ``share`` of the mask's bounding-box size, at least 2."""
    ys, xs = np.nonzero(np.asarray(mask, bool))
    if not len(xs):
        return 0
    return max(2, int(round(share * max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1))))


# ------------------------------------------------------------------------------------ series
def finite_mean(values) -> Optional[float]:
    v = np.asarray(values, np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else None


def finite_max(values) -> Optional[float]:
    v = np.asarray(values, np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    return float(v.max()) if v.size else None


def decay(similarities) -> Optional[float]:
    """Mean similarity of the first quarter of the frames minus that of the last quarter (positive: the
    identity fades over the clip); None with fewer than 4 frames with a face in those quarters."""
    s = np.asarray(similarities, np.float64).reshape(-1)
    q = max(1, s.size // 4)
    head, tail = finite_mean(s[:q]), finite_mean(s[-q:])
    if s.size < 4 or head is None or tail is None:
        return None
    return head - tail


def slope_per_100(values) -> Optional[float]:
    """Least-squares slope of a per-frame series, per 100 frames (None with fewer than 3 finite values)."""
    v = np.asarray(values, np.float64).reshape(-1)
    idx = np.flatnonzero(np.isfinite(v))
    if idx.size < 3:
        return None
    x = idx.astype(np.float64)
    return float(np.polyfit(x, v[idx], 1)[0] * 100.0)


def check_frame(frame, what: str) -> np.ndarray:
    arr = np.asarray(frame)
    if arr.ndim != 3 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise InputError(f"{what}: expected a uint8 RGB frame [H, W, 3], got {arr.dtype} {list(arr.shape)}")
    return arr
