"""The DreamID-V diffusion transformer: Wan2.1 blocks with reference tokens and pose attention.

Token sequence of one sample (h, w = latent size / 2):

    [ reference tokens (h*w) | video tokens (F*h*w) ]      RoPE grid (F+1, h, w)

Reference tokens come from ``ref_conv`` on the VAE latent of the reference image and take temporal
RoPE index 0; video latent frame i takes index i+1; the reference tokens are cut before the head.
Every self-attention adds ``pose_gate * Attn(q, rope(norm_k_pose(k_pose(P))), v_pose(P))``, with ``P``
the PoseGuider tokens behind zero vectors at the reference positions.

What does not change between sampling steps is computed once by :meth:`DreamIDVTransformer.prepare`:
the text embedding and every block's cross-attention K/V, the reference tokens (with and without the
reference), the RoPE table, the PoseGuider tokens and (optionally) every block's pose K/V.

Models built with ``cfg.id_tokens > 0`` (or :meth:`DreamIDVTransformer.attach_id_projection`) also hold
the ArcFace ID-token projection (:mod:`dreamidv_core.models.id_projection`): ``prepare(..., id_embedding=[R, E])``
computes every block's ID K/V once, and each self-attention adds ``gate_i * Attn(q, K_id, V_id)`` (query
before RoPE). With every gate 0 this is exactly the model without it.

Sequence parallelism (several processes on one clip, :mod:`dreamidv_core.parallel.ulysses`) enters through
``prepare(..., parallel=)``: the conditions then carry it, the forward runs the blocks on this rank's part of the
token sequence and exchanges q/k/v around each self-attention. Without it (``None``, the default) nothing
changes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .attention import attention, check_backend
from .configs import DiTConfig
from ..errors import InputError
from .id_projection import IDProjection
from .layers import (CastConv2d, CastConv3d, CastLinear, LayerNorm, RMSNorm, apply_rope, rope_table,
                     sinusoidal_embedding)
from .pose_guider import PoseGuider

KV = Tuple[torch.Tensor, torch.Tensor]
IDAttn = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # ID K [B, T, N, D], ID V [B, T, N, D], gate [1]


class _AttentionLayers(nn.Module):
    """q, k, v, o projections with qk RMSNorm, plus the pose layers when ``pose`` (the released names)."""

    def __init__(self, dim: int, num_heads: int, eps: float, pose: bool):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q, self.k, self.v, self.o = (CastLinear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)
        if pose:
            self.k_pose, self.v_pose = CastLinear(dim, dim), CastLinear(dim, dim)
            self.norm_k_pose = RMSNorm(dim, eps)
            self.pose_gate = nn.Parameter(torch.zeros(1))

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (self.num_heads, self.head_dim))


class SelfAttention(_AttentionLayers):
    """Multi-head self-attention with qk RMSNorm, 3-axis RoPE and (optionally) gated pose attention."""

    def pose_kv(self, pose_tokens: torch.Tensor, rope, sp=None) -> KV:
        """pose_tokens [1, L, C] (zeros at reference positions) -> roped pose K, pose V [1, L, N, D]
        (with ``sp``, a sequence-parallel group: this rank's heads only, [1, L, N/P, D])."""
        k, v = self._heads(self.norm_k_pose(self.k_pose(pose_tokens))), self._heads(self.v_pose(pose_tokens))
        if sp is not None:
            k, v = sp.heads(k), sp.heads(v)
        return apply_rope(k, *rope).to(pose_tokens.dtype), v

    def forward(self, x: torch.Tensor, rope, pose_kv: Optional[KV], backend: str,
                id_attn: Optional[IDAttn] = None, sp=None) -> torch.Tensor:
        """x [B, L, C] (compute dtype) -> [B, L, C]. ``id_attn``: this block's ID K/V and gate (ID tokens have
        no position, so they are attended with the query before RoPE). ``sp``: this forward's sequence shard
        (:class:`dreamidv_core.parallel.ulysses.SequenceShard`): x and rope are this rank's rows, pose/ID K/V
        this rank's heads; q/k/v go to head layout for the attentions and the output comes back."""
        q0 = self._heads(self.norm_q(self.q(x)))
        q = apply_rope(q0, *rope).to(x.dtype)
        k = apply_rope(self._heads(self.norm_k(self.k(x))), *rope).to(x.dtype)
        v = self._heads(self.v(x))
        q_id = None if id_attn is None else q0.to(x.dtype)
        if sp is not None:
            q, k, v, *rest = sp.to_heads(q, k, v, *([] if q_id is None else [q_id]))
            q_id = rest[0] if rest else None
        out = attention(q, k, v, backend)
        if pose_kv is not None:
            out = out.float() + self.pose_gate.float() * attention(q, *pose_kv, backend).float()
        if id_attn is not None:
            id_k, id_v, gate = id_attn
            out = out.float() + gate.float() * attention(q_id, id_k, id_v, backend).float()
        out = out.to(x.dtype)
        return self.o(out if sp is None else sp.to_seq(out))


class CrossAttention(_AttentionLayers):
    """Attention from the video tokens to the 512 text tokens (whose K/V are computed once).

    With ``pose=True`` it holds the pose layers the reference declares here by inheritance and never uses.
    """

    def context_kv(self, context: torch.Tensor) -> KV:
        """context [1, text_len, C] (embedded) -> K, V [1, text_len, N, D] in the context's dtype."""
        return self._heads(self.norm_k(self.k(context))).to(context.dtype), self._heads(self.v(context))

    def forward(self, x: torch.Tensor, kv: KV, backend: str) -> torch.Tensor:
        q = self._heads(self.norm_q(self.q(x))).to(x.dtype)
        return self.o(attention(q, *kv, backend))


class DiTBlock(nn.Module):
    """Wan2.1 block: modulated self-attention, affine-normed cross-attention, modulated GELU FFN."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        dim = cfg.dim
        self.norm1 = LayerNorm(dim, cfg.eps)
        self.self_attn = SelfAttention(dim, cfg.num_heads, cfg.eps, pose=cfg.has_pose)
        self.norm3 = LayerNorm(dim, cfg.eps, affine=True)
        self.cross_attn = CrossAttention(dim, cfg.num_heads, cfg.eps, pose=cfg.cross_attn_pose)
        self.norm2 = LayerNorm(dim, cfg.eps)
        self.ffn = nn.Sequential(CastLinear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"),
                                 CastLinear(cfg.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim ** 0.5)

    def forward(self, x, e0, rope, context_kv: KV, pose_kv: Optional[KV], cdtype, backend,
                id_attn: Optional[IDAttn] = None, sp=None):
        """x [B, L, C] (compute dtype, then float32), e0 [B, 6, C] float32 -> [B, L, C] float32.
        ``sp``: see :meth:`SelfAttention.forward` (every other op works token by token)."""
        e = (self.modulation.float() + e0).chunk(6, dim=1)
        h = self.norm1(x).float() * (1 + e[1]) + e[0]
        x = x + self.self_attn(h.to(cdtype), rope, pose_kv, backend, id_attn, sp).float() * e[2]
        x = x + self.cross_attn(self.norm3(x).to(cdtype), context_kv, backend).float()
        h = self.norm2(x).float() * (1 + e[4]) + e[3]
        return x + self.ffn(h.to(cdtype)).float() * e[5]


class Head(nn.Module):
    """Modulated LayerNorm + linear to patch pixels, in float32 as in the reference."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        out = cfg.out_dim * cfg.patch_size[0] * cfg.patch_size[1] * cfg.patch_size[2]
        self.norm = LayerNorm(cfg.dim, cfg.eps)
        self.head = CastLinear(cfg.dim, out)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim ** 0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x [B, L, C], e [B, C] float32 -> [B, L, out_dim * prod(patch)] float32."""
        shift, scale = (self.modulation.float() + e.unsqueeze(1)).chunk(2, dim=1)
        return self.head(self.norm(x.float()) * (1 + scale) + shift)


@dataclass
class DiTConditions:
    """Everything the DiT needs besides the noisy latent and the timestep, computed once per video.

    ``ref_tokens`` [R, Lr, C]: one row per reference variant (for identity guidance: the reference,
    then the zeroed reference). ``pose_kv`` holds each block's pose K/V when cached, otherwise
    ``pose_tokens`` [1, Lr + Lv, C] is kept and K/V are recomputed per call. ``id_kv``: each block's ArcFace
    ID K/V [R, T, N, D] (one row per reference row) when the model has an active ID projection.
    ``parallel``: the sequence-parallel group (:class:`dreamidv_core.parallel.ulysses.SequenceParallel`) the
    forward splits the tokens over; pose and ID K/V then hold this rank's heads only. ``None``: one process.
    """

    grid: Tuple[int, int, int]
    y: Optional[torch.Tensor]
    ref_tokens: Optional[torch.Tensor]
    rope: Tuple[torch.Tensor, torch.Tensor]
    context_kv: List[KV]
    pose_tokens: Optional[torch.Tensor] = None
    pose_kv: Optional[List[KV]] = None
    extra: dict = field(default_factory=dict)
    id_kv: Optional[List[KV]] = None
    parallel: Optional[object] = None

    @property
    def num_refs(self) -> int:
        return 0 if self.ref_tokens is None else self.ref_tokens.shape[0]


class DreamIDVTransformer(nn.Module):
    """Wan2.1 DiT with DreamID-V's reference tokens and pose attention (``full``), reference tokens
    only (``faster``), or neither (``wan_t2v``). Parameter names equal the released checkpoints'."""

    def __init__(self, cfg: DiTConfig, compute_dtype: torch.dtype = torch.float32, attention_backend: str = "sdpa"):
        super().__init__()
        self.cfg = cfg
        self.compute_dtype = compute_dtype
        self.attention_backend = check_backend(attention_backend)
        dim = cfg.dim
        self.patch_embedding = CastConv3d(cfg.in_dim, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(CastLinear(cfg.text_dim, dim), nn.GELU(approximate="tanh"),
                                            CastLinear(dim, dim))
        self.time_embedding = nn.Sequential(CastLinear(cfg.freq_dim, dim), nn.SiLU(), CastLinear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), CastLinear(dim, dim * 6))
        self.blocks = nn.ModuleList([DiTBlock(cfg) for _ in range(cfg.num_layers)])
        self.head = Head(cfg)
        if cfg.has_ref:
            self.ref_conv = CastConv2d(cfg.ref_dim, dim, kernel_size=cfg.patch_size[1:], stride=cfg.patch_size[1:])
        if cfg.has_pose:
            self.project_pose = PoseGuider(dim, cfg.pose_channels, cfg.pose_widths, cfg.patch_size)
        if cfg.id_tokens > 0:  # registered last: the released parameters keep their order
            self.id_projection = IDProjection(dim, cfg.num_heads, cfg.num_layers, cfg.id_tokens, cfg.id_embed_dim,
                                              cfg.eps)
        self.block_offload = None  # sampling.offload.BlockOffload when some blocks live off the device

    def attach_id_projection(self, num_tokens: int = 4, embed_dim: int = 512) -> IDProjection:
        """Add a fresh (gates 0: a no-op until trained) ID-token projection to a model without one, on the
        model's device, float32; ``cfg`` gains ``id_tokens`` / ``id_embed_dim``."""
        if getattr(self, "id_projection", None) is not None:
            raise InputError("this model already has an ID-token projection")
        cfg = self.cfg
        proj = IDProjection(cfg.dim, cfg.num_heads, cfg.num_layers, num_tokens, embed_dim, cfg.eps)
        self.id_projection = proj.to(self.patch_embedding.weight.device)
        self.cfg = cfg.with_(id_tokens=num_tokens, id_embed_dim=embed_dim)
        return self.id_projection

    @property
    def id_projection_active(self) -> bool:
        """True when the model has an ID projection that can change its output (a gate != 0 or training)."""
        proj = getattr(self, "id_projection", None)
        return proj is not None and not proj.is_noop()

    def streamed_blocks(self) -> Iterator[Tuple[int, DiTBlock]]:
        """Yield (index, block) with the block's weights on the compute device: with block offload
        (``sampling.offload.enable_block_offload``) each offloaded block is streamed in for the loop body only."""
        off = self.block_offload
        if off is None:
            yield from enumerate(self.blocks)
            return
        off.begin()
        for i, blk in enumerate(self.blocks):
            off.fetch(i)
            try:
                yield i, blk
            finally:
                off.release(i)

    # ------------------------------------------------------------------ conditions (once per video)
    @torch.no_grad()
    def pose_tokens(self, pose_video: torch.Tensor) -> torch.Tensor:
        """pose video [1, 3, F, H, W] in [0, 1] -> PoseGuider tokens [1, Lv, C] in the compute dtype."""
        if not self.cfg.has_pose:
            raise InputError("this DreamID-V checkpoint (faster variant) has no pose branch")
        return self.project_pose(pose_video.to(self.compute_dtype)).to(self.compute_dtype)

    def embed_context(self, context) -> torch.Tensor:
        """Text context -> embedded, zero-padded to text_len: [L, text_dim] -> [1, text_len, C]; a batch
        ([B, L, text_dim] or a list of [L_b, text_dim]) -> [B, text_len, C]. L <= text_len.

        Grad-agnostic (inference calls it under ``no_grad``; training with autograd)."""
        items = [context] if torch.is_tensor(context) and context.dim() == 2 else list(context)
        padded = []
        for i, c in enumerate(items):
            what = "text context" if len(items) == 1 else f"text context {i}"
            if c.dim() != 2 or c.shape[-1] != self.cfg.text_dim:
                raise InputError(f"{what} must be [tokens, {self.cfg.text_dim}], got {list(c.shape)}")
            if c.shape[0] > self.cfg.text_len:
                raise InputError(f"{what} has {c.shape[0]} tokens; at most {self.cfg.text_len} allowed")
            p = c.new_zeros(self.cfg.text_len, c.shape[1])
            p[: c.shape[0]] = c
            padded.append(p)
        device = self.patch_embedding.weight.device
        return self.text_embedding(torch.stack(padded).to(device, self.compute_dtype))

    def prepare(self, context, y: Optional[torch.Tensor] = None,
                ref_latents: Optional[torch.Tensor] = None, pose_tokens: Optional[torch.Tensor] = None,
                latent_grid: Optional[Tuple[int, int, int]] = None, cache_pose_kv: bool = True,
                id_embedding: Optional[torch.Tensor] = None, parallel=None) -> DiTConditions:
        """Compute once what every step reuses.

        context [L, text_dim] (or one per sample, see :meth:`embed_context`); y [32, F, h8, w8] or
        [B, 32, F, h8, w8] (VAE video latent then VAE mask latent; ``None`` for ``wan_t2v``);
        ref_latents [R, 16, 1, h8, w8] (reference latent rows: at inference the reference and zeros,
        in training one per sample); pose_tokens [1 or B, Lv, C] from :meth:`pose_tokens` (``None``: no
        pose attention); id_embedding [R, id_embed_dim] (ArcFace; one row per reference row: at inference
        the embedding and zeros) for a model with an active ID projection (:attr:`id_projection_active`),
        ignored otherwise. ``parallel``: a sequence-parallel group (see :class:`DiTConditions`; inference only).
        Grad-agnostic: inference calls it under ``no_grad``, training with autograd.
        """
        cfg, cd = self.cfg, self.compute_dtype
        device = self.patch_embedding.weight.device
        if y is not None:
            y = y[None] if y.dim() == 4 else y
            if y.dim() != 5 or y.shape[1] != cfg.in_dim - cfg.out_dim:
                raise InputError(f"conditioning latent y must be [{cfg.in_dim - cfg.out_dim}, F, h, w] or "
                                 f"[B, {cfg.in_dim - cfg.out_dim}, F, h, w], got {list(y.shape)}")
            latent_grid = tuple(y.shape[2:])
        elif cfg.in_dim != cfg.out_dim:
            raise InputError("this model needs the video and mask latents (y)")
        if latent_grid is None:
            raise InputError("latent_grid is required when y is not given")
        f, h8, w8 = latent_grid
        pt, ph, pw = cfg.patch_size
        if h8 % ph or w8 % pw:
            raise InputError(f"latent size {h8}x{w8} must be divisible by the patch size {ph}x{pw}")
        grid = (f // pt, h8 // ph, w8 // pw)
        ref_tokens = None
        if cfg.has_ref:
            if ref_latents is None:
                raise InputError("this model needs the reference image latent")
            if ref_latents.dim() == 4:
                ref_latents = ref_latents[None]
            if tuple(ref_latents.shape[-2:]) != (h8, w8):
                raise InputError(f"reference latent is {tuple(ref_latents.shape[-2:])}, the video latent is "
                                 f"{(h8, w8)}: the reference must be letterboxed to the video size")
            ref = ref_latents[:, :, 0].to(device, cd)
            ref_tokens = self.ref_conv(ref).flatten(2).transpose(1, 2)
        rope_grid = (grid[0] + 1, grid[1], grid[2]) if cfg.has_ref else grid
        rope = rope_table(rope_grid, cfg.head_dim, cfg.rope_theta, device)
        ctx = self.embed_context(context)
        context_kv = [blk.cross_attn.context_kv(ctx) for _, blk in self.streamed_blocks()]
        cond = DiTConditions(grid=grid, y=None if y is None else y.to(device, cd), ref_tokens=ref_tokens,
                             rope=rope, context_kv=context_kv, parallel=parallel)
        if self.id_projection_active:
            if id_embedding is None:
                raise InputError("this model has a trained ArcFace ID-token projection: give the identity's ArcFace "
                                 f"embedding (id_embedding [rows, {cfg.id_embed_dim}]; the identity node must "
                                 "detect a face)")
            emb = id_embedding[None] if id_embedding.dim() == 1 else id_embedding
            if ref_tokens is not None and emb.shape[0] != ref_tokens.shape[0]:
                raise InputError(f"{emb.shape[0]} ID embedding rows for {ref_tokens.shape[0]} reference rows; give "
                                 "one per reference row (inference: the embedding, then zeros)")
            cond.id_kv = self.id_projection.all_kv(emb, cd)
            if parallel is not None:
                cond.id_kv = [(parallel.heads(k), parallel.heads(v)) for k, v in cond.id_kv]
        if pose_tokens is not None:
            if not cfg.has_pose:
                raise InputError("pose tokens were given but this checkpoint (faster variant) has no pose branch")
            lv = grid[0] * grid[1] * grid[2]
            if pose_tokens.shape[-2] != lv:
                raise InputError(f"pose video gives {pose_tokens.shape[-2]} tokens, the video latent {lv}: "
                                 "pose frames and size must match the video's")
            num_ref_tokens = 0 if ref_tokens is None else ref_tokens.shape[1]
            pb = pose_tokens.shape[0] if pose_tokens.dim() == 3 else 1
            full = torch.cat([pose_tokens.new_zeros(pb, num_ref_tokens, cfg.dim), pose_tokens.reshape(pb, lv, cfg.dim)],
                             dim=1)
            full = full.to(device, cd)
            if cache_pose_kv:
                cond.pose_kv = [blk.self_attn.pose_kv(full, rope, parallel) for _, blk in self.streamed_blocks()]
            else:
                cond.pose_tokens = full
        return cond

    def pose_kv_cache_bytes(self, latent_grid: Tuple[int, int, int]) -> int:
        """Memory the per-block pose K/V cache takes for a latent grid (F, h8, w8)."""
        f, h8, w8 = latent_grid
        pt, ph, pw = self.cfg.patch_size
        tokens = (f // pt + 1) * (h8 // ph) * (w8 // pw)
        itemsize = torch.empty((), dtype=self.compute_dtype).element_size()
        return 2 * tokens * self.cfg.dim * self.cfg.num_layers * itemsize

    def should_cache_pose_kv(self, latent_grid: Tuple[int, int, int], budget_fraction: float = 0.25) -> bool:
        """Cache the pose K/V (saves two linear layers per block and evaluation) only when it takes
        less than ``budget_fraction`` of the free memory of the model's device. At 81 frames of
        832x480 the 1.3B model's cache is ~6.3 GB in bf16 for a saving of ~2% per evaluation."""
        device = self.patch_embedding.weight.device
        if device.type == "cuda":
            free = torch.cuda.mem_get_info(device)[0]
        else:
            import psutil

            free = psutil.virtual_memory().available
        return self.pose_kv_cache_bytes(latent_grid) < budget_fraction * free

    # ------------------------------------------------------------------ one evaluation
    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: DiTConditions,
                refs: Optional[Sequence[int]] = None) -> torch.Tensor:
        """x [B, 16, F, h8, w8] noisy latent, t [B] or scalar timestep (0..1000) -> velocity [B, 16, F, h8, w8] float32.

        ``refs`` picks a row of ``cond.ref_tokens`` (and of ``cond.id_kv``) per batch element (default: row b
        for element b when B == R, else row 0).
        """
        cfg, cd, backend = self.cfg, self.compute_dtype, self.attention_backend
        b = x.shape[0]
        inp = x.to(cd)
        if cond.y is not None:
            inp = torch.cat([inp, cond.y.expand(b, -1, -1, -1, -1)], dim=1)
        tokens = self.patch_embedding(inp).flatten(2).transpose(1, 2)
        num_ref_tokens = 0
        if cond.ref_tokens is not None:
            if refs is None:
                refs = list(range(b)) if cond.num_refs == b else [0] * b
            ref = cond.ref_tokens[list(refs)]
            num_ref_tokens = ref.shape[1]
            tokens = torch.cat([ref, tokens], dim=1)
        id_kv = None
        if cond.id_kv is not None:
            rows = cond.id_kv[0][0].shape[0]
            pick = list(refs) if refs is not None else (list(range(b)) if rows == b else [0] * b)
            id_kv = [(k[pick], v[pick]) for k, v in cond.id_kv]
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(b)
        e = self.time_embedding(sinusoidal_embedding(cfg.freq_dim, t))
        e0 = self.time_projection(e).unflatten(1, (6, cfg.dim))
        sp = None if cond.parallel is None else cond.parallel.bind(tokens.shape[1])
        local = tokens if sp is None else sp.take(tokens)  # this rank's part of the sequence
        cache = cond.extra.get("step_cache")  # sampling.step_cache.StepCache: may skip the blocks
        if cache is None:
            h = self.run_blocks(local, e0, cond, id_kv, sp)
        else:
            h = cache.run(self, tokens, e0, num_ref_tokens, cache.key(cond, refs),
                          lambda x: self.run_blocks(x, e0, cond, id_kv, sp), local=local)
        if sp is None:
            out = self.head(h[:, num_ref_tokens:], e)
        else:  # the head works token by token: on this rank's part, then its narrow output is gathered
            out = sp.gather(self.head(h, e))[:, num_ref_tokens:]
        return self.unpatchify(out, cond.grid)

    def run_blocks(self, h: torch.Tensor, e0: torch.Tensor, cond: DiTConditions,
                   id_kv: Optional[List[KV]] = None, sp=None) -> torch.Tensor:
        """tokens [B, L, C] (compute dtype), e0 [B, 6, C] float32 -> output of the last block [B, L, C] float32.
        ``id_kv``: each block's ID K/V with one row per batch element (see :meth:`forward`). ``sp``: the
        forward's sequence shard; ``h`` is then this rank's rows [B, Lp/P, C]."""
        cd, backend = self.compute_dtype, self.attention_backend
        rope = cond.rope if sp is None else sp.rope(cond.rope)
        for i, blk in self.streamed_blocks():
            pose_kv = None
            if cond.pose_kv is not None:
                pose_kv = cond.pose_kv[i]
            elif cond.pose_tokens is not None:
                pose_kv = blk.self_attn.pose_kv(cond.pose_tokens, cond.rope, sp)
            id_attn = None if id_kv is None else (*id_kv[i], self.id_projection.blocks[i].gate)
            h = blk(h, e0, rope, cond.context_kv[i], pose_kv, cd, backend, id_attn, sp)
        return h

    def unpatchify(self, x: torch.Tensor, grid: Tuple[int, int, int]) -> torch.Tensor:
        """[B, F*h*w, out*pt*ph*pw] -> [B, out, F*pt, h*ph, w*pw]."""
        b = x.shape[0]
        f, h, w = grid
        pt, ph, pw = self.cfg.patch_size
        c = self.cfg.out_dim
        x = x.reshape(b, f, h, w, pt, ph, pw, c).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(b, c, f * pt, h * ph, w * pw)


def init_random_(model: nn.Module, seed: int = 0, std: float = 0.05) -> nn.Module:
    """Fill every parameter with seeded noise (tests and benchmarks; the released init zeroes the head).

    Matrices get variance-preserving noise (std 1/sqrt(fan_in)) so signals neither vanish nor explode
    through the tiny models; vectors and modulation get ``std``; norm weights 1 + noise; pose gates 0.5;
    ID-projection gates stay 0 (a no-op until a test or training sets them).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("pose_gate"):
                p.fill_(0.5)
            elif name.startswith("id_projection.") and name.endswith(".gate"):
                p.zero_()
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + std * noise)
            elif p.dim() >= 2 and not name.endswith("modulation"):
                p.copy_((noise / p[0].numel() ** 0.5).to(p.dtype))
            else:
                p.copy_((std * noise).to(p.dtype))
    return model
