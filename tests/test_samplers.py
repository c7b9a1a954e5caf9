"""Tests for dreamidv_core.sampling.samplers (CPU, a few seconds in all)."""

import math

import numpy as np
import pytest
import torch

from dreamidv_core.errors import Cancelled
from dreamidv_core.sampling.guidance import identity_guidance
from dreamidv_core.sampling.samplers import (
                                             SAMPLERS,
                                             flow_sigmas,
                                             sample_euler,
                                             sample_unipc,
                                             sigma_to_timestep,
                                             )

# --------------------------------------------------------------------------------------------
# schedule
# --------------------------------------------------------------------------------------------


def _schedule_numpy(steps, shift=5.0, num_train=1000):
    """Independent float64 computation of the reference schedule, with the reference's casts."""
    # top of the float32 training grid 1 - linspace(1, 1/T, T)[::-1]
    train = (1.0 - np.linspace(1.0, 1.0 / num_train, num_train)[::-1]).astype(np.float32)
    sigma_max, sigma_min = float(train[0]), float(train[-1])
    s = np.linspace(sigma_max, sigma_min, steps + 1)[:-1]
    s = shift * s / (1 + (shift - 1) * s)
    timesteps = (s * num_train).astype(np.int64)
    sigmas32 = np.concatenate([s, [0.0]]).astype(np.float32)
    return s, sigmas32, timesteps


# (198, 5.0) and (37, 1.0) are cases where deriving the timestep from float32 sigmas is off by one
@pytest.mark.parametrize("steps,shift", [(12, 5.0), (20, 5.0), (50, 5.0), (198, 5.0), (37, 1.0), (121, 7.5)])
def test_sigmas_and_timesteps_match_reference_formula(steps, shift):
    s64, s32, ts = _schedule_numpy(steps, shift)
    sig = flow_sigmas(steps, shift)
    assert sig.shape == (steps + 1,)
    assert sig[-1].item() == 0.0
    assert bool((sig[1:] < sig[:-1]).all())
    np.testing.assert_allclose(sig[:-1].numpy(), s64, rtol=0, atol=1e-12)
    # the float32 rounding is what the solver (and the reference) computes with: bit-equal
    assert torch.equal(sig.to(torch.float32), torch.from_numpy(s32))
    assert torch.equal(flow_sigmas(steps, shift, dtype=torch.float32), torch.from_numpy(s32))
    np.testing.assert_allclose(sig.to(torch.float32).numpy(), s32, rtol=0, atol=1e-6)
    t = sigma_to_timestep(sig[:-1])
    assert t.dtype == torch.int64
    assert t.tolist() == ts.tolist()


def test_schedule_anchor_values():
    # values printed by the reference FlowUniPCMultistepScheduler(shift=1).set_timesteps(12, shift=5)
    sig = flow_sigmas(12, 5.0)
    assert sigma_to_timestep(sig[:-1]).tolist() == [999, 981, 961, 937, 908, 874, 833, 780, 713, 624, 499, 312]
    assert sig.float()[0].item() == pytest.approx(0.9997998476028442, abs=0)
    # sigma_max is float32(0.999), not 1: shift(0.999) = 4.995 / 4.996
    assert sig[0].item() == pytest.approx(5 * 0.9990000128746033 / (1 + 4 * 0.9990000128746033), abs=1e-15)


def test_sigma_to_timestep_truncates():
    t = sigma_to_timestep(torch.tensor([0.9999, 0.5, 0.0015, 0.0], dtype=torch.float64))
    assert t.tolist() == [999, 500, 1, 0]
    assert sigma_to_timestep(0.25).tolist() == 250


def test_flow_sigmas_rejects_bad_arguments():
    with pytest.raises(ValueError):
        flow_sigmas(0)
    with pytest.raises(ValueError):
        flow_sigmas(10, shift=0.0)


# --------------------------------------------------------------------------------------------
# guidance / registry
# --------------------------------------------------------------------------------------------


