"""The pack's DreamIDVModelLoader under ComfyUI's model manager (in-process, CPU): LoRAs are ModelPatcher patches
(no reload when the strength changes, fp8 never merged into), and block offload is accounted, partially
unloadable and freeable by ComfyUI."""
from __future__ import annotations

import gc

import pytest
import torch

from dreamidv_core.models.configs import tiny_config
from dreamidv_core.models.dit import DreamIDVTransformer, init_random_
from dreamidv_core.sampling.offload import offload_memory
from dreamidv_core.weights.checkpoints import save_dit
from tests.node_helpers import model_folders
from tests.test_lora_formats import LAYERS, adapters, hand_merge, lora_file

pytestmark = pytest.mark.comfyui
LAYERS_N = 6


@pytest.fixture
def folders(comfy, tmp_path):
    with model_folders(tmp_path, ("diffusion_models", "loras"), (".safetensors",)) as dirs:
        save_dit(init_random_(DreamIDVTransformer(tiny_config("full", text_dim=4096, num_layers=LAYERS_N)), seed=1),
                 dirs["diffusion_models"] / "dreamidv.safetensors")
        yield dirs


@pytest.fixture
def loaders(pack):
    import comfy.model_management as mm

    yield pack.nodes.loaders
    mm.unload_all_models()
    gc.collect()


def reference(ad, fmt, strength):
    model = init_random_(DreamIDVTransformer(tiny_config("full", text_dim=4096, num_layers=LAYERS_N)), seed=1)
    hand_merge(model, ad, fmt, strength)
    return model.state_dict()


@pytest.mark.parametrize("fmt", ["pack", "comfy", "kohya"])
def test_loader_lora_is_a_patch_equal_to_a_hand_merge_and_strength_does_not_reload(folders, loaders, monkeypatch,
                                                                                   fmt):
    reads = []
    real = loaders.load_dit
    monkeypatch.setattr(loaders, "load_dit", lambda *a, **k: reads.append(a[0]) or real(*a, **k))
    plain = loaders.load_model("dreamidv.safetensors", "fp32", "sdpa", "cpu")
    ad = adapters(plain.dit)
    lora_file(folders["loras"], fmt, ad)
    name = f"{fmt}.safetensors"
    for strength in (1.0, 0.5):
        handle = loaders.load_model("dreamidv.safetensors", "fp32", "sdpa", "cpu", lora=name, lora_strength=strength)
        assert handle.dit is plain.dit  # the same weights: nothing re-read
        handle.load()
        want = reference(ad, fmt, strength)
        for layer in LAYERS:
            torch.testing.assert_close(handle.dit.get_submodule(layer).weight, want[f"{layer}.weight"],
                                       rtol=1e-6, atol=1e-6)
    assert len(reads) == 1
    plain.load()  # the model without the LoRA: the patches come off again
    base = init_random_(DreamIDVTransformer(tiny_config("full", text_dim=4096, num_layers=LAYERS_N)), seed=1).state_dict()
    assert torch.equal(plain.dit.get_submodule(LAYERS[0]).weight, base[f"{LAYERS[0]}.weight"])


def test_fp8_weights_are_not_merged_into(folders, loaders):
    lora_file(folders["loras"], "pack", adapters(loaders.load_model("dreamidv.safetensors", "fp32", "sdpa", "cpu").dit))
    handle = loaders.load_model("dreamidv.safetensors", "fp8_e4m3fn", "sdpa", "cpu", lora="pack.safetensors")
    layer = handle.dit.get_submodule(LAYERS[0])
    original = layer.weight.detach().clone()
    assert original.dtype == torch.float8_e4m3fn
    handle.load()
    assert layer.weight.dtype == torch.bfloat16  # the patched weight in the compute dtype, not rounded to fp8
    loaders.unload_patcher(handle.patcher)
    assert layer.weight.dtype == torch.float8_e4m3fn and torch.equal(layer.weight.view(torch.uint8),
                                                                     original.view(torch.uint8))


def test_block_offload_is_accounted_partially_unloadable_and_freed(folders, loaders):
    import comfy.model_management as mm

    handle = loaders.load_model("dreamidv.safetensors", "fp32", "sdpa", "cpu", offload_blocks=3)
    dit = handle.dit
    handle.load()
    loaded = [lm for lm in mm.current_loaded_models if lm.model is handle.patcher]
    assert len(loaded) == 1 and dit.block_offload is not None and dit.block_offload.indices == [3, 4, 5]
    expected = offload_memory(dit, 3).device_weights
    assert loaded[0].model_loaded_memory() == expected < handle.patcher.model_size()
    handle.release()  # the run is over: still loaded and accounted
    assert loaded[0] in mm.current_loaded_models and dit.block_offload is not None
    # ComfyUI asks for one block's worth of memory: one more block streams
    block = offload_memory(dit, 1).block_bytes
    assert loaded[0].model_unload(memory_to_free=block) is False
    assert dit.block_offload.indices == [2, 3, 4, 5]
    assert loaded[0].model_loaded_memory() == offload_memory(dit, 4).device_weights
    handle.load()  # the next run: back to the requested offload
    assert dit.block_offload.indices == [3, 4, 5]
    plain = loaders.load_model("dreamidv.safetensors", "fp32", "sdpa", "cpu")  # a clone without offload
    plain.load()
    assert dit.block_offload is None and plain.patcher.loaded_size() == plain.patcher.model_size()
    handle.load()
    assert dit.block_offload.indices == [3, 4, 5]
    mm.free_memory(1e30, handle.patcher.load_device)
    assert not any(lm.model is handle.patcher for lm in mm.current_loaded_models)
    assert dit.block_offload is None and handle.patcher.loaded_size() == 0


def test_patched_weights_give_a_clones_own_weights_whatever_is_applied(folders, loaders):
    """What the fine-tune node copies: the handle's LoRA merged in, even while another clone's patches are
    applied to the shared model."""
    plain = loaders.load_model("dreamidv.safetensors", "fp32", "sdpa", "cpu")
    ad = adapters(plain.dit)
    lora_file(folders["loras"], "pack", ad)
    full = loaders.load_model("dreamidv.safetensors", "fp32", "sdpa", "cpu", lora="pack.safetensors")
    half = loaders.load_model("dreamidv.safetensors", "fp32", "sdpa", "cpu", lora="pack.safetensors",
                              lora_strength=0.5)
    half.load()  # the shared module now holds the strength-0.5 weights
    key = f"{LAYERS[0]}.weight"
    torch.testing.assert_close(loaders.patched_weights(full.patcher)[key], reference(ad, "pack", 1.0)[key])
    torch.testing.assert_close(loaders.patched_weights(plain.patcher)[key], reference(ad, "pack", 0.0)[key])
