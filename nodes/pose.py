"""DreamID-V nodes: pose extraction (frames or VIDEO -> pose video + face mask + keypoints + info).

A thin adapter over :mod:`dreamidv_core.preprocess.pose`. Model files come from the pack's model folders:
``models/mediapipe/`` (face_landmarker_v2_with_blendshapes.task) and ``models/dwpose/``
(yolox_l.onnx, dw-ll_ucoco_384.onnx), or wherever extra_model_paths.yaml points those folders.

A VIDEO is read one frame at a time. The ``pose_mask`` output (DREAMIDV_POSE_MASK) carries what was found
(keypoints, and which source frames) and draws pose and mask frames only when the PoseGuider, the sampler or
the composite read them: flat memory for any clip length. The IMAGE ``pose`` and MASK ``mask`` outputs hold
the whole clip at its size (~32 MB a 1080p frame) and are made only when connected (for other packs).
"""
from __future__ import annotations

import torch
from comfy_api.latest import io

from dreamidv_core.preprocess import pose as core
from dreamidv_core.errors import InputError
from dreamidv_core.io.frames import select_frames
from dreamidv_core.pipelines.plan import frame_range
from dreamidv_core.preprocess.pose.dwpose import DWPose
from dreamidv_core.preprocess.pose.mediapipe_face import FaceLandmarker

from . import common
from .video import clip_of

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
                io.MultiType.Input("frames", types=[io.Image, io.Video],
                                   tooltip="The driving video: IMAGE frames, or a VIDEO (Load Video; read a frame "
                                           "at a time). Pose and mask come out at the same size and count."),
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
                io.Combo.Input("provider", options=["CPU", "CUDA"], default="CPU",
                               tooltip="dwpose only: onnxruntime device. CUDA needs onnxruntime-gpu (falls "
                               "back to CPU, noted in 'info', otherwise)."),
                *common.frame_range_inputs(frame_num=True),
            ],
            outputs=[
                io.Image.Output("pose", display_name="pose", tooltip="Pose video for the DreamID-V PoseGuider."),
                io.Mask.Output("mask", display_name="mask", tooltip="Face mask per frame (1 = face region to swap)."),
                common.PoseKeypoint.Output("pose_keypoints", display_name="keypoints",
                                           tooltip="The drawn keypoints (POSE_KEYPOINT, pixel coordinates)."),
                io.String.Output("info", display_name="info", tooltip="Source, frame count, faces found and frames "
                                 "filled from neighbours."),
                common.PoseMask.Output("pose_mask", display_name="pose_mask",
                                       tooltip="Pose and face mask of the selected frames, drawn on demand (flat "
                                               "memory): for the PoseGuider's pose_video, the sampler's mask and "
                                               "the composite's face_mask."),
            ],
            hidden=[io.Hidden.prompt, io.Hidden.unique_id],
        )

    @classmethod
    def fingerprint_inputs(cls, **_inputs):
        return common.output_links_fingerprint()

    @classmethod
    def execute(cls, frames, source, reference=None, keypoints=None, mediapipe_model=MEDIAPIPE_FILE,
                detector_model=DET_FILE, pose_model=POSE_FILE, provider="CPU", start_frame=0, frame_num=0,
                select_every_nth=1) -> io.NodeOutput:
        clip = clip_of(frames, "frames")
        picked = frame_range(clip.count, frame_num or None, start_frame, select_every_nth, minimum=1)
        progress = common.progress_hook(len(picked), "pose")
        cancel = common.cancel_hook()
        with clip.open() as seq:
            seq = select_frames(seq, picked)
            if source == "mediapipe":
                path = common.resolve_model_file("mediapipe", mediapipe_model, MEDIAPIPE_FILE)
                ref = None if reference is None else reference.detach().cpu()
                with FaceLandmarker(path) as landmarker:
                    track = core.track_mediapipe(seq, landmarker, ref, "frames", progress, cancel)
            elif source == "dwpose":
                det = common.resolve_model_file("dwpose", detector_model, DET_FILE)
                est = common.resolve_model_file("dwpose", pose_model, POSE_FILE)
                track = core.track_dwpose(seq, DWPose(det, est, provider), "frames", progress, cancel)
            elif source == "keypoints":
                if keypoints is None:
                    raise InputError("keypoints: source is 'keypoints' but no POSE_KEYPOINT is connected")
                if isinstance(keypoints, list) and len(keypoints) == clip.count != len(picked):
                    keypoints = [keypoints[i] for i in picked]  # made for the whole clip: the range's frames
                track = core.track_keypoints(seq, keypoints, "keypoints", progress)
            else:
                raise InputError(f"source: expected one of {list(SOURCES)}, got {source!r}")
        track.start, track.stride, track.available = picked.start, picked.step, clip.count
        wanted = common.wanted_outputs(cls)
        use = (lambda slot: wanted is None or slot in wanted)
        result = track.result(pose=use(0), mask=use(1), keypoints=use(2))
        pose = torch.from_numpy(result.pose) if use(0) else None
        mask = torch.from_numpy(result.mask) if use(1) else None
        return io.NodeOutput(pose, mask, result.keypoints if use(2) else None, result.info, track)


NODES = [DreamIDVPoseExtract]
