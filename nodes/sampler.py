"""DreamID-V nodes: the PoseGuider and the pose-attention DiT sampler.

* ``DreamIDVPoseGuider``: model + pose video -> DREAMIDV_POSE_TOKENS (a
  :class:`~dreamidv_core.pipelines.adapters.PoseTokenSet`: the PoseGuider tokens, computed once, and the
  geometry they belong to).
* ``DreamIDVSampler``: model + VAE + text context + identity + pose tokens + video + mask -> the swapped
  frames at model resolution, the same frames pasted back into the source frames, the frame count, and the
  result as a VIDEO (pasted back, the source's frame rate and sound).

Streaming (VIDEO in, VIDEO out): the video is read from its file a piece at a time, the mask drawn on demand
from the pose node's DREAMIDV_POSE_MASK, and the decoded frames go to a file at the model's resolution
(exact, uint8) in ComfyUI's temporary folder; the VIDEO output pastes them into the source frames and
encodes them when it is saved. The IMAGE outputs hold the whole clip (frames_in_source: ~24 MB a 1080p
frame) and are made only when connected.
  A model with a trained ArcFace ID-token projection also gets the identity's ArcFace embedding; if the
  identity has none (face detection off or no face found) the sampler stops with an error rather than
  silently sampling without the identity signal the projection was trained to use.
"""
from __future__ import annotations

import logging

import torch

import comfy.model_management as mm
from comfy_api.latest import io

from dreamidv_core.errors import InputError
from dreamidv_core.io.video import even_size
from dreamidv_core.pipelines.adapters import PixelSpaceVAE, PoseTokenSet, context_from_conditioning
from dreamidv_core.pipelines.clips import CHUNK, StoreSink, SwappedClip, to_float_frames
from dreamidv_core.pipelines.plan import ClipPlan, face_crop_plan
from dreamidv_core.preprocess.face_crop import DEFAULT_MARGIN, mask_presence
from dreamidv_core.pipelines.swap import SwapSettings, id_embedding_rows, pose_tokens_for, swap_face
from dreamidv_core.preprocess.identity_bundle import encode_reference
from dreamidv_core.sampling.samplers import SAMPLERS

from . import common
from .video import DreamIDVVideo, clip_of, plan_frames, source_geometry

log = logging.getLogger(__name__)

MAX_SIZE = 4096


def _geometry_inputs():
    return [
        io.Int.Input("width", default=832, min=16, max=MAX_SIZE, step=16,
                     tooltip="Area width: frames are resized (down only) to at most width x height pixels, keeping "
                             "the video's aspect ratio, then centre-cropped to multiples of 16. 832x480 is the "
                             "released setting; 1280x720 for more detail."),
        io.Int.Input("height", default=480, min=16, max=MAX_SIZE, step=16,
                     tooltip="Area height (see width)."),
        io.Int.Input("frame_num", default=0, min=0, max=100000, step=1,
                     tooltip="0: swap the whole clip (or range). Otherwise swap at most frame_num frames: the "
                             "first ones of the range start_frame / select_every_nth sets (at least 5)."),
        *window_inputs(),
    ]


def window_inputs(note: str = "") -> list:
    """``window`` / ``overlap``: the long-clip windowing of :mod:`dreamidv_core.sampling.windows` (swap and IVS)."""
    return [
        io.Int.Input("window", default=81, min=5, max=1001, step=4,
                     tooltip="Frames the model sees at once (4n+1; the released model was trained on 81). Longer "
                             "clips are sampled in overlapping windows blended at every step (no seams)." + note),
        io.Int.Input("overlap", default=16, min=0, max=1000, step=4,
                     tooltip="Frames shared by neighbouring windows (a multiple of 4, smaller than window). More "
                             "overlap: smoother results across windows, more compute."),
    ]


def sampling_inputs(guidance) -> list:
    """steps, shift, ``guidance`` (the node's own guidance input), seed, sampler: the flow-matching settings
    every DreamID-V sampling node declares, in this order."""
    return [
        io.Int.Input("steps", default=20, min=1, max=200, tooltip="Sampling steps (released: 20)."),
        io.Float.Input("shift", default=5.0, min=0.01, max=100.0, step=0.1,
                       tooltip="Flow-matching sigma shift (released: 5)."),
        guidance,
        io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                     tooltip="Noise seed; the same seed gives the same result."),
        io.Combo.Input("sampler", options=list(SAMPLERS), default="unipc",
                       tooltip="unipc: the released flow-matching UniPC (order 2); euler: first order."),
    ]


