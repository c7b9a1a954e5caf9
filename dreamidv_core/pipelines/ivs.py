"""Identity-Anchored Video Synthesizer (IVS): a video from a first frame, a last frame and a pose video.

The IVS is the DreamID-V DiT with its pose attention and PoseGuider, without reference tokens
(config variant ``"ivs"``), conditioned the way Wan2.1's first-last-frame-to-video (FLF2V) model is:

* the pixel clip ``[first, 0, ..., 0, last]`` (in [-1, 1], so the unknown frames are mid-grey) is
  VAE-encoded into a normalised latent [16, F', h, w];
* a per-pixel-frame mask (1 for the known frames, 0 between) has its frame 0 repeated 4 times so that
  it has 4 * F' entries, which are grouped in fours: [4, F', h, w] (one channel per pixel frame of a
  latent frame);
* ``y = cat(mask [4], latent [16])`` -> [20, F', h, w]; the DiT input is ``cat(noise [16], y [20])``:
  36 channels, ``patch_embedding`` has ``in_dim = 36``.

Unlike Wan I2V/FLF2V there is **no CLIP image embedding** of the first/last frames (this DiT has no
image cross-attention); the frames reach the model through ``y`` only, and the motion through the pose
attention. Text guidance is optional (Wan's ``u + g * (c - u)`` with a negative or empty context).

Clips of N >= 5 frames are padded to Np = 4n+1 (the pose by repeating its last frame, as the swap does);
the last frame is placed at frame N-1 and repeated over the padding, all of which are marked known, and
exactly N frames are returned. Frames are resized and centre-cropped by :mod:`dreamidv_core.preprocess.video_ops`
exactly like the swap's.

Long clips are sampled in overlapping windows (:mod:`dreamidv_core.sampling.windows`, as the swap): one latent for
the whole clip, the DiT evaluated per step on windows of ``window`` frames overlapping by ``overlap``, the
windows' velocities blended. Each window takes its slice of the whole-clip y and of the pose tokens: the
first window holds the known first frame, the last (end-aligned) window the known last frame, middle windows
have no known frame and are tied to their neighbours by the blended overlaps. A clip of at most one window
is exactly the single pass. Encode, pose tokens and decode stream window by window (flat memory).

The model's conditioning layout and its initialisation from DreamID-V (full/faster) or Wan2.1-T2V weights:
:mod:`dreamidv_core.models.ivs`; loading an IVS file: :func:`dreamidv_core.weights.checkpoints.load_ivs`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

from ..errors import InputError, numeric_problems
from ..models.frame_grid import MIN_FRAMES, padded_frame_count
from ..models.ivs import flf_mask, flf_pixel_mask
from ..io.video import to_uint8_frames
from ..preprocess.video_ops import prepare_frames
from ..progress import Cancel, Progress, reporter
from ..sampling.guidance import text_guided_model
from ..sampling.samplers import SAMPLERS, flow_sigmas
from ..sampling.windows import WindowedModel, WindowLayout
from .clip_stream import FrameSource, clip_pose_tokens, decode_clip, encode_clip
from .plan import ClipPlan


# ------------------------------------------------------------------------------------------------ conditioning

class _FLFSource:
    """Frames [start, stop) of the padded FLF clip in [0, 1]: first at 0, last from ``last_at`` on, 0.5
    (zero after the [-1, 1] mapping) between -> [3, k, H, W]."""

    def __init__(self, first: torch.Tensor, last: torch.Tensor, plan: ClipPlan):
        self.first, self.last, self.plan, self.what = first, last, plan, "first/last frames"
        self.last_at = plan.frames - 1

    def __call__(self, start: int, stop: int) -> torch.Tensor:
        out = torch.full((3, stop - start, *self.first.shape[-2:]), 0.5)
        for i in range(start, stop):
            if i == 0:
                out[:, i - start] = self.first
            elif i >= self.last_at:
                out[:, i - start] = self.last
        return out


def prepare_first_last(first, last, width: int, height: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """first, last: images [H, W, C] or [1, H, W, C] (uint8 / float 0..1) of the same size -> two
    [3, H', W'] float32 in [0, 1], resized and centre-cropped like the swap's frames."""
    imgs = []
    for img, what in ((first, "first frame"), (last, "last frame")):
        arr = to_uint8_frames(img[None] if len(img.shape) == 3 and img.shape[-1] in (1, 3, 4) else img, what)
        if arr.shape[0] != 1:
            raise InputError(f"{what}: expected one image, got {arr.shape[0]} frames")
        imgs.append(arr)
    if imgs[0].shape[1:3] != imgs[1].shape[1:3]:
        raise InputError("first frame is {}x{}, last frame is {}x{}; they must have the same size".format(
            imgs[0].shape[2], imgs[0].shape[1], imgs[1].shape[2], imgs[1].shape[1]))
    return (prepare_frames(imgs[0], 1, width, height, "first frame")[:, 0],
            prepare_frames(imgs[1], 1, width, height, "last frame")[:, 0])


