"""Host-neutral helpers the ComfyUI nodes use (no ComfyUI import here; everything is duck-typed).

* :func:`context_from_conditioning`: a padded text-encoder output -> the un-padded ``[L, 4096]``
  context the released pipeline feeds the DiT.
* :class:`PixelSpaceVAE`: wraps a VAE with ComfyUI's calling convention (``encode(pixels [B, F, H, W, 3]
  in 0..1) -> raw latent``, ``decode(raw latent) -> [B, F, H, W, 3] in 0..1``) into the ``vae``
  protocol of :mod:`dreamidv_core.pipelines.swap` (``[B, 3, F, H, W]`` in [-1, 1] <-> normalised latent),
  applying the Wan 2.1 latent normalisation.
* :class:`PoseTokenSet`: pose tokens plus the geometry they were computed for, so the sampler can
  refuse tokens made for another video, size or model.

Facts about ComfyUI's umT5 text encoding (ComfyUI 0.3.75, ``comfy/text_encoders/wan.py``,
``comfy/sd1_clip.py``), which :func:`context_from_conditioning` relies on:

* The Wan tokenizer appends ``</s>`` (id 1), has no start token, and pads with id 0 up to
  ``min_length=512`` tokens (longer prompts are not truncated).
* The encoder runs with an attention mask covering the tokens up to and including the first
  ``</s>``; with ``zero_out_masked=True`` the states of every padding row are multiplied by 0.
  The attention mask itself is not returned (``return_attention_masks`` is off), and there is no
  pooled output.
* So CLIPTextEncode gives CONDITIONING ``[[cond [1, 512, 4096] float32, {"pooled_output": None}]]``
  whose first L rows are the real tokens (L counts ``</s>``) and whose remaining rows are exactly 0.
* ComfyUI's Wan model (``comfy/ldm/wan/model.py``) passes that 512-row tensor straight through
  ``text_embedding``; the official pipeline instead zero-pads its ``[L, 4096]`` states to 512
  *before* ``text_embedding``, which is the same thing. :class:`DreamIDVTransformer.embed_context`
  zero-pads likewise, so stripping the zero rows changes nothing numerically; it recovers L, which
  the pack's cache and checks use.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

from ..errors import InputError
from ..io.video import check_pixels
from ..models.vae import LATENT_MEAN, LATENT_STD
from .plan import ClipPlan


# ------------------------------------------------------------------------------------------------ text

def context_from_conditioning(cond: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                              text_dim: int = 4096) -> torch.Tensor:
    """Encoder states ``[1, N, D]`` or ``[N, D]`` (padded, padding rows zero) -> ``[L, D]`` float32.

    With an ``attention_mask`` ([1, N] or [N], 1 = real token) the real rows are the masked ones;
    without it, the trailing all-zero rows are dropped (ComfyUI zeroes padding rows).
    """
    if not isinstance(cond, torch.Tensor):
        raise InputError(f"conditioning: expected a tensor, got {type(cond).__name__}")
    if cond.dim() == 3:
        if cond.shape[0] != 1:
            raise InputError(f"conditioning: expected a batch of one prompt, got {cond.shape[0]}")
        cond = cond[0]
    if cond.dim() != 2:
        raise InputError(f"conditioning: expected [1, tokens, {text_dim}], got {list(cond.shape)}")
    if cond.shape[1] != text_dim:
        raise InputError(f"conditioning is {cond.shape[1]}-wide; DreamID-V needs {text_dim}-wide umT5-XXL states "
                         "(load the umT5-XXL file with CLIPLoader type 'wan', or use DreamIDVTextContext)")
    cond = cond.detach().to("cpu", torch.float32)
    if not torch.isfinite(cond).all():
        rows = torch.nonzero(~torch.isfinite(cond).all(dim=1)).flatten()
        raise InputError(f"conditioning contains NaN or infinite values ({rows.numel()} of {cond.shape[0]} token rows, "
                         f"first: row {int(rows[0])}): the text encoder overflowed (run it in bf16 or fp32, not fp16) "
                         "or its file is damaged")
    if attention_mask is not None:
        mask = attention_mask.reshape(-1).to("cpu").bool()
        if mask.numel() != cond.shape[0]:
            raise InputError(f"conditioning: attention mask has {mask.numel()} entries for {cond.shape[0]} tokens")
        out = cond[mask]
    else:
        nonzero = cond.abs().amax(dim=1) > 0
        idx = torch.nonzero(nonzero).flatten()
        out = cond[: int(idx[-1]) + 1] if idx.numel() else cond[:0]
    if out.shape[0] == 0:
        raise InputError("conditioning is all zeros (an empty prompt?); encode the prompt 'chang face'")
    return out


def rgb_frames(frames: torch.Tensor, what: str) -> torch.Tensor:
    """IMAGE-like frames [F, H, W, C] (C 1..4) or [F, H, W] -> float32 [F, H, W, 3] in [0, 1].

    Alpha is dropped (C 4, or 2 for grey + alpha); greyscale is repeated to RGB. NaN/inf or values on
    another scale (0..255) are an :class:`InputError` (:func:`~dreamidv_core.io.video.check_pixels`): they
    would otherwise pass through into every output that keeps source pixels.
    """
    if not isinstance(frames, torch.Tensor):
        raise InputError(f"{what}: expected an IMAGE tensor [frames, height, width, channels], got {type(frames).__name__}")
    if frames.dim() == 3:
        frames = frames[..., None]
    if frames.dim() != 4 or not 1 <= frames.shape[-1] <= 4:
        raise InputError(f"{what}: expected [frames, height, width, 1..4 channels], got {list(frames.shape)}")
    check_pixels(frames, what)
    c = frames.shape[-1]
    frames = frames.float()
    if c in (1, 2):
        frames = frames[..., :1].expand(*frames.shape[:-1], 3)
    elif c == 4:
        frames = frames[..., :3]
    return frames


# ------------------------------------------------------------------------------------------------ VAE

def _stats(device, dtype=torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
    shape = (1, len(LATENT_MEAN), 1, 1, 1)
    mean = torch.tensor(LATENT_MEAN, dtype=dtype, device=device).view(shape)
    std = torch.tensor(LATENT_STD, dtype=dtype, device=device).view(shape)
    return mean, std


def normalise_latent(raw: torch.Tensor) -> torch.Tensor:
    """Raw Wan 2.1 VAE mean ``[B, 16, T, h, w]`` -> ``(raw - mean) / std`` float32 (what the DiT sees)."""
    mean, std = _stats(raw.device)
    return (raw.float() - mean) / std


def denormalise_latent(latent: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalise_latent`."""
    mean, std = _stats(latent.device)
    return latent.float() * std + mean


