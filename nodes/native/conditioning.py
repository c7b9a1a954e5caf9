"""DreamID-V's conditioning in ComfyUI's own conventions, so core samplers sample it.

:func:`build` turns the text conditioning, the video, its face mask, the reference photo and the pose video
into what ComfyUI's Wan model reads (``comfy.model_base.WAN21``):

* ``concat_latent_image``: the raw VAE latents of the video and of the mask video (32 channels; the mask goes
  through the VAE as [0, 1], not normalised, as in the reference); ComfyUI normalises each 16-channel half and
  concatenates it after the noise: the model's 48 input channels;
* ``reference_latents``: the reference photo letterboxed onto the video frame size, resized and cropped like
  the video, encoded (positive), and in the negative a latent that normalises to exactly zero
  (``Wan21().process_out(0)``): identity guidance ``c + g (c - u)`` is ComfyUI's CFG with ``cfg = g + 1``;
* ``model_conds``: the pose video (a :class:`~.branch.PoseSource`, the same object in both) and, for a model with
  an ArcFace ID-token projection, the identity's embedding (zeros in the negative);
* the text context zero-padded to 512 tokens (what the reference feeds; ComfyUI's umT5 encoder already pads).

The empty latent carries the clip's plan (``LATENT["dreamidv_plan"]``) so :func:`decode` can stream the decode,
cut the padding frames and paste the frames back into the source.
"""
from __future__ import annotations

from typing import Optional

import torch

import comfy.conds
import comfy.latent_formats
import node_helpers

from dreamidv_core.errors import InputError
from dreamidv_core.io.video import even_size
from dreamidv_core.pipelines.adapters import PixelSpaceVAE, denormalise_latent, normalise_latent, rgb_frames
from dreamidv_core.pipelines.clip_stream import FrameSource, decode_clip, encode_clip
from dreamidv_core.pipelines.plan import ClipPlan
from dreamidv_core.preprocess.geometry import paste_back
from dreamidv_core.preprocess.identity_bundle import encode_reference

from .branch import ID_COND, POSE_COND, PoseSource

PLAN_KEY = "dreamidv_plan"
TEXT_TOKENS = 512


def pad_text(conditioning: list, tokens: int = TEXT_TOKENS) -> list:
    """CONDITIONING with every cross-attention tensor [1, L, D] zero-padded to ``tokens`` rows."""
    out = []
    for cond, extra in conditioning:
        if cond.dim() == 3 and cond.shape[1] < tokens:
            cond = torch.cat([cond, cond.new_zeros(cond.shape[0], tokens - cond.shape[1], cond.shape[2])], dim=1)
        out.append([cond, extra])
    return out


def _with_values(conditioning: list, values: dict, model_conds: dict) -> list:
    out = node_helpers.conditioning_set_values(conditioning, values)
    for entry in out:
        entry[1]["model_conds"] = {**entry[1].get("model_conds", {}), **model_conds}
    return out


def _raw(normalised: torch.Tensor) -> torch.Tensor:
    """Normalised latent [B, 16k, F, h, w] -> the raw VAE latent ComfyUI keeps (per 16-channel group)."""
    return torch.cat([denormalise_latent(part) for part in normalised.split(16, dim=1)], dim=1)


