"""MediaPipe face landmarker (``mediapipe.tasks``), with blendshapes and the metric face mesh the reference
pipeline retargets (see :mod:`.face_geometry`): one face per image (``landmarker(image)``), or every face
up to ``num_faces`` (``landmarker.detect_all(image)``, for tracking several people).

MediaPipe's face detector sees the whole image at 128x128, so a face much smaller than the image's long side
(a person in a wide shot, a 4K frame) is not found. ``tile_levels`` > 0 also runs it on overlapping square
tiles (level 1: the image's short side, each further level half the previous side; half a tile of overlap,
so a face up to half a tile lies wholly inside one): a face down to about a sixth of the tile is found,
i.e. ~1/6, 1/12, 1/24 of the short side at levels 1, 2, 3. Each view's landmarks are mapped back to the
image, faces touching a view's inner edge are dropped (a cut face) and faces already found are not added
twice. ``hints`` (boxes where faces were, e.g. in the previous frame) are looked at in a square window
around each (4x the face): a tracked small face costs one small view per frame, and the full tile search
can run every few frames only (``search=False`` skips it).

``mediapipe`` is imported lazily: the rest of the pose package works without it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from ... import optional
from ...errors import CheckpointError
from .face_geometry import load_metadata, metric_mesh


@dataclass
class FaceFrame:
    """One detected face: landmarks [478, 3] normalised (x, y, z), mesh [468, 3] metric in the face
    frame, pose [4, 4] face frame -> camera, expression = sum of the 51 blendshapes (neutral excluded),
    width/height of the image it came from; blendshapes [51] (the scores without ``_neutral``, in the
    model's order, names in ``FaceLandmarker.blendshape_names``) and matrix [4, 4] (MediaPipe's facial
    transformation matrix, canonical face -> camera) when the landmarker gave them (faces found in the whole
    image; not those found in a tile, whose matrix would be the tile's camera)."""
    landmarks: np.ndarray
    mesh: np.ndarray
    pose: np.ndarray
    expression: float
    width: int
    height: int
    blendshapes: Optional[np.ndarray] = None
    matrix: Optional[np.ndarray] = None


class FaceLandmarker:
    """Callable: uint8 RGB [H, W, 3] -> FaceFrame or None (no face; with ``num_faces`` > 1 the largest
    face). ``detect_all(image)`` -> every face found (at most ``num_faces``). Use as a context manager or
    call ``close()``."""

    def __init__(self, task_path: str, num_faces: int = 1, tile_levels: int = 0):
        optional.require("mediapipe", "MediaPipe face landmarker (pose source 'mediapipe')",
                         "mediapipe.tasks.python.vision")
        self.num_faces, self.tile_levels = max(1, int(num_faces)), max(0, int(tile_levels))
        if not os.path.isfile(task_path):
            raise CheckpointError(task_path, "file not found")
        self.meta = load_metadata(task_path)
        self.blendshape_names: list = []  # filled by the first detection (the model's blendshape order)
        import mediapipe as mp
        from mediapipe.tasks.python import BaseOptions, vision

        self._mp = mp
        options = vision.FaceLandmarkerOptions(
            base_options=BaseOptions(model_asset_path=str(task_path)),
            running_mode=vision.RunningMode.IMAGE, num_faces=self.num_faces,
            output_face_blendshapes=True, output_facial_transformation_matrixes=True)
        try:
            self._detector = vision.FaceLandmarker.create_from_options(options)
        except Exception as exc:  # mediapipe raises RuntimeError/ValueError for unusable files
            raise CheckpointError(task_path, f"MediaPipe cannot load it as a face landmarker ({exc})") from exc

    def __call__(self, image: np.ndarray) -> Optional[FaceFrame]:
        faces = self.detect_all(image)
        if not faces:
            return None
        return max(faces, key=lambda f: float(np.ptp(f.landmarks[:, 0]) * np.ptp(f.landmarks[:, 1])))

    def detect_all(self, image: np.ndarray, hints: Sequence[Sequence[float]] = (), search: bool = True
                   ) -> List[FaceFrame]:
        """Every face in uint8 RGB [H, W, 3]: the whole image's (at most ``num_faces``, MediaPipe's order),
        then the new ones in a window around each hint box (x0, y0, x1, y1 pixels), then (``search`` and
        ``tile_levels``) in the tiles."""
        h, w = image.shape[:2]
        found = list(self._landmarks(image))
        views = [hint_window(b, w, h) for b in hints] + (tile_grid(w, h, self.tile_levels) if search else [])
        for x0, y0, side in views:
            if len(found) >= self.num_faces:
                break
            for lmks, scores, _ in self._landmarks(image[y0:y0 + side, x0:x0 + side]):
                full = tile_to_image(lmks, x0, y0, side, w, h)
                if not cut_by_tile(lmks, x0, y0, side, w, h) and not any(
                        _box_iou(full, seen[0]) > 0.3 for seen in found):
                    found.append((full, scores, None))
        faces = []
        for lmks, scores, matrix in found:
            mesh, pose = metric_mesh(lmks, w, h, self.meta)
            faces.append(FaceFrame(lmks, mesh, pose, float(scores.sum()), w, h, scores, matrix))
        return faces

    def _landmarks(self, image: np.ndarray):
        """MediaPipe on one image -> [(landmarks [478, 3] normalised to it, blendshape scores [51] without
        ``_neutral``, facial transformation matrix [4, 4] or None)]."""
        mp_image = self._mp.Image(image_format=self._mp.ImageFormat.SRGB, data=np.ascontiguousarray(image))
        result = self._detector.detect(mp_image)
        if len(result.face_blendshapes) != len(result.face_landmarks):
            return []
        matrices = list(getattr(result, "facial_transformation_matrixes", None) or [])
        out = []
        for k, (marks, shapes) in enumerate(zip(result.face_landmarks, result.face_blendshapes)):
            shapes = shapes[1:]
            self.blendshape_names = [c.category_name for c in shapes]
            matrix = np.asarray(matrices[k], np.float64).reshape(4, 4) if k < len(matrices) else None
            out.append((np.array([[p.x, p.y, p.z] for p in marks], np.float64),
                        np.array([c.score for c in shapes], np.float64), matrix))
        return out

    def close(self) -> None:
        det, self._detector = getattr(self, "_detector", None), None
        if det is not None:
            det.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ----------------------------------------------------------------------------- tiles for small faces
def tile_grid(width: int, height: int, levels: int) -> List[Tuple[int, int, int]]:
    """Square tiles (x0, y0, side) covering a width x height image: per level the side is the short side
    halved (level - 1) times, tiles half a side apart (the last one flush with the edge)."""
    tiles = []
    for level in range(1, levels + 1):
        side = min(width, height) >> (level - 1)
        if side < 64:
            break
        xs = sorted(set(list(range(0, width - side + 1, side // 2)) + [width - side]))
        ys = sorted(set(list(range(0, height - side + 1, side // 2)) + [height - side]))
        tiles += [(x, y, side) for y in ys for x in xs if (x, y, side) != (0, 0, max(width, height))]
    return tiles


def hint_window(box: Sequence[float], width: int, height: int, scale: float = 4.0) -> Tuple[int, int, int]:
    """A square view (x0, y0, side) around a face box: ``scale`` times its size, at least 128 px, inside the image."""
    x0, y0, x1, y1 = (float(v) for v in box)
    side = int(min(min(width, height), max(128.0, scale * max(x1 - x0, y1 - y0))))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left = int(min(max(cx - side / 2, 0), width - side))
    top = int(min(max(cy - side / 2, 0), height - side))
    return left, top, side


def tile_to_image(lmks: np.ndarray, x0: int, y0: int, side: int, width: int, height: int) -> np.ndarray:
    """Landmarks [N, 3] normalised to a tile -> normalised to the image (z scales like x)."""
    out = np.asarray(lmks, np.float64).copy()
    out[:, 0] = (out[:, 0] * side + x0) / width
    out[:, 1] = (out[:, 1] * side + y0) / height
    out[:, 2] = out[:, 2] * side / width
    return out


def cut_by_tile(lmks: np.ndarray, x0: int, y0: int, side: int, width: int, height: int, pad: float = 0.01) -> bool:
    """Whether a tile's face touches one of the tile's edges that lies inside the image (a cut face)."""
    lo, hi = lmks[:, :2].min(0), lmks[:, :2].max(0)
    return bool((lo[0] < pad and x0 > 0) or (lo[1] < pad and y0 > 0) or (hi[0] > 1 - pad and x0 + side < width)
                or (hi[1] > 1 - pad and y0 + side < height))


def _box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of the (normalised) landmark boxes of two faces."""
    (ax0, ay0), (ax1, ay1) = a[:, :2].min(0), a[:, :2].max(0)
    (bx0, by0), (bx1, by1) = b[:, :2].min(0), b[:, :2].max(0)
    iw, ih = max(0.0, min(ax1, bx1) - max(ax0, bx0)), max(0.0, min(ay1, by1) - max(ay0, by0))
    inter = iw * ih
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    return inter / union if union > 0 else 0.0