def test_identity_guidance():
    c = torch.tensor([1.0, 2.0, -3.0])
    u = torch.tensor([0.5, 2.0, -1.0])
    c0, u0 = c.clone(), u.clone()
    out = identity_guidance(c, u, 5.0)
    assert torch.allclose(out, torch.tensor([3.5, 2.0, -13.0]))
    assert torch.equal(c, c0) and torch.equal(u, u0)  # not in place
    assert torch.equal(identity_guidance(c, u, 0.0), c)


def test_registry():
    assert SAMPLERS["unipc"] is sample_unipc
    assert SAMPLERS["euler"] is sample_euler


# --------------------------------------------------------------------------------------------
# accuracy on flows with an exact solution
# --------------------------------------------------------------------------------------------


def _gaussian_flow(mu, s0):
    """Data N(mu, s0^2) per dimension, noise N(0, 1): exact velocity and exact ODE transport."""

    def stats(sigma):
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        return (1 - sigma) * mu, torch.sqrt((1 - sigma) ** 2 * s0**2 + sigma**2)

    def model(x, sigma):
        sigma = sigma.to(torch.float64)
        mean, sd = stats(sigma)
        dev = x.to(torch.float64) - mean
        var = sd**2
        e_noise = sigma / var * dev
        e_x0 = mu + (1 - sigma) * s0**2 / var * dev
        return (e_noise - e_x0).to(x.dtype)

    return stats, model


@pytest.mark.parametrize("mu,s0,shift", [(1.0, 1.0, 5.0), (0.5, 2.0, 5.0), (1.0, 1.0, 1.0), (0.5, 2.0, 1.0)])
def test_error_falls_with_steps_and_unipc_beats_euler(mu, s0, shift):
    stats, model = _gaussian_flow(mu, s0)
    z = torch.linspace(-3.0, 3.0, 13, dtype=torch.float64)
    exact = mu + s0 * z  # the flow maps standardised values to standardised values

    def error(sampler, steps):
        sig = flow_sigmas(steps, shift)
        mean, sd = stats(sig[0])
        x = (mean + sd * z).to(torch.float32)
        return (sampler(model, x, sig).to(torch.float64) - exact).abs().max().item()

    steps = [5, 10, 20, 40]
    e_euler = [error(sample_euler, n) for n in steps]
    e_unipc = [error(sample_unipc, n) for n in steps]
    assert all(b < a for a, b in zip(e_euler, e_euler[1:])), e_euler
    assert all(b < a for a, b in zip(e_unipc, e_unipc[1:])), e_unipc
    assert all(u < e for u, e in zip(e_unipc, e_euler)), (e_unipc, e_euler)
    assert e_unipc[-1] < e_euler[-1] / 5
    if shift == 1.0:
        # asymptotic orders: Euler ~1 (error halves), UniPC clearly higher
        ratio_euler = e_euler[-1] / error(sample_euler, 80)
        ratio_unipc = e_unipc[-1] / error(sample_unipc, 80)
        assert 1.7 < ratio_euler < 2.3, ratio_euler
        assert ratio_unipc > 3.0, ratio_unipc


@pytest.mark.parametrize("sampler", [sample_euler, sample_unipc])
def test_point_mass_is_followed_exactly_at_every_step(sampler):
    # For a point mass at mu the flow lines are straight: x_sigma = (1 - sigma) mu + sigma n and
    # the data prediction is always mu, so both solvers must stay on the line at every step.
    mu = torch.tensor([2.0, -1.0, 0.5, 0.0])
    n = torch.tensor([0.3, 1.2, -0.7, 2.0])
    sig = flow_sigmas(9, 5.0)
    s32 = sig.float()

    def model(x, sigma):
        return (x - mu) / sigma.float()

    seen = []
    out = sampler(model, (1 - s32[0]) * mu + s32[0] * n, sig, callback=lambda i, t, x: seen.append(x))
    for i, x in enumerate(seen):
        assert torch.allclose(x, (1 - s32[i + 1]) * mu + s32[i + 1] * n, atol=2e-6)
    assert torch.allclose(out, mu, atol=2e-6)


# --------------------------------------------------------------------------------------------
# parity with an independent float64 re-derivation of UniPC-bh2 (data prediction)
# --------------------------------------------------------------------------------------------


