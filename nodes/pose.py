"""DreamID-V nodes: pose extraction (frames -> pose video + face mask + keypoints + info).

A thin adapter over :mod:`dreamidv_core.preprocess.pose`. Model files come from the pack's model folders:
``models/mediapipe/`` (face_landmarker_v2_with_blendshapes.task) and ``models/dwpose/``
(yolox_l.onnx, dw-ll_ucoco_384.onnx), or wherever extra_model_paths.yaml points those folders.
"""
from __future__ import annotations

import torch
from comfy_api.latest import io

from dreamidv_core.preprocess import pose as core
from dreamidv_core.errors import InputError
from dreamidv_core.preprocess.pose.dwpose import DWPose
from dreamidv_core.preprocess.pose.mediapipe_face import FaceLandmarker

from . import common

SOURCES = ("mediapipe", "dwpose", "keypoints")
MEDIAPIPE_FILE = "face_landmarker_v2_with_blendshapes.task"
DET_FILE = "yolox_l.onnx"
POSE_FILE = "dw-ll_ucoco_384.onnx"


def model_file_choices(folder: str, suffix: str, default: str) -> list:
    names = common.model_choices(folder, (suffix,))
    return names or [default]


class DreamIDVPoseExtract(io.ComfyNode):
    """Frames -> DreamID-V pose video, face mask and keypoints, drawn as the reference pipeline does."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DreamIDVPoseExtract",
            display_name="DreamID-V Pose Extract",
            category=common.CATEGORY,
            description="Pose video + face mask for DreamID-V from the driving video: MediaPipe face "
                        "landmarks retargeted onto the reference face (the released default), DWPose "
                        "body + face, or keypoints from another node (POSE_KEYPOINT). Frames without a "
                        "face are filled from their neighbours (counted in 'info').",
            inputs=[
                io.Image.Input("frames", tooltip="The driving video frames (IMAGE batch); pose and mask come "
                               "out at the same size and count."),
                io.Combo.Input("source", options=list(SOURCES), default="mediapipe",
                               tooltip="mediapipe: face landmarks, expression retargeted onto 'reference' "
                               "(the DreamID-V default). dwpose: body limbs + 68 face points (YOLOX + DWPose "
                               "ONNX). keypoints: draw the POSE_KEYPOINT input (e.g. from controlnet_aux)."),
                io.Image.Input("reference", optional=True,
                               tooltip="mediapipe only: the face photo to swap in; the video's expressions "
                               "are moved onto this face's shape. Unconnected: the video's own face is drawn."),
                common.PoseKeypoint.Input("keypoints", optional=True,
                                          tooltip="keypoints only: POSE_KEYPOINT from another node (e.g. "
                                          "DWPose Estimator), normalised or pixel coordinates, one per frame."),
                io.Combo.Input("mediapipe_model", options=model_file_choices("mediapipe", ".task", MEDIAPIPE_FILE),
                               tooltip=f"mediapipe only: the face landmarker in models/mediapipe ({MEDIAPIPE_FILE})."),
                io.Combo.Input("detector_model", options=model_file_choices("dwpose", ".onnx", DET_FILE),
                               default=DET_FILE, tooltip=f"dwpose only: person detector in models/dwpose ({DET_FILE})."),
                io.Combo.Input("pose_model", options=model_file_choices("dwpose", ".onnx", POSE_FILE),
                               default=POSE_FILE, tooltip=f"dwpose only: pose estimator in models/dwpose ({POSE_FILE})."),
                common.onnx_provider_input("dwpose only: the two DWPose models (the build and device used are "
                                           "noted in 'info')"),
            ],
            outputs=[
                io.Image.Output("pose", display_name="pose", tooltip="Pose video for the DreamID-V PoseGuider."),
                io.Mask.Output("mask", display_name="mask", tooltip="Face mask per frame (1 = face region to swap)."),
                common.PoseKeypoint.Output("pose_keypoints", display_name="keypoints",
                                           tooltip="The drawn keypoints (POSE_KEYPOINT, pixel coordinates)."),
                io.String.Output("info", display_name="info", tooltip="Source, frame count, faces found and frames "
                                 "filled from neighbours."),
            ],
        )

    @classmethod
    def execute(cls, frames, source, reference=None, keypoints=None, mediapipe_model=MEDIAPIPE_FILE,
                detector_model=DET_FILE, pose_model=POSE_FILE, provider="auto") -> io.NodeOutput:
        if not isinstance(frames, torch.Tensor) or frames.dim() != 4 or frames.shape[0] == 0:
            raise InputError(f"frames: expected IMAGE frames [F, H, W, C], got "
                             f"{list(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__}")
        frames = frames.detach().cpu()
        count = int(frames.shape[0])
        progress = common.progress_hook(count, "pose")
        cancel = common.cancel_hook()
        if source == "mediapipe":
            path = common.resolve_model_file("mediapipe", mediapipe_model, MEDIAPIPE_FILE)
            ref = None if reference is None else reference.detach().cpu()
            with FaceLandmarker(path) as landmarker:
                result = core.extract_mediapipe(frames, landmarker, ref, "frames", progress, cancel)
        elif source == "dwpose":
            det = common.resolve_model_file("dwpose", detector_model, DET_FILE)
            est = common.resolve_model_file("dwpose", pose_model, POSE_FILE)
            result = core.extract_dwpose(frames, DWPose(det, est, provider), "frames", progress, cancel)
        elif source == "keypoints":
            if keypoints is None:
                raise InputError("keypoints: source is 'keypoints' but no POSE_KEYPOINT is connected")
            result = core.extract_keypoints(frames, keypoints, "keypoints", progress)
        else:
            raise InputError(f"source: expected one of {list(SOURCES)}, got {source!r}")
        pose = torch.from_numpy(result.pose)
        mask = torch.from_numpy(result.mask)
        return io.NodeOutput(pose, mask, result.keypoints, result.info)


NODES = [DreamIDVPoseExtract]
