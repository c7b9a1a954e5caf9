"""Model configurations: the released DreamID-V 1.3B variants, plain Wan2.1-T2V-1.3B, the Wan 2.1 VAE, and tiny
test models."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Tuple


@dataclass(frozen=True)
class DiTConfig:
    """Shape of a Wan2.1 / DreamID-V diffusion transformer.

    ``variant``: ``"full"`` (pose attention + PoseGuider), ``"faster"`` (reference tokens, no pose
    branch), ``"wan_t2v"`` (plain Wan2.1 text-to-video: no reference tokens, 16 input channels) or
    ``"ivs"`` (the IVS of :mod:`dreamidv_core.models.ivs`: pose attention + PoseGuider, no reference tokens,
    36 input channels = 16 noise + 4 frame mask + 16 first/last-frame latent).
    ``cross_attn_pose``: the reference declares pose layers inside every cross-attention too (class
    inheritance) although it never uses them; a checkpoint may carry them, so the model can hold them.
    ``id_tokens``: not in the released models; > 0 adds the trainable ArcFace ID-token projection.
    """

    variant: str = "full"
    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    in_dim: int = 48
    out_dim: int = 16
    ref_dim: int = 16
    patch_size: Tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    rope_theta: float = 10000.0
    pose_channels: int = 3
    pose_widths: Tuple[int, ...] = (128, 256, 512, 512)
    cross_attn_pose: bool = True
    id_tokens: int = 0  # > 0: an ArcFace ID-token projection of this many tokens (dreamidv_core.models.id_projection)
    id_embed_dim: int = 512  # width of the identity embedding it projects (ArcFace: 512)

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def has_pose(self) -> bool:
        return self.variant in ("full", "ivs")

    @property
    def has_ref(self) -> bool:
        return self.variant in ("full", "faster")

    def to_dict(self) -> dict:
        return asdict(self)

    def with_(self, **changes) -> "DiTConfig":
        return replace(self, **changes)


DREAMIDV_1_3B = DiTConfig(variant="full")
DREAMIDV_FASTER_1_3B = DiTConfig(variant="faster", cross_attn_pose=False)
WAN21_T2V_1_3B = DiTConfig(variant="wan_t2v", in_dim=16, cross_attn_pose=False)
# IVS (dreamidv_core.pipelines.ivs): pose attention, no reference tokens, FLF2V input 16 noise + 4 mask + 16 latent.
IVS_1_3B = DiTConfig(variant="ivs", in_dim=36, cross_attn_pose=False)

RELEASED_CONFIGS = {
    "dreamidv": DREAMIDV_1_3B,
    "dreamidv_faster": DREAMIDV_FASTER_1_3B,
    "wan21_t2v_1_3b": WAN21_T2V_1_3B,
}


def tiny_config(variant: str = "full", **overrides) -> DiTConfig:
    """A few-hundred-thousand-parameter model with the same code paths, for CPU tests.

    head_dim 16 keeps the 3-axis RoPE split non-trivial (16 - 4*2, 2*2, 2*2 -> 8/4/4 frequencies: 4, 2, 2).
    """
    base = dict(dim=64, ffn_dim=128, num_heads=4, num_layers=2, freq_dim=32, text_dim=32, text_len=16,
                pose_widths=(8, 8, 16, 16), cross_attn_pose=(variant == "full"))
    if variant == "wan_t2v":
        base["in_dim"] = 16
    elif variant == "ivs":
        base["in_dim"] = 36
    base.update(overrides)
    return DiTConfig(variant=variant, **base)


# ------------------------------------------------------------------------------------------------ VAE

@dataclass(frozen=True)
class WanVAEConfig:
    """Architecture hyper-parameters. ``z_dim`` must stay 16 (the latent statistics are per channel)."""

    dim: int = 96
    z_dim: int = 16
    dim_mult: Tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: Tuple[bool, ...] = (False, True, True)


WAN21_VAE_CONFIG = WanVAEConfig()
"""The released Wan 2.1 VAE."""

TINY_VAE_CONFIG = WanVAEConfig(dim=8, num_res_blocks=1)
"""Same code path at a fraction of the cost, for tests."""
