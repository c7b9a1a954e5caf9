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
exactly N frames are returned. Frames are resized and centre-cropped by :mod:`dreamidv_core.video_ops`
exactly like the swap's.

Long clips are sampled in overlapping windows (:mod:`dreamidv_core.windows`, as the swap): one latent for
the whole clip, the DiT evaluated per step on windows of ``window`` frames overlapping by ``overlap``, the
windows' velocities blended. Each window takes its slice of the whole-clip y and of the pose tokens: the
first window holds the known first frame, the last (end-aligned) window the known last frame, middle windows
have no known frame and are tied to their neighbours by the blended overlaps. A clip of at most one window
is exactly the single pass. Encode, pose tokens and decode stream window by window (flat memory).

Initialising an IVS from DreamID-V (full/faster) or Wan2.1-T2V weights: :func:`init_ivs_state_dict`.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import torch

from .configs import DiTConfig
from .errors import InputError
from .samplers import SAMPLERS, flow_sigmas, sigma_to_timestep
from .video_ops import output_size, prepare_frames, to_uint8_frames
from .windows import (MIN_FRAMES, FrameSource, WindowedModel, WindowLayout, check_window, clip_pose_tokens,
                      decode_clip, encode_clip, padded_frame_count, plan_windows)

Progress = Optional[Callable[[str, int, int], None]]
Cancel = Optional[Callable[[], bool]]
MASK_CHANNELS = 4  # pixel frames per latent frame (VAE temporal stride)
Y_CHANNELS = MASK_CHANNELS + 16


# ------------------------------------------------------------------------------------------------ conditioning

def flf_pixel_mask(frames: int, known_last: Optional[int] = None) -> torch.Tensor:
    """Per pixel frame, 1 where the frame is known: frame 0 and frames ``known_last`` .. frames-1 -> [frames].

    ``known_last`` defaults to the last frame (Wan's FLF2V layout for a 4n+1 clip).
    """
    m = torch.zeros(frames)
    m[0] = 1
    m[(frames - 1 if known_last is None else known_last):] = 1
    return m


