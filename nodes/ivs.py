"""DreamID-V nodes: the Identity-Anchored Video Synthesizer (IVS) of the data-synthesis graph.

* ``DreamIDVIVSLoader``: IVS weights, or a new IVS initialised from a DreamID-V (full/faster) or
  Wan2.1-T2V file (:func:`dreamidv_core.pipelines.ivs.load_ivs`) -> DREAMIDV_MODEL (variant "ivs") and a report.
* ``DreamIDVIVSSampler``: IVS model + VAE + text + first IMAGE + last IMAGE + pose IMAGE -> the generated
  frames (:func:`dreamidv_core.pipelines.ivs.sample_ivs`), at model resolution; clips longer than ``window`` frames
  are sampled in overlapping windows (as the swap sampler).
"""
from __future__ import annotations

import logging

import torch

import comfy.model_management as mm
import comfy.model_patcher
import folder_paths
from comfy_api.latest import io

from dreamidv_core.pipelines.adapters import PixelSpaceVAE, rgb_frames
from dreamidv_core.models.attention import BACKENDS
from dreamidv_core.weights.checkpoints import WEIGHT_DTYPES
from dreamidv_core.errors import CheckpointError, InputError
from dreamidv_core.pipelines.ivs import IVSSettings, check_ivs_model, ivs_plan, sample_ivs
from dreamidv_core.weights.checkpoints import load_ivs
from dreamidv_core.models.frame_grid import MIN_FRAMES
from dreamidv_core.sampling.windows import check_window

from . import common
from .loaders import DEVICE_CHOICES, LoadedDiT, model_devices
from .sampler import conditioning_context, memory_estimate, sampling_inputs, window_inputs

log = logging.getLogger(__name__)

FOLDERS = ("diffusion_models", "dreamidv")
EXPECTED = ("IVS weights (saved by the IVS training), or a DreamID-V (dreamidv.pth / dreamidv_faster.pth) or "
            "Wan2.1-T2V-1.3B DiT file to initialise a new IVS from")
MAX_SIZE = 4096

_MODELS = common.ModelCache()


def ivs_choices() -> list:
    """Weight files in diffusion_models and the dreamidv folder (the first folder wins on a name clash)."""
    names = []
    for folder in FOLDERS:
        if folder in folder_paths.folder_names_and_paths:
            names += common.model_choices(folder, (".safetensors", ".pth", ".pt"))
    return list(dict.fromkeys(names))


def resolve_ivs_file(name: str):
    for folder in FOLDERS:
        try:
            return common.resolve_model_file(folder, name, EXPECTED)
        except CheckpointError:
            continue
    raise CheckpointError(name or "(no file chosen)", f"not found in {common.folder_hint(FOLDERS[0])} nor "
                                                      f"{common.folder_hint(FOLDERS[1])}; put {EXPECTED} there")


def load_ivs_model(name: str, weight_dtype: str = "bf16", attention: str = "sdpa", device: str = "auto",
                   seed: int = 0):
    """-> (LoadedDiT of an IVS, report str). The same object while anything holds it (same file, options)."""
    path = resolve_ivs_file(name)
    key = ("ivs", common.FileStamp.of(path), weight_dtype, attention, device, seed)

    def load():
        load_device, offload_device = model_devices(device)
        dit, report = load_ivs(path, weight_dtype=weight_dtype, device=offload_device, attention_backend=attention,
                               seed=seed)
        text = f"{name}: IVS weights loaded" if report is None else f"{name}: {report.summary()}"
        patcher = comfy.model_patcher.ModelPatcher(dit, load_device=load_device, offload_device=offload_device)
        handle = LoadedDiT(patcher=patcher, name=name, path=str(path), key=common.cache_key_text(key),
                           offload_after=(device == "auto_offload"))
        log.info("DreamID-V: %s", text)
        return handle, text

    return _MODELS.get_or_load(key, load)


class DreamIDVIVSLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DreamIDVIVSLoader",
            display_name="DreamID-V IVS Loader",
            category=common.CATEGORY,
            description="Loads the Identity-Anchored Video Synthesizer (first frame + last frame + pose video -> "
                        "video), or initialises one from DreamID-V or Wan2.1-T2V weights (new input channels "
                        "zero, pose gates zero when the file has no pose branch; train it before use).",
            inputs=[
                io.Combo.Input("model_name", options=ivs_choices(),
                               tooltip=f"A file in models/diffusion_models or models/dreamidv: {EXPECTED}. What it "
                                       "is is detected from the file."),
                io.Combo.Input("weight_dtype", options=list(WEIGHT_DTYPES), default="bf16",
                               tooltip="Precision of the weights in memory (bf16 as released; fp32 for CPU checks)."),
                io.Combo.Input("attention", options=list(BACKENDS), default="sdpa",
                               tooltip="Attention kernel: sdpa (always available), flash or sage if installed."),
                io.Combo.Input("device", options=list(DEVICE_CHOICES), default="auto",
                               tooltip="auto: ComfyUI's GPU; auto_offload: GPU during a run, CPU after; cpu."),
                io.Int.Input("init_seed", default=0, min=0, max=2 ** 31 - 1, optional=True,
                             tooltip="Seed of a freshly initialised pose branch (only when initialising from a file "
                                     "without one, e.g. Wan2.1-T2V)."),
            ],
            outputs=[common.DreamIDVModel.Output(display_name="model", tooltip="The IVS (variant 'ivs')."),
                     io.String.Output(display_name="report",
                                      tooltip="What was loaded, or which tensors were copied / initialised.")],
        )

    @classmethod
    def validate_inputs(cls, model_name):
        try:
            resolve_ivs_file(model_name)
        except CheckpointError as exc:
            return str(exc)
        return True

    @classmethod
    def execute(cls, model_name, weight_dtype="bf16", attention="sdpa", device="auto", init_seed=0) -> io.NodeOutput:
        handle, report = load_ivs_model(model_name, weight_dtype, attention, device, init_seed)
        return io.NodeOutput(handle, report)


