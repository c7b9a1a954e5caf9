"""Guidance: how the conditional and unconditional DiT evaluations of a step become one velocity.

* identity guidance (DreamID-V's swap): ``c + g * (c - u)``, ``u`` the pass with a zeroed reference;
* text guidance (the IVS, Wan's CFG): ``u + g * (c - u)``, ``u`` the pass with the negative text.

Each ``*_guided_model`` returns a ``model(x, sigma) -> v`` for the samplers of :mod:`.samplers`. ``pair``
(optional) evaluates the two passes: ``pair(cond_fn, uncond_fn) -> (c, u)``; by default in turn in this process,
with guidance-parallel (:meth:`dreamidv_core.parallel.mesh.Mesh.pair`) one pass per rank.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional, Tuple

import torch

from .samplers import sigma_to_timestep


def identity_guidance(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Reference identity guidance ``cond + scale * (cond - uncond)`` (not in place).

    Note: unlike usual CFG, ``scale=0`` returns ``cond``; the reference's 5.0 extrapolates
    6x cond - 5x uncond.
    """
    return cond + scale * (cond - uncond)


Pair = Callable[[Callable[[], torch.Tensor], Callable[[], torch.Tensor]], Tuple[torch.Tensor, torch.Tensor]]


def in_turn(cond: Callable[[], torch.Tensor], uncond: Callable[[], torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The two guidance passes one after the other (one process)."""
    c = cond()
    return c, uncond()


def make_guided_model(dit, cond, guidance: float, batch: bool, pair: Optional[Pair] = None):
    """model(x, sigma) -> guided velocity, for the samplers. x: [1, 16, F', h, w]. ``pair``: see the module."""
    pair = pair or in_turn

    def model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        t = sigma_to_timestep(sigma).to(x.device).reshape(1).float()
        if cond.num_refs < 2:
            return dit(x, t, cond, refs=[0])
        if batch:
            c, u = dit(x.expand(2, -1, -1, -1, -1), t, cond, refs=[0, 1]).chunk(2)
        else:
            c, u = pair(lambda: dit(x, t, cond, refs=[0]), lambda: dit(x, t, cond, refs=[1]))
        return identity_guidance(c, u, guidance)

    return model


def text_guided_model(dit, cond, negative_kv, guidance: float, pair: Optional[Pair] = None):
    """model(x [1, 16, F, h, w], sigma) -> velocity: ``c``, or ``u + g * (c - u)`` where ``u`` uses ``cond``
    with the negative text K/V ``negative_kv`` (per block; ``None``: no guidance, one pass)."""
    uncond = None if negative_kv is None else replace(cond, context_kv=negative_kv)
    pair = pair or in_turn

    def model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        t = sigma_to_timestep(sigma).to(x.device).reshape(1).float()
        if uncond is None:
            return dit(x, t, cond)
        c, u = pair(lambda: dit(x, t, cond), lambda: dit(x, t, uncond))
        return u + guidance * (c - u)

    return model
