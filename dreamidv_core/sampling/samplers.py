"""Flow-matching samplers for DreamID-V (Wan2.1 rectified flow).

Conventions
-----------
* ``x_sigma = (1 - sigma) * x0 + sigma * noise``; sigma runs from ~1 (noise) down to 0 (data).
* A *model* is any callable ``model(x, sigma) -> v`` returning the flow velocity ``v ~ noise - x0``
  for the current sample ``x`` at noise level ``sigma`` (a 0-dim tensor taken from the ``sigmas``
  the sampler was given, in that tensor's dtype). The samplers know nothing else about the model;
  a wrapper that needs the integer timestep of the reference implementation calls
  :func:`sigma_to_timestep`.
* ``callback(step_index, total_steps, x)`` is called once after every step with the new sample.
* ``cancel()`` is polled before every model call; if it returns True, :class:`Cancelled` is raised.
* After every step the sample is checked for NaN/inf (:func:`check_finite_sample`): a
  :class:`~dreamidv_core.errors.NonFiniteError` names the step and the likely causes.

Schedule facts reproduced from the reference ``FlowUniPCMultistepScheduler`` (built with
``num_train_timesteps=1000, shift=1``, then ``set_timesteps(steps, shift=5.0)``):

* the training grid is ``1 - linspace(1, 1/T, T)[::-1]`` stored in float32, so the top of the
  inference schedule is ``sigma_max = float32(1 - 1/T) = 0.9990000128746033`` and
  ``sigma_min = 0`` (not 1 and not a small positive number);
* inference sigmas are ``linspace(sigma_max, 0, steps + 1)[:-1]`` in float64 (numpy's algorithm:
  ``start + i * ((stop - start) / steps)``), shifted with ``shift*s / (1 + (shift-1)*s)`` in
  float64, then a final 0 is appended and the whole vector is cast to float32;
* the timesteps handed to the model are the *float64* shifted sigmas times ``T`` truncated
  toward zero to int64.

:func:`flow_sigmas` therefore returns float64 values by default (so the timestep can be derived
exactly); their float32 rounding is bit-identical to the reference ``scheduler.sigmas``, and all
solver arithmetic is done in float32 on those rounded values, as the reference does.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ..errors import NonFiniteError
from ..progress import Cancel, check_cancel

__all__ = [
    "NUM_TRAIN_TIMESTEPS",
    "flow_sigmas",
    "shift_sigmas",
    "sigma_to_timestep",
    "sample_euler",
    "sample_unipc",
    "sample_unipc_x0",
    "SAMPLERS",
]

NUM_TRAIN_TIMESTEPS = 1000

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Optional[Callable[[int, int, torch.Tensor], None]]


# --------------------------------------------------------------------------------------------
# schedule
# --------------------------------------------------------------------------------------------


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Time shift ``shift * s / (1 + (shift - 1) * s)`` (identity for shift == 1)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def _train_sigma_max(num_train_timesteps: int) -> float:
    # Largest sigma of the float32 training grid: 1 - 1/T rounded to float32.
    top = torch.tensor(1.0 - 1.0 / num_train_timesteps, dtype=torch.float64)
    return float(top.to(torch.float32))


def _linspace_like_numpy(start: float, stop: float, num: int) -> torch.Tensor:
    # numpy.linspace (endpoint=True): i * step + start, with the last entry forced to stop.
    # torch.linspace uses a different two-sided formula, so it can differ in the last bit.
    if num == 1:
        return torch.tensor([start], dtype=torch.float64)
    step = (stop - start) / (num - 1)
    out = torch.arange(num, dtype=torch.float64) * step + start
    out[-1] = stop
    return out


def flow_sigmas(
    steps: int,
    shift: float = 5.0,
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Noise levels of the reference UniPC schedule: ``steps + 1`` values, descending, last 0.

    With the default float64 dtype the values are the unrounded ones the reference derives its
    timesteps from; ``flow_sigmas(...).float()`` equals the reference ``scheduler.sigmas``
    bit for bit. Pass ``dtype=torch.float32`` to get that directly.
    """
    steps = int(steps)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    sigma_max = _train_sigma_max(num_train_timesteps)
    sigmas = _linspace_like_numpy(sigma_max, 0.0, steps + 1)[:-1]
    sigmas = shift_sigmas(sigmas, float(shift))
    sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    return sigmas.to(dtype)