def _phi(k, z):
    """phi_k(z): phi_0 = e^z, phi_{k+1}(z) = (phi_k(z) - 1/k!) / z."""
    val = math.exp(z)
    for j in range(k):
        val = (val - 1.0 / math.factorial(j)) / z
    return val


def _unipc_bh2_float64(model, x, sigmas):
    """UniPC (Zhao et al. 2023), B(h) = e^h - 1, order 2, data prediction, written on scalars.

    Notation per interval s -> t: alpha = 1 - sigma, lambda = log(alpha / sigma), h = lambda_t -
    lambda_s.  In data prediction the exponential integrator runs in -h:
        x_t = sigma_t/sigma_s x_s + alpha_t (1 - e^{-h}) m_s  - alpha_t B (sum_k rho_k D_k)
    with B = e^{-h} - 1, D_k = (m_k - m_s)/r_k, r_k = (lambda_k - lambda_s)/h.
    UniP-2 uses rho = 1/2 on the previous point; UniC-1 uses rho = 1/2 on the new point;
    UniC-2 solves [[1, 1], [r_1, 1]] rho = [g_1, g_2], g_k = (-h) phi_{k+1}(-h) k! / B.
    The last interval (to sigma 0) is first order, warm-up is first order, no corrector at the end.
    """
    sig = [float(s) for s in sigmas.to(torch.float32)]  # the solver works on float32 sigmas
    n = len(sig) - 1
    alpha = [1.0 - s for s in sig]
    lam = [math.log(1.0 - s) - math.log(s) if s > 0 else math.inf for s in sig]
    x = x.to(torch.float64)

    def predict(j, x_s, ms, order):
        h = lam[j + 1] - lam[j]
        big_b = math.expm1(-h)
        out = sig[j + 1] / sig[j] * x_s + alpha[j + 1] * (-math.expm1(-h)) * ms[j]
        if order == 2:
            r1 = (lam[j - 1] - lam[j]) / h
            out = out - alpha[j + 1] * big_b * 0.5 * (ms[j - 1] - ms[j]) / r1
        return out

    def correct(j, x_s, m_new, ms, order):  # interval j-1 -> j
        h = lam[j] - lam[j - 1]
        hh = -h
        big_b = math.expm1(hh)
        out = sig[j] / sig[j - 1] * x_s + alpha[j] * (-math.expm1(hh)) * ms[j - 1]
        if order == 1:
            return out - alpha[j] * big_b * 0.5 * (m_new - ms[j - 1])
        r1 = (lam[j - 2] - lam[j - 1]) / h
        g1 = hh * _phi(2, hh) * 1 / big_b
        g2 = hh * _phi(3, hh) * 2 / big_b
        rho1 = (g1 - g2) / (1.0 - r1)  # Cramer on [[1, 1], [r1, 1]]
        rho2 = g1 - rho1
        d1 = (ms[j - 2] - ms[j - 1]) / r1
        return out - alpha[j] * big_b * (rho1 * d1 + rho2 * (m_new - ms[j - 1]))

    ms, xs_start, orders, trace = [], [], [], []
    for j in range(n):
        m = x - sig[j] * model(x, sigmas[j])
        if j > 0:
            x = correct(j, xs_start[j - 1], m, ms, orders[j - 1])
        ms.append(m)
        xs_start.append(x)
        orders.append(min(2, j + 1, n - j))
        x = predict(j, x, ms, orders[j])
        trace.append(x)
    return x, trace


def _smooth_model(dtype):
    w = torch.linspace(-1.0, 1.0, 24, dtype=torch.float64).reshape(2, 3, 4)

    def model(x, sigma):
        s = float(sigma)
        xd = x.to(torch.float64)
        return (0.8 * xd + 0.3 * torch.tanh(xd) * s + w * (1 - s) - 0.2).to(dtype)

    return model


@pytest.mark.parametrize("steps", [2, 3, 6, 12])
def test_unipc_matches_independent_float64_derivation(steps):
    g = torch.Generator().manual_seed(steps)
    x = torch.randn(2, 3, 4, generator=g)
    sig = flow_sigmas(steps, 5.0)
    want, want_trace = _unipc_bh2_float64(_smooth_model(torch.float64), x, sig)
    trace = []
    got = sample_unipc(_smooth_model(torch.float32), x, sig, callback=lambda i, t, xi: trace.append(xi))
    assert got.dtype == torch.float32
    assert len(trace) == steps
    for a, b in zip(trace, want_trace):
        torch.testing.assert_close(a.to(torch.float64), b, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.to(torch.float64), want, rtol=1e-4, atol=1e-4)