def face_crop_inputs() -> list:
    """``face_crop`` / ``crop_margin``: face-crop mode (:mod:`dreamidv_core.preprocess.face_crop`), the same on
    the PoseGuider and the sampler."""
    return [
        io.Boolean.Input("face_crop", default=False, optional=True,
                         tooltip="Off (as released): the whole frame is resized to the model's area. On: each frame "
                                 "is cropped to a window around the face of the mask (width x height aspect ratio, "
                                 "smoothed over time, inside the frame), swapped at the model's resolution and "
                                 "pasted back into the full-resolution frames through a feathered edge: small faces "
                                 "in large frames get many more model pixels. Set it the same on the PoseGuider."),
        io.Float.Input("crop_margin", default=DEFAULT_MARGIN, min=0.0, max=5.0, step=0.05, optional=True,
                       tooltip="Face crop: context around the face, in face sizes on each side (1: the face is a "
                               "third of the window's height). Same value on the PoseGuider."),
    ]


IDENTITY_GUIDANCE_TOOLTIP = ("Identity guidance: pred = c + g * (c - u), with u the pass without the reference. "
                             "0 skips the second pass (released: 4).")


def _check_model(model):
    if not hasattr(model, "patcher") or not hasattr(model, "dit"):
        raise InputError(f"model: expected the output of DreamIDVModelLoader, got {type(model).__name__}")


def memory_estimate(dit, plan: ClipPlan, batch: int = 1, cache_pose_kv: bool = True) -> int:
    """Rough bytes the DiT needs besides its weights for one window of the plan (activations, cached pose K/V)."""
    cfg = dit.cfg
    size = torch.empty((), dtype=dit.compute_dtype).element_size()
    latent_frames = plan.layout.latent_window
    tokens = (latent_frames + 1) * plan.tokens_per_latent_frame  # video latent frames + the reference frame
    act = batch * tokens * (cfg.ffn_dim + 8 * cfg.dim) * size
    grid = (latent_frames, *plan.latent_grid[1:])
    pose_kv = dit.pose_kv_cache_bytes(grid) if (cfg.has_pose and cache_pose_kv) else 0
    return int(act + pose_kv)


class DreamIDVPoseGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DreamIDVPoseGuider",
            display_name="DreamID-V PoseGuider",
            category=common.CATEGORY,
            description="Turns the pose video into the full model's pose tokens, once per video.",
            inputs=[
                common.DreamIDVModel.Input("model", tooltip="The full DreamID-V model (the faster one has no "
                                                            "pose branch)."),
                io.MultiType.Input("pose_video", types=[io.Image, io.Video, common.PoseMask],
                                   tooltip="The pose node's pose_mask (drawn on demand), or pose frames (IMAGE or "
                                           "VIDEO) of the same length and size as the video to swap."),
                *_geometry_inputs(),
                io.MultiType.Input("mask", types=[io.Mask, io.Video, common.PoseMask], optional=True,
                                   tooltip="Face crop only: the face mask (the pose node's pose_mask or mask), the "
                                           "same one the sampler gets; the crop windows follow it."),
                *face_crop_inputs(),
                *common.frame_range_inputs(),
            ],
            outputs=[common.PoseTokens.Output(display_name="pose_tokens",
                                              tooltip="Pose tokens and the clip geometry they were made for.")],
        )

    @classmethod
    def execute(cls, model, pose_video, width=832, height=480, frame_num=0, window=81, overlap=16, mask=None,
                face_crop=False, crop_margin=DEFAULT_MARGIN, start_frame=0, select_every_nth=1) -> io.NodeOutput:
        _check_model(model)
        if not model.dit.cfg.has_pose:
            raise InputError(f"model: {model.name} is the faster DreamID-V variant, which has no pose branch; "
                             "connect the mask straight to the sampler and leave pose_tokens empty")
        src_w, src_h, available = source_geometry(pose_video, "pose_video")
        plan = ClipPlan.build(src_w, src_h, available, frame_num or None, width, height, window, overlap,
                              start_frame, select_every_nth)
        if face_crop:
            plan = face_crop_clip_plan(plan, available, window, overlap, crop_margin, mask)
        model.load(memory_estimate(model.dit, plan, cache_pose_kv=False))
        try:
            with plan_frames(pose_video, plan, "pose_video", "pose") as pose:
                tokens = pose_tokens_for(model.dit, pose, plan, cancel=common.cancel_hook()).to("cpu")
        finally:
            model.release()
        return io.NodeOutput(PoseTokenSet(tokens=tokens, plan=plan, model_key=model.key))