def ivs_plan(first, frames: int, width: int = 832, height: int = 480, window: Optional[int] = None,
             overlap: int = 16) -> ClipPlan:
    """The :class:`ClipPlan` of an IVS clip of ``frames`` (N >= 5) frames of the first frame's size [H, W, C]
    (``window`` None: one window of the whole padded clip)."""
    if frames < MIN_FRAMES:
        raise InputError(f"the IVS needs at least {MIN_FRAMES} frames, got {frames}")
    h, w = int(first.shape[-3]), int(first.shape[-2])
    if window is None:
        window, overlap = padded_frame_count(frames), 0
    return ClipPlan.build(w, h, frames, None, width, height, window, overlap)


@torch.no_grad()
def flf_conditioning(vae, first, last, plan: ClipPlan, device="cpu", cancel: Cancel = None) -> torch.Tensor:
    """First/last frames -> the IVS conditioning y [20, F', H'/8, W'/8] (4 mask channels, then the latent).

    first, last: [H, W, C] images (uint8 or float in [0, 1]) of the same size; ``plan`` (:func:`ivs_plan`):
    N >= 5 output frames (padded to 4n+1; the last frame sits at N-1 and fills the padding) at the area
    (resize down, centre crop to multiples of 16, as the swap). The VAE encodes ``[first, 0..., last]``
    in [-1, 1] (streaming when it has ``encode_iter``; else in the pieces of the plan's windows).
    """
    f0, f1 = prepare_first_last(first, last, *plan.area)
    latent = encode_clip(vae, _FLFSource(f0, f1, plan), lambda p: p.mul(2).sub(1), device, cancel)
    mask = flf_mask(flf_pixel_mask(plan.layout.frames, plan.frames - 1), *latent.shape[-2:]).to(latent)
    return torch.cat([mask, latent])


# ------------------------------------------------------------------------------------------------ sampling

