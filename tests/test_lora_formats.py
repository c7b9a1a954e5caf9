"""LoRA key formats (dreamidv_core.weights.lora): every common Wan2.1 format resolves to the DiT's layers and merges
as ``W + strength * alpha / rank * up @ down``; foreign files fail naming the file."""
from __future__ import annotations

import pytest
import torch

from dreamidv_core.errors import CheckpointError
from dreamidv_core.io.state_dict import save_safetensors
from dreamidv_core.models.configs import tiny_config
from dreamidv_core.models.dit import DreamIDVTransformer, init_random_
from dreamidv_core.weights.lora import apply_lora_file, lora_layers, resolve_layer

LAYERS = ("blocks.0.self_attn.q", "blocks.1.ffn.2", "blocks.0.cross_attn.o", "blocks.1.self_attn.k_pose")
DIFFUSERS = {"blocks.0.self_attn.q": "blocks.0.attn1.to_q", "blocks.1.ffn.2": "blocks.1.ffn.net.2",
             "blocks.0.cross_attn.o": "blocks.0.attn2.to_out.0"}


def adapters(model, rank=3, seed=0):
    """{layer: (down [r, in], up [out, r], alpha)} for LAYERS."""
    g = torch.Generator().manual_seed(seed)
    mods = dict(model.named_modules())
    out = {}
    for i, name in enumerate(LAYERS):
        w = mods[name].weight
        out[name] = (torch.randn(rank, w.shape[1], generator=g) * 0.1, torch.randn(w.shape[0], rank, generator=g) * 0.1,
                     float(2 + i))
    return out


def lora_file(tmp_path, fmt, ad, layers=LAYERS):
    """A LoRA file in format ``fmt`` holding the adapters ``ad`` for ``layers``."""
    t = {}
    for name in layers:
        down, up, alpha = ad[name]
        if fmt == "pack":  # training/lora.py: ComfyUI's key names, lora_A / lora_B, alpha
            t |= {f"diffusion_model.{name}.lora_A.weight": down, f"diffusion_model.{name}.lora_B.weight": up,
                  f"diffusion_model.{name}.alpha": torch.tensor(alpha)}
        elif fmt == "legacy":  # this pack before 0.3: bare names
            t |= {f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up, f"{name}.alpha": torch.tensor(alpha)}
        elif fmt == "comfy":  # ComfyUI / PEFT: lora_A / lora_B, no alpha (scale 1)
            t |= {f"diffusion_model.{name}.lora_A.weight": down, f"diffusion_model.{name}.lora_B.weight": up}
        elif fmt == "kohya":  # kohya / musubi: underscores, lora_down / lora_up, alpha
            k = "lora_unet_" + name.replace(".", "_")
            t |= {f"{k}.lora_down.weight": down, f"{k}.lora_up.weight": up, f"{k}.alpha": torch.tensor(alpha)}
        elif fmt == "diffusers":  # diffusers' Wan names
            t |= {f"transformer.{DIFFUSERS[name]}.lora_A.weight": down, f"transformer.{DIFFUSERS[name]}.lora_B.weight": up}
    path = tmp_path / f"{fmt}.safetensors"
    save_safetensors(t, path)
    return path


def hand_merge(model, ad, fmt, strength, layers=LAYERS):
    mods = dict(model.named_modules())
    with torch.no_grad():
        for name in layers:
            down, up, alpha = ad[name]
            scale = 1.0 if fmt in ("comfy", "diffusers") else alpha / down.shape[0]
            w = mods[name].weight
            w.copy_(w + strength * scale * up @ down)


@pytest.mark.parametrize("fmt", ["pack", "legacy", "comfy", "kohya", "diffusers"])
def test_every_format_merges_like_a_hand_merge(tmp_path, fmt):
    model = init_random_(DreamIDVTransformer(tiny_config("full")), seed=1)
    ad = adapters(model)
    layers = tuple(DIFFUSERS) if fmt == "diffusers" else LAYERS
    path = lora_file(tmp_path, fmt, ad, layers)
    expected = init_random_(DreamIDVTransformer(tiny_config("full")), seed=1)
    hand_merge(expected, ad, fmt, 0.7, layers)
    assert sorted(apply_lora_file(model, path, strength=0.7)) == sorted(layers)
    for (n, a), (_, b) in zip(model.state_dict().items(), expected.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=n)


def test_layers_resolve_and_foreign_files_fail(tmp_path):
    model = DreamIDVTransformer(tiny_config("full"))
    modules = {n for n, m in model.named_modules() if hasattr(m, "weight")}
    assert resolve_layer("lora_unet_blocks_0_self_attn_q", modules) == "blocks.0.self_attn.q"
    assert resolve_layer("model.diffusion_model.blocks.1.ffn.0", modules) == "blocks.1.ffn.0"
    assert resolve_layer("transformer.blocks.1.attn2.to_k", modules) == "blocks.1.cross_attn.k"
    assert resolve_layer("blocks.9.self_attn.q", modules) is None
    found = lora_layers(["lora_unet_blocks_0_ffn_0.lora_down.weight", "lora_unet_blocks_0_ffn_0.lora_up.weight",
                         "lora_unet_blocks_0_ffn_0.alpha", "diffusion_model.blocks.0.norm3.diff_b"], modules, "x")
    assert [(f.module, sorted(f.tensors)) for f in found] == [("blocks.0.ffn.0", ["alpha", "down", "up"]),
                                                             ("blocks.0.norm3", ["diff_b"])]
    other = tmp_path / "other.safetensors"
    save_safetensors({"diffusion_model.blocks.7.self_attn.q.lora_A.weight": torch.zeros(2, 64),
                      "diffusion_model.blocks.7.self_attn.q.lora_B.weight": torch.zeros(64, 2)}, other)
    with pytest.raises(CheckpointError, match="other.safetensors.*blocks.7.self_attn.q"):
        apply_lora_file(model, other)
    half = tmp_path / "half.safetensors"
    save_safetensors({"blocks.0.self_attn.q.lora_A.weight": torch.zeros(2, 64)}, half)
    with pytest.raises(CheckpointError, match="lacks its down"):
        apply_lora_file(model, half)
    junk = tmp_path / "junk.safetensors"
    save_safetensors({"blocks.0.self_attn.q.weight": torch.zeros(64, 64)}, junk)
    with pytest.raises(CheckpointError, match="not a LoRA file"):
        apply_lora_file(model, junk)
    wrong = tmp_path / "wrong.safetensors"
    save_safetensors({"blocks.0.self_attn.q.lora_A.weight": torch.zeros(2, 32),
                      "blocks.0.self_attn.q.lora_B.weight": torch.zeros(64, 2)}, wrong)
    with pytest.raises(CheckpointError, match="another model"):
        apply_lora_file(model, wrong)