def conditioning_context(positive, text_dim: int) -> torch.Tensor:
    """ComfyUI CONDITIONING -> [L, text_dim] (DreamIDVTextContext's, or CLIPTextEncode's umT5 output)."""
    if not isinstance(positive, (list, tuple)) or not positive or not isinstance(positive[0], (list, tuple)):
        raise InputError("positive: expected CONDITIONING (DreamIDVTextContext, or CLIPTextEncode with the umT5-XXL "
                         "encoder loaded by CLIPLoader type 'wan')")
    if len(positive) > 1:
        log.warning("DreamID-V: positive has %d conditioning entries; only the first is used", len(positive))
    cond, extra = positive[0][0], (positive[0][1] if len(positive[0]) > 1 else {})
    mask = extra.get("attention_mask") if isinstance(extra, dict) else None
    return context_from_conditioning(cond, mask, text_dim)


class DreamIDVSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DreamIDVSampler",
            display_name="DreamID-V Sampler",
            category=common.CATEGORY,
            description="Swaps the face in the video for the identity, with DreamID-V's pose-attention DiT.",
            inputs=[
                common.DreamIDVModel.Input("model", tooltip="From DreamIDVModelLoader."),
                io.Vae.Input("vae", tooltip="The Wan 2.1 VAE (ComfyUI's Load VAE with wan_2.1_vae.safetensors)."),
                io.Conditioning.Input("positive", tooltip="The text context of \"chang face\": DreamIDVTextContext, "
                                                          "or CLIPTextEncode with umT5-XXL (CLIPLoader type wan)."),
                common.Identity.Input("identity", tooltip="The reference face, from the DreamID-V identity node."),
                io.MultiType.Input("video", types=[io.Image, io.Video],
                                   tooltip="The clip to swap: a VIDEO (Load Video; read a piece at a time, its frame "
                                           "rate and sound kept) or IMAGE frames (alpha is dropped, greyscale "
                                           "becomes RGB)."),
                io.MultiType.Input("mask", types=[io.Mask, io.Video, common.PoseMask],
                                   tooltip="Face mask per frame (white = face region): the pose node's pose_mask "
                                           "(drawn on demand), or a MASK / mask VIDEO of the same length and size "
                                           "as the video."),
                *_geometry_inputs(),
                *sampling_inputs(io.Float.Input("identity_guidance", default=4.0, min=0.0, max=30.0, step=0.1,
                                                tooltip=IDENTITY_GUIDANCE_TOOLTIP)),
                io.Boolean.Input("batch_guidance", default=False,
                                 tooltip="Run both guidance passes as one batch: faster on a large GPU, uses more "
                                         "memory."),
                io.Float.Input("background_strength", default=0.0, min=0.0, max=1.0, step=0.05,
                               tooltip="Pull the latent outside the face mask back to the source video at every "
                                       "step (1: the background stays the source's; 0: off). A cheap complement "
                                       "to the SAM2 composite."),
                io.Float.Input("step_cache", default=0.0, min=0.0, max=2.0, step=0.01,
                               tooltip="Skip DiT evaluations whose input barely changed since the last computed "
                                       "one (TeaCache-like; 0 = off). Faster, slightly less faithful; calibrate "
                                       "the threshold on your clips (see benchmarks/bench_long.py)."),
                io.Int.Input("vae_tile", default=0, min=0, max=512, step=8,
                             tooltip="Decode in spatial tiles of this many latent pixels (x8 image pixels; e.g. "
                                     "40 = 320 px) so decoding 720p never needs more memory than sampling. "
                                     "0 = no tiles."),
                io.Int.Input("vae_tile_overlap", default=8, min=0, max=256, step=1,
                             tooltip="Latent pixels neighbouring tiles share and blend (smaller than vae_tile)."),
                common.PoseTokens.Input("pose_tokens", optional=True,
                                        tooltip="From DreamIDVPoseGuider; required by the full model, ignored by "
                                                "the faster one."),
                *face_crop_inputs(),
                *common.frame_range_inputs(),
            ],
            outputs=[
                io.Image.Output(display_name="frames",
                                tooltip="Swapped frames at model resolution (the resized, centre-cropped area; with "
                                        "face_crop: the face windows). Whole clip in memory: made only when "
                                        "connected."),
                io.Image.Output(display_name="frames_in_source",
                                tooltip="The swapped frames resized back into the source frames: the input video's "
                                        "size (an odd width or height loses its last column or row, so video "
                                        "encoders accept it); pixels outside the model's crop (face_crop: outside "
                                        "the face window) and frames whose mask is empty are the source's. Whole "
                                        "clip at source size in memory (~24 MB a 1080p frame): made only when "
                                        "connected; prefer the video output."),
                io.Int.Output(display_name="frame_count",
                              tooltip="Frames swapped (the frame range, at most frame_num)."),
                io.Video.Output(display_name="video",
                                tooltip="The swapped frames pasted into the source frames, with the source's frame "
                                        "rate (divided by select_every_nth) and sound; never held whole in memory. "
                                        "For Save Video or the SAM2 composite."),
            ],
            hidden=[io.Hidden.prompt, io.Hidden.unique_id],
        )

    @classmethod
    def fingerprint_inputs(cls, **_inputs):
        return common.output_links_fingerprint()

    @classmethod
    def execute(cls, model, vae, positive, identity, video, mask, width=832, height=480, frame_num=0, window=81,
                overlap=16, steps=20, shift=5.0, identity_guidance=4.0, seed=0, sampler="unipc",
                batch_guidance=False, background_strength=0.0, step_cache=0.0, vae_tile=0, vae_tile_overlap=8,
                pose_tokens=None, face_crop=False, crop_margin=DEFAULT_MARGIN, start_frame=0,
                select_every_nth=1) -> io.NodeOutput:
        _check_model(model)
        dit = model.dit
        settings = SwapSettings(width=width, height=height, frame_num=frame_num or None, steps=steps, shift=shift,
                                guidance=identity_guidance, seed=seed, sampler=sampler, batch_guidance=batch_guidance,
                                window=window, overlap=overlap, background_strength=background_strength,
                                step_cache=step_cache, vae_tile=vae_tile or None,
                                vae_tile_overlap=vae_tile_overlap).validate(label=_input_name)
        context = conditioning_context(positive, dit.cfg.text_dim)
        source = clip_of(video, "video")
        if not hasattr(identity, "latent_for") or not hasattr(identity, "image"):
            raise InputError(f"identity: expected the output of the DreamID-V identity node, got {type(identity).__name__}")
        id_embedding = identity_embedding(dit, identity, model.name)
        plan = ClipPlan.build(source.width, source.height, source.count, frame_num or None, width, height, window,
                              overlap, start_frame, select_every_nth)
        if face_crop:
            plan = face_crop_clip_plan(plan, source.count, window, overlap, crop_margin, mask)
        tokens = None
        if dit.cfg.has_pose:
            if pose_tokens is None:
                raise InputError(f"pose_tokens: {model.name} is the full DreamID-V model and needs pose tokens; "
                                 "connect DreamIDVPoseGuider (or load the faster checkpoint)")
            pose_tokens.check(plan, model.key)
            tokens = pose_tokens.tokens
        elif pose_tokens is not None:
            log.info("DreamID-V: %s is the faster variant; pose tokens are ignored", model.name)

        wanted = common.wanted_outputs(cls)
        use = (lambda slot: wanted is None or slot in wanted)
        sink = StoreSink(plan, common.temp_folder(), store=use(3), keep=use(0) or use(1))
        need = memory_estimate(dit, plan, 2 if batch_guidance else 1)
        adapter = PixelSpaceVAE(vae, after_encode=lambda: model.load(need))
        ref_latent = identity.latent_for(plan.reference_size, plan.area)
        if ref_latent is None:
            ref_latent = encode_reference(adapter, identity.image, plan.reference_size, plan.area)
        with source.open() as frames, plan_frames(mask, plan, "mask", "mask", source.count) as mask_frames:
            # whole frame: frames whose mask is empty stay the source's (face crop: the track knows them)
            present = None if plan.track is not None else mask_presence(mask_frames, plan.frames)
            model.load(need)
            progress, preview = common.sampling_progress(steps)  # with ComfyUI's latent previews when they are on
            try:
                result = swap_face(dit, adapter, plan.select(frames), mask_frames, None, context, settings=settings,
                                   progress=progress, cancel=common.cancel_hook(), preview=preview,
                                   pose_tokens=tokens, ref_latent=ref_latent, id_embedding=id_embedding, plan=plan,
                                   sink=sink)
            finally:
                model.release()
        if step_cache > 0:
            log.info("DreamID-V: step cache skipped %d of %d DiT evaluations", result.skipped, result.evaluations)
        frames = sink.kept.to(mm.intermediate_device(), torch.float32) if use(0) else None
        in_source = pasted_in_source(source, plan, sink.kept, present) if use(1) else None
        out_video = DreamIDVVideo(SwappedClip(source, plan, sink.store, present=present)) if use(3) else None
        return io.NodeOutput(frames, in_source, result.frames_used, out_video)


