"""The DreamID-V face swap, following the released pipeline step by step, for clips of any length.

video + mask + pose frames + reference photo + text context -> swapped frames.

1. Take the whole clip (or its first ``frame_num`` frames): N >= 5 frames, padded at the end (last frame
   repeated) to Np = 4n+1; area-resize and centre-crop to multiples of 16, chunk by chunk.
2. VAE-encode the video ([-1, 1]), the mask video ([0, 1], *not* normalised) and the reference photo
   (letterboxed in white onto the original frame size, then resized like the video, [-1, 1]), streaming.
3. PoseGuider tokens from the pose video ([0, 1]) — once, on the CPU; text K/V and reference tokens — once
   for every window (:mod:`dreamidv_core.sampling.windows`).
4. Seeded float32 noise [16, (Np-1)/4+1, H/8, W/8] for the whole clip; flow-matching UniPC with shift; per
   step the model runs on every window of ``window`` frames (with the reference and with a zeroed
   reference: ``pred = c + g * (c - u)``) and the windows' predictions are blended where they overlap.
   A clip of at most one window is exactly the released single pass. A model with a trained ArcFace
   ID-token projection (:mod:`dreamidv_core.models.id_projection`) also gets the identity's ArcFace embedding,
   and zeros for the pass without the reference (as in training's identity dropout).
5. VAE-decode, streaming, into N frames in [0, 1] (or a ``sink``).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from functools import partial
from typing import Callable, Optional, Tuple

import torch

from ..errors import InputError
from ..models.dit import DreamIDVTransformer
from ..preprocess.identity_bundle import encode_reference
from ..io.video import to_uint8_frames
from ..progress import Cancel, Progress, reporter
from ..sampling.guidance import make_guided_model
from ..sampling.samplers import SAMPLERS, flow_sigmas
from ..sampling.step_cache import StepCache, attach_step_cache
from ..sampling.windows import WindowLayout, WindowedModel, preserve_background
from .clip_stream import FrameSource, clip_face_mask, clip_pose_tokens, decode_clip, encode_clip
from .plan import ClipPlan


@dataclass
class SwapSettings:
    """Defaults are the released recipe (README: 20 steps; 832*480 area; shift 5; identity guidance 4)."""

    width: int = 832
    height: int = 480
    frame_num: Optional[int] = None  # None: the whole clip; an int keeps the first frame_num frames
    steps: int = 20
    shift: float = 5.0
    guidance: float = 4.0
    seed: int = 0
    sampler: str = "unipc"
    batch_guidance: bool = False  # both guidance passes in one batched forward (more memory, faster on GPU)
    cache_pose_kv: Optional[bool] = None  # per-block pose K/V computed once; None: one window and memory allows
    window: int = 81  # frames per window (4n+1); longer clips are sampled in overlapping windows
    overlap: int = 16  # frames shared by neighbouring windows (a multiple of 4, < window)
    background_strength: float = 0.0  # 0..1: pull the latent outside the face mask to the source at each step
    step_cache: float = 0.0  # > 0: skip DiT evaluations whose input barely changed (TeaCache-like threshold)
    vae_tile: Optional[int] = None  # VAE decode in spatial tiles of this many latent pixels (8 px each)
    vae_tile_overlap: int = 8  # latent pixels shared by neighbouring tiles (blended)


@dataclass
class SwapResult:
    frames: Optional[torch.Tensor]  # [N, H, W, 3] float32 in [0, 1] on the CPU (None when a sink took them)
    latent: torch.Tensor  # [16, F', H/8, W/8] float32 (F' = latent frames of the padded clip)
    frames_used: int  # N: frames swapped and returned
    plan: ClipPlan  # the clip's geometry and windows
    evaluations: int = 0  # DiT forward calls (both guidance passes, every window)
    skipped: int = 0  # of which the step cache skipped

    @property
    def layout(self) -> WindowLayout:
        return self.plan.layout


def plan_for(video, settings: SwapSettings) -> ClipPlan:
    """The :class:`ClipPlan` of ``video`` (frames with ``len`` and slicing) under ``settings``."""
    first = to_uint8_frames(video[:1], "video")[0]
    return ClipPlan.build(first.shape[1], first.shape[0], len(video), settings.frame_num, settings.width,
                          settings.height, settings.window, settings.overlap)


def _check_stream(frames, name: str, count: int, size):
    if len(frames) < count:
        raise InputError(f"{name} has {len(frames)} frames but the video has {count}; they must have the same length")
    first = to_uint8_frames(frames[:1], name)[0]
    if first.shape[:2] != size:
        raise InputError(f"{name} frames are {first.shape[1]}x{first.shape[0]}, the video is {size[1]}x{size[0]}; "
                         "they must have the same size")


def id_embedding_rows(dit: DreamIDVTransformer, embedding, rows: int) -> Optional[torch.Tensor]:
    """The ID-projection rows matching the reference rows: [embedding] or [embedding, zeros] -> [rows, E]
    float32; ``None`` when the model has no active ID projection (the embedding is then not needed)."""
    if not getattr(dit, "id_projection_active", False):
        return None
    dim = dit.cfg.id_embed_dim
    if embedding is None:
        raise InputError("this model has a trained ArcFace ID-token projection and needs the reference's ArcFace "
                         "embedding: connect the DreamID-V identity node with face detection on (a face must be "
                         "found in the reference photo)")
    emb = torch.as_tensor(embedding, dtype=torch.float32).reshape(-1)
    if emb.numel() != dim:
        raise InputError(f"the identity embedding has {emb.numel()} values; this model's ID projection takes {dim} "
                         "(an ArcFace embedding)")
    emb = emb[None]
    return torch.cat([emb, torch.zeros_like(emb)]) if rows == 2 else emb


def pose_tokens_for(dit: DreamIDVTransformer, pose, plan: ClipPlan, cancel: Cancel = None) -> torch.Tensor:
    """The plan's pose frames (padded to 4n+1 like the video) -> PoseGuider tokens [1, F' * hw, C] on the
    CPU, computed once per video, one window piece at a time (:func:`.clip_stream.clip_pose_tokens`)."""
    return clip_pose_tokens(dit, FrameSource(pose, plan, "pose"), cancel)


@torch.no_grad()
def swap_face(dit: DreamIDVTransformer, vae, video, mask, reference, context: torch.Tensor, pose=None,
              settings: SwapSettings = SwapSettings(), progress: Progress = None, cancel: Cancel = None,
              pose_tokens: Optional[torch.Tensor] = None, ref_latent: Optional[torch.Tensor] = None,
              sink: Optional[Callable[[torch.Tensor, int], None]] = None,
              id_embedding=None, plan: Optional[ClipPlan] = None) -> SwapResult:
    """Swap the face in ``video`` for the identity in ``reference``; returns exactly N frames.

    video, mask, pose: frames [F, H, W, C] (uint8 or float in [0, 1]; mask may be [F, H, W]; anything with
    ``len`` and slicing, read a chunk at a time); reference: [H, W, C]; context: umT5 context [L, 4096] of
    the prompt. ``pose`` is required by the full model and ignored by the faster one (whose mask carries
    the pose). Precomputed ``pose_tokens`` (:func:`pose_tokens_for` with the same N, window and overlap)
    and ``ref_latent`` (:func:`encode_reference`) replace ``pose`` and ``reference``. ``vae`` is anything
    with ``encode(video [B,3,F,H,W] in [-1,1])`` and ``decode(latent)`` on normalised Wan 2.1 latents; with
    ``encode_iter`` / ``decode_iter`` too it streams (see :func:`windows.encode_clip`).
    ``progress(stage, i, n)``: stages "encode", "sample" (per step), "window" (per window evaluation),
    "decode". ``cancel()`` returning True stops before the next window evaluation (within one step).
    ``sink(frames [k, H, W, 3] float32 CPU, start)`` receives the decoded frames instead of a returned tensor.
    ``id_embedding``: the reference's ArcFace embedding [512] (array or tensor), required by a model with a
    trained ID-token projection (``dit.id_projection_active``) and ignored by every other model.
    ``plan``: the clip's :class:`ClipPlan` when the caller built it already (default: :func:`plan_for` the
    video and ``settings``).
    """
    s = settings
    check_settings(s)
    report = reporter(progress)
    plan = plan or plan_for(video, s)
    inputs = encode_inputs(dit, vae, video, mask, reference, plan, s, pose=pose, pose_tokens=pose_tokens,
                           ref_latent=ref_latent, id_embedding=id_embedding, progress=report, cancel=cancel)
    latent, evaluations, skipped = sample_latent(dit, inputs, context, plan, s, progress=report, cancel=cancel)
    del inputs
    out = decode_frames(vae, latent, plan, s, sink, report, cancel)
    return SwapResult(frames=out, latent=latent, frames_used=plan.frames, plan=plan, evaluations=evaluations,
                      skipped=skipped)


# ------------------------------------------------------------------------------------------------ the stages
# swap_face = encode_inputs -> sample_latent -> decode_frames. Under torchrun (pipelines.swap_parallel) one rank
# encodes, every rank of the clip's group samples together, and that rank decodes.

@dataclass
class SwapInputs:
    """What sampling needs from the clip, made once from the files (under torchrun: by one rank, then shared).

    y [32, F', h, w] float32 (video latent, then mask latent); ref_latent [1, 16, 1, h, w]; pose_tokens
    [1, F' * hw, C] (CPU) or None (faster model); noise [16, F', h, w] float32 (seeded); face [F', h, w] the
    face mask on the latent grid (only with background preservation) or None; id_rows [R, E] the ArcFace rows
    (:func:`id_embedding_rows`) or None.
    """

    y: torch.Tensor
    ref_latent: torch.Tensor
    noise: torch.Tensor
    pose_tokens: Optional[torch.Tensor] = None
    face: Optional[torch.Tensor] = None
    id_rows: Optional[torch.Tensor] = None

    def tensors(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def check_settings(s: SwapSettings) -> None:
    if s.sampler not in SAMPLERS:
        raise InputError(f"unknown sampler '{s.sampler}'; choose one of {', '.join(SAMPLERS)}")
    if not 0.0 <= s.background_strength <= 1.0:
        raise InputError(f"background_strength must be in [0, 1], got {s.background_strength}")


def encode_inputs(dit: DreamIDVTransformer, vae, video, mask, reference, plan: ClipPlan, settings: SwapSettings,
                  pose=None, pose_tokens: Optional[torch.Tensor] = None, ref_latent: Optional[torch.Tensor] = None,
                  id_embedding=None, progress: Progress = None, cancel: Cancel = None) -> SwapInputs:
    """The clip's files -> :class:`SwapInputs` (arguments as :func:`swap_face`'s): checks, VAE encodings,
    PoseGuider tokens, noise. Progress stage "encode"."""
    s, report = settings, reporter(progress)
    count, layout = plan.frames, plan.layout
    src_w, src_h = plan.source_size
    _check_stream(video, "video", count, (src_h, src_w))
    _check_stream(mask, "mask", count, (src_h, src_w))
    if dit.cfg.has_pose and pose_tokens is None:
        if pose is None:
            raise InputError("the full DreamID-V model needs a pose video (or load the faster checkpoint)")
        _check_stream(pose, "pose", count, (src_h, src_w))
    if ref_latent is None and reference is None:
        raise InputError("a reference image (or its latent) is required")
    id_rows = id_embedding_rows(dit, id_embedding, 2 if s.guidance != 0 else 1)
    device = dit.patch_embedding.weight.device

    report("encode", 0, 3)
    video_src = FrameSource(video, plan, "video")
    video_latent = encode_clip(vae, video_src, lambda p: p.mul(2).sub(1), device, cancel)
    report("encode", 1, 3)
    mask_src = FrameSource(mask, plan, "mask")
    mask_latent = encode_clip(vae, mask_src, lambda p: p, device, cancel)
    report("encode", 2, 3)
    if ref_latent is None:
        ref_latent = encode_reference(vae, reference, plan.reference_size, plan.area)
    report("encode", 3, 3)

    if dit.cfg.has_pose and pose_tokens is None:
        pose_tokens = pose_tokens_for(dit, pose, plan, cancel)
    if not dit.cfg.has_pose:
        pose_tokens = None
    total = video_latent.shape[1]
    if pose_tokens is not None and pose_tokens.shape[-2] % total:
        raise InputError(f"pose tokens ({pose_tokens.shape[-2]}) were made for another clip: this one has {count} "
                         f"frames (padded to {layout.frames}, {total} latent frames); compute them with "
                         "pose_tokens_for and the same frame count, size, window and overlap")
    y = torch.cat([video_latent, mask_latent])
    del mask_latent, video_latent
    ref_latent = ref_latent.reshape(1, *ref_latent.shape[-4:]).to(y.device)
    generator = torch.Generator(device=device).manual_seed(s.seed)
    noise = torch.randn(y[:16].shape, generator=generator, dtype=torch.float32, device=device)
    face = clip_face_mask(mask_src).to(device) if s.background_strength > 0 else None
    return SwapInputs(y=y, ref_latent=ref_latent, noise=noise, pose_tokens=pose_tokens, face=face, id_rows=id_rows)


def sample_latent(dit: DreamIDVTransformer, inputs: SwapInputs, context: torch.Tensor, plan: ClipPlan,
                  settings: SwapSettings, progress: Progress = None, cancel: Cancel = None,
                  mesh=None) -> Tuple[torch.Tensor, int, int]:
    """Sample the clip's latent -> (latent [16, F', h, w] float32, DiT evaluations, of which skipped).
    Progress stages "sample" (per step) and "window". ``mesh``: this rank's
    :class:`dreamidv_core.parallel.mesh.Mesh` when several ranks sample the clip together (every rank of the
    group calls this with the same inputs; ``None``: one process)."""
    s, report = settings, reporter(progress)
    layout, y, device = plan.layout, inputs.y, dit.patch_embedding.weight.device
    sp = None if mesh is None else mesh.sp
    pair = None if mesh is None else mesh.pair
    refs = torch.cat([inputs.ref_latent, torch.zeros_like(inputs.ref_latent)]) if s.guidance != 0 else inputs.ref_latent
    make_model = partial(make_guided_model, pair=pair)
    if layout.count == 1:  # the released single pass
        cache_kv = s.cache_pose_kv if s.cache_pose_kv is not None else dit.should_cache_pose_kv(tuple(y.shape[1:]))
        shared = dit.prepare(context, y, refs, inputs.pose_tokens, cache_pose_kv=cache_kv, id_embedding=inputs.id_rows,
                             parallel=sp)
        model = WindowedModel(dit, shared, layout, y, None, s.guidance, s.batch_guidance,
                              progress=report, cancel=cancel, make_model=make_model)
        model._cache[0] = shared
    else:
        # several windows: caching every window's pose K/V would make memory grow with the clip for ~2%
        # of compute, so "auto" recomputes them per evaluation (True caches them all anyway)
        cache_kv = bool(s.cache_pose_kv)
        shared = dit.prepare(context, y[:, :layout.latent_window], refs, None, id_embedding=inputs.id_rows,
                             parallel=sp)
        model = WindowedModel(dit, shared, layout, y, inputs.pose_tokens, s.guidance, s.batch_guidance,
                              cache_pose_kv=cache_kv, progress=report, cancel=cancel, make_model=make_model)

    step_cache = None
    if s.step_cache > 0:
        step_cache = StepCache(s.step_cache, steps=s.steps, agree=None if mesh is None else mesh.agree)
        attach_step_cache(shared, step_cache)  # every window and guidance pass keeps its own state
    windowed = model

    if inputs.face is not None:
        keep = (s.background_strength * (1 - inputs.face))[None, None]
        model = preserve_background(model, y[None, :16].to(device), keep)
    sigmas = flow_sigmas(s.steps, shift=s.shift)
    latent = SAMPLERS[s.sampler](model, inputs.noise[None], sigmas,
                                 callback=lambda i, n, x: report("sample", i + 1, n), cancel=cancel)[0]
    evaluations, skipped = _evaluation_counts(windowed, s.batch_guidance, step_cache)
    if step_cache is not None and mesh is not None:  # each rank of a guidance pair counted its own pass
        evaluations, skipped = mesh.sum_over_pair([evaluations, skipped])
    return latent, evaluations, skipped


def decode_frames(vae, latent: torch.Tensor, plan: ClipPlan, settings: SwapSettings,
                  sink: Optional[Callable[[torch.Tensor, int], None]] = None, progress: Progress = None,
                  cancel: Cancel = None) -> Optional[torch.Tensor]:
    """Latent -> the plan's N frames [N, H, W, 3] float32 (``None`` when ``sink`` takes them). Stage "decode"."""
    s, report = settings, reporter(progress)
    report("decode", 0, 1)
    out = None
    if sink is None:
        out = torch.empty(plan.frames, *plan.size, 3, dtype=torch.float32)

        def sink(frames: torch.Tensor, start: int) -> None:
            out[start:start + frames.shape[0]] = frames

    tiles = {} if not s.vae_tile else {"tile": s.vae_tile, "overlap": s.vae_tile_overlap}
    decode_clip(vae, latent, plan, sink, cancel, **tiles)
    report("decode", 1, 1)
    return out


def _evaluation_counts(windowed: WindowedModel, batch: bool, step_cache: Optional[StepCache]):
    if step_cache is not None:
        return step_cache.evaluations, step_cache.skipped
    return windowed.evaluations * (1 if batch else 2), 0
