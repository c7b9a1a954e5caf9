"""DreamID-V nodes: the SyncID-Pipe data-synthesis stages (thin adapters over dreamidv_core.synthesis).

First/last frames -> image face swap (DreamID-V on single frames, or any image from the graph) ->
expression adaptation (the real clip's expressions on I_g's face) -> [IVS] -> background recomposition
(SAM2 masks optional) -> quadruplet writer (forward/backward training samples, training/DATASET.md).
"""
from __future__ import annotations

from pathlib import Path

import torch
import folder_paths
import comfy.model_management as mm
from comfy_api.latest import io

from dreamidv_core.preprocess import identity as id_core
from dreamidv_core.preprocess import segmentation
from dreamidv_core import synthesis as core
from dreamidv_core.pipelines.adapters import PixelSpaceVAE, rgb_frames
from dreamidv_core.errors import InputError
from dreamidv_core.pipelines.swap import SwapSettings
from dreamidv_core.preprocess.identity_bundle import encode_reference
from dreamidv_core.synthesis.background import MODES
from dreamidv_core.synthesis.frames import check_clip
from dreamidv_core.synthesis.writer import DIRECTIONS, QuadrupletSettings, summary
from dreamidv_core.pipelines.clips import to_float_frames

from . import common
from .video import clip_of
from .composite import CKPT_SUFFIXES, SAM2_FOLDER, sam2_config_path, sam2_device
from .pose import MEDIAPIPE_FILE, model_file_choices
from .sampler import IDENTITY_GUIDANCE_TOOLTIP, conditioning_context, sampling_inputs

NO_SAM2 = "none"


def _mask(mask, what: str) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise InputError(f"{what}: expected a MASK [frames, height, width], got {type(mask).__name__}")
    return (mask[None] if mask.dim() == 2 else mask).detach().cpu().float()


class DreamIDVFirstLastFrames(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DreamIDVFirstLastFrames", display_name="DreamID-V First/Last Frames", category=common.CATEGORY,
            description="The first and last frames of the real clip (the IVS conditioning frames), with the same "
                        "frames of its face mask and pose drawing when connected. The clip needs at least 5 frames.",
            inputs=[
                io.MultiType.Input("frames", types=[io.Image, io.Video],
                                   tooltip="The real clip V_r (IMAGE batch or VIDEO, at least 5 frames; of a VIDEO "
                                           "only the two frames are decoded)."),
                io.Mask.Input("mask", optional=True, tooltip="Its face mask (pose node), sliced the same way."),
                io.Image.Input("pose", optional=True, tooltip="Its pose drawing (e.g. the expression adaptation "
                               "output), sliced the same way."),
            ],
            outputs=[
                io.Image.Output("first", display_name="first", tooltip="Frame 0 [1, H, W, 3]."),
                io.Image.Output("last", display_name="last", tooltip="The last frame [1, H, W, 3]."),
                io.Int.Output("frame_count", display_name="frame_count", tooltip="Frames in the clip."),
                io.Mask.Output("first_mask", display_name="first_mask", tooltip="Mask of frame 0 (zeros when no mask "
                               "is connected)."),
                io.Mask.Output("last_mask", display_name="last_mask", tooltip="Mask of the last frame (zeros when "
                               "no mask is connected)."),
                io.Image.Output("first_pose", display_name="first_pose", tooltip="Pose of frame 0 (black when no "
                                "pose is connected)."),
                io.Image.Output("last_pose", display_name="last_pose", tooltip="Pose of the last frame (black when "
                                "no pose is connected)."),
            ],
        )

    @classmethod
    def execute(cls, frames, mask=None, pose=None) -> io.NodeOutput:
        if isinstance(frames, torch.Tensor):
            first, last, count = core.first_last_frames(frames, "frames")
        else:
            with clip_of(frames, "frames").open() as seq:
                count = check_clip(seq, "frames")
                first, last = to_float_frames(seq[0:1]), to_float_frames(seq[count - 1:count])
        h, w = first.shape[1:3]
        if mask is None:
            m0 = m1 = torch.zeros(1, h, w)
        else:
            mask = _mask(mask, "mask")
            if mask.shape[0] != count or tuple(mask.shape[1:]) != (h, w):
                raise InputError(f"mask is {list(mask.shape)} but the clip is {count} frames of {w}x{h}; connect "
                                 "the same clip's mask")
            m0, m1 = mask[:1].clone(), mask[-1:].clone()
        if pose is None:
            p0 = p1 = torch.zeros(1, h, w, 3)
        else:
            if pose.dim() != 4 or pose.shape[0] != count or tuple(pose.shape[1:3]) != (h, w):
                raise InputError(f"pose is {list(pose.shape)} but the clip is {count} frames of {w}x{h}; connect "
                                 "the same clip's pose drawing")
            p0, p1 = pose[:1, ..., :3].clone(), pose[-1:, ..., :3].clone()
        return io.NodeOutput(first[..., :3], last[..., :3], count, m0, m1, p0, p1)


