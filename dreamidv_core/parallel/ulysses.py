"""Ulysses sequence parallelism for the DiT (inference): the token sequence split over P ranks.

Every op of a DiT block but attention works token by token (norms, modulation, the q/k/v/o linears with their
RMSNorm over all channels, RoPE, the FFN, the cross-attention to the text), so each rank runs them on its own
contiguous slice of the sequence ``[reference tokens | video tokens]``. Around the self-attention an all-to-all
turns "my tokens, every head" into "every token, my heads" (heads N/P per rank) and back:

    q, k, v [B, Lp/P, N, D]  --all-to-all-->  [B, Lp, N/P, D]  -> [:, :L]: attention over the whole sequence
    out [B, L, N/P * D]  -> padded to Lp  --all-to-all-->  [B, Lp/P, N * D]  -> o linear

The pose attention reuses those q (its K/V, made once per video from the pose tokens over the whole sequence,
are kept for this rank's heads only), the ArcFace ID attention sends the pre-RoPE q in the same all-to-all.
The head runs on the slice and its narrow output [B, Lp/P, 64] is all-gathered.

**Padding is exact**: the sequence of L tokens is padded at the end to Lp = P * ceil(L / P) (zero tokens,
RoPE rows of the identity rotation) so that it splits evenly, and the padding rows are cut *before* every
attention (after the all-to-all every rank holds the whole sequence for its heads), so padding tokens are
never attended to, and results equal one process's for any L and any P dividing the number of heads (12 for
the released model: P = 2, 3, 4, 6, 12). Inference only: plain c10d collectives carry no gradient.

Traffic per block and rank: 4 all-to-alls of (P-1)/P of a [B, Lp/P, C] tensor in the compute dtype (5 with an
active ID projection); see ``benchmarks/bench_parallel.py``.
"""
from __future__ import annotations

from typing import Tuple

import torch


class SequenceParallel:
    """The Ulysses group of this rank: ``size`` ranks, this one at ``rank``; ``group`` the process group."""

    def __init__(self, group, rank: int, size: int):
        self.group, self.rank, self.size = group, rank, size

    def heads(self, t: torch.Tensor) -> torch.Tensor:
        """[B, L, N, D] -> this rank's heads [B, L, N/P, D] (a contiguous copy: the rest can be freed)."""
        per = t.shape[2] // self.size
        return t[:, :, self.rank * per:(self.rank + 1) * per].contiguous()

    def bind(self, length: int) -> "SequenceShard":
        """This rank's part of a sequence of ``length`` tokens (one per forward)."""
        return SequenceShard(self, length)

    # ------------------------------------------------------------------ collectives
    def all_to_all(self, send: torch.Tensor) -> torch.Tensor:
        """send [P, ...] (row j goes to rank j) -> [P, ...] (row j came from rank j)."""
        import torch.distributed as dist

        send = send.contiguous()
        recv = torch.empty(send.shape, dtype=send.dtype, device=send.device)
        dist.all_to_all_single(recv, send, group=self.group)
        return recv

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """t [B, l, K] on every rank -> [B, P * l, K] (rank order)."""
        import torch.distributed as dist

        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return torch.cat(parts, dim=1)


class SequenceShard:
    """Rows ``[start, stop)`` of a sequence of ``length`` tokens padded to ``padded`` (a multiple of P)."""

    def __init__(self, sp: SequenceParallel, length: int):
        self.sp, self.length = sp, length
        self.local = -(-length // sp.size)
        self.padded = self.local * sp.size
        self.start, self.stop = sp.rank * self.local, (sp.rank + 1) * self.local

    def heads(self, t: torch.Tensor) -> torch.Tensor:
        return self.sp.heads(t)

    def take(self, x: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """x [B, L, ...] (the whole sequence) -> this rank's rows [B, Lp/P, ...], padding rows = ``fill``."""
        if self.stop <= self.length:
            return x[:, self.start:self.stop]
        real = x[:, self.start:self.length] if self.start < self.length else x[:, :0]
        pad = x.new_full((x.shape[0], self.stop - max(self.start, self.length), *x.shape[2:]), fill)
        return torch.cat([real, pad], dim=1)

    def rope(self, rope: Tuple[torch.Tensor, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """RoPE table (cos, sin) [L, D/2] -> this rank's rows; padding rows rotate by 0 (cos 1, sin 0)."""
        cos, sin = rope
        return self.take(cos[None], 1.0)[0], self.take(sin[None], 0.0)[0]

    def to_heads(self, *ts: torch.Tensor):
        """Tensors [B, Lp/P, N, D] (one dtype) -> each [B, L, N/P, D]: the whole sequence (padding cut) for this
        rank's heads, in one all-to-all."""
        p = self.sp.size
        x = torch.stack(ts)  # [T, B, l, N, D]
        t, b, l, n, d = x.shape
        send = x.reshape(t, b, l, p, n // p, d).permute(3, 0, 1, 2, 4, 5)  # [P (to), T, B, l, N/P, D]
        recv = self.sp.all_to_all(send)  # [P (from: sequence part), T, B, l, N/P, D]
        out = recv.permute(1, 2, 0, 3, 4, 5).reshape(t, b, p * l, n // p, d)[:, :, :self.length]
        return out.unbind(0)

    def to_seq(self, out: torch.Tensor) -> torch.Tensor:
        """Attention output [B, L, N/P * D] for this rank's heads -> [B, Lp/P, N * D]: this rank's rows, every
        head (in head order)."""
        p = self.sp.size
        b, length, k = out.shape
        if self.padded > length:
            out = torch.cat([out, out.new_zeros(b, self.padded - length, k)], dim=1)
        send = out.reshape(b, p, self.local, k).permute(1, 0, 2, 3)  # [P (to: sequence part), B, l, K]
        recv = self.sp.all_to_all(send)  # [P (from: head group), B, l, K]
        return recv.permute(1, 2, 0, 3).reshape(b, self.local, p * k)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token output on this rank's rows [B, Lp/P, K] -> the whole sequence [B, L, K] on every rank."""
        return self.sp.all_gather(x)[:, :self.length]