def test_unipc_first_two_steps_by_hand():
    # constant "velocity" outputs, 3 steps: step 0 is UniP-1, step 1 is UniC-1 + UniP-2
    sig = flow_sigmas(3, 5.0)
    s = [float(v) for v in sig.float()]
    v_out = [torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.25]), torch.tensor([0.0, 0.0])]
    calls = []

    def model(x, sigma):
        calls.append(x.clone())
        return v_out[len(calls) - 1]

    x0 = torch.tensor([0.4, -1.1])
    sample_unipc(model, x0, sig)
    lam = [math.log((1 - a) / a) for a in s[:3]]
    # step 0: m0 = x - s0 v0;  x1 = s1/s0 x + (1 - s1)(1 - e^{-h0}) m0
    m0 = x0.double() - s[0] * v_out[0].double()
    h0 = lam[1] - lam[0]
    x1 = s[1] / s[0] * x0.double() + (1 - s[1]) * (-math.expm1(-h0)) * m0
    torch.testing.assert_close(calls[1].double(), x1, rtol=1e-5, atol=1e-6)
    # step 1: m1 at x1, corrector (order 1), then predictor order 2 to sigma 2
    m1 = x1 - s[1] * v_out[1].double()
    x1c = x1 - (1 - s[1]) * math.expm1(-h0) * 0.5 * (m1 - m0)
    h1 = lam[2] - lam[1]
    r1 = (lam[0] - lam[1]) / h1
    x2 = s[2] / s[1] * x1c + (1 - s[2]) * (-math.expm1(-h1)) * m1
    x2 = x2 - (1 - s[2]) * math.expm1(-h1) * 0.5 * (m0 - m1) / r1
    torch.testing.assert_close(calls[2].double(), x2, rtol=1e-5, atol=1e-6)


def test_unipc_state_is_local_and_reproducible():
    g = torch.Generator().manual_seed(0)
    xa, xb = torch.randn(5, generator=g), torch.randn(5, generator=g)
    sig = flow_sigmas(8, 5.0)

    def wrap(x, s):
        return 0.5 * x + torch.tanh(x) * float(s)

    a1 = sample_unipc(wrap, xa, sig)
    b1 = sample_unipc(wrap, xb, sig)
    a2 = sample_unipc(wrap, xa, sig)
    assert torch.equal(a1, a2)
    assert not torch.equal(a1, b1)


# --------------------------------------------------------------------------------------------
# progress / cancel
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["unipc", "euler"])
def test_callback_once_per_step(name):
    sig = flow_sigmas(7, 5.0)
    seen = []
    SAMPLERS[name](lambda x, s: 0.1 * x, torch.ones(3), sig, callback=lambda i, t, x: seen.append((i, t, x.shape)))
    assert seen == [(i, 7, torch.Size([3])) for i in range(7)]


@pytest.mark.parametrize("name", ["unipc", "euler"])
def test_cancel_stops_before_next_model_call(name):
    sig = flow_sigmas(6, 5.0)
    calls, steps_done = [], []

    def model(x, s):
        calls.append(float(s))
        return 0.1 * x

    with pytest.raises(Cancelled):
        SAMPLERS[name](model, torch.ones(3), sig, callback=lambda i, t, x: steps_done.append(i),
                       cancel=lambda: len(steps_done) >= 2)
    assert len(calls) == 2 and steps_done == [0, 1]

    calls.clear()
    with pytest.raises(Cancelled):
        SAMPLERS[name](model, torch.ones(3), sig, cancel=lambda: True)
    assert calls == []


def test_model_receives_schedule_sigmas_in_order():
    sig = flow_sigmas(5, 5.0)
    got = []
    sample_unipc(lambda x, s: (got.append(s), x * 0)[1], torch.zeros(2), sig)
    assert torch.equal(torch.stack(got), sig[:-1])
    assert got[0].dtype == torch.float64
