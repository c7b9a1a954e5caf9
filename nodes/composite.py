"""DreamID-V node: SAM2 background composite (generated head over the original frames).

Streaming: with a VIDEO source, the sampler's VIDEO and the pose node's DREAMIDV_POSE_MASK, SAM 2 reads the
source one frame at a time (its masks are kept compressed, a few KB a frame), then the frames are composited
and encoded a chunk at a time into the VIDEO output (the source's frame rate and sound), once, while the node
runs: Save Video then only copies the file. The IMAGE and MASK outputs hold the whole clip (~32 MB a 1080p
frame) and are made only when connected.
"""
from __future__ import annotations


import comfy.model_management
import folder_paths
import torch
from comfy_api.latest import io

from dreamidv_core.errors import CheckpointError, InputError
from dreamidv_core.pipelines.clips import CompositedClip, SwappedClip, track_heads
from dreamidv_core.pipelines.plan import FrameSpan, frame_range
from dreamidv_core.preprocess import segmentation
from dreamidv_core.io.video import even_size

from . import common
from .video import DreamIDVVideo, clip_of, plan_frames

SAM2_FOLDER = "sam2"
CKPT_SUFFIXES = (".pt", ".pth", ".safetensors")
NO_SAM2 = "none"  # composite inside the (dilated, feathered) face mask only: needs no sam2 package


def sam2_config_path(config: str):
    """'auto', a bundled config name, or a .yaml file in the sam2 folder -> what segmentation takes."""
    if config in ("", "auto") or config in segmentation.bundled_configs():
        return config or "auto"
    path = folder_paths.get_full_path(SAM2_FOLDER, config)
    if path is None:
        raise CheckpointError(config, f"SAM2 config not found in the '{SAM2_FOLDER}' model folder and not a bundled "
                              f"config ({', '.join(segmentation.bundled_configs())})")
    return path


def sam2_device(choice: str) -> torch.device:
    return torch.device("cpu") if choice == "cpu" else comfy.model_management.get_torch_device()