@dataclass
class IVSSettings:
    """width x height: area (resize down, crop to multiples of 16); frames: N (None: the pose video's
    length); guidance: text guidance ``u + g * (c - u)`` (1: one pass, no negative)."""

    width: int = 832
    height: int = 480
    frames: Optional[int] = None
    steps: int = 20
    shift: float = 5.0
    guidance: float = 1.0
    seed: int = 0
    sampler: str = "unipc"
    cache_pose_kv: Optional[bool] = None  # None: while the per-block pose K/V fit the cache budget (windows.py)
    embed_condition_once: bool = True  # y's patch embedding once per window (False: bit-identical single pass)
    window: int = 81  # frames per window (4n+1); longer clips are sampled in overlapping windows
    overlap: int = 16  # frames shared by neighbouring windows (a multiple of 4, < window)

    def validate(self) -> "IVSSettings":
        """Every number checked before any work (an :class:`InputError` naming each bad one); returns ``self``."""
        problems = numeric_problems(
            str, ("width", self.width, "int", 1, None), ("height", self.height, "int", 1, None),
            ("frames", self.frames, "int?", None, None), ("steps", self.steps, "int", 1, None),
            ("shift", self.shift, "float>", 0, None), ("guidance", self.guidance, "float", None, None),
            ("seed", self.seed, "int", None, None), ("window", self.window, "int", MIN_FRAMES, None),
            ("overlap", self.overlap, "int", 0, None))
        if self.sampler not in SAMPLERS:
            problems.append(f"sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if problems:
            raise InputError("invalid IVS settings: " + "; ".join(problems))
        return self


def check_ivs_model(dit) -> None:
    cfg = getattr(dit, "cfg", None)
    if cfg is None or cfg.variant != "ivs":
        raise InputError(f"model: the IVS needs an IVS DiT (variant 'ivs': pose attention, 36 input channels), got "
                         f"{'a ' + cfg.variant + ' DiT' if cfg is not None else type(dit).__name__}; load it with "
                         "the IVS loader (it can initialise one from DreamID-V or Wan weights)")


class IVSWindowedModel(WindowedModel):
    """:class:`windows.WindowedModel` (window layout, per-window y / pose slices, blending) whose per-window
    model is the IVS's text-guided one (:func:`text_guided_model`) instead of the swap's identity guidance."""

    def __init__(self, dit, shared, layout: WindowLayout, y: torch.Tensor, pose_tokens: Optional[torch.Tensor],
                 guidance: float, negative_kv, cache_pose_kv: Optional[bool] = False, progress: Progress = None,
                 cancel: Cancel = None, cache_budget: Optional[int] = None, embed_condition: bool = True):
        super().__init__(dit, shared, layout, y, pose_tokens, guidance, False, cache_pose_kv=cache_pose_kv,
                         progress=progress, cancel=cancel, cache_budget=cache_budget, embed_condition=embed_condition,
                         make_model=lambda dit_, cond, g, _batch: text_guided_model(dit_, cond, negative_kv, g))


@torch.no_grad()
def sample_ivs(dit, vae, first, last, pose, context: torch.Tensor, settings: IVSSettings = IVSSettings(),
               progress: Progress = None, cancel: Cancel = None,
               negative_context: Optional[torch.Tensor] = None,
               sink: Optional[Callable[[torch.Tensor, int], None]] = None) -> Optional[torch.Tensor]:
    """Generate N frames from the first and last frames and a pose video -> [N, H', W', 3] float32 in [0, 1]
    (``None`` when ``sink(frames [k, H', W', 3] float32, start)`` receives the decoded frames instead).

    first, last: [H, W, C] images of the same size; pose: frames [>= N, H, W, C] of that size (uint8 or float
    0..1); context: text context [L, text_dim]; negative_context (with guidance != 1): [L', text_dim],
    default the empty context. ``progress(stage, i, n)``: "encode", "sample" (per step), "window" (per window
    evaluation), "decode"; ``cancel()`` -> True raises :class:`Cancelled`. Clips longer than
    ``settings.window`` frames are sampled in overlapping windows (module docstring).
    """
    report = reporter(progress)
    latent, plan = sample_ivs_latent(dit, vae, first, last, pose, context, settings, report, cancel,
                                     negative_context)
    report("decode", 0, 1)
    out = None
    if sink is None:
        out = torch.empty(plan.frames, *plan.size, 3, dtype=torch.float32)

        def sink(frames: torch.Tensor, start: int) -> None:
            out[start:start + frames.shape[0]] = frames.cpu()

    decode_clip(vae, latent, plan, sink, cancel)
    report("decode", 1, 1)
    return out


@torch.no_grad()
def sample_ivs_latent(dit, vae, first, last, pose, context: torch.Tensor, settings: IVSSettings = IVSSettings(),
                      progress: Progress = None, cancel: Cancel = None,
                      negative_context: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, ClipPlan]:
    """:func:`sample_ivs` without the decode -> (latent [16, F', h, w] float32, the clip's plan)."""
    s = settings.validate()
    check_ivs_model(dit)
    report = reporter(progress)
    if pose is None:
        raise InputError("the IVS needs a pose video")
    n = len(pose) if s.frames is None else int(s.frames)
    if n < MIN_FRAMES:
        raise InputError(f"the IVS needs at least {MIN_FRAMES} frames, got {n}")
    if len(pose) < n:
        raise InputError(f"pose video has {len(pose)} frames, fewer than the {n} to generate")
    f0 = to_uint8_frames(first[None] if len(first.shape) == 3 else first[:1], "first frame")[0]
    p0 = to_uint8_frames(pose[:1], "pose video")[0]
    if p0.shape[:2] != f0.shape[:2]:
        raise InputError(f"pose video frames are {p0.shape[1]}x{p0.shape[0]}, the first frame is "
                         f"{f0.shape[1]}x{f0.shape[0]}; they must have the same size")
    device = dit.patch_embedding.weight.device
    plan = ivs_plan(f0, n, s.width, s.height, s.window, s.overlap)
    layout = plan.layout
    report("encode", 0, 1)
    y = flf_conditioning(vae, first, last, plan, device, cancel)
    report("encode", 1, 1)
    tokens = clip_pose_tokens(dit, FrameSource(pose, plan, "pose video"), cancel)
    negative_kv = None
    if s.guidance != 1.0:
        neg = negative_context if negative_context is not None else context.new_zeros(0, dit.cfg.text_dim)
        ctx = dit.embed_context(neg)
        negative_kv = [blk.cross_attn.context_kv(ctx) for _, blk in dit.streamed_blocks()]
    # one window or many: the same code and caching rule (windows.py)
    shared = dit.prepare(context, y[:, :layout.latent_window], None, None)
    model = IVSWindowedModel(dit, shared, layout, y, tokens, s.guidance, negative_kv, cache_pose_kv=s.cache_pose_kv,
                             progress=report, cancel=cancel,
                             cache_budget=None if s.cache_pose_kv is True else dit.cache_budget_bytes(),
                             embed_condition=s.embed_condition_once)
    del tokens

    gen = torch.Generator(device=device).manual_seed(s.seed)
    noise = torch.randn((dit.cfg.out_dim, *y.shape[1:]), generator=gen, dtype=torch.float32, device=device)
    latent = SAMPLERS[s.sampler](model, noise[None], flow_sigmas(s.steps, shift=s.shift),
                                 callback=lambda i, k, x: report("sample", i + 1, k), cancel=cancel)[0]
    return latent, plan
