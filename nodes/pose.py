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

import folder_paths

from dreamidv_core.preprocess import pose as core
from dreamidv_core.errors import CheckpointError, DreamIDVError, InputError
from dreamidv_core.io.frames import select_frames
from dreamidv_core.pipelines.plan import frame_range
from dreamidv_core.preprocess import identity
from dreamidv_core.preprocess.pose.dwpose import DWPose
from dreamidv_core.preprocess.pose.mediapipe_face import FaceLandmarker
from dreamidv_core.preprocess.tracking import (TARGET_MODES, TargetSpec, analyzer_embedder,
                                               analyzer_photo_embedding)

from . import common
from .video import clip_of

SOURCES = ("mediapipe", "dwpose", "keypoints")
MEDIAPIPE_FILE = "face_landmarker_v2_with_blendshapes.task"
DET_FILE = "yolox_l.onnx"
POSE_FILE = "dw-ll_ucoco_384.onnx"
MAX_FACES = 6  # faces MediaPipe looks for per frame (every one is tracked; the target is chosen among them)
ARCFACE_CHOICES = ("auto", "none") + tuple(identity.PACK_NAMES)


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
                        "body + face, or keypoints from another node (POSE_KEYPOINT). Every face is tracked "
                        "through the clip and one target person is chosen once (largest, by index, or most "
                        "similar to a photo); pose and mask show that person only. Short misses are bridged from "
                        "the target's neighbouring frames; frames without the target stay empty (the swap passes "
                        "them through unchanged); both are listed in 'info' with the track. To swap two "
                        "people, run a second pose + swap pass on the first pass's output with the other target.",
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
                common.onnx_provider_input("dwpose only: the two DWPose models (the build and device used are "
                                           "noted in 'info')"),
                io.Combo.Input("target", options=list(TARGET_MODES), default="largest", optional=True,
                               tooltip="Which person to swap, chosen once for the whole clip and tracked: largest "
                                       "(the largest face over the clip, counting the frames it is visible), index "
                                       "(target_index, people numbered left to right at first appearance) or "
                                       "similar (the face most like target_photo, by ArcFace)."),
                io.Int.Input("target_index", default=0, min=0, max=63, optional=True,
                             tooltip="target 'index': 0 = the leftmost person when people first appear; 'info' "
                                     "lists everyone found with their numbers."),
                io.Image.Input("target_photo", optional=True,
                               tooltip="target 'similar': a photo of the person to swap (its largest face is "
                                       "compared with everyone in the clip)."),
                io.Float.Input("min_similarity", default=0.3, min=-1.0, max=1.0, step=0.01, optional=True,
                               tooltip="target 'similar': the least ArcFace cosine similarity to the photo; below it "
                                       "the node stops with an error rather than swap someone else."),
                io.Int.Input("bridge_frames", default=3, min=0, max=60, optional=True,
                             tooltip="The target missed for at most this many frames (blur, a blink of the "
                                     "detector) keeps its nearest pose and mask; longer absences (occlusion, out "
                                     "of shot) stay empty and those frames are passed through unchanged."),
                io.Combo.Input("insightface_pack", options=list(ARCFACE_CHOICES), default="auto", optional=True,
                               tooltip="ArcFace for 'similar' and to recognise people again after an occlusion or a "
                                       "cut (models/insightface/models/<pack>/). auto: the first pack found, else "
                                       "position, size and motion only; none: never."),
                io.Int.Input("small_faces", default=0, min=0, max=3, optional=True,
                             tooltip="mediapipe only: MediaPipe alone finds faces of about a quarter of the frame's "
                                     "long side; 1, 2, 3 also search overlapping tiles for faces down to ~1/6, "
                                     "1/12, 1/24 of the short side (wide shots, 4K). Slower: the tiles are searched "
                                     "every 12 frames, faces already found are followed cheaply every frame."),
                *common.frame_range_inputs(frame_num=True),
            ],
            outputs=[
                io.Image.Output("pose", display_name="pose", tooltip="Pose video for the DreamID-V PoseGuider."),
                io.Mask.Output("mask", display_name="mask", tooltip="Face mask per frame (1 = face region to swap)."),
                common.PoseKeypoint.Output("pose_keypoints", display_name="keypoints",
                                           tooltip="The drawn keypoints (POSE_KEYPOINT, pixel coordinates)."),
                io.String.Output("info", display_name="info", tooltip="Source, frame count, people found (numbered "
                                 "left to right), the target and its track, bridged frames and frames without the "
                                 "target (passed through)."),
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
                detector_model=DET_FILE, pose_model=POSE_FILE, provider="auto", target="largest", target_index=0,
                target_photo=None, min_similarity=0.3, bridge_frames=3, insightface_pack="auto",
                small_faces=0, start_frame=0, frame_num=0, select_every_nth=1) -> io.NodeOutput:
        if source not in SOURCES:
            raise InputError(f"source: expected one of {list(SOURCES)}, got {source!r}")
        if source == "keypoints" and keypoints is None:
            raise InputError("keypoints: source is 'keypoints' but no POSE_KEYPOINT is connected")
        clip = clip_of(frames, "frames")
        picked = frame_range(clip.count, frame_num or None, start_frame, select_every_nth, minimum=1)
        spec, embed_face, arcface_note = target_spec(target, target_index, target_photo, min_similarity,
                                                     bridge_frames, insightface_pack, provider)
        progress = common.progress_hook(len(picked), "pose")
        cancel = common.cancel_hook()
        with clip.open() as seq:
            seq = select_frames(seq, picked)
            if source == "mediapipe":
                path = common.resolve_model_file("mediapipe", mediapipe_model, MEDIAPIPE_FILE)
                ref = None if reference is None else reference.detach().cpu()
                with FaceLandmarker(path, num_faces=MAX_FACES, tile_levels=small_faces) as landmarker:
                    track = core.track_mediapipe(seq, landmarker, ref, "frames", progress, cancel, spec, embed_face)
            elif source == "dwpose":
                det = common.resolve_model_file("dwpose", detector_model, DET_FILE)
                est = common.resolve_model_file("dwpose", pose_model, POSE_FILE)
                track = core.track_dwpose(seq, DWPose(det, est, provider), "frames", progress, cancel, spec,
                                          embed_face)
            else:
                if isinstance(keypoints, list) and len(keypoints) == clip.count != len(picked):
                    keypoints = [keypoints[i] for i in picked]  # made for the whole clip: the range's frames
                track = core.track_keypoints(seq, keypoints, "keypoints", progress, spec, embed_face)
        track.start, track.stride, track.available = picked.start, picked.step, clip.count
        track.info = f"{track.info}; {arcface_note}"
        wanted = common.wanted_outputs(cls)
        use = (lambda slot: wanted is None or slot in wanted)
        result = track.result(pose=use(0), mask=use(1), keypoints=use(2))
        pose = torch.from_numpy(result.pose) if use(0) else None
        mask = torch.from_numpy(result.mask) if use(1) else None
        return io.NodeOutput(pose, mask, result.keypoints if use(2) else None, track.info, track)