class DreamIDVImageFaceSwap(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DreamIDVImageFaceSwap", display_name="DreamID-V Image Face Swap", category=common.CATEGORY,
            description="Swaps the face of one frame (e.g. the clip's first or last frame) to the identity: with "
                        "DreamID-V itself (the frame repeated to a 5-frame still clip, frame 0 kept and pasted back at "
                        "the frame's size), or pass-through of 'swapped' from any image face-swap node.",
            inputs=[
                io.Image.Input("image", tooltip="The frame to swap [1, H, W, 3] (a batch: each image is swapped)."),
                io.Image.Input("swapped", optional=True, tooltip="Already swapped frame(s) from any other face-swap "
                               "node: returned as they are (after a size check); nothing below is needed then."),
                common.DreamIDVModel.Input("model", optional=True, tooltip="DreamID-V model (DreamIDVModelLoader)."),
                io.Vae.Input("vae", optional=True, tooltip="The Wan 2.1 VAE."),
                io.Conditioning.Input("positive", optional=True, tooltip="Text context (DreamIDVTextContext or umT5)."),
                common.Identity.Input("identity", optional=True, tooltip="The identity I_g (DreamID-V ArcFace ID "
                                      "Token Encoder on the generated face)."),
                io.Mask.Input("mask", optional=True, tooltip="Face mask of 'image' (First/Last Frames' mask output)."),
                io.Image.Input("pose", optional=True, tooltip="Pose drawing of 'image' (needed by the full model)."),
                io.Int.Input("width", default=832, min=16, max=4096, step=16, tooltip="Area width (as the sampler)."),
                io.Int.Input("height", default=480, min=16, max=4096, step=16, tooltip="Area height (as the sampler)."),
                *sampling_inputs(io.Float.Input("identity_guidance", default=4.0, min=0.0, max=30.0, step=0.1,
                                                tooltip=IDENTITY_GUIDANCE_TOOLTIP)),
            ],
            outputs=[io.Image.Output("swapped_image", display_name="image", tooltip="The swapped frame(s), same size "
                                     "as 'image'.")],
        )

    @classmethod
    def execute(cls, image, swapped=None, model=None, vae=None, positive=None, identity=None, mask=None, pose=None,
                width=832, height=480, steps=20, shift=5.0, identity_guidance=4.0, seed=0,
                sampler="unipc") -> io.NodeOutput:
        image = rgb_frames(image, "image")
        n, h, w = image.shape[:3]
        if swapped is not None:
            swapped = rgb_frames(swapped, "swapped")
            if tuple(swapped.shape[1:3]) != (h, w) or swapped.shape[0] < n:
                raise InputError(f"swapped is {list(swapped.shape)} but image is {list(image.shape)}: the swapped "
                                 "frame must have the frame's size (resize it back first)")
            return io.NodeOutput(swapped[:n])
        missing = [k for k, v in (("model", model), ("vae", vae), ("positive", positive), ("identity", identity),
                                  ("mask", mask)) if v is None]
        if missing:
            raise InputError(f"{', '.join(missing)}: connect them to swap with DreamID-V, or connect 'swapped' "
                             "(any image face-swap node's output)")
        if not hasattr(model, "dit") or not hasattr(model, "load"):
            raise InputError(f"model: expected the output of DreamIDVModelLoader, got {type(model).__name__}")
        if not hasattr(identity, "latent_for") or not hasattr(identity, "image"):
            raise InputError(f"identity: expected the DreamID-V identity node's output, got {type(identity).__name__}")
        mask = _mask(mask, "mask")
        if mask.shape[0] < n:
            raise InputError(f"mask has {mask.shape[0]} frames but image has {n}")
        if pose is not None and pose.shape[0] < n:
            raise InputError(f"pose has {pose.shape[0]} images but image has {n}")
        dit = model.dit
        if dit.cfg.has_pose and pose is None:
            raise InputError("pose: the full DreamID-V model needs the frame's pose drawing (or load the faster model)")
        context = conditioning_context(positive, dit.cfg.text_dim)
        settings = SwapSettings(width=width, height=height, steps=steps, shift=shift, guidance=identity_guidance,
                                seed=seed, sampler=sampler, window=5, overlap=4)
        adapter = PixelSpaceVAE(vae, after_encode=lambda: model.load())
        ref_latent = identity.latent_for((w, h), (width, height))
        if ref_latent is None:
            ref_latent = encode_reference(adapter, identity.image, (w, h), (width, height))
        hook = common.progress_hook(steps * n)
        out = torch.empty(n, h, w, 3)
        model.load()
        try:
            for i in range(n):
                prog = lambda stage, k, m, i=i: hook(stage, i * steps + k, steps * n)  # noqa: E731
                out[i] = core.swap_image(dit, adapter, image[i:i + 1], mask[i:i + 1], None, context,
                                         None if pose is None else pose[i:i + 1], settings, ref_latent=ref_latent,
                                         progress=prog, cancel=common.cancel_hook())[0]
        finally:
            model.release()
        return io.NodeOutput(out)


