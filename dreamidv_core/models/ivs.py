"""The IVS model (Identity-Anchored Video Synthesizer): its conditioning layout and its initial weights.

The IVS is the DreamID-V DiT with pose attention and PoseGuider, without reference tokens (config
variant ``"ivs"``), conditioned the way Wan2.1's first-last-frame-to-video model is: ``y = cat(mask [4],
latent [16])``, DiT input ``cat(noise [16], y [20])`` = 36 channels. The mask has one channel per pixel frame
of a latent frame (:func:`flf_mask`). Sampling it: :mod:`dreamidv_core.pipelines.ivs`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple

import torch

from ..errors import InputError
from .configs import DiTConfig
from .dit import DreamIDVTransformer
from .frame_grid import TEMPORAL_STRIDE

MASK_CHANNELS = TEMPORAL_STRIDE  # one mask channel per pixel frame of a latent frame
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
