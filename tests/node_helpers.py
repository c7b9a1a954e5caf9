"""Helpers for node unit tests that run ComfyUI in-process (the ``comfy`` fixture of tests/conftest.py)."""
from __future__ import annotations

import contextlib
from pathlib import Path


@contextlib.contextmanager
def model_folders(root: Path, keys, suffixes=(".safetensors", ".pth", ".pt")):
    """ComfyUI's model folders ``keys`` pointed at fresh ``root/<key>`` folders (-> {key: Path}) for the
    block; what they were is restored afterwards. Needs ComfyUI importable (the ``comfy`` fixture)."""
    import folder_paths

    saved = {k: folder_paths.folder_names_and_paths.get(k) for k in keys}
    dirs = {}
    for k in keys:
        dirs[k] = Path(root) / k
        dirs[k].mkdir(parents=True, exist_ok=True)
        folder_paths.folder_names_and_paths[k] = ([str(dirs[k])], set(suffixes))
    folder_paths.filename_list_cache.clear()
    try:
        yield dirs
    finally:
        for k, v in saved.items():
            if v is None:
                folder_paths.folder_names_and_paths.pop(k, None)
            else:
                folder_paths.folder_names_and_paths[k] = v
        folder_paths.filename_list_cache.clear()


@contextlib.contextmanager
def progress_updates():
    """The (value, total) updates ComfyUI's progress bars make inside the block (-> the list, filled live)."""
    import comfy.utils

    seen = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview=None, node_id=None: seen.append((value, total)))
    try:
        yield seen
    finally:
        comfy.utils.set_progress_bar_global_hook(None)



def tiny_wan_vae(jitter: float = 0.05, seed: int = 0):
    """A tiny random Wan 2.1 VAE that ``comfy.sd.VAE`` recognises (it fixes num_res_blocks=2): seeded, and its
    weights moved by ``jitter`` x N(0, 1) so that no layer is an identity."""
    import torch

    from dreamidv_core.models.vae import WanVAE, WanVAEConfig

    torch.manual_seed(seed)
    vae = WanVAE(WanVAEConfig(dim=8, num_res_blocks=2)).eval().requires_grad_(False)
    if jitter:
        with torch.no_grad():
            for p in vae.parameters():
                p.add_(torch.randn_like(p) * jitter)
    return vae


def as_comfy_vae(vae):
    """``vae`` (the pack's WanVAE) as ComfyUI's VAE, what VAELoader gives for the same file."""
    import comfy.sd

    return comfy.sd.VAE(sd={k: v.clone() for k, v in vae.state_dict().items()})
