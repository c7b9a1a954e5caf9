"""The reference pipeline's pose and mask drawings (numpy + OpenCV, uint8 RGB).

MediaPipe variant: white dots of radius 2 on black at the frame's size; mask = filled convex polygon
of the 36 face-oval points. Pixel positions are truncated toward zero, as the release does.

DWPose variant (also used for keypoints from another node): a canvas whose short side is 1024
(both sides rounded to multiples of 64), OpenPose-18 limbs as filled ellipses (half-width 4) in their
colours, the canvas dimmed to 60 %, keypoint dots of radius 4, 68 white face dots of radius 3, no
hands; the canvas is then resized to the frame with Lanczos. Mask = convex hull of the largest face's
points at the frame's size, dilated with a 15x15 square.

A person here is a pair ``(body [18, 3], face [68, 3])`` of (x, y, score) with x, y normalised to
0..1 of the frame; a point is drawn when its score is above 0.3 (body) / at least 0.3 (face).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import cv2
import numpy as np

from .landmark_sets import COLORS, CORE_POINTS, FACE_OVAL, LIMBS, SCORE_THRESHOLD

CANVAS_SHORT_SIDE = 1024
STICK_WIDTH = 4
Person = Tuple[np.ndarray, np.ndarray]  # (body [18, 3], face [68, 3]); x, y normalised, score


# ----------------------------------------------------------------------------- MediaPipe drawing
def draw_face_points(points: np.ndarray, height: int, width: int, indices: Sequence[int] = CORE_POINTS,
                     radius: int = 2) -> np.ndarray:
    """points [N, 2] pixel (x, y) -> uint8 [H, W, 3]: white filled circles at points[indices]."""
    canvas = np.zeros((height, width, 3), np.uint8)
    for x, y in np.asarray(points, np.float64)[list(indices)]:
        cv2.circle(canvas, (int(x), int(y)), radius, (255, 255, 255), thickness=-1)
    return canvas


def face_oval_mask(points: np.ndarray, height: int, width: int, indices: Sequence[int] = FACE_OVAL) -> np.ndarray:
    """points [N, 2] pixel (x, y) -> uint8 [H, W] (0/255): the filled convex polygon of points[indices]."""
    mask = np.zeros((height, width), np.uint8)
    poly = np.asarray(points, np.float64)[list(indices)].astype(np.int32)
    cv2.fillConvexPoly(mask, poly, 255)
    return mask


# ----------------------------------------------------------------------------- OpenPose / DWPose drawing
def canvas_size(height: int, width: int, short_side: int = CANVAS_SHORT_SIDE) -> Tuple[int, int]:
    """(H, W) of the drawing canvas: short side ``short_side``, both rounded to multiples of 64."""
    k = float(short_side) / min(height, width)
    return int(np.round(height * k / 64.0)) * 64, int(np.round(width * k / 64.0)) * 64


def draw_openpose_canvas(people: Sequence[Person], height: int, width: int) -> np.ndarray:
    """Draw every person's body and face on a black height x width canvas -> uint8 [H, W, 3] RGB."""
    canvas = np.zeros((height, width, 3), np.uint8)
    for i, (a, b) in enumerate(LIMBS):
        for body, _ in people:
            if body is None or body[a, 2] <= SCORE_THRESHOLD or body[b, 2] <= SCORE_THRESHOLD:
                continue
            xs = np.array([body[a, 0], body[b, 0]]) * float(width)
            ys = np.array([body[a, 1], body[b, 1]]) * float(height)
            length = math.hypot(xs[0] - xs[1], ys[0] - ys[1])
            angle = math.degrees(math.atan2(ys[0] - ys[1], xs[0] - xs[1]))
            poly = cv2.ellipse2Poly((int(xs.mean()), int(ys.mean())), (int(length / 2), STICK_WIDTH),
                                    int(angle), 0, 360, 1)
            cv2.fillConvexPoly(canvas, poly, COLORS[i])
    canvas = (canvas * 0.6).astype(np.uint8)
    for i in range(len(COLORS)):
        for body, _ in people:
            if body is None or body[i, 2] <= SCORE_THRESHOLD:
                continue
            cv2.circle(canvas, (int(body[i, 0] * width), int(body[i, 1] * height)), 4, COLORS[i], thickness=-1)
    for _, face in people:
        if face is None:
            continue
        for x, y, s in face:
            if s < SCORE_THRESHOLD:
                continue
            px, py = int(x * width), int(y * height)
            if px > 0 and py > 0:
                cv2.circle(canvas, (px, py), 3, (255, 255, 255), thickness=-1)
    return canvas


def draw_openpose(people: Sequence[Person], height: int, width: int) -> np.ndarray:
    """The DWPose pose frame at the frame's size: drawn on the 1024 canvas, resized back (Lanczos)."""
    ch, cw = canvas_size(height, width)
    canvas = draw_openpose_canvas(people, ch, cw)
    if (ch, cw) == (height, width):
        return canvas
    return cv2.resize(canvas, (width, height), interpolation=cv2.INTER_LANCZOS4)


def largest_face_hull(people: Sequence[Person], height: int, width: int) -> Optional[np.ndarray]:
    """Convex hull (int32 [K, 1, 2], pixels) of the face with the largest hull area, or None when no
    person has more than 3 visible face points spanning a non-zero area."""
    best, best_area = None, 0.0
    for _, face in people:
        if face is None:
            continue
        ok = (face[:, 2] >= SCORE_THRESHOLD) & (face[:, 0] >= 0) & (face[:, 1] >= 0)
        if ok.sum() <= 3:
            continue
        pts = np.stack([(face[ok, 0] * width).astype(np.int64), (face[ok, 1] * height).astype(np.int64)], 1)
        hull = cv2.convexHull(pts.astype(np.int32).reshape(-1, 1, 2))
        area = cv2.contourArea(hull)
        if area > best_area:
            best, best_area = hull, area
    return best


def dwpose_face_mask(people: Sequence[Person], height: int, width: int, kernel: int = 15) -> np.ndarray:
    """uint8 [H, W] (0/255): the largest face's filled convex hull, dilated with a kernel x kernel square."""
    mask = np.zeros((height, width), np.uint8)
    hull = largest_face_hull(people, height, width)
    if hull is not None:
        cv2.fillPoly(mask, [hull], 255)
    return cv2.dilate(mask, np.ones((kernel, kernel), np.uint8), iterations=1)