class PixelSpaceVAE:
    """The swap's ``vae`` protocol over a VAE with ComfyUI's convention.

    ``vae.encode(pixels [F, H, W, 3] in 0..1) -> raw latent [1, 16, F', h, w]`` and
    ``vae.decode(raw latent) -> [B, F, H, W, 3] in 0..1`` (ComfyUI's ``comfy.sd.VAE`` with the Wan 2.1
    VAE, whose ``encode`` returns the un-normalised posterior mean). This class exposes
    ``encode(video [B, 3, F, H, W] in [-1, 1]) -> normalised latent`` and ``decode(normalised latent)
    -> [B, 3, F, H, W] in [-1, 1]``. The mask video, which the swap passes in [0, 1] rather than
    [-1, 1], goes through the same affine maps and reaches the VAE's network unchanged.

    ``after_encode`` (optional) runs after every encode, e.g. to put the DiT back on the GPU if the
    host's memory manager moved it away to make room for the VAE.
    """

    def __init__(self, vae, after_encode: Optional[Callable[[], None]] = None):
        if not (hasattr(vae, "encode") and hasattr(vae, "decode")):
            raise InputError(f"vae: expected a VAE with encode/decode, got {type(vae).__name__}")
        self.vae = vae
        self.after_encode = after_encode

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        if video.dim() != 5 or video.shape[1] != 3:
            raise InputError(f"vae input: expected [B, 3, F, H, W], got {list(video.shape)}")
        pixels = video.float().add(1).div(2).permute(0, 2, 3, 4, 1)  # [B, F, H, W, 3] in 0..1
        # One clip at a time, as IMAGE [F, H, W, 3]: ComfyUI's VAE treats a 5-D input's frame axis as a
        # spatial one (it would crop it to a multiple of 8).
        raw = torch.cat([self.vae.encode(clip) for clip in pixels])
        if raw.dim() != 5 or raw.shape[1] != len(LATENT_MEAN):
            raise InputError(f"vae: produced a latent of shape {list(raw.shape)}; DreamID-V needs the Wan 2.1 VAE "
                             f"(16 channels, e.g. wan_2.1_vae.safetensors), not Wan 2.2 or an image VAE")
        if self.after_encode is not None:
            self.after_encode()
        return normalise_latent(raw)

    def decode(self, latent: torch.Tensor, tile: Optional[int] = None, overlap: int = 8) -> torch.Tensor:
        """``tile``/``overlap`` (latent pixels): the host VAE's own spatial tiling (``decode_tiled``)."""
        raw = denormalise_latent(latent)
        if tile and hasattr(self.vae, "decode_tiled"):
            pixels = self.vae.decode_tiled(raw, tile_x=tile, tile_y=tile, overlap=overlap)
        else:
            pixels = self.vae.decode(raw)
        if pixels.dim() == 4:  # [F, H, W, 3] for a batch of one
            pixels = pixels[None]
        return pixels.float().mul(2).sub(1).permute(0, 4, 1, 2, 3)