class DreamIDVExpressionAdaptation(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DreamIDVExpressionAdaptation", display_name="DreamID-V Expression Adaptation",
            category=common.CATEGORY,
            description="Pose video with I_g's face shape and the real clip's expression and head pose, frame by "
                        "frame: the MediaPipe retargeting of DreamID-V Pose Extract with I_g as the reference (the "
                        "same result; this node names the stage and requires I_g).",
            inputs=[
                io.MultiType.Input("frames", types=[io.Image, io.Video],
                                   tooltip="The real clip V_r (IMAGE batch, or a VIDEO read a frame at a time)."),
                io.Image.Input("identity_image", tooltip="The generated identity I_g (must show one clear face)."),
                io.Combo.Input("mediapipe_model", options=model_file_choices("mediapipe", ".task", MEDIAPIPE_FILE),
                               tooltip=f"The face landmarker in models/mediapipe ({MEDIAPIPE_FILE})."),
            ],
            outputs=[
                io.Image.Output("pose", display_name="pose", tooltip="The adapted pose video (I_g's face shape)."),
                io.Mask.Output("mask", display_name="mask", tooltip="Face mask per frame of the adapted face."),
                common.PoseKeypoint.Output("pose_keypoints", display_name="keypoints",
                                           tooltip="The drawn keypoints (POSE_KEYPOINT)."),
                io.String.Output("info", display_name="info", tooltip="Faces found, frames filled, neutral frame."),
            ],
        )

    @classmethod
    def execute(cls, frames, identity_image, mediapipe_model=MEDIAPIPE_FILE) -> io.NodeOutput:
        from dreamidv_core.preprocess.pose.mediapipe_face import FaceLandmarker

        clip = clip_of(frames, "frames")
        hook = common.progress_hook(clip.count, "pose")
        path = common.resolve_model_file("mediapipe", mediapipe_model, MEDIAPIPE_FILE)
        with FaceLandmarker(str(path)) as landmarker, clip.open() as seq:
            res = core.adapt_expression(seq, landmarker, identity_image.detach().cpu(),
                                        progress=hook, cancel=common.cancel_hook())
        return io.NodeOutput(torch.from_numpy(res.pose), torch.from_numpy(res.mask), res.keypoints, res.info)


