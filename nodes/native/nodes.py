"""DreamID-V on ComfyUI's own model and samplers (category "DreamID-V/native").

Load the checkpoint with core **Load Diffusion Model** (``dreamidv`` or ``dreamidv_faster``), apply LoRAs with
core LoRA loaders, then:

* ``DreamIDVApply``: MODEL + the same checkpoint file -> MODEL with the pose branch (and ArcFace ID projection),
  the reference's timesteps and flow shift (:mod:`.branch`);
* ``DreamIDVConditioning``: text + VAE + video + mask + reference (+ pose video, identity) -> positive, negative,
  empty latent for KSampler / SamplerCustomAdvanced (:mod:`.conditioning`; identity guidance g is CFG g + 1);
* ``DreamIDVDecode``: the sampled latent -> frames at model resolution and pasted into the source;
* ``DreamIDVSigmas``, ``DreamIDVUniPCSampler``, ``DreamIDVNoise``: the released schedule, sampler and seeds for
  SamplerCustomAdvanced (:mod:`.sampling`), the exact recipe;
* ``DreamIDVWindows``: long clips through ComfyUI's context windows with the pack's windows and blending.
"""
from __future__ import annotations

import logging

import torch

from comfy_api.latest import io

from dreamidv_core.sampling.samplers import flow_sigmas
from dreamidv_core.weights.checkpoints import dit_tensor
from dreamidv_core.weights.pose_branch import load_pose_branch

from .. import common
from ..loaders import DIT_FOLDER, ID_PROJECTION_EXPECTED, LORA_FOLDER, NONE, expected_dit_names, file_problem, \
    id_projection_choice, lora_patches
from ..sampler import MAX_SIZE
from ..video import mask_tensor
from . import branch as native_branch
from . import conditioning as native_conditioning
from .sampling import PackNoise, sample_flow_unipc, window_handler

log = logging.getLogger(__name__)

CATEGORY = common.CATEGORY + "/native"
_BRANCHES = common.ModelCache(keep_last=True)  # the last pose branch stays while DreamID-V Apply re-runs


def _branch_dtype(model) -> str:
    """Storage of the pose branch: the Wan model's compute dtype (bf16 for fp8 weights)."""
    dtype = model.model.manual_cast_dtype or model.model_dtype()
    return {torch.float32: "fp32", torch.float16: "fp16"}.get(dtype, "bf16")


def load_branch(model, model_name: str, id_projection: str = NONE):
    """(pose branch, its ModelPatcher) of ``diffusion_models/<model_name>`` for the core MODEL ``model``: cached while
    anything holds it; checked to be the checkpoint the MODEL was loaded from."""
    path = common.resolve_model_file(DIT_FOLDER, model_name, expected_dit_names())
    id_file = id_projection_choice(id_projection)
    dtype = _branch_dtype(model)
    key = (common.FileStamp.of(path), dtype, str(model.load_device), str(model.offload_device), id_file)

    def load():
        branch, cfg = load_pose_branch(path, dtype, model.offload_device, native_branch.ComfyOps,
                                       None if id_file is None else id_file.path)
        patcher = native_branch.branch_patcher_for(branch, model)
        log.info("DreamID-V: pose branch of %s (%s%s) for ComfyUI's Wan model", model_name, cfg.variant,
                 ", ID projection" if cfg.id_tokens else "")
        return patcher, cfg

    patcher, cfg = _BRANCHES.get_or_load(key, load)
    native_branch.check_same_checkpoint(model, cfg, dit_tensor(path, "blocks.0.modulation"), path)
    return patcher.model, patcher