def load_face_analyzer(pack: str, provider: str):
    """(insightface analyzer or None, note): ``pack`` 'none', 'auto' (the first pack found in the insightface
    model folder; none found or the package missing: None) or a pack name (missing: an error)."""
    if pack == "none":
        return None, "ArcFace: off"
    roots = folder_paths.get_folder_paths("insightface") if "insightface" in folder_paths.folder_names_and_paths else []
    for name in (identity.PACK_NAMES if pack == "auto" else (pack,)):
        try:
            pack_dir = identity.find_pack(roots, name)
            return identity.load_analyzer(pack_dir, "CUDA" if provider == "CUDA" else "CPU"), f"ArcFace: {name}"
        except (CheckpointError, DreamIDVError):
            if pack != "auto":
                raise
    return None, ("ArcFace: no insightface pack found (models/insightface/models/antelopev2 or buffalo_l): people "
                  "are re-identified by position, size and motion only")


def target_spec(target, index, photo, min_similarity, bridge, pack, provider):
    """The node's target inputs -> (TargetSpec, ArcFace embed(image, box) or None, a note for 'info')."""
    if target not in TARGET_MODES:
        raise InputError(f"target: expected one of {list(TARGET_MODES)}, got {target!r}")
    if target == "similar" and photo is None:
        raise InputError("target_photo: target is 'similar' but no photo is connected; connect a photo of the "
                         "person to swap")
    analyzer, note = load_face_analyzer(pack, provider)
    if target == "similar" and analyzer is None:
        raise InputError("target 'similar' compares faces with ArcFace: put an insightface model pack in "
                         "models/insightface/models/ (antelopev2 or buffalo_l) and set insightface_pack to it or "
                         "'auto'")
    embedding = None
    if target == "similar":
        embedding = analyzer_photo_embedding(analyzer, identity.photo(photo, "target_photo"))
    spec = TargetSpec(target, int(index), embedding, float(min_similarity), int(bridge))
    return spec, (analyzer_embedder(analyzer) if analyzer is not None else None), note


NODES = [DreamIDVPoseExtract]
