"""Step cache: a TeaCache-like skip of whole DiT evaluations whose input barely changed.

Per pass (guidance branch, window) :class:`StepCache` keeps the modulated input of the first block for the
video tokens from the previous evaluation and the residual the blocks added then (blocks' output minus
input). Each evaluation adds the relative L1 change of the modulated input to an accumulator; while the
accumulator stays under ``threshold`` the blocks are skipped and the stored residual is added to the new
input instead. After a real evaluation the accumulator is reset. The first ``warmup`` evaluations and (when
``steps`` is known) the last one are always computed. The indicator only looks at video tokens, which are
the same for the identity-guided and unguided passes, so both passes take the same decisions and the
guidance extrapolation ``c + g (c - u)`` is never fed one stale branch.

Several processes on one clip (:mod:`dreamidv_core.parallel`): the indicator is computed from the whole token
sequence (which every rank has), so every rank takes one process's decision; ``agree`` (e.g.
``Mesh.agree``) then makes sure no rank skips the blocks (and their collectives) while another runs them.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Callable, Dict, Hashable, List, Optional, Sequence

import torch

from ..errors import InputError
from .guidance import make_guided_model
from .samplers import flow_sigmas, sample_unipc

__all__ = ["StepCache", "attach_step_cache", "measure_step_cache"]


_uid = itertools.count()


@dataclass
class _PassState:
    previous: Optional[torch.Tensor] = None  # modulated video-token input of block 0 at the last evaluation
    residual: Optional[torch.Tensor] = None  # blocks' output minus input at the last real evaluation
    accumulated: float = 0.0
    calls: int = 0


class StepCache:
    """TeaCache-like skipping of DiT evaluations (off unless attached; ``threshold=0`` never skips).

    threshold: accumulated relative L1 change of block 0's modulated video-token input below which
    the blocks are skipped (0.05-0.15 are reasonable; see :func:`measure_step_cache`).
    steps: evaluations per pass in the run (the sampler's step count); the last is then always computed.
    warmup: the first ``warmup`` evaluations of each pass are always computed (>= 1).
    residual_dtype: dtype of the stored residuals (float32; bf16 halves the cache memory).
    agree: ``agree(compute) -> bool`` over the processes of one clip (True when any computes), or None.

    One object serves a whole run: every (conditions object, window, reference rows) combination
    gets its own state, so guided/unguided passes and sampler windows never mix. Counters:
    ``evaluations`` (forward calls seen), ``skipped``.
    """

    def __init__(self, threshold: float, steps: Optional[int] = None, warmup: int = 1,
                 residual_dtype: torch.dtype = torch.float32, agree: Optional[Callable[[bool], bool]] = None):
        if not threshold >= 0:
            raise InputError(f"step cache threshold must be >= 0, got {threshold}")
        if warmup < 1:
            raise InputError(f"step cache warmup must be >= 1, got {warmup}")
        self.threshold, self.steps, self.warmup, self.residual_dtype = float(threshold), steps, int(warmup), residual_dtype
        self.agree = agree
        self.states: Dict[Hashable, _PassState] = {}
        self.evaluations = 0
        self.skipped = 0

    def reset(self) -> None:
        """Forget every pass's state and the counters (a new run)."""
        self.states.clear()
        self.evaluations = self.skipped = 0

    def memory_bytes(self) -> int:
        """Device memory the stored inputs and residuals take now."""
        return sum(t.numel() * t.element_size() for s in self.states.values()
                   for t in (s.previous, s.residual) if t is not None)

    def summary(self) -> str:
        return f"step cache: skipped {self.skipped} of {self.evaluations} DiT evaluations (threshold {self.threshold:g})"

    @staticmethod
    def key(cond, refs: Optional[Sequence[int]]) -> Hashable:
        token = cond.extra.setdefault("_step_cache_token", object())
        return token, cond.extra.get("window"), None if refs is None else tuple(int(r) for r in refs)

    @torch.no_grad()
    def run(self, dit, tokens: torch.Tensor, e0: torch.Tensor, num_ref_tokens: int, key: Hashable,
            blocks: Callable[[torch.Tensor], torch.Tensor], local: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens [B, Lr + Lv, C] (block 0's input), e0 [B, 6, C] float32, num_ref_tokens: Lr;
        ``blocks(tokens)`` runs every block -> [B, L, C] float32. Returns the blocks' output (or its estimate).
        ``local``: the part of ``tokens`` the blocks run on (sequence parallelism; default all of them); the
        decision still looks at all of ``tokens``."""
        base = tokens if local is None else local
        state = self.states.setdefault(key, _PassState())
        self.evaluations += 1
        video = tokens[:, num_ref_tokens:]
        mod = dit.blocks[0].modulation.detach().to(e0.device, torch.float32)
        shift, scale = (mod[:, :2] + e0[:, :2]).unbind(1)
        indicator = dit.blocks[0].norm1(video).float() * (1 + scale[:, None]) + shift[:, None]
        last = self.steps is not None and state.calls >= self.steps - 1
        compute = (state.calls < self.warmup or last or state.previous is None or state.residual is None
                   or state.previous.shape != indicator.shape or state.residual.shape[1] != base.shape[1])
        if not compute:
            change = ((indicator - state.previous).abs().mean() / state.previous.abs().mean().clamp_min(1e-12)).item()
            state.accumulated += change
            compute = state.accumulated >= self.threshold
        if self.agree is not None:
            compute = self.agree(compute)
        state.previous = indicator
        state.calls += 1
        if not compute:
            self.skipped += 1
            return base.float() + state.residual.to(torch.float32)
        out = blocks(base)
        state.residual = (out - base.float()).to(self.residual_dtype)
        state.accumulated = 0.0
        return out


def attach_step_cache(cond, cache: Optional[StepCache], window: Optional[Hashable] = None):
    """Make every forward with ``cond`` use ``cache`` (``None`` detaches). ``window`` separates the
    state of sampler windows that reuse one conditions object. Returns ``cond``."""
    if cache is None:
        cond.extra.pop("step_cache", None)
    else:
        cond.extra["step_cache"] = cache
        cond.extra.setdefault("_step_cache_token", object())  # shared by copies made for windows
    if window is not None:
        cond.extra["window"] = window
    return cond


# ====================================================================================== measurement
def _psnr(a: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR (dB) of ``a`` against ``ref``, peak = ref's range."""
    mse = (a.float() - ref.float()).pow(2).mean().item()
    peak = (ref.max() - ref.min()).item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(peak * peak / mse)).item()


@torch.no_grad()
def measure_step_cache(dit, cond, noise: torch.Tensor, thresholds: Sequence[float] = (0.05, 0.1, 0.2),
                       steps: int = 20, shift: float = 5.0, guidance: float = 4.0, batch: bool = False,
                       decode: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> List[dict]:
    """Run the UniPC sampler without the cache and with each threshold; report time and error.

    noise [1, 16, F, h, w]; cond from ``dit.prepare``; ``decode(latent) -> frames`` (e.g. a VAE decode)
    makes the PSNR be measured on frames instead of latents. Returns one dict per run:
    ``threshold`` (None: uncached), ``seconds``, ``speedup``, ``evaluations``, ``skipped``, ``psnr``.
    """
    sigmas = flow_sigmas(steps, shift=shift)
    saved = cond.extra.get("step_cache")

    def once(cache):
        attach_step_cache(cond, cache)
        model = make_guided_model(dit, cond, guidance, batch)
        start = time.perf_counter()
        latent = sample_unipc(model, noise, sigmas)
        seconds = time.perf_counter() - start
        return latent, seconds

    rows = []
    try:
        base, base_s = once(None)
        ref = decode(base) if decode else base
        rows.append(dict(threshold=None, seconds=base_s, speedup=1.0, evaluations=None, skipped=0, psnr=float("inf")))
        for th in thresholds:
            cache = StepCache(th, steps=steps)
            latent, s = once(cache)
            out = decode(latent) if decode else latent
            rows.append(dict(threshold=th, seconds=s, speedup=base_s / s, evaluations=cache.evaluations,
                             skipped=cache.skipped, psnr=_psnr(out, ref)))
    finally:
        attach_step_cache(cond, saved)
    return rows
