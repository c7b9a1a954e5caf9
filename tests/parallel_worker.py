"""Worker for tests/test_parallel_torchrun.py: the tiny swap under torchrun in several parallel layouts.

``torchrun --nproc_per_node N -m tests.parallel_worker OUT_DIR SCENARIO...``: for each scenario every rank joins
a mesh of that layout and runs :func:`swap_face_parallel` on the clip of :func:`clip`; the leader of group 0
writes the frames and latent to ``OUT_DIR/<scenario>.safetensors`` with a JSON of facts (whether every rank of
the world ended with a bit-identical latent, the evaluation counts). The test compares with :func:`single`, the
one-process :func:`swap_face` of the same clip.
"""
from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

from dreamidv_core.models.configs import tiny_config
from dreamidv_core.models.dit import DreamIDVTransformer, init_random_
from dreamidv_core.models.vae import TINY_VAE_CONFIG, WanVAE
from dreamidv_core.parallel.mesh import ParallelConfig
from dreamidv_core.pipelines.swap import SwapSettings, swap_face

SIZE = 48  # frames 48x48 at a 48x48 area: latent 6x6, 9 tokens per latent frame (odd: padding for P = 2 and 4)

# name: (layout, clip frames, settings)
BASE = SwapSettings(width=SIZE, height=SIZE, steps=2, seed=3, guidance=4.0)
# 13 frames: 4 latent frames in 3 windows of 2 (27 tokens each); 4 steps with a step cache that skips 6 of 24
LONG = replace(BASE, window=5, overlap=4, steps=4, step_cache=0.5)
SCENARIOS = {
    "cfg": (ParallelConfig(cfg_parallel=True), 5, replace(BASE, background_strength=0.5)),
    "u2": (ParallelConfig(ulysses=2), 5, replace(BASE, cache_pose_kv=False)),
    "u2_long": (ParallelConfig(ulysses=2), 13, LONG),
    "u4": (ParallelConfig(ulysses=4), 5, replace(BASE, batch_guidance=True)),
    "u2_cfg": (ParallelConfig(ulysses=2, cfg_parallel=True), 5, BASE),
    "u2_cfg_long": (ParallelConfig(ulysses=2, cfg_parallel=True), 13, replace(LONG, cache_pose_kv=True)),
    "u2_fsdp": (ParallelConfig(ulysses=2, fsdp=True), 5, BASE),
}


def models():
    """Tiny full DiT (4 heads, pose branch, an active ArcFace ID projection) and tiny VAE, float32."""
    dit = init_random_(DreamIDVTransformer(tiny_config("full", text_dim=48, id_tokens=2)), seed=7).eval()
    with torch.no_grad():
        for blk in dit.id_projection.blocks:
            blk.gate.fill_(0.3)
    torch.manual_seed(0)
    return dit, WanVAE(TINY_VAE_CONFIG).eval()


def clip(frames: int):
    """-> video, mask, pose [F, 48, 48(, 3)] uint8, reference [30, 20, 3] uint8 (tests/test_swap.py's clip),
    context [4, 48], ArcFace embedding [512]."""
    from tests.test_swap import clip as swap_clip

    g = torch.Generator().manual_seed(frames)
    return (*swap_clip(frames, SIZE, SIZE, seed=frames), torch.randn(4, 48, generator=g), torch.randn(512, generator=g))


def single(name: str):
    """The one-process result of scenario ``name`` -> SwapResult."""
    _, frames, settings = SCENARIOS[name]
    dit, vae = models()
    video, mask, pose, ref, ctx, emb = clip(frames)
    with torch.no_grad():
        return swap_face(dit, vae, video, mask, ref, ctx, pose=pose, settings=settings, id_embedding=emb)


def main(out: Path, names) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    from dreamidv_core.parallel.fsdp import shard_for_inference
    from dreamidv_core.parallel.mesh import init_mesh
    from dreamidv_core.pipelines.swap_parallel import swap_face_parallel

    torch.set_num_threads(1)
    for name in names:
        config, frames, settings = SCENARIOS[name]
        mesh = init_mesh(config)
        dit, vae = models()
        if config.fsdp:
            shard_for_inference(dit, mesh.device, mesh.groups, mesh.group_size)
        video, mask, pose, ref, ctx, emb = clip(frames)
        lead = mesh.is_leader  # only the leader's inputs are used: the others pass None
        res = swap_face_parallel(mesh, dit, vae if lead else None, video if lead else None, mask if lead else None,
                                 ref if lead else None, ctx if lead else None, pose=pose if lead else None,
                                 settings=settings, id_embedding=emb if lead else None)
        latents = [torch.empty_like(res.latent) for _ in range(mesh.world)]
        dist.all_gather(latents, res.latent.contiguous())
        same = all(torch.equal(latents[0], t) for t in latents)
        if mesh.rank == 0:
            save_file({"latent": res.latent.contiguous(), "frames": res.frames.contiguous()},
                      str(out / f"{name}.safetensors"))
            facts = dict(identical_on_all_ranks=same, evaluations=res.evaluations, skipped=res.skipped,
                         world=mesh.world, groups=mesh.groups)
            (out / f"{name}.json").write_text(json.dumps(facts))
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
