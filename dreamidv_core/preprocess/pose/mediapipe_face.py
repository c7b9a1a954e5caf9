"""MediaPipe face landmarker (``mediapipe.tasks``), one face per image, with blendshapes and the
metric face mesh the reference pipeline retargets (see :mod:`.face_geometry`).

``mediapipe`` is imported lazily: the rest of the pose package works without it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional

import numpy as np

from ...errors import CheckpointError, DreamIDVError
from .face_geometry import load_metadata, metric_mesh


@dataclass
class FaceFrame:
    """One detected face: landmarks [478, 3] normalised (x, y, z), mesh [468, 3] metric in the face
    frame, pose [4, 4] face frame -> camera, expression = sum of the 51 blendshapes (neutral excluded),
    width/height of the image it came from."""
    landmarks: np.ndarray
    mesh: np.ndarray
    pose: np.ndarray
    expression: float
    width: int
    height: int


class FaceLandmarker:
    """Callable: uint8 RGB [H, W, 3] -> FaceFrame or None (no face). Use as a context manager or
    call ``close()``. With ``num_faces`` > 1, :meth:`detect_all` lists up to that many faces of an image."""

    def __init__(self, task_path: str, num_faces: int = 1):
        if not os.path.isfile(task_path):
            raise CheckpointError(task_path, "file not found")
        self.meta = load_metadata(task_path)
        try:
            import mediapipe as mp
            from mediapipe.tasks.python import BaseOptions, vision
        except ImportError as exc:
            raise DreamIDVError("the MediaPipe source needs the 'mediapipe' package "
                                "(pip install mediapipe)") from exc
        self._mp = mp
        options = vision.FaceLandmarkerOptions(
            base_options=BaseOptions(model_asset_path=str(task_path)),
            running_mode=vision.RunningMode.IMAGE, num_faces=int(num_faces),
            output_face_blendshapes=True, output_facial_transformation_matrixes=True)
        try:
            self._detector = vision.FaceLandmarker.create_from_options(options)
        except Exception as exc:  # mediapipe raises RuntimeError/ValueError for unusable files
            raise CheckpointError(task_path, f"MediaPipe cannot load it as a face landmarker ({exc})") from exc

    def __call__(self, image: np.ndarray) -> Optional[FaceFrame]:
        faces = self.detect_all(image)
        return faces[0] if len(faces) == 1 else None

    def detect_all(self, image: np.ndarray) -> List[FaceFrame]:
        """Every face found (at most ``num_faces``), in MediaPipe's order."""
        h, w = image.shape[:2]
        mp_image = self._mp.Image(image_format=self._mp.ImageFormat.SRGB, data=np.ascontiguousarray(image))
        result = self._detector.detect(mp_image)
        if len(result.face_landmarks) != len(result.face_blendshapes):
            return []
        faces = []
        for marks, shapes in zip(result.face_landmarks, result.face_blendshapes):
            lmks = np.array([[p.x, p.y, p.z] for p in marks], np.float64)
            expression = float(sum(c.score for c in shapes[1:]))
            mesh, pose = metric_mesh(lmks, w, h, self.meta)
            faces.append(FaceFrame(lmks, mesh, pose, expression, w, h))
        return faces

    def close(self) -> None:
        det, self._detector = getattr(self, "_detector", None), None
        if det is not None:
            det.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