# ------------------------------------------------------------------------------------------------ pose

@dataclass
class PoseTokenSet:
    """PoseGuider tokens and the clip they were made for.

    tokens: [1, L, C] (CPU); plan: the :class:`~.plan.ClipPlan` of the pose video (frames, source size, area,
    windows); model_key: identity of the DiT that made them.
    """

    tokens: torch.Tensor
    plan: ClipPlan
    model_key: str

    def check(self, plan: ClipPlan, model_key: str) -> None:
        """Raise :class:`InputError` naming every difference from the sampler's clip and model."""
        mine, problems = self.plan, []
        if mine.window != plan.window:
            problems.append("window {} / overlap {} (the sampler's: {} / {})".format(*mine.window, *plan.window))
        if mine.frames != plan.frames:
            problems.append(f"{mine.frames} frames (the sampler uses {plan.frames})")
        if (mine.start, mine.stride) != (plan.start, plan.stride):
            problems.append(f"start_frame {mine.start}, select_every_nth {mine.stride} (the sampler's: {plan.start}, "
                            f"{plan.stride})")
        if mine.source_size != plan.source_size:
            problems.append("a {}x{} pose video (the video is {}x{})".format(*mine.source_size, *plan.source_size))
        if mine.area != plan.area:
            problems.append("area {}x{} (the sampler's is {}x{})".format(*mine.area, *plan.area))
        if (mine.track is None) != (plan.track is None):
            problems.append("face crop {} (the sampler's is {})".format(*("on" if p.track is not None else "off"
                                                                            for p in (mine, plan))))
        elif mine.track != plan.track:
            problems.append("another face-crop track (another mask or crop_margin than the sampler's)")
        if self.model_key != model_key:
            problems.append("another DreamID-V model")
        if problems:
            raise InputError("pose tokens were computed for " + "; ".join(problems) + ". Give DreamIDVPoseGuider the "
                             "same model, the pose video of this clip, and the same width, height, frame_num, "
                             "window, overlap and frame range as the sampler (and the same face_crop, crop_margin and\n"
                             "mask)")