def _sam2_union(frames, mask, predictor, prompt_frames: int) -> torch.Tensor:
    head = segmentation.track_head(predictor, frames, mask, prompt_frames, cancel=common.cancel_hook())
    return torch.maximum(mask, head.float())


class DreamIDVBackgroundRecompose(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DreamIDVBackgroundRecompose", display_name="DreamID-V Background Recompose",
            category=common.CATEGORY,
            description="Removes the person from the real clip (plate of the frames where the background is "
                        "visible + OpenCV inpainting, smoothed in time) and puts the generated person over it: "
                        "V'_g = M_g * V_g + (1 - M_g) * V_bg. With a SAM2 checkpoint the masks are grown to SAM2's "
                        "tracked head (prompted by the given masks).",
            inputs=[
                io.Image.Input("real_frames", tooltip="The real clip V_r."),
                io.Mask.Input("real_mask", tooltip="Person/face mask of V_r (pose node or SAM2 composite mask)."),
                io.Image.Input("generated", tooltip="The generated clip V_g (IVS output), V_r's size, <= its frames."),
                io.Mask.Input("generated_mask", tooltip="Person/face mask of V_g (1 = keep V_g's pixel)."),
                io.Combo.Input("sam2_checkpoint", options=[NO_SAM2] + common.model_choices(SAM2_FOLDER, CKPT_SUFFIXES),
                               default=NO_SAM2, tooltip="'none': use the masks as given. A SAM2 checkpoint in "
                               "models/sam2: track each clip's head from its mask and unite."),
                io.Combo.Input("sam2_config", options=["auto"] + segmentation.bundled_configs()
                               + common.model_choices(SAM2_FOLDER, (".yaml",)), default="auto",
                               tooltip="SAM2 model config ('auto' tells it from the checkpoint)."),
                io.Int.Input("prompt_frames", default=4, min=1, max=64, tooltip="SAM2: frames prompted with the mask."),
                io.Combo.Input("mode", options=list(MODES), default="plate",
                               tooltip="plate: fill from frames where the background is visible, inpaint the rest "
                               "(static camera). inpaint: per-frame inpainting only (moving camera)."),
                io.Int.Input("removal_dilation", default=8, min=0, max=256,
                             tooltip="Pixels the real person region is grown by before removal."),
                io.Float.Input("smoothing", default=0.6, min=0.0, max=0.95, step=0.05,
                               tooltip="Temporal smoothing of the filled region (EMA weight of the previous frame)."),
                io.Int.Input("inpaint_radius", default=5, min=1, max=64, tooltip="OpenCV inpainting radius."),
                io.Int.Input("mask_dilation", default=0, min=0, max=256, tooltip="Grow M_g by this many pixels."),
                io.Int.Input("feather", default=0, min=0, max=256, tooltip="Soft edge of M_g in pixels (0: as given)."),
                io.Combo.Input("device", options=["auto", "cpu"], default="auto", tooltip="Where SAM2 runs."),
            ],
            outputs=[
                io.Image.Output("recomposed", display_name="recomposed", tooltip="V'_g: the generated person over "
                                "the cleaned real background."),
                io.Image.Output("background", display_name="background", tooltip="V_bg: the real clip without "
                                "its person."),
                io.Mask.Output("generated_mask_out", display_name="generated_mask", tooltip="M_g as used (after SAM2)."),
            ],
        )

    @classmethod
    def execute(cls, real_frames, real_mask, generated, generated_mask, sam2_checkpoint=NO_SAM2, sam2_config="auto",
                prompt_frames=4, mode="plate", removal_dilation=8, smoothing=0.6, inpaint_radius=5, mask_dilation=0,
                feather=0, device="auto") -> io.NodeOutput:
        real, gen = rgb_frames(real_frames, "real_frames"), rgb_frames(generated, "generated")
        m_r, m_g = _mask(real_mask, "real_mask"), _mask(generated_mask, "generated_mask")
        for what, f, m in (("real_mask", real, m_r), ("generated_mask", gen, m_g)):
            if m.shape[0] != f.shape[0] or tuple(m.shape[1:]) != tuple(f.shape[1:3]):
                raise InputError(f"{what} is {list(m.shape)} but its clip is {list(f.shape[:3])}; same frames and size")
        if gen.shape[0] > real.shape[0] or tuple(gen.shape[1:3]) != tuple(real.shape[1:3]):
            raise InputError(f"generated is {list(gen.shape[:3])} but real_frames is {list(real.shape[:3])}: same size, "
                             "at most as many frames")
        if sam2_checkpoint and sam2_checkpoint != NO_SAM2:
            ckpt = common.resolve_model_file(SAM2_FOLDER, sam2_checkpoint, "a SAM2 checkpoint")
            dev = sam2_device(device)
            predictor = segmentation.load_video_predictor(str(ckpt), sam2_config_path(sam2_config), device=dev)
            try:
                m_r = _sam2_union(real, m_r, predictor, prompt_frames)
                m_g = _sam2_union(gen, m_g, predictor, prompt_frames)
            finally:
                del predictor
                mm.soft_empty_cache()
        hook = common.progress_hook(real.shape[0], "recompose")
        bg = core.clean_background(real, m_r, removal_dilation, mode, smoothing, inpaint_radius,
                                   progress=hook, cancel=common.cancel_hook())
        out = core.recompose(gen, m_g, bg, mask_dilation, feather, cancel=common.cancel_hook())
        return io.NodeOutput(out, bg, m_g)