class DreamIDVApply(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DreamIDVApply",
            display_name="DreamID-V Apply (native)",
            category=CATEGORY,
            description="Makes ComfyUI's Wan model (Load Diffusion Model with a DreamID-V checkpoint) compute "
                        "DreamID-V: adds the pose branch that core drops on load, read from the same file, the "
                        "reference's integer timesteps and flow shift. Works with core LoRA loaders, KSampler, "
                        "context windows and ComfyUI's memory management.",
            inputs=[
                io.Model.Input("model", tooltip="From Load Diffusion Model with dreamidv or dreamidv_faster (LoRA "
                                                "loaders may come before or after this node)."),
                io.Combo.Input("model_name", options=common.model_choices(DIT_FOLDER),
                               tooltip="The same checkpoint the model was loaded from: its pose branch (which "
                                       "core does not load) is read from it. Checked against the model."),
                io.Float.Input("shift", default=5.0, min=0.01, max=100.0, step=0.1,
                               tooltip="Flow-matching sigma shift for KSampler's schedulers (released: 5). "
                                       "DreamID-V Sigmas sets its own."),
                io.Combo.Input("id_projection", options=[NONE] + common.model_choices(LORA_FOLDER, (".safetensors",)),
                               default=NONE, optional=True,
                               tooltip=f"An ArcFace ID-token projection in models/{LORA_FOLDER} "
                                       f"({ID_PROJECTION_EXPECTED}); the conditioning then needs the identity."),
            ],
            outputs=[io.Model.Output(display_name="model",
                                     tooltip="A clone of the model that computes DreamID-V (the input is unchanged).")],
        )

    @classmethod
    def validate_inputs(cls, model_name, **kwargs):
        return file_problem(DIT_FOLDER, model_name, expected_dit_names()) or True

    @classmethod
    def execute(cls, model, model_name, shift=5.0, id_projection=NONE) -> io.NodeOutput:
        branch, patcher = load_branch(model, model_name, id_projection)
        return io.NodeOutput(native_branch.patch_model(model, branch, patcher, model_name, shift))


class DreamIDVConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DreamIDVConditioning",
            display_name="DreamID-V Conditioning (native)",
            category=CATEGORY,
            description="Builds DreamID-V's positive (the reference) and negative (the zeroed reference) with the "
                        "video and mask latents, and the empty latent, for KSampler or SamplerCustomAdvanced. "
                        "Identity guidance g is CFG g + 1 (released: cfg 5).",
            inputs=[
                io.Conditioning.Input("positive", tooltip="The text context of \"chang face\": DreamIDVTextContext, "
                                                          "or CLIPTextEncode with umT5-XXL (CLIPLoader type wan)."),
                io.Vae.Input("vae", tooltip="The Wan 2.1 VAE."),
                io.Image.Input("video", tooltip="Frames to swap."),
                io.Mask.Input("mask", tooltip="Face mask per frame (white = face region), same length and size as "
                                              "the video."),
                io.Image.Input("reference", tooltip="The reference face photo (letterboxed onto the frame size, "
                                                    "as the released pipeline does)."),
                io.Int.Input("width", default=832, min=16, max=MAX_SIZE, step=16,
                             tooltip="Area width: frames are resized (down only) to at most width x height, keeping "
                                     "the aspect ratio, then centre-cropped to multiples of 16 (released: 832x480)."),
                io.Int.Input("height", default=480, min=16, max=MAX_SIZE, step=16, tooltip="Area height."),
                io.Int.Input("frame_num", default=0, min=0, max=100000,
                             tooltip="0: the whole clip; otherwise its first frame_num frames (at least 5)."),
                io.Image.Input("pose_video", optional=True,
                               tooltip="Pose frames (DreamID-V Pose Extract), same size as the video: needed by the "
                                       "full model, ignored by the faster one."),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="Text of the pass without the reference; default: the positive text "
                                              "(the released recipe)."),
                common.Identity.Input("identity", optional=True,
                                      tooltip="The DreamID-V identity: its ArcFace embedding for a model with an "
                                              "ID-token projection (and its latent, if made for this clip)."),
            ],
            outputs=[
                io.Conditioning.Output(display_name="positive", tooltip="Text + reference + video/mask latents + pose."),
                io.Conditioning.Output(display_name="negative", tooltip="The same with the zeroed reference."),
                io.Latent.Output(display_name="latent", tooltip="Empty latent of the clip (padded to 4n+1 frames), "
                                                                "with the clip's plan for DreamID-V Decode."),
            ],
        )

    @classmethod
    def execute(cls, positive, vae, video, mask, reference, width=832, height=480, frame_num=0, pose_video=None,
                negative=None, identity=None) -> io.NodeOutput:
        return io.NodeOutput(*native_conditioning.build(
            positive, negative, vae, video, mask_tensor(mask).float().clamp(0, 1), reference, pose_video, identity,
            width, height, frame_num or None))


class DreamIDVDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DreamIDVDecode",
            display_name="DreamID-V Decode (native)",
            category=CATEGORY,
            description="Decodes the sampled latent window by window, drops the padding frames and pastes the "
                        "frames back into the source video.",
            inputs=[
                io.Vae.Input("vae", tooltip="The Wan 2.1 VAE."),
                io.Latent.Input("samples", tooltip="The sampled latent (from DreamID-V Conditioning's latent)."),
                io.Image.Input("video", tooltip="The source video given to DreamID-V Conditioning."),
                io.Int.Input("vae_tile", default=0, min=0, max=512, step=8,
                             tooltip="Decode in spatial tiles of this many latent pixels (0: no tiles)."),
                io.Int.Input("vae_tile_overlap", default=8, min=0, max=256,
                             tooltip="Latent pixels neighbouring tiles share."),
            ],
            outputs=[
                io.Image.Output(display_name="frames", tooltip="Swapped frames at model resolution."),
                io.Image.Output(display_name="frames_in_source",
                                tooltip="The swapped frames resized back into the source frames (an odd width or "
                                        "height loses its last column or row, so video encoders accept it)."),
                io.Int.Output(display_name="frame_count", tooltip="Frames swapped."),
            ],
        )

    @classmethod
    def execute(cls, vae, samples, video, vae_tile=0, vae_tile_overlap=8) -> io.NodeOutput:
        return io.NodeOutput(*native_conditioning.decode(vae, samples, video, vae_tile, vae_tile_overlap))


class DreamIDVSigmas(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DreamIDVSigmas",
            display_name="DreamID-V Sigmas",
            category=CATEGORY,
            description="The released flow UniPC schedule (steps + 1 sigmas from 0.999, shifted, ending at 0).",
            inputs=[
                io.Int.Input("steps", default=20, min=1, max=200, tooltip="Sampling steps (released: 20)."),
                io.Float.Input("shift", default=5.0, min=0.01, max=100.0, step=0.1,
                               tooltip="Flow-matching sigma shift (released: 5)."),
            ],
            outputs=[io.Sigmas.Output(tooltip="float32, bit-identical to the reference scheduler's sigmas.")],
        )

    @classmethod
    def execute(cls, steps=20, shift=5.0) -> io.NodeOutput:
        return io.NodeOutput(flow_sigmas(steps, shift=shift, dtype=torch.float32))


class DreamIDVUniPCSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DreamIDVUniPCSampler",
            display_name="DreamID-V UniPC Sampler",
            category=CATEGORY,
            description="The released flow-matching UniPC (bh2) as a SAMPLER for SamplerCustomAdvanced; ComfyUI's "
                        "uni_pc samplers are a different (VP/VE) method.",
            inputs=[io.Int.Input("order", default=2, min=1, max=2, tooltip="Solver order (released: 2).")],
            outputs=[io.Sampler.Output(tooltip="The released multistep UniPC solver (order as set), for "
                                                "SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls, order=2) -> io.NodeOutput:
        import comfy.samplers  # imported here: it pulls scipy, which a bare ComfyUI install may lack at load time

        return io.NodeOutput(comfy.samplers.KSAMPLER(sample_flow_unipc, extra_options={"order": int(order)}))


class DreamIDVNoise(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DreamIDVNoise",
            display_name="DreamID-V Noise",
            category=CATEGORY,
            description="The pack's noise for SamplerCustomAdvanced: the same seed gives the same result as the "
                        "DreamID-V Sampler node (and the official code) on a GPU.",
            inputs=[
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Noise seed."),
                io.Combo.Input("device", options=["model", "cpu"], default="model",
                               tooltip="Where the generator runs: model (the sampling device, as the pack) or cpu "
                                       "(as ComfyUI's RandomNoise)."),
            ],
            outputs=[io.Noise.Output(tooltip="The reference's seeded starting noise, for SamplerCustomAdvanced (same "
                                              "seed, same noise as the pack's sampler).")],
        )

    @classmethod
    def execute(cls, seed=0, device="model") -> io.NodeOutput:
        return io.NodeOutput(PackNoise(seed, device))


class DreamIDVWindows(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DreamIDVWindows",
            display_name="DreamID-V Windows (native)",
            category=CATEGORY,
            description="Long clips: ComfyUI's context windows with the pack's layout (last window aligned to the "
                        "end) and its linear blending of the overlaps, applied at every step.",
            inputs=[
                io.Model.Input("model", tooltip="The model after DreamID-V Apply."),
                io.Int.Input("window", default=81, min=5, max=1001, step=4,
                             tooltip="Frames the model sees at once (4n+1; trained on 81)."),
                io.Int.Input("overlap", default=16, min=0, max=1000, step=4,
                             tooltip="Frames shared by neighbouring windows (a multiple of 4, smaller than window)."),
            ],
            outputs=[io.Model.Output(tooltip="A clone that samples clips longer than a window window by window.")],
        )

    @classmethod
    def execute(cls, model, window=81, overlap=16) -> io.NodeOutput:
        import comfy.context_windows

        m = model.clone()
        m.model_options["context_handler"] = window_handler(window, overlap)
        comfy.context_windows.create_prepare_sampling_wrapper(m)
        return io.NodeOutput(m)


def _weight_keys(module, prefix: str = "") -> dict:
    """{layer name: its weight's key} of every layer of ``module`` with a weight."""
    return {n: f"{prefix}{n}.weight" for n, m in module.named_modules()
            if isinstance(getattr(m, "weight", None), torch.Tensor)}


class DreamIDVLoraLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DreamIDVLoraLoader",
            display_name="DreamID-V LoRA (native)",
            category=CATEGORY,
            description="A LoRA on the native model, pose branch included: every format the pack reads (this "
                        "pack's, also from before 0.3; ComfyUI/diffusers lora_A/lora_B, diffusers' Wan names; kohya "
                        "lora_down/lora_up + alpha). Core's LoRA loaders do the same for the Wan layers; use this one "
                        "for LoRAs that adapt the pose layers (k_pose, v_pose, project_pose).",
            inputs=[
                io.Model.Input("model", tooltip="The model after DreamID-V Apply."),
                io.Combo.Input("lora_name", options=common.model_choices(LORA_FOLDER, (".safetensors",)),
                               tooltip=f"A LoRA in models/{LORA_FOLDER}."),
                io.Float.Input("strength", default=1.0, min=-4.0, max=4.0, step=0.05,
                               tooltip="How much of the LoRA to apply (a weight patch: nothing is reloaded)."),
            ],
            outputs=[io.Model.Output(tooltip="A clone with the LoRA patched in (the input is unchanged).")],
        )

    @classmethod
    def validate_inputs(cls, lora_name, **kwargs):
        return file_problem(LORA_FOLDER, lora_name, "a LoRA file") or True

    @classmethod
    def execute(cls, model, lora_name, strength=1.0) -> io.NodeOutput:
        path = common.resolve_model_file(LORA_FOLDER, lora_name, "a LoRA file")
        m = model.clone()
        targets = _weight_keys(m.get_model_object("diffusion_model"), "diffusion_model.")
        branches = m.get_additional_models_with_key(native_branch.KEY)
        if branches:
            targets.update(_weight_keys(branches[0].model))
        patches = lora_patches(path, targets)
        m.add_patches({k: v for k, v in patches.items() if k.startswith("diffusion_model.")}, strength)
        if branches:
            branches[0].add_patches({k: v for k, v in patches.items() if not k.startswith("diffusion_model.")},
                                    strength)
        log.info("DreamID-V: LoRA %s at strength %g patches %d weights", lora_name, strength, len(patches))
        return io.NodeOutput(m)


NODES = [DreamIDVApply, DreamIDVLoraLoader, DreamIDVConditioning, DreamIDVDecode, DreamIDVSigmas, DreamIDVUniPCSampler, DreamIDVNoise,
         DreamIDVWindows]
