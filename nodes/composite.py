"""DreamID-V node: SAM2 background composite (generated head over the original frames)."""
from __future__ import annotations


import comfy.model_management
import folder_paths
import torch
from comfy_api.latest import io

from dreamidv_core.preprocess import composite as core
from dreamidv_core.preprocess import segmentation
from dreamidv_core.errors import CheckpointError

from . import common

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
            display_name="SAM2 background composite",
            category=common.CATEGORY,
            description="Segments the head with SAM2 (prompted by the face mask of the first frames and tracked "
                        "through the clip), feathers it and pastes the generated frames inside it over the original "
                        "frames: background, hair outside the head and everything else keep the source's pixels.",
            inputs=[
                io.Image.Input("frames", tooltip="The original source frames."),
                io.Image.Input("generated", tooltip="The swapped frames on the source geometry (the sampler's output). "
                                                    "If there are fewer of them than source frames (the sampler keeps "
                                                    "4k+1 frames), the first source frames are used."),
                io.Mask.Input("face_mask", tooltip="Face mask of the source frames (from the pose node); SAM2 is "
                                                  "prompted with it and the result always contains it."),
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
            ],
            outputs=[
                io.Image.Output("composited", display_name="frames", tooltip="The composited frames."),
                io.Mask.Output("blend_mask", display_name="mask", tooltip="The feathered blend mask (1 = generated)."),
            ],
        )

    @classmethod
    def execute(cls, frames, generated, face_mask, sam2_checkpoint, sam2_config="auto", prompt_frames=4,
                mask_dilation=8, feather=16, device="auto") -> io.NodeOutput:
        if face_mask.dim() == 2:
            face_mask = face_mask[None]
        count = core.check_inputs(frames, generated, face_mask)  # fail before loading anything
        frames, face_mask = frames[:count], face_mask[:count]
        dev = sam2_device(device)
        if sam2_checkpoint == NO_SAM2:
            out, mask = core.composite_video(frames, generated, face_mask, None, mask_dilation, feather,
                                             device=dev, cancel=common.cancel_hook())
            return io.NodeOutput(out, mask)
        ckpt = str(common.resolve_model_file(SAM2_FOLDER, sam2_checkpoint, "one of " + ", ".join(segmentation.OFFICIAL_NAMES)))
        config = sam2_config_path(sam2_config)
        if dev.type != "cpu":
            comfy.model_management.free_memory(3 * 1024 ** 3, dev)
        predictor = segmentation.load_video_predictor(ckpt, config, device=dev)
        try:
            head = segmentation.track_head(predictor, frames, face_mask, prompt_frames,
                                           progress=common.progress_hook(count, "segment"),
                                           cancel=common.cancel_hook())
        finally:
            del predictor
            comfy.model_management.soft_empty_cache()
        out, mask = core.composite_video(frames, generated, face_mask, head, mask_dilation, feather,
                                         device=dev, cancel=common.cancel_hook())
        return io.NodeOutput(out, mask)


NODES = [BackgroundComposite]