def sigma_to_timestep(sigma, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """Integer timestep the reference passes to the model for noise level ``sigma``.

    ``trunc(sigma * T)`` evaluated in float64, as int64. Exact for the float64 values of
    :func:`flow_sigmas`; for float32 sigmas it uses the float32 value widened to float64.
    """
    s = torch.as_tensor(sigma)
    if not s.is_floating_point():
        s = s.to(torch.float64)
    return (s.to(torch.float64) * num_train_timesteps).to(torch.int64)


# --------------------------------------------------------------------------------------------
# helpers shared by the samplers
# --------------------------------------------------------------------------------------------


def _check_inputs(x: torch.Tensor, sigmas: torch.Tensor) -> int:
    if not torch.is_tensor(sigmas) or sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError("sigmas must be a 1-D tensor with at least 2 entries (last usually 0)")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
    return sigmas.numel() - 1


def _velocity(model: Model, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    v = model(x, sigma)
    if v.shape != x.shape:
        raise ValueError(f"model returned shape {tuple(v.shape)}, expected {tuple(x.shape)}")
    return v.to(torch.float32)


NON_FINITE_CAUSES = ("a NaN or infinite guidance value; NaN or infinite weights in the model file (a damaged or "
                     "badly converted checkpoint: load it again, or convert the original once more); fp16 overflow "
                     "(load the model with weight_dtype bf16 or fp32 instead of fp16); NaN or infinite values in "
                     "the inputs (conditioning, reference, video, mask)")


def check_finite_sample(x: torch.Tensor, step: int, total: int, sigma) -> None:
    """Stop sampling at the first step whose sample holds NaN or inf (one reduction per step), with a
    :class:`NonFiniteError` naming the step and the likely causes, instead of decoding a black video."""
    if bool(torch.isfinite(x).all()):
        return
    bad = int((~torch.isfinite(x)).sum())
    raise NonFiniteError(f"sampling produced NaN/inf values at step {step + 1} of {total} (noise level "
                         f"{float(sigma):.4f}; {bad} of {x.numel()} latent values); stopped before decoding. "
                         f"Likely causes: {NON_FINITE_CAUSES}")


def _half_log_snr(sigmas: torch.Tensor) -> list:
    # lambda = log(alpha) - log(sigma) with alpha = 1 - sigma; +inf at sigma == 0.
    # Evaluated element by element on 0-dim tensors, as the reference does: a vectorised log
    # over the whole schedule may round differently in the last bit.
    return [torch.log(1 - s) - torch.log(s) for s in sigmas]


# --------------------------------------------------------------------------------------------
# Euler
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_euler(
    model: Model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    callback: Callback = None,
    cancel: Cancel = None,
) -> torch.Tensor:
    """First-order flow ODE solver: ``x <- x + (sigma_next - sigma) * v``, float32."""
    total = _check_inputs(x, sigmas)
    sig32 = sigmas.detach().to("cpu", torch.float32)
    x = x.to(torch.float32)
    for i in range(total):
        check_cancel(cancel, f"sampling before step {i + 1}/{total}")
        v = _velocity(model, x, sigmas[i])
        x = x + (sig32[i + 1] - sig32[i]) * v
        check_finite_sample(x, i, total, sig32[i])
        if callback is not None:
            callback(i, total, x)
    return x


# --------------------------------------------------------------------------------------------
# UniPC (B(h) = expm1, i.e. "bh2"; data prediction; order 2; lower order at the end)
# --------------------------------------------------------------------------------------------
#
# Notation for a step from s = sigmas[j] to t = sigmas[j+1]:
#   alpha = 1 - sigma, lambda = log(alpha / sigma), h = lambda_t - lambda_s,
#   hh = -h, h_phi_1 = expm1(hh), B(h) = expm1(hh)  (bh2).
# Base (DDIM-like) update from x_s with the latest data prediction m0:
#   x_t = (sigma_t / sigma_s) * x_s - alpha_t * h_phi_1 * m0
# UniP-2 adds  - alpha_t * B(h) * 0.5 * D1,   D1 = (m1 - m0) / r1,  r1 = (lambda_prev - lambda_s) / h
# UniC-p re-runs the same step once the model has been evaluated at the predicted x_t:
#   x_t = base - alpha_t * B(h) * (sum_k rho_k D_k + rho_p (m_t - m0)),
# with rho = [0.5] for p = 1 and, for p = 2, R rho = b, R = [[1, 1], [r1, 1]],
# b_k = hh * phi_{k+1}(hh) * k! / B(h).
# Scalars are 0-dim float32 CPU tensors computed with the same operations as the reference,
# so the result is bit-identical to the reference scheduler fed the same model outputs.


def _base_update(sig, lam, s_idx, t_idx, x, m0):
    sigma_s, sigma_t = sig[s_idx], sig[t_idx]
    alpha_t = 1 - sigma_t
    hh = -(lam[t_idx] - lam[s_idx])
    h_phi_1 = torch.expm1(hh)
    b_h = torch.expm1(hh)
    x_base = sigma_t / sigma_s * x - alpha_t * h_phi_1 * m0
    return x_base, alpha_t, hh, b_h


def _unip_step(sig, lam, j, x, m_hist, order):
    """Predictor from sigmas[j] to sigmas[j+1]; m_hist[-1] is the data prediction at j."""
    m0 = m_hist[-1]
    x_base, alpha_t, hh, b_h = _base_update(sig, lam, j, j + 1, x, m0)
    if order == 1:
        return x_base
    r1 = (lam[j - 1] - lam[j]) / -hh
    d1 = (m_hist[-2] - m0) / r1
    return x_base - alpha_t * b_h * (0.5 * d1)


def _unic_rhos(hh, b_h, r1, device):
    """Solve R rho = b for the order-2 corrector (2x2, as the reference: float32 linalg.solve)."""
    h_phi_k = torch.expm1(hh) / hh - 1  # hh * phi_2(hh)
    b1 = h_phi_k * 1 / b_h
    h_phi_k = h_phi_k / hh - 1 / 2  # hh * phi_3(hh)
    b2 = h_phi_k * 2 / b_h
    rks = torch.tensor([r1, 1.0], device=device)
    mat = torch.stack([torch.pow(rks, 0), torch.pow(rks, 1)])
    rhs = torch.tensor([b1, b2], device=device)
    return torch.linalg.solve(mat, rhs)


def _unic_step(sig, lam, j, x_prev, x_pred, m_t, m_hist, order):
    """Corrector of the step sigmas[j-1] -> sigmas[j] using m_t = data prediction at x_pred.

    ``m_hist`` holds the data predictions *before* m_t (m_hist[-1] at j-1, m_hist[-2] at j-2).
    """
    m0 = m_hist[-1]
    x_base, alpha_t, hh, b_h = _base_update(sig, lam, j - 1, j, x_prev, m0)
    d1_t = m_t - m0
    if order == 1:
        rho_t = torch.tensor(0.5, dtype=torch.float32)
        corr = rho_t * d1_t
    else:
        r1 = (lam[j - 2] - lam[j - 1]) / -hh
        d1 = (m_hist[-2] - m0) / r1
        rhos = _unic_rhos(hh, b_h, r1, x_prev.device).to(torch.float32)
        corr = rhos[0] * d1 + rhos[-1] * d1_t
    return x_base - alpha_t * b_h * corr


@torch.no_grad()
def sample_unipc(
    model: Model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    callback: Callback = None,
    cancel: Cancel = None,
    order: int = 2,
) -> torch.Tensor:
    """UniPC (bh2, data prediction) for flow models, equal to the reference scheduler's step() loop.

    The model predicts the velocity: v = model(x, sigmas[j]) and m_j = x - sigma_j * v (float32); the steps are
    :func:`sample_unipc_x0`'s.
    """
    sig = sigmas.detach().to("cpu", torch.float32)

    def denoise(x: torch.Tensor, j: int) -> torch.Tensor:
        return x - sig[j] * _velocity(model, x, sigmas[j])

    step_done = None if callback is None else (lambda j, total, x, x0: callback(j, total, x))
    return sample_unipc_x0(denoise, x, sigmas, step_done, cancel, order)


@torch.no_grad()
def sample_unipc_x0(
    denoise: Callable[[torch.Tensor, int], torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    callback: Optional[Callable[[int, int, torch.Tensor, torch.Tensor], None]] = None,
    cancel: Cancel = None,
    order: int = 2,
) -> torch.Tensor:
    """UniPC (bh2, order 2) over data predictions: ``denoise(x, j) -> m_j`` is the clean-sample estimate at
    noise level ``sigmas[j]`` (a host whose model returns x0, e.g. ComfyUI's, calls this directly);
    ``callback(j, total, x, m_j)`` after every step.

    Per step j: m_j = denoise(x, j); if j > 0 the UniC corrector
    (order = the predictor order of step j-1) refines x with m_j; then the UniP predictor of
    order ``min(order, j + 1, steps - j)`` moves to sigmas[j+1] (so the first step warms up
    with order 1 and the final step is order 1, which lands exactly on m_j when sigma is 0).
    No corrector follows the last step. All state is local to the call.

    Fed the same model outputs, the result is bit-identical (CPU, float32) to the reference
    ``FlowUniPCMultistepScheduler(num_train_timesteps=1000, shift=1).set_timesteps(n, shift=s)``
    + ``step()`` loop. (With shift 5 and n >= 251 the reference's first two int timesteps
    coincide, its step counter starts at 1 and it fails; this function simply keeps going.)
    """
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order}")
    total = _check_inputs(x, sigmas)
    sig = sigmas.detach().to("cpu", torch.float32)
    lam = _half_log_snr(sig)
    x = x.to(torch.float32)

    m_hist: list = []  # data predictions of the last `order` steps, oldest first
    x_prev = None  # sample the previous predictor started from (after its correction)
    prev_order = 0
    for j in range(total):
        check_cancel(cancel, f"sampling before step {j + 1}/{total}")
        m_t = denoise(x, j).to(torch.float32)
        if j > 0:
            x = _unic_step(sig, lam, j, x_prev, x, m_t, m_hist, prev_order)
        m_hist = (m_hist + [m_t])[-order:]
        step_order = min(order, j + 1, total - j)
        x_prev = x
        x = _unip_step(sig, lam, j, x, m_hist, step_order)
        check_finite_sample(x, j, total, sig[j])
        prev_order = step_order
        if callback is not None:
            callback(j, total, x, m_t)
    return x


SAMPLERS = {
    "unipc": sample_unipc,
    "euler": sample_euler,
}