class BackgroundComposite(io.ComfyNode):
    """SAM2 head mask from the face mask, feathered, then generated pixels over the original frames."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        configs = ["auto"] + segmentation.bundled_configs() + common.model_choices(SAM2_FOLDER, (".yaml",))
        return io.Schema(
            node_id="DreamIDVBackgroundComposite",
            display_name="DreamID-V SAM2 Background Composite",
            category=common.CATEGORY,
            description="Segments the head with SAM2 (prompted by the face mask of the first frames and tracked "
                        "through the clip), feathers it and pastes the generated frames inside it over the original "
                        "frames: background, hair outside the head and everything else keep the source's pixels.",
            inputs=[
                io.MultiType.Input("frames", types=[io.Image, io.Video],
                                   tooltip="The original source frames: a VIDEO (Load Video; read a frame at a time) "
                                           "or IMAGE frames."),
                io.MultiType.Input("generated", types=[io.Image, io.Video],
                                   tooltip="The swapped frames on the source geometry: the sampler's video (or its "
                                           "frames_in_source). If there are fewer of them than source frames, the "
                                           "first frames of the range are used."),
                io.MultiType.Input("face_mask", types=[io.Mask, io.Video, common.PoseMask],
                                   tooltip="Face mask of the source frames: the pose node's pose_mask (or a MASK); "
                                           "SAM2 is prompted with it and the result always contains it."),
                io.Combo.Input("sam2_checkpoint", options=common.model_choices(SAM2_FOLDER, CKPT_SUFFIXES) + [NO_SAM2],
                               tooltip="SAM2 checkpoint in models/sam2 (sam2.1_hiera_tiny/small/base_plus/large.pt "
                                       "or the SAM 2.0 sam2_hiera_*.pt files). 'none': no SAM2 (and no sam2 "
                                       "package needed): the generated pixels are pasted inside the dilated, "
                                       "feathered face mask only."),
                io.Combo.Input("sam2_config", options=configs, default="auto",
                               tooltip="Model config: 'auto' tells it from the checkpoint; or a config bundled "
                                       "with the sam2 package, or a .yaml file in models/sam2."),
                io.Int.Input("prompt_frames", default=4, min=1, max=64,
                             tooltip="How many of the first frames with a face prompt SAM2 with their face mask."),
                io.Int.Input("mask_dilation", default=8, min=0, max=256,
                             tooltip="Grow the head mask (SAM2 result united with the face mask) by this many pixels."),
                io.Int.Input("feather", default=16, min=0, max=256,
                             tooltip="Width in pixels of the soft edge outside the mask (0: hard edge)."),
                io.Combo.Input("device", options=["auto", "cpu"], default="auto",
                               tooltip="Where SAM2 and the compositing run: 'auto' uses ComfyUI's device."),
                *common.frame_range_inputs(),
            ],
            outputs=[
                io.Image.Output("composited", display_name="frames",
                                tooltip="The composited frames, the source's size (an odd width or height loses its "
                                        "last column or row, so video encoders accept it; whole clip in memory: made "
                                        "only when connected)."),
                io.Mask.Output("blend_mask", display_name="mask",
                               tooltip="The feathered blend mask, 1 = generated (made only when connected)."),
                io.Video.Output("video", display_name="video",
                                tooltip="The composited frames as a VIDEO with the source's frame rate and sound, "
                                        "encoded while the node runs (never held whole): for Save Video."),
            ],
            hidden=[io.Hidden.prompt, io.Hidden.unique_id],
        )

    @classmethod
    def fingerprint_inputs(cls, **_inputs):
        return common.output_links_fingerprint()

    @classmethod
    def execute(cls, frames, generated, face_mask, sam2_checkpoint, sam2_config="auto", prompt_frames=4,
                mask_dilation=8, feather=16, device="auto", start_frame=0, select_every_nth=1) -> io.NodeOutput:
        source = clip_of(frames, "frames")
        gen = clip_of(_to_source_size(generated, source), "generated")
        picked = frame_range(source.count, None, start_frame, select_every_nth, minimum=1)
        if isinstance(gen, SwappedClip) and (gen.plan.start, gen.plan.stride) != (picked.start, picked.step):
            raise InputError(f"generated was swapped from {gen.plan.range_text()} but this node reads from "
                             f"start_frame {picked.start}, select_every_nth {picked.step}: set the sampler's frame "
                             "range here too")
        if gen.count > len(picked):
            raise InputError(f"generated has {gen.count} frames but frames has only {len(picked)}"
                             + (" in its frame range" if len(picked) < source.count else ""))
        if (gen.width, gen.height) != (source.width, source.height):
            raise InputError(f"generated frames are {gen.width}x{gen.height} but frames are {source.width}x"
                             f"{source.height}: map the generated frames back to the source size first (the "
                             "sampler's video or frames_in_source)")
        plan = FrameSpan.of(source.width, source.height, picked[:gen.count])
        original = source.select(plan.source_frames)
        dev = sam2_device(device)
        heads = None if sam2_checkpoint == NO_SAM2 else segment_heads(original, face_mask, plan, source.count,
                                                                       sam2_checkpoint, sam2_config, dev,
                                                                       prompt_frames)
        result = CompositedClip(original, gen, _PlanMask(face_mask, plan, source.count), heads, mask_dilation,
                                feather, device=dev)
        wanted = common.wanted_outputs(cls)
        use = (lambda slot: wanted is None or slot in wanted)
        out = mask = video = None
        if use(0) or use(1):
            out, mask = _composited_tensors(result, use(0), use(1))
        if use(2):
            video = DreamIDVVideo(result)
            video.render()  # encoded now, once: Save Video (and any later save) copies the file
        return io.NodeOutput(out, mask, video)


def segment_heads(original, face_mask, plan, source_count: int, sam2_checkpoint: str, sam2_config: str, dev,
                  prompt_frames: int):
    """The head masks SAM 2 tracks through ``original`` from the face mask (kept on disk, a chunk at a time)."""
    ckpt = str(common.resolve_model_file(SAM2_FOLDER, sam2_checkpoint, "one of " + ", ".join(segmentation.OFFICIAL_NAMES)))
    config = sam2_config_path(sam2_config)
    with plan_frames(face_mask, plan, "face_mask", "mask", source_count) as face:
        segmentation.prompt_frame_indices(face, 1)  # fail before loading anything when there is no face
        if dev.type != "cpu":
            comfy.model_management.free_memory(3 * 1024 ** 3, dev)
        predictor = segmentation.load_video_predictor(ckpt, config, device=dev)
        try:
            return track_heads(predictor, original, face, prompt_frames,
                               progress=common.progress_hook(plan.frames, "segment"), cancel=common.cancel_hook())
        finally:
            del predictor
            comfy.model_management.soft_empty_cache()


def _to_source_size(generated, source):
    """The sampler's ``frames_in_source`` of an odd-sized source lost their last row/column (video encoders need
    even sizes): give them back, repeated from the edge, so they line up with the source frames; the
    composite's own outputs lose them again (:func:`even_size`)."""
    if not isinstance(generated, torch.Tensor) or generated.dim() != 4:
        return generated
    h, w = int(generated.shape[1]), int(generated.shape[2])
    if (w, h) == (source.width, source.height) or (w, h) != (source.width - source.width % 2,
                                                             source.height - source.height % 2):
        return generated
    pad = (0, source.width - w, 0, source.height - h)  # (left, right, top, bottom) of [N, C, H, W]
    chw = generated.permute(0, 3, 1, 2).float()
    return torch.nn.functional.pad(chw, pad, mode="replicate").permute(0, 2, 3, 1).contiguous()


class _PlanMask:
    """The face mask of a frame range as a clip-like value: opened anew by every reader."""

    def __init__(self, value, plan, source_count: int):
        self.value, self.plan, self.source_count = value, plan, source_count

    def open(self):
        return plan_frames(self.value, self.plan, "face_mask", "mask", self.source_count)


def _composited_tensors(result: CompositedClip, frames: bool, masks: bool):
    """IMAGE [G, H, W, 3] and MASK [G, H, W] of the composite (the memory-hungry outputs), chunk by chunk; an odd
    width or height loses its last column or row (:func:`even_size`: video encoders need even sizes)."""
    h, w = even_size(torch.empty(0, result.height, result.width), "composited frames").shape[1:3]
    out = torch.empty(result.count, h, w, 3, dtype=torch.float32) if frames else None
    blend = torch.empty(result.count, h, w, dtype=torch.float32) if masks else None
    cancel = common.cancel_hook()
    with result.chunks() as parts:
        for a, chunk, m in parts:
            cancel()
            if out is not None:
                out[a:a + chunk.shape[0]] = chunk[:, :h, :w]
            if blend is not None:
                blend[a:a + m.shape[0]] = m[:, :h, :w]
    return out, blend


NODES = [BackgroundComposite]