def build(positive, negative, vae, video, mask, reference, pose_video=None, identity=None, width=832, height=480,
          frame_num: Optional[int] = None):
    """-> (positive, negative, latent) for ComfyUI's samplers (module docstring). ``mask``: float [F, H, W] in 0..1
    (the node checks it with ``nodes.video.mask_tensor``); ``negative`` None: the positive's text."""
    frames = rgb_frames(video, "video")
    if mask.shape[0] != frames.shape[0] or tuple(mask.shape[1:3]) != tuple(frames.shape[1:3]):
        raise InputError(f"mask is {mask.shape[0]} frames of {mask.shape[2]}x{mask.shape[1]}, the video "
                         f"{frames.shape[0]} frames of {frames.shape[2]}x{frames.shape[1]}; they must match")
    plan = ClipPlan.build(frames.shape[2], frames.shape[1], frames.shape[0], frame_num, width, height)
    vae_adapter = PixelSpaceVAE(vae)
    video_latent = encode_clip(vae_adapter, FrameSource(frames, plan, "video"), lambda p: p.mul(2).sub(1), "cpu")
    mask_latent = encode_clip(vae_adapter, FrameSource(mask, plan, "mask"), lambda p: p, "cpu")
    concat = _raw(torch.cat([video_latent, mask_latent])[None])
    del video_latent, mask_latent
    ref = identity.latent_for(plan.source_size, plan.area) if identity is not None else None
    if ref is None:
        image = reference if reference is not None else getattr(identity, "image", None)
        if image is None:
            raise InputError("reference: connect the reference face photo (or a DreamID-V identity)")
        ref = encode_reference(vae_adapter, image, plan.source_size, plan.area)
    ref = _raw(ref.reshape(1, 16, 1, *ref.shape[-2:]).cpu())
    zero_ref = comfy.latent_formats.Wan21().process_out(torch.zeros_like(ref))

    model_conds = {}
    if pose_video is not None:
        pose = rgb_frames(pose_video, "pose_video")
        if pose.shape[0] < plan.frames or tuple(pose.shape[1:3]) != tuple(frames.shape[1:3]):
            raise InputError(f"pose_video is {pose.shape[0]} frames of {pose.shape[2]}x{pose.shape[1]}; it must have "
                             f"the video's size ({frames.shape[2]}x{frames.shape[1]}) and at least its {plan.frames} "
                             "frames")
        model_conds[POSE_COND] = comfy.conds.CONDConstant(PoseSource(pose, plan))
    embedding = getattr(identity, "embedding", None) if identity is not None else None
    pos_conds, neg_conds = dict(model_conds), dict(model_conds)
    if embedding is not None:
        emb = torch.as_tensor(embedding, dtype=torch.float32).reshape(1, -1)
        pos_conds[ID_COND] = comfy.conds.CONDRegular(emb)
        neg_conds[ID_COND] = comfy.conds.CONDRegular(torch.zeros_like(emb))
    text_negative = negative if negative is not None else positive
    positive = _with_values(pad_text(positive), {"concat_latent_image": concat, "reference_latents": [ref]}, pos_conds)
    negative = _with_values(pad_text(text_negative), {"concat_latent_image": concat, "reference_latents": [zero_ref]},
                            neg_conds)
    latent = {"samples": torch.zeros(1, 16, *plan.latent_grid), PLAN_KEY: plan}
    return positive, negative, latent


def decode(vae, samples: dict, video, tile: int = 0, tile_overlap: int = 8):
    """Sampled LATENT (with the plan of :func:`build`) -> (frames [N, H, W, 3] at model resolution, the same pasted
    into the source frames, N), decoding window piece by piece."""
    plan = samples.get(PLAN_KEY) if isinstance(samples, dict) else None
    if plan is None:
        raise InputError("samples: expected the sampled latent of DreamID-V Conditioning (through KSampler or "
                         "SamplerCustomAdvanced); this latent carries no DreamID-V clip plan")
    latent = samples["samples"]
    if tuple(latent.shape[2:]) != tuple(plan.latent_grid):
        raise InputError(f"samples: latent {tuple(latent.shape[2:])} does not match its plan {plan.latent_grid}")
    out = torch.empty(plan.frames, *plan.size, 3, dtype=torch.float32)

    def sink(frames: torch.Tensor, start: int) -> None:
        out[start:start + frames.shape[0]] = frames.cpu()

    tiles = {"tile": tile, "overlap": tile_overlap} if tile else {}
    decode_clip(PixelSpaceVAE(vae), normalise_latent(latent[:1].float())[0], plan, sink, **tiles)
    source = rgb_frames(video, "video")
    if tuple(source.shape[1:3]) != (plan.source_size[1], plan.source_size[0]) or source.shape[0] < plan.frames:
        raise InputError("video: expected the source video given to DreamID-V Conditioning "
                         f"({plan.source_size[0]}x{plan.source_size[1]}, at least {plan.frames} frames)")
    # an odd width or height loses its last column or row, as the pack sampler's (video encoders need even sizes)
    in_source = even_size(paste_back(source[:plan.frames].to(out.device), out, plan.crop), "frames_in_source")
    return out, in_source, plan.frames
