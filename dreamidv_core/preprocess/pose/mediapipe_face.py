"""MediaPipe face landmarker (``mediapipe.tasks``), one face per image, with blendshapes and the
metric face mesh the reference pipeline retargets (see :mod:`.face_geometry`).

``mediapipe`` is imported lazily: the rest of the pose package works without it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ... import optional
from ...errors import CheckpointError
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
    call ``close()``."""

    def __init__(self, task_path: str):
        optional.require("mediapipe", "MediaPipe face landmarker (pose source 'mediapipe')",
                         "mediapipe.tasks.python.vision")
        if not os.path.isfile(task_path):
            raise CheckpointError(task_path, "file not found")
        self.meta = load_metadata(task_path)
        import mediapipe as mp
        from mediapipe.tasks.python import BaseOptions, vision

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
        expression = float(sum(c.score for c in result.face_blendshapes[0][1:]))
        mesh, pose = metric_mesh(lmks, w, h, self.meta)
        return FaceFrame(lmks, mesh, pose, expression, w, h)

    def close(self) -> None:
        det, self._detector = getattr(self, "_detector", None), None
        if det is not None:
            det.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