def flf_mask(pixel_mask: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """pixel mask [Np] (Np = 4n+1) -> mask channels [4, F', h, w], F' = (Np - 1) / 4 + 1.

    Frame 0 is repeated 4 times (the VAE's first latent frame holds one pixel frame) and the 4 * F'
    entries are grouped in fours: channel c of latent frame k is pixel frame 4k - 3 + c (k > 0).
    """
    np_ = pixel_mask.shape[0]
    if (np_ - 1) % MASK_CHANNELS:
        raise InputError(f"the frame mask needs 4n+1 frames, got {np_}")
    m = torch.cat([pixel_mask[:1].repeat(MASK_CHANNELS), pixel_mask[1:]]).float()
    m = m.reshape(-1, MASK_CHANNELS).t()  # [4, F']
    return m[:, :, None, None].expand(-1, -1, h, w).contiguous()


class _FLFSource:
    """Frames [start, stop) of the padded FLF clip in [0, 1]: first at 0, last from ``last_at`` on, 0.5
    (zero after the [-1, 1] mapping) between -> [3, k, H, W]."""

    def __init__(self, first: torch.Tensor, last: torch.Tensor, last_at: int):
        self.first, self.last, self.last_at, self.what = first, last, last_at, "first/last frames"

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


@torch.no_grad()
def flf_conditioning(vae, first, last, frames: int, width: int = 832, height: int = 480,
                     device="cpu", cancel: Cancel = None, layout: Optional[WindowLayout] = None) -> torch.Tensor:
    """First/last frames -> the IVS conditioning y [20, F', H'/8, W'/8] (4 mask channels, then the latent).

    first, last: [H, W, C] images (uint8 or float in [0, 1]) of the same size; frames: N >= 5 output
    frames (padded to 4n+1; the last frame sits at N-1 and fills the padding); width x height: the area
    (resize down, centre crop to multiples of 16, as the swap). The VAE encodes ``[first, 0..., last]``
    in [-1, 1] (streaming when it has ``encode_iter``; else in the pieces of ``layout``, the windows of
    :func:`windows.plan_windows` for ``frames``; default one piece).
    """
    if frames < MIN_FRAMES:
        raise InputError(f"the IVS needs at least {MIN_FRAMES} frames, got {frames}")
    f0, f1 = prepare_first_last(first, last, width, height)
    np_ = padded_frame_count(frames)
    if layout is None:
        layout = plan_windows(frames, np_, 0)
    elif layout.frames != np_:
        raise InputError(f"the window layout is for {layout.frames} padded frames, the clip has {np_}")
    latent = encode_clip(vae, _FLFSource(f0, f1, frames - 1), layout, lambda p: p.mul(2).sub(1), device, cancel)
    mask = flf_mask(flf_pixel_mask(np_, frames - 1), *latent.shape[-2:]).to(latent)
    return torch.cat([mask, latent])


# ------------------------------------------------------------------------------------------------ weights

def ivs_config_from(source: DiTConfig) -> DiTConfig:
    """The IVS config with the sizes of a source DiT (full, faster or wan_t2v). The IVS has no identity
    input, so a source's ArcFace ID-token projection (``id_tokens``) is not carried over."""
    extra = {"id_tokens": 0} if hasattr(source, "id_tokens") else {}
    return source.with_(variant="ivs", in_dim=source.out_dim + Y_CHANNELS, cross_attn_pose=False, **extra)


@dataclass
class InitReport:
    """What :func:`init_ivs_state_dict` did, tensor by tensor (names)."""

    source_variant: str
    copied: List[str] = field(default_factory=list)
    partly_copied: List[str] = field(default_factory=list)  # patch_embedding: noise channels copied, rest zero
    initialised: List[str] = field(default_factory=list)  # fresh pose branch (the source had none)
    zeroed: List[str] = field(default_factory=list)  # pose gates of a fresh pose branch
    dropped: List[str] = field(default_factory=list)  # source tensors the IVS has no place for

    def summary(self) -> str:
        return (f"IVS initialised from a {self.source_variant} DiT: {len(self.copied)} tensors copied, "
                f"{len(self.partly_copied)} partly copied ({', '.join(self.partly_copied)}: the 16 noise input "
                f"channels; the 20 mask/latent channels zero), {len(self.initialised)} freshly initialised"
                f" (pose branch), {len(self.zeroed)} pose gates set to 0, {len(self.dropped)} dropped"
                + (f" (e.g. {', '.join(self.dropped[:3])})" if self.dropped else ""))


def _source_variant(names) -> str:
    names = set(names)
    has_pose = "blocks.0.self_attn.k_pose.weight" in names or any(n.startswith("project_pose.") for n in names)
    has_ref = "ref_conv.weight" in names
    if has_pose and not has_ref:
        return "ivs"
    return "full" if has_pose else ("faster" if has_ref else "wan_t2v")


def _fresh(name: str, shape: Tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Default-like init for a new pose-branch tensor: norm weights 1, gates 0, biases 0, matrices
    uniform(+-1/sqrt(fan_in)) (PyTorch's Linear/Conv default bound), seeded."""
    if name.endswith("pose_gate") or (name.endswith("bias")):
        return torch.zeros(shape)
    if "norm" in name:
        return torch.ones(shape)
    fan_in = 1
    for s in shape[1:]:
        fan_in *= s
    bound = 1.0 / max(1, fan_in) ** 0.5
    return (torch.rand(shape, generator=gen) * 2 - 1) * bound


def init_ivs_state_dict(source: Mapping[str, torch.Tensor], cfg: DiTConfig,
                        seed: int = 0) -> Tuple[Dict[str, torch.Tensor], InitReport]:
    """IVS weights from a DreamID-V (full / faster) or Wan2.1-T2V state dict (official names, no prefix).

    Every IVS tensor whose name and shape the source has is copied; ``patch_embedding.weight``
    [dim, 36, 1, 2, 2] gets the source's first 16 input channels (the noisy latent) and zeros for the
    20 new ones (bias copied); the pose branch (PoseGuider, k_pose/v_pose/norm_k_pose, pose_gate) is
    copied from a full model, or freshly initialised with every ``pose_gate`` = 0 when the source has none
    (Wan, faster); ``ref_conv`` and the unused cross-attention pose layers are dropped.

    With a Wan2.1-T2V source the new model computes exactly the source's velocity (zero new input
    channels, zero pose gates). With a DreamID-V source it does not: the source always attends to its
    reference tokens, which the IVS has no longer. Returns (float32-or-source-dtype tensors, report).
    """
    from .dit import DreamIDVTransformer

    if cfg.variant != "ivs":
        raise InputError(f"init_ivs_state_dict needs an IVS config (variant 'ivs'), got {cfg.variant!r}")
    with torch.device("meta"):
        target = {n: tuple(p.shape) for n, p in DreamIDVTransformer(cfg).named_parameters()}
    src_variant = _source_variant(source.keys())
    report = InitReport(src_variant)
    gen = torch.Generator().manual_seed(seed)
    out: Dict[str, torch.Tensor] = {}
    for name, shape in target.items():
        if name == "patch_embedding.weight":
            src = source.get(name)
            if src is None or src.shape[0] != shape[0] or src.shape[2:] != torch.Size(shape[2:]) \
                    or src.shape[1] < cfg.out_dim:
                raise InputError(f"source patch_embedding.weight {None if src is None else list(src.shape)} does not "
                                 f"fit an IVS of dim {shape[0]} (needs [dim, >= {cfg.out_dim}, ...])")
            w = torch.zeros(shape, dtype=src.dtype)
            w[:, :cfg.out_dim] = src[:, :cfg.out_dim]
            if src.shape[1] == shape[1] and src_variant == "ivs":
                w = src.clone()
            out[name] = w
            (report.copied if src_variant == "ivs" else report.partly_copied).append(name)
        elif name in source and tuple(source[name].shape) == shape:
            out[name] = source[name]
            report.copied.append(name)
        elif name in source:
            raise InputError(f"source tensor {name} is {list(source[name].shape)}, the IVS needs {list(shape)}: "
                             "the source DiT has other sizes than the IVS config")
        elif _is_pose(name):
            out[name] = _fresh(name, shape, gen)
            (report.zeroed if name.endswith("pose_gate") else report.initialised).append(name)
        else:
            raise InputError(f"the source state dict lacks {name}: not a DreamID-V / Wan2.1 DiT of this size")
    report.dropped = [n for n in source.keys() if n not in target]
    return out, report


def _is_pose(name: str) -> bool:
    return name.startswith("project_pose.") or any(f"self_attn.{p}" in name for p in
                                                    ("k_pose.", "v_pose.", "norm_k_pose.", "pose_gate"))


def load_ivs(path, weight_dtype: str = "bf16", compute_dtype: Optional[torch.dtype] = None, device="cpu",
             attention_backend: str = "sdpa", seed: int = 0):
    """An IVS from ``path``: IVS weights load as they are (:func:`checkpoints.load_dit`); a DreamID-V or
    Wan2.1-T2V file initialises a new IVS (:func:`init_ivs_state_dict`). -> (model, InitReport or None)."""
    from .checkpoints import DIT_PREFIXES, WEIGHT_DTYPES, _set_tensor, detect_dit_config, load_dit, storage_dtype
    from .dit import DreamIDVTransformer
    from .errors import CheckpointError
    from .state_dict_io import read_state_dict, strip_prefix

    if weight_dtype not in WEIGHT_DTYPES:
        raise CheckpointError(path, f"unknown weight dtype '{weight_dtype}'; choose one of {', '.join(WEIGHT_DTYPES)}")
    reader = read_state_dict(path)
    prefix = strip_prefix(reader.keys(), DIT_PREFIXES) or ""
    src_cfg = detect_dit_config(reader, prefix)
    if src_cfg.variant == "ivs":
        return load_dit(path, weight_dtype, compute_dtype, device, attention_backend=attention_backend), None
    cfg = ivs_config_from(src_cfg)
    source = {n[len(prefix):]: reader[n] for n in reader}
    try:
        tensors, report = init_ivs_state_dict(source, cfg, seed)
    except InputError as exc:
        raise CheckpointError(path, str(exc)) from None
    wdt = WEIGHT_DTYPES[weight_dtype]
    if compute_dtype is None:
        compute_dtype = torch.bfloat16 if wdt == torch.float8_e4m3fn else wdt
    with torch.device("meta"):
        model = DreamIDVTransformer(cfg, compute_dtype=compute_dtype, attention_backend=attention_backend)
    for name, p in list(model.named_parameters()):
        _set_tensor(model, name, tensors.pop(name).to(device=device, dtype=storage_dtype(name, tuple(p.shape), wdt)))
    return model.eval().requires_grad_(False), report


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
    cache_pose_kv: Optional[bool] = None  # None: one window and the per-block pose K/V fit (should_cache_pose_kv)
    window: int = 81  # frames per window (4n+1); longer clips are sampled in overlapping windows
    overlap: int = 16  # frames shared by neighbouring windows (a multiple of 4, < window)


def check_ivs_model(dit) -> None:
    cfg = getattr(dit, "cfg", None)
    if cfg is None or cfg.variant != "ivs":
        raise InputError(f"model: the IVS needs an IVS DiT (variant 'ivs': pose attention, 36 input channels), got "
                         f"{'a ' + cfg.variant + ' DiT' if cfg is not None else type(dit).__name__}; load it with "
                         "the IVS loader (it can initialise one from DreamID-V or Wan weights)")


def text_guided_model(dit, cond, negative_kv, guidance: float):
    """model(x [1, 16, F, h, w], sigma) -> velocity: ``c``, or ``u + g * (c - u)`` where ``u`` uses ``cond``
    with the negative text K/V ``negative_kv`` (per block; ``None``: no guidance, one pass)."""
    uncond = None if negative_kv is None else replace(cond, context_kv=negative_kv)

    def model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        t = sigma_to_timestep(sigma).to(x.device).reshape(1).float()
        c = dit(x, t, cond)
        if uncond is None:
            return c
        u = dit(x, t, uncond)
        return u + guidance * (c - u)

    return model


class IVSWindowedModel(WindowedModel):
    """:class:`windows.WindowedModel` (window layout, per-window y / pose slices, blending) whose per-window
    model is the IVS's text-guided one (:func:`text_guided_model`) instead of the swap's identity guidance."""

    def __init__(self, dit, shared, layout: WindowLayout, y: torch.Tensor, pose_tokens: Optional[torch.Tensor],
                 guidance: float, negative_kv, cache_pose_kv: bool = False, progress: Progress = None,
                 cancel: Cancel = None):
        super().__init__(dit, shared, layout, y, pose_tokens, guidance, False, cache_pose_kv=cache_pose_kv,
                         progress=progress, cancel=cancel,
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
    report = progress or (lambda stage, i, n: None)
    latent, n = sample_ivs_latent(dit, vae, first, last, pose, context, settings, report, cancel, negative_context)
    report("decode", 0, 1)
    out = None
    if sink is None:
        out = torch.empty(n, latent.shape[-2] * 8, latent.shape[-1] * 8, 3, dtype=torch.float32)

        def sink(frames: torch.Tensor, start: int) -> None:
            out[start:start + frames.shape[0]] = frames.cpu()

    decode_clip(vae, latent, plan_windows(n, settings.window, settings.overlap), n, sink, cancel)
    report("decode", 1, 1)
    return out


@torch.no_grad()
def sample_ivs_latent(dit, vae, first, last, pose, context: torch.Tensor, settings: IVSSettings = IVSSettings(),
                      progress: Progress = None, cancel: Cancel = None,
                      negative_context: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, int]:
    """:func:`sample_ivs` without the decode -> (latent [16, F', h, w] float32, N)."""
    s = settings
    check_ivs_model(dit)
    if s.sampler not in SAMPLERS:
        raise InputError(f"unknown sampler '{s.sampler}'; choose one of {', '.join(SAMPLERS)}")
    check_window(s.window, s.overlap)
    report = progress or (lambda stage, i, n: None)
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
    layout = plan_windows(n, s.window, s.overlap)
    report("encode", 0, 1)
    y = flf_conditioning(vae, first, last, n, s.width, s.height, device, cancel, layout=layout)
    report("encode", 1, 1)
    tokens = clip_pose_tokens(dit, FrameSource(pose, n, s.width, s.height, "pose video"), layout, cancel)
    negative_kv = None
    if s.guidance != 1.0:
        neg = negative_context if negative_context is not None else context.new_zeros(0, dit.cfg.text_dim)
        ctx = dit.embed_context(neg)
        negative_kv = [blk.cross_attn.context_kv(ctx) for _, blk in dit.streamed_blocks()]
    if layout.count == 1:  # the single pass
        cache_kv = s.cache_pose_kv if s.cache_pose_kv is not None else dit.should_cache_pose_kv(tuple(y.shape[1:]))
        shared = dit.prepare(context, y, None, tokens, cache_pose_kv=cache_kv)
        model = IVSWindowedModel(dit, shared, layout, y, None, s.guidance, negative_kv, progress=report,
                                 cancel=cancel)
        model._cache[0] = shared
    else:
        # several windows: per-window y and pose slices built when a window runs; pose K/V recomputed per
        # evaluation unless cache_pose_kv is True (caching all windows' would grow with the clip)
        shared = dit.prepare(context, y[:, :layout.latent_window], None, None)
        model = IVSWindowedModel(dit, shared, layout, y, tokens, s.guidance, negative_kv,
                                 cache_pose_kv=bool(s.cache_pose_kv), progress=report, cancel=cancel)
    del tokens

    gen = torch.Generator(device=device).manual_seed(s.seed)
    noise = torch.randn((dit.cfg.out_dim, *y.shape[1:]), generator=gen, dtype=torch.float32, device=device)
    latent = SAMPLERS[s.sampler](model, noise[None], flow_sigmas(s.steps, shift=s.shift),
                                 callback=lambda i, k, x: report("sample", i + 1, k), cancel=cancel)[0]
    return latent, n


def ivs_output_size(first, width: int, height: int) -> Tuple[int, int]:
    """(height, width) of the IVS output for a first frame [H, W, C]."""
    return output_size(int(first.shape[-3]), int(first.shape[-2]), width, height)