def face_crop_clip_plan(plan: ClipPlan, available: int, window: int, overlap: int, crop_margin: float,
                        mask) -> ClipPlan:
    """``plan``'s frame range in face-crop mode: windows around the face of ``mask`` (the pose node's), read
    a frame at a time."""
    if mask is None:
        raise InputError("mask: face_crop is on but no mask is connected; connect the pose node's pose_mask or mask "
                         "(the crop windows follow the face it marks)")
    w, h = plan.source_size
    with plan_frames(mask, plan, "mask", "mask", available) as mask_frames:
        return face_crop_plan(mask_frames, w, h, available, plan.frames, *plan.area, window, overlap, crop_margin,
                              start=plan.start, stride=plan.stride)


def pasted_in_source(source, plan: ClipPlan, frames: torch.Tensor, present=None) -> torch.Tensor:
    """IMAGE [F, H, W, 3]: the model's frames (float) pasted into the plan's source frames (``present``:
    :meth:`ClipPlan.paste_back`), a chunk at a time into one preallocated tensor (the memory-hungry output).
    An odd width or height loses its last column or row (:func:`even_size`: video encoders need even sizes)."""
    h, w = even_size(torch.empty(0, source.height, source.width), "frames_in_source").shape[1:3]
    out = torch.empty(plan.frames, h, w, 3, dtype=torch.float32)
    with source.open() as seq:
        picked = plan.select(seq)
        for a in range(0, plan.frames, CHUNK):
            b = min(a + CHUNK, plan.frames)
            out[a:b] = plan.paste_back(to_float_frames(picked[a:b]), frames[a:b], a, present)[:, :h, :w]
    return out.to(mm.intermediate_device())


def identity_embedding(dit, identity, model_name: str):
    """The identity bundle's ArcFace embedding when ``dit`` has a trained ID-token projection, else None."""
    if not getattr(dit, "id_projection_active", False):
        return None
    emb = getattr(identity, "embedding", None)
    if emb is None:
        raise InputError(f"identity: {model_name} has a trained ArcFace ID-token projection and needs the reference "
                         "face's ArcFace embedding, but this identity has none; turn face detection on in the "
                         "DreamID-V identity node (with the insightface models) and use a photo with a visible face")
    id_embedding_rows(dit, emb, 1)  # checks the width now, before any encoding
    return emb


def _input_name(setting: str) -> str:
    """A SwapSettings field as the sampler's input that sets it."""
    return {"guidance": "identity_guidance"}.get(setting, setting)


NODES = [DreamIDVPoseGuider, DreamIDVSampler]
