"""Exact attention with a choice of kernel.

PyTorch SDPA is the default and needs nothing installed. FlashAttention (``flash_attn``) and
SageAttention (``sageattention``) are used only when installed *and* asked for; asking for one that
is missing is a clear error, never a silent fallback.
"""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from ..errors import DreamIDVError

BACKENDS = ("sdpa", "flash", "sage")


def available_backends() -> list:
    found = ["sdpa"]
    if importlib.util.find_spec("flash_attn") is not None:
        found.append("flash")
    if importlib.util.find_spec("sageattention") is not None:
        found.append("sage")
    return found


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise DreamIDVError(f"unknown attention backend '{name}'; choose one of {', '.join(BACKENDS)}")
    if name not in available_backends():
        package = {"flash": "flash-attn", "sage": "sageattention"}[name]
        raise DreamIDVError(f"attention backend '{name}' was asked for but the '{package}' package is not "
                            f"installed; install it or use 'sdpa'")
    return name


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    """Full (unmasked, unwindowed) multi-head attention.

    q: [B, Lq, N, D], k and v: [B or 1, Lk, N, D] (a batch of 1 broadcasts) -> [B, Lq, N * D].
    All three must share one dtype; the softmax scale is 1/sqrt(D).
    """
    b, lq, n, d = q.shape
    if k.shape[0] != b:
        k = k.expand(b, -1, -1, -1)
        v = v.expand(b, -1, -1, -1)
    if backend == "sdpa":
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2).reshape(b, lq, n * d)
    if backend == "flash":
        from flash_attn import flash_attn_func

        half = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
        out = flash_attn_func(q.to(half), k.to(half), v.to(half))
        return out.to(q.dtype).reshape(b, lq, n * d)
    if backend == "sage":
        from sageattention import sageattn

        half = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
        out = sageattn(q.to(half), k.to(half), v.to(half), tensor_layout="NHD")
        return out.to(q.dtype).reshape(b, lq, n * d)
    raise DreamIDVError(f"unknown attention backend '{backend}'")
