"""Pose video, face mask and keypoints for DreamID-V (numpy, OpenCV, onnxruntime, mediapipe; no torch).

- :mod:`.extract`: ``track_mediapipe`` / ``track_dwpose`` / ``track_keypoints`` -> ``PoseTrack`` (drawn on
  demand); ``extract_*`` -> ``PoseResult`` (every frame drawn).
- :mod:`.mediapipe_face`: ``FaceLandmarker`` (MediaPipe tasks) with the metric face mesh.
- :mod:`.face_geometry`: MediaPipe's geometry pipeline in numpy and the expression retargeting.
- :mod:`.dwpose`: ``DWPose`` (YOLOX-L + DWPose-L ONNX with onnxruntime).
- :mod:`.keypoints`: controlnet_aux's POSE_KEYPOINT format.
- :mod:`.render`: the reference drawings; :mod:`.landmark_sets`: index sets and colours.
"""
from .extract import (PoseResult, PoseTrack, extract_dwpose, extract_keypoints, extract_mediapipe, fill_gaps,
                      track_dwpose, track_keypoints, track_mediapipe)

__all__ = ["PoseResult", "PoseTrack", "extract_dwpose", "extract_keypoints", "extract_mediapipe", "fill_gaps",
           "track_dwpose", "track_keypoints", "track_mediapipe"]