def dataset_root(folder: str) -> Path:
    """A relative dataset folder lives under ComfyUI's output directory; absolute paths are used as given."""
    return common.output_path(folder, "dataset_folder")


class DreamIDVQuadrupletWriter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DreamIDVQuadrupletWriter", display_name="DreamID-V Quadruplet Writer", category=common.CATEGORY,
            is_output_node=True, not_idempotent=True,
            description="Writes the forward sample {identity I_g, driving V_r, target V_g} and the backward sample "
                        "{identity of the real person, driving V'_g, target V_r} in the training dataset format "
                        "(training/DATASET.md), with ArcFace similarities; pairs whose identity is off are rejected "
                        "(reported, not written). Existing samples are skipped; no half-written sample is left.",
            inputs=[
                io.String.Input("dataset_folder", default="dreamidv_dataset",
                                tooltip="Dataset folder (relative: under ComfyUI's output folder)."),
                io.String.Input("sample_prefix", default="clip_0001", tooltip="Sample names: <prefix>_forward and "
                                "<prefix>_backward (a rerun with the same prefix skips them)."),
                io.Image.Input("real_frames", tooltip="The real clip V_r (person A)."),
                io.Image.Input("generated", tooltip="V_g: the IVS output (V_r with I_g's face); forward target."),
                io.Image.Input("identity_image", tooltip="I_g: the generated identity image; forward identity."),
                io.Mask.Input("forward_mask", tooltip="Face mask of V_r (forward driving)."),
                io.Mask.Input("backward_mask", optional=True, tooltip="Face mask of V'_g (backward driving); needed "
                              "for the backward sample."),
                io.Image.Input("forward_pose", optional=True, tooltip="Pose of V_r retargeted onto I_g (the expression "
                               "adaptation output). Connect both poses (full model) or neither (faster model)."),
                io.Image.Input("backward_pose", optional=True, tooltip="Pose of V'_g retargeted onto the real person."),
                io.Image.Input("recomposed", optional=True, tooltip="V'_g (Background Recompose output): backward "
                               "driving. Unconnected: V_g."),
                io.Image.Input("real_identity", optional=True, tooltip="A photo of the real person from another shot "
                               "or time (backward identity). Unconnected: the clip's frame 0 (noted in record.json)."),
                io.Combo.Input("directions", options=["both", "forward", "backward"], default="both",
                               tooltip="Which samples to write."),
                io.Float.Input("fps", default=24.0, min=1.0, max=240.0, step=0.001, tooltip="Frame rate of the videos."),
                io.Float.Input("min_identity_target", default=0.3, min=-1.0, max=1.0, step=0.01,
                               tooltip="Reject when ArcFace(identity, target) mean is below this (-1: off)."),
                io.Float.Input("max_identity_driving", default=0.5, min=-1.0, max=1.0, step=0.01,
                               tooltip="Reject when ArcFace(identity, driving) mean is above this (1: off)."),
                io.Int.Input("similarity_stride", default=1, min=1, max=100,
                             tooltip="Measure ArcFace on every k-th frame (faster; the others are null)."),
                io.Combo.Input("insightface_pack", options=list(id_core.PACK_NAMES), default="antelopev2",
                               tooltip="insightface pack in models/insightface/models/<pack>/ (ArcFace)."),
                common.onnx_provider_input("face detection and ArcFace"),
                io.Int.Input("detection_size", default=640, min=128, max=2048, step=32, tooltip="Face detection size."),
                io.Float.Input("detection_threshold", default=0.5, min=0.05, max=0.99, step=0.01,
                               tooltip="Minimum detector confidence."),
                io.String.Input("source", default="", optional=True, tooltip="Provenance for record.json (e.g. the "
                                "raw video path)."),
            ],
            outputs=[
                io.String.Output("summary", display_name="summary", tooltip="Written / skipped / rejected samples."),
                io.Int.Output("written", display_name="written", tooltip="Samples written by this run."),
            ],
        )

    @classmethod
    def execute(cls, dataset_folder, sample_prefix, real_frames, generated, identity_image, forward_mask,
                backward_mask=None, forward_pose=None, backward_pose=None, recomposed=None, real_identity=None,
                directions="both", fps=24.0, min_identity_target=0.3, max_identity_driving=0.5, similarity_stride=1,
                insightface_pack="antelopev2", provider="auto", detection_size=640, detection_threshold=0.5,
                source="") -> io.NodeOutput:
        root = dataset_root(dataset_folder)
        dirs = DIRECTIONS if directions == "both" else (directions,)
        settings = QuadrupletSettings(
            fps=float(fps), directions=dirs, similarity_stride=similarity_stride,
            min_identity_target=None if min_identity_target <= -1 else float(min_identity_target),
            max_identity_driving=None if max_identity_driving >= 1 else float(max_identity_driving),
            source={"video": source or None, "pipeline": "SyncID-Pipe graph v1"})
        pack_dir = id_core.find_pack(folder_paths.get_folder_paths("insightface"), insightface_pack)
        analyzer = id_core.load_analyzer(pack_dir, provider, detection_size, detection_threshold)
        bar = common.progress_hook(len(dirs), "write")
        reports = core.write_quadruplet(
            root, sample_prefix, rgb_frames(real_frames, "real_frames"), rgb_frames(generated, "generated"),
            identity_image, core.analyzer_encoder(analyzer), forward_mask=forward_mask, forward_pose=forward_pose,
            backward_mask=backward_mask, backward_pose=backward_pose, generated_recomposed=recomposed,
            real_identity=real_identity, settings=settings, progress=bar,
            cancel=common.cancel_hook())
        text = f"{root}: " + summary(reports)
        return io.NodeOutput(text, sum(r.status == "written" for r in reports), ui={"text": [text]})


NODES = [DreamIDVFirstLastFrames, DreamIDVImageFaceSwap, DreamIDVExpressionAdaptation, DreamIDVBackgroundRecompose,
         DreamIDVQuadrupletWriter]
