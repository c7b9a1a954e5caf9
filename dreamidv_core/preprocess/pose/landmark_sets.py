"""Index sets and colours the reference drawing uses (data, as published by the DreamID-V release).

MediaPipe face mesh (478 landmarks, 468..477 irises):
- ``FACE_OVAL``: the 36 face-oval landmarks, in drawing order (the mask is their filled convex polygon).
- ``CORE_POINTS``: every landmark drawn as a dot on the pose video: lips, nose, eyes, the two iris
  centres, brows, plus the face oval (sorted, duplicates removed: drawing order does not matter).

OpenPose-18 (DWPose body, after the COCO -> OpenPose reorder with the neck at 1):
- ``LIMBS``: pairs of 0-based keypoint indices, the 17 limbs that are drawn, each in ``COLORS[i]``.
- ``COLORS``: 18 RGB colours (limb i and keypoint i).
"""
from __future__ import annotations

FACE_OVAL = (
    10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288,
    397, 365, 379, 378, 400, 377, 152, 148, 176, 149, 150, 136,
    172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109,
)

_LIPS = (
    78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308, 95, 88, 178, 87, 14, 317, 402, 318, 324,
    61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291, 146, 91, 181, 84, 17, 314, 405, 321, 375,
)
_NOSE = (1, 2, 5, 6, 48, 64, 94, 98, 168, 195, 197, 278, 294, 324, 327, 4, 24)
_EYES = (
    33, 7, 163, 144, 145, 153, 154, 155, 133, 173, 157, 158, 159, 160, 161, 246,
    263, 249, 390, 373, 374, 380, 381, 382, 362, 398, 384, 385, 386, 387, 388, 466,
)
_IRIS_CENTRES = (468, 473)
_BROWS = (
    55, 65, 52, 53, 46, 285, 295, 282, 283, 276, 70, 63, 105, 66, 107,
    300, 293, 334, 296, 336, 156,
)
CORE_POINTS = tuple(sorted(set(_LIPS + _NOSE + _EYES + _IRIS_CENTRES + _BROWS + FACE_OVAL)))

# Iris placement: each iris (centre + 4 points) and the eye contour whose bounding box holds it.
RIGHT_IRIS = (468, 469, 470, 471, 472)
LEFT_IRIS = (473, 474, 475, 476, 477)
RIGHT_EYE_CONTOUR = (33, 7, 163, 144, 145, 153, 154, 155, 246, 161, 160, 159, 158, 157, 173, 133)
LEFT_EYE_CONTOUR = (249, 390, 373, 374, 380, 381, 382, 362, 466, 388, 387, 386, 385, 384, 398, 263)

# OpenPose-18 limbs (0-based), drawn in this order with COLORS[i]; the release draws the first 17
# of its 19-entry list (the two ear-shoulder links are never drawn).
LIMBS = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10),
    (1, 11), (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
)
COLORS = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)

# DWPose 133-keypoint COCO-WholeBody layout -> OpenPose 18 body (neck = mean of the shoulders).
COCO_TO_OPENPOSE = (0, None, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3)
WHOLEBODY_FACE = slice(23, 91)  # the 68 face points among the 133 (0-based, before the neck insert)
BODY_POINTS = 18
FACE_POINTS = 68
SCORE_THRESHOLD = 0.3
