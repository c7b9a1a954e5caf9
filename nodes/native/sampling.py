"""The released sampling recipe as ComfyUI objects: the flow UniPC as a SAMPLER, the pack's noise as a NOISE, and the
pack's long-clip window blending as ComfyUI context windows.

* :func:`sample_flow_unipc`: a k-diffusion-style sampler function for ``comfy.samplers.KSAMPLER``. ComfyUI's own
  ``uni_pc`` / ``uni_pc_bh2`` treat sigma as a VP/VE noise level and end at 0.001; this is the released
  ``FlowUniPCMultistepScheduler`` (bh2, order 2, :func:`dreamidv_core.sampling.samplers.sample_unipc_x0`) on
  ComfyUI's denoised predictions. With an empty latent it starts from the noise itself, as the reference does
  (ComfyUI would start from ``sigmas[0] * noise``).
* :class:`PackNoise`: the pack's noise (a float32 ``torch.Generator`` on the model's device seeded with ``seed``);
  on the CPU it equals ComfyUI's, on a GPU it reproduces the pack's (and the official) seeds.
* :func:`window_handler`: ComfyUI's context-window handler with the pack's windows (the static schedule with the
  last window aligned to the end, :func:`dreamidv_core.sampling.windows.plan_windows`) and the pack's linear
  blend weights (:func:`dreamidv_core.sampling.windows.window_blend_weights`).
"""
from __future__ import annotations

import torch

import comfy.context_windows as cw
import comfy.model_management as mm

from dreamidv_core.models.frame_grid import TEMPORAL_STRIDE, latent_frame_count
from dreamidv_core.sampling.samplers import sample_unipc_x0
from dreamidv_core.sampling.windows import check_window, window_blend_weights


@torch.no_grad()
def sample_flow_unipc(model, noise, sigmas, extra_args=None, callback=None, disable=None, order=2):
    """``model(x, sigma * s_in, **extra_args) -> denoised``; ``noise``: ComfyUI's scaled start; ``callback({"x",
    "i", "sigma", "sigma_hat", "denoised"})`` after every step (previews, progress)."""
    extra_args = {} if extra_args is None else extra_args
    x = noise
    raw, latent = getattr(model, "noise", None), getattr(model, "latent_image", None)
    if raw is not None and latent is not None and raw.shape == x.shape and not torch.count_nonzero(latent):
        x = raw.to(x)  # an empty latent: start from pure noise at sigmas[0], as the reference
    s_in = x.new_ones([x.shape[0]])

    def denoise(x: torch.Tensor, j: int) -> torch.Tensor:
        mm.throw_exception_if_processing_interrupted()
        return model(x, sigmas[j] * s_in, **extra_args)

    def step_done(j: int, total: int, x: torch.Tensor, x0: torch.Tensor) -> None:
        callback({"x": x, "i": j, "sigma": sigmas[j], "sigma_hat": sigmas[j], "denoised": x0})

    return sample_unipc_x0(denoise, x, sigmas, step_done if callback is not None else None, order=order)


class PackNoise:
    """ComfyUI NOISE: float32 Gaussian noise of the latent's shape from ``torch.Generator(device).manual_seed(seed)``."""

    def __init__(self, seed: int, device: str = "model"):
        self.seed, self.device = int(seed), device

    def generate_noise(self, input_latent) -> torch.Tensor:
        latent = input_latent["samples"]
        device = mm.get_torch_device() if self.device == "model" else torch.device("cpu")
        gen = torch.Generator(device=device).manual_seed(self.seed)
        return torch.randn(tuple(latent.shape), generator=gen, dtype=torch.float32, device=device).cpu()


def window_handler(window: int, overlap: int):
    """ComfyUI's context-window handler for windows of ``window`` frames (4n+1) overlapping by ``overlap`` (a
    multiple of 4), blended as the pack blends them (``dim=2``, Wan's time axis)."""
    check_window(window, overlap)
    length, latent_overlap = latent_frame_count(window), overlap // TEMPORAL_STRIDE

    def weights(length, full_length=None, idxs=None, handler=None, **kwargs):
        return window_blend_weights(full_length, length, latent_overlap, idxs[0]).tolist()

    schedule = cw.get_matching_context_schedule(cw.ContextSchedules.STATIC_STANDARD)
    return cw.IndexListContextHandler(schedule, cw.ContextFuseMethod("dreamidv_linear", weights),
                                      context_length=length, context_overlap=latent_overlap, dim=2)
