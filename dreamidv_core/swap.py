"""The DreamID-V face swap, following the released pipeline step by step.

video + mask + pose frames + reference photo + text context -> swapped frames.

1. Take the first ``frame_num`` frames, floored to 4n+1; area-resize and centre-crop to multiples of 16.
2. VAE-encode the video ([-1, 1]), the mask video ([0, 1], *not* normalised) and the reference photo
   (letterboxed in white onto the original frame size, then resized like the video, [-1, 1]).
3. PoseGuider tokens from the pose video ([0, 1]) — once; text K/V, reference tokens, pose K/V — once.
4. Seeded float32 noise [16, (F-1)/4+1, H/8, W/8]; flow-matching UniPC with shift; per step the
   model runs with the reference and with a zeroed reference: ``pred = c + g * (c - u)``.
5. VAE-decode; frames in [0, 1].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .dit import DreamIDVTransformer
from .errors import InputError
from .samplers import SAMPLERS, flow_sigmas, identity_guidance, sigma_to_timestep
from .video_ops import prepare_frames, prepare_reference, to_uint8_frames, usable_frame_count

Progress = Optional[Callable[[str, int, int], None]]
Cancel = Optional[Callable[[], bool]]


@dataclass
class SwapSettings:
    """Defaults are the released recipe (README: 20 steps; 832*480 area; shift 5; identity guidance 4)."""

    width: int = 832
    height: int = 480
    frame_num: int = 81
    steps: int = 20
    shift: float = 5.0
    guidance: float = 4.0
    seed: int = 0
    sampler: str = "unipc"
    batch_guidance: bool = False  # both guidance passes in one batched forward (more memory, faster on GPU)
    cache_pose_kv: Optional[bool] = None  # per-block pose K/V computed once; None: when memory allows


@dataclass
class SwapResult:
    frames: torch.Tensor  # [F, H, W, 3] float32 in [0, 1]
    latent: torch.Tensor  # [16, F', H/8, W/8] float32
    frames_used: int


def _check_stream(frames, name: str, count: int, size):
    if len(frames) < count:
        raise InputError(f"{name} has {len(frames)} frames but the video has {count}; they must have the same length")
    first = to_uint8_frames(frames[:1], name)[0]
    if first.shape[:2] != size:
        raise InputError(f"{name} frames are {first.shape[1]}x{first.shape[0]}, the video is {size[1]}x{size[0]}; "
                         "they must have the same size")


def make_guided_model(dit: DreamIDVTransformer, cond, guidance: float, batch: bool):
    """model(x, sigma) -> guided velocity, for the samplers. x: [1, 16, F', h, w]."""

    def model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        t = sigma_to_timestep(sigma).to(x.device).reshape(1).float()
        if cond.num_refs < 2:
            return dit(x, t, cond, refs=[0])
        if batch:
            c, u = dit(x.expand(2, -1, -1, -1, -1), t, cond, refs=[0, 1]).chunk(2)
        else:
            c = dit(x, t, cond, refs=[0])
            u = dit(x, t, cond, refs=[1])
        return identity_guidance(c, u, guidance)

    return model


def encode_reference(vae, reference, source_width: int, source_height: int, settings: SwapSettings) -> torch.Tensor:
    """Reference photo -> its VAE latent [1, 16, 1, h, w]: letterboxed in white onto the original
    frame size, then resized and cropped like the video (the released model's identity tokens)."""
    ref = prepare_reference(reference, source_width, source_height, settings.width, settings.height)
    return vae.encode(ref.mul(2).sub(1)[None])


def pose_tokens_for(dit: DreamIDVTransformer, pose, count: int, settings: SwapSettings) -> torch.Tensor:
    """Pose frames -> PoseGuider tokens [1, L, C] (computed once per video)."""
    return dit.pose_tokens(prepare_frames(pose, count, settings.width, settings.height, "pose")[None])


@torch.no_grad()
def swap_face(dit: DreamIDVTransformer, vae, video, mask, reference, context: torch.Tensor, pose=None,
              settings: SwapSettings = SwapSettings(), progress: Progress = None, cancel: Cancel = None,
              pose_tokens: Optional[torch.Tensor] = None, ref_latent: Optional[torch.Tensor] = None) -> SwapResult:
    """Swap the face in ``video`` for the identity in ``reference``.

    video, mask, pose: frames [F, H, W, C] (uint8 or float in [0, 1]; mask may be [F, H, W]);
    reference: [H, W, C]; context: umT5 context [L, 4096] of the prompt. ``pose`` is required by the
    full model and ignored by the faster one (whose mask carries the pose). Precomputed
    ``pose_tokens`` (:func:`pose_tokens_for`) and ``ref_latent`` (:func:`encode_reference`) replace
    ``pose`` and ``reference``. ``vae`` is anything with ``encode(video [B,3,F,H,W] in [-1,1])`` and
    ``decode(latent)`` on normalised Wan 2.1 latents. ``progress(stage, i, n)`` is called per stage and
    per sampling step; ``cancel()`` returning True stops within one step.
    """
    s = settings
    if s.sampler not in SAMPLERS:
        raise InputError(f"unknown sampler '{s.sampler}'; choose one of {', '.join(SAMPLERS)}")
    report = progress or (lambda stage, i, n: None)
    count = usable_frame_count(len(video), s.frame_num)
    first = to_uint8_frames(video[:1], "video")[0]
    src_h, src_w = first.shape[:2]
    _check_stream(mask, "mask", len(video), (src_h, src_w))
    if dit.cfg.has_pose and pose_tokens is None:
        if pose is None:
            raise InputError("the full DreamID-V model needs a pose video (or load the faster checkpoint)")
        _check_stream(pose, "pose", len(video), (src_h, src_w))
    if ref_latent is None and reference is None:
        raise InputError("a reference image (or its latent) is required")

    report("encode", 0, 3)
    pixels = prepare_frames(video, count, s.width, s.height, "video")
    video_latent = vae.encode(pixels.mul(2).sub(1)[None])[0]
    del pixels
    report("encode", 1, 3)
    mask_latent = vae.encode(prepare_frames(mask, count, s.width, s.height, "mask")[None])[0]
    report("encode", 2, 3)
    if ref_latent is None:
        ref_latent = encode_reference(vae, reference, src_w, src_h, s)
    report("encode", 3, 3)

    if dit.cfg.has_pose and pose_tokens is None:
        pose_tokens = pose_tokens_for(dit, pose, count, s)
    if not dit.cfg.has_pose:
        pose_tokens = None
    y = torch.cat([video_latent, mask_latent])
    ref_latent = ref_latent.reshape(1, *ref_latent.shape[-4:]).to(y.device)
    refs = torch.cat([ref_latent, torch.zeros_like(ref_latent)]) if s.guidance != 0 else ref_latent
    cache_kv = s.cache_pose_kv if s.cache_pose_kv is not None else dit.should_cache_pose_kv(tuple(y.shape[1:]))
    cond = dit.prepare(context, y, refs, pose_tokens, cache_pose_kv=cache_kv)

    device = dit.patch_embedding.weight.device
    generator = torch.Generator(device=device).manual_seed(s.seed)
    noise = torch.randn(video_latent.shape, generator=generator, dtype=torch.float32, device=device)
    sigmas = flow_sigmas(s.steps, shift=s.shift)
    model = make_guided_model(dit, cond, s.guidance, s.batch_guidance)
    latent = SAMPLERS[s.sampler](model, noise[None], sigmas,
                                 callback=lambda i, n, x: report("sample", i + 1, n), cancel=cancel)[0]
    del cond
    report("decode", 0, 1)
    frames = vae.decode(latent[None])[0]
    report("decode", 1, 1)
    frames = frames.add_(1).div_(2).clamp_(0, 1).permute(1, 2, 3, 0).contiguous()
    return SwapResult(frames=frames, latent=latent, frames_used=count)
