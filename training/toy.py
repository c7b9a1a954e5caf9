"""Toy stand-ins for tests and smoke runs of the trainer (``dataset: "toy"``, ``loss: "toy"``, ``model: "tiny"``).

``ToyDataset``: seeded random samples sized for ``tiny_config('full')``: 5 frames of 32x32 ->
latent x0 [16, 2, 4, 4], y [32, 2, 4, 4], ref [16, 1, 4, 4], pose video [3, 5, 32, 32], context [4, text_dim].
``toy_flow_loss``: flow matching on x0 with the DiT (noise and timesteps from the step generator),
with gradients through the pose branch and the reference tokens.
"""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

from dreamidv_core.models.configs import tiny_config
from dreamidv_core.models.dit import DreamIDVTransformer, init_random_


class ToyDataset(Dataset):
    def __init__(self, n: int = 8, text_dim: int = 32, seed: int = 0):
        self.n, self.text_dim, self.seed = n, text_dim, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.n:
            raise IndexError(i)
        g = torch.Generator().manual_seed(self.seed * 1000 + i)
        r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
        return {"x0": r(16, 2, 4, 4), "y": r(32, 2, 4, 4), "ref": r(16, 1, 4, 4),
                "pose": torch.rand(3, 5, 32, 32, generator=g), "context": r(4, self.text_dim), "index": i}


def tiny_model(seed: int = 0, variant: str = "full", **overrides) -> DreamIDVTransformer:
    torch.manual_seed(seed)
    return init_random_(DreamIDVTransformer(tiny_config(variant, **overrides)), seed=seed)


def toy_flow_loss(model, batch: dict, generator: torch.Generator) -> torch.Tensor:
    """Mean over the batch of || model(x_t, t) - (eps - x0) ||^2 with x_t = (1 - t) x0 + t eps."""
    dit = getattr(model, "module", model)
    losses = []
    for b in range(batch["x0"].shape[0]):
        x0 = batch["x0"][b:b + 1]
        eps = torch.randn(x0.shape, generator=generator, device=generator.device).to(x0.device)
        t = torch.rand((), generator=generator, device=generator.device).to(x0.device)
        pose = None
        if dit.cfg.has_pose:
            pose = dit.project_pose(batch["pose"][b:b + 1].to(dit.compute_dtype))
        cond = dit.prepare(batch["context"][b], batch["y"][b], batch["ref"][b:b + 1], pose, cache_pose_kv=True)
        xt = (1 - t) * x0 + t * eps
        pred = model(xt, (t * 1000).reshape(1), cond)
        losses.append(((pred.float() - (eps - x0)) ** 2).mean())
    return torch.stack(losses).mean()