def _one_image(image, what: str, pick: int) -> torch.Tensor:
    frames = rgb_frames(image, what)
    if frames.shape[0] < 1:
        raise InputError(f"{what}: the IMAGE holds no image")
    return frames[pick]


class DreamIDVIVSSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DreamIDVIVSSampler",
            display_name="DreamID-V IVS Sampler",
            category=common.CATEGORY,
            description="Generates a video that starts at the first frame, ends at the last frame and moves like "
                        "the pose video (Wan first-last-frame conditioning + pose attention).",
            inputs=[
                common.DreamIDVModel.Input("model", tooltip="From DreamIDVIVSLoader."),
                io.Vae.Input("vae", tooltip="The Wan 2.1 VAE (Load VAE with wan_2.1_vae.safetensors)."),
                io.Conditioning.Input("positive", tooltip="Text context: DreamIDVTextContext, or CLIPTextEncode "
                                                          "with umT5-XXL (CLIPLoader type wan)."),
                io.Image.Input("first_frame", tooltip="The first frame (if several images, the first is used)."),
                io.Image.Input("last_frame", tooltip="The last frame (if several images, the last is used); same "
                                                     "size as first_frame."),
                io.Image.Input("pose_video", tooltip="Pose frames (same size as the first frame, at least length "
                                                     "frames) that drive the motion in between."),
                io.Int.Input("width", default=832, min=16, max=MAX_SIZE, step=16,
                             tooltip="Area width: frames are resized (down only) to at most width x height pixels, "
                                     "then centre-cropped to multiples of 16 (as the swap sampler)."),
                io.Int.Input("height", default=480, min=16, max=MAX_SIZE, step=16, tooltip="Area height."),
                io.Int.Input("length", default=0, min=0, max=100000,
                             tooltip=f"Frames to generate (at least {MIN_FRAMES}); 0: the pose video's length. The "
                                     "last frame is placed at the end of exactly this many frames."),
                *window_inputs(" The first window holds the first frame, the last window the last frame."),
                *sampling_inputs(io.Float.Input("guidance", default=1.0, min=0.0, max=30.0, step=0.1,
                                                tooltip="Text guidance u + g * (c - u) against the negative (or "
                                                        "empty) prompt; 1 skips the second pass.")),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="Negative text for guidance != 1 (default: the empty prompt)."),
            ],
            outputs=[io.Image.Output(display_name="frames",
                                     tooltip="The generated frames at model resolution (resized, centre-cropped).")],
        )

    @classmethod
    def execute(cls, model, vae, positive, first_frame, last_frame, pose_video, width=832, height=480, length=0,
                window=81, overlap=16, steps=20, shift=5.0, guidance=1.0, seed=0, sampler="unipc",
                negative=None) -> io.NodeOutput:
        if not hasattr(model, "patcher") or not hasattr(model, "dit"):
            raise InputError(f"model: expected the output of DreamIDVIVSLoader, got {type(model).__name__}")
        dit = model.dit
        check_ivs_model(dit)
        check_window(window, overlap)
        context = conditioning_context(positive, dit.cfg.text_dim)
        neg = conditioning_context(negative, dit.cfg.text_dim) if negative is not None and guidance != 1.0 else None
        first = _one_image(first_frame, "first_frame", 0)
        last = _one_image(last_frame, "last_frame", -1)
        pose = rgb_frames(pose_video, "pose_video")
        n = length or pose.shape[0]
        settings = IVSSettings(width=width, height=height, frames=n, steps=steps, shift=shift, guidance=guidance,
                               seed=seed, sampler=sampler, window=window, overlap=overlap)
        plan = ivs_plan(first, n, width, height, window, overlap)
        need = memory_estimate(dit, plan, cache_pose_kv=plan.layout.count == 1)
        adapter = PixelSpaceVAE(vae, after_encode=lambda: model.load(need))
        model.load(need)
        try:
            frames = sample_ivs(dit, adapter, first, last, pose, context, settings,
                                progress=common.progress_hook(steps), cancel=common.cancel_hook(),
                                negative_context=neg)
        finally:
            model.release()
        return io.NodeOutput(frames.to(mm.intermediate_device(), torch.float32))


NODES = [DreamIDVIVSLoader, DreamIDVIVSSampler]
