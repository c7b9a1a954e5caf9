"""MediaPipe face landmarker (``mediapipe.tasks``), one face per image, with blendshapes and the
metric face mesh the reference pipeline retargets (see :mod:`.face_geometry`).

``mediapipe`` is imported lazily: the rest of the pose package works without it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ...errors import CheckpointError, DreamIDVError
from .face_geometry import load_metadata, metric_mesh


@dataclass
class FaceFrame:
    """One detected face: landmarks [478, 3] normalised (x, y, z), mesh [468, 3] metric in the face
    frame, pose [4, 4] face frame -> camera, expression = sum of the 51 blendshapes (neutral excluded),
    width/height of the image it came from; blendshapes [51] (the scores without ``_neutral``, in the
    model's order, names in ``FaceLandmarker.blendshape_names``) and matrix [4, 4] (MediaPipe's facial
    transformation matrix, canonical face -> camera) when the landmarker gave them."""
    landmarks: np.ndarray
    mesh: np.ndarray
    pose: np.ndarray
    expression: float
    width: int
    height: int
    blendshapes: Optional[np.ndarray] = None
    matrix: Optional[np.ndarray] = None


class FaceLandmarker:
    """Callable: uint8 RGB [H, W, 3] -> FaceFrame or None (no face). Use as a context manager or
    call ``close()``."""

    def __init__(self, task_path: str):
        if not os.path.isfile(task_path):
            raise CheckpointError(task_path, "file not found")
        self.meta = load_metadata(task_path)
        self.blendshape_names: list = []  # filled by the first detection (the model's blendshape order)
        try:
            import mediapipe as mp
            from mediapipe.tasks.python import BaseOptions, vision
        except ImportError as exc:
            raise DreamIDVError("the MediaPipe source needs the 'mediapipe' package "
                                "(pip install mediapipe)") from exc
        self._mp = mp
        options = vision.FaceLandmarkerOptions(
            base_options=BaseOptions(model_asset_path=str(task_path)),
            running_mode=vision.RunningMode.IMAGE, num_faces=1,
            output_face_blendshapes=True, output_facial_transformation_matrixes=True)
        try:
            self._detector = vision.FaceLandmarker.create_from_options(options)
        except Exception as exc:  # mediapipe raises RuntimeError/ValueError for unusable files
            raise CheckpointError(task_path, f"MediaPipe cannot load it as a face landmarker ({exc})") from exc

    def __call__(self, image: np.ndarray) -> Optional[FaceFrame]:
        h, w = image.shape[:2]
        mp_image = self._mp.Image(image_format=self._mp.ImageFormat.SRGB, data=np.ascontiguousarray(image))
        result = self._detector.detect(mp_image)
        if len(result.face_landmarks) != 1 or len(result.face_blendshapes) != 1:
            return None
        lmks = np.array([[p.x, p.y, p.z] for p in result.face_landmarks[0]], np.float64)
        shapes = result.face_blendshapes[0][1:]
        scores = np.array([c.score for c in shapes], np.float64)
        self.blendshape_names = [c.category_name for c in shapes]
        mesh, pose = metric_mesh(lmks, w, h, self.meta)
        matrices = getattr(result, "facial_transformation_matrixes", None) or []
        matrix = np.asarray(matrices[0], np.float64).reshape(4, 4) if len(matrices) == 1 else None
        return FaceFrame(lmks, mesh, pose, float(sum(c.score for c in shapes)), w, h, scores, matrix)

    def close(self) -> None:
        det, self._detector = getattr(self, "_detector", None), None
        if det is not None:
            det.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
