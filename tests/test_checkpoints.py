"""Checkpoint loading: official .pth and safetensors layouts, safety, clear errors, dtypes, converter."""
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from dreamidv_core.weights.checkpoints import convert_to_safetensors, detect_dit_config, load_dit, save_dit
from dreamidv_core.models.configs import tiny_config
from dreamidv_core.models.dit import DreamIDVTransformer, init_random_
from dreamidv_core.errors import CheckpointError
from dreamidv_core.io.state_dict import read_state_dict

from test_dit import make_inputs, run


@pytest.fixture(scope="module")
def tiny():
    return init_random_(DreamIDVTransformer(tiny_config("full")), seed=5).eval()


def test_official_pth_layout_loads_back_with_identical_outputs(tiny, tmp_path):
    path = tmp_path / "dreamidv.pth"
    torch.save(tiny.state_dict(), path)
    loaded = load_dit(path, weight_dtype="fp32", config=tiny.cfg)
    inp = make_inputs(tiny.cfg)
    assert torch.equal(run(loaded, inp), run(tiny, inp))


def test_safetensors_loads_back_with_identical_outputs_and_config_from_metadata(tiny, tmp_path):
    path = tmp_path / "dreamidv.safetensors"
    save_dit(tiny, path)
    loaded = load_dit(path, weight_dtype="fp32")  # config comes from the file's metadata
    assert loaded.cfg == tiny.cfg
    inp = make_inputs(tiny.cfg)
    assert torch.equal(run(loaded, inp), run(tiny, inp))


def test_comfyui_prefixed_safetensors_loads(tiny, tmp_path):
    path = tmp_path / "prefixed.safetensors"
    save_file({"model.diffusion_model." + k: v.contiguous() for k, v in tiny.state_dict().items()}, str(path))
    loaded = load_dit(path, weight_dtype="fp32", config=tiny.cfg)
    inp = make_inputs(tiny.cfg)
    assert torch.equal(run(loaded, inp), run(tiny, inp))


def test_variant_detected_from_keys(tmp_path):
    for variant in ("full", "faster", "wan_t2v"):
        model = DreamIDVTransformer(tiny_config(variant))
        path = tmp_path / f"{variant}.pth"
        torch.save(model.state_dict(), path)
        cfg = detect_dit_config(read_state_dict(path))
        assert cfg.variant == variant
        assert (cfg.dim, cfg.num_layers, cfg.ffn_dim, cfg.in_dim) == (64, 2, 128, model.cfg.in_dim)


def test_unused_cross_attention_pose_keys_may_be_absent(tiny, tmp_path):
    sd = {k: v for k, v in tiny.state_dict().items() if ".cross_attn.k_pose" not in k and ".cross_attn.v_pose" not in k
          and ".cross_attn.norm_k_pose" not in k and ".cross_attn.pose_gate" not in k}
    path = tmp_path / "no_cross_pose.pth"
    torch.save(sd, path)
    loaded = load_dit(path, weight_dtype="fp32", config=tiny.cfg)
    inp = make_inputs(tiny.cfg)
    assert torch.equal(run(loaded, inp), run(tiny, inp))


def test_missing_tensor_is_a_clear_error_naming_file_and_key(tiny, tmp_path):
    sd = dict(tiny.state_dict())
    del sd["blocks.1.self_attn.k_pose.weight"]
    sd["blocks.0.extra.weight"] = torch.zeros(2)
    path = tmp_path / "broken.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as err:
        load_dit(path, config=tiny.cfg)
    msg = str(err.value)
    assert str(path) in msg and "blocks.1.self_attn.k_pose.weight" in msg and "blocks.0.extra.weight" in msg


def test_foreign_layout_is_a_clear_error(tmp_path):
    path = tmp_path / "vae.safetensors"
    save_file({"encoder.conv1.weight": torch.zeros(8, 3, 3, 3, 3), "decoder.head.2.bias": torch.zeros(3)}, str(path))
    with pytest.raises(CheckpointError, match="not a DreamID-V / Wan2.1 diffusion-transformer checkpoint") as err:
        load_dit(path)
    assert str(path) in str(err.value)


def test_wrong_shapes_are_a_clear_error(tiny, tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save(tiny.state_dict(), path)
    with pytest.raises(CheckpointError, match="wrong shape"):
        load_dit(path, config=tiny.cfg.with_(ffn_dim=96))


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_without_running_its_payload(tmp_path):
    marker = tmp_path / "pwned"
    _Payload.marker = marker
    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:
        pickle.dump({"patch_embedding.weight": _Payload()}, fh)
    # torch.save format too (zip container with a malicious pickle inside)
    zpath = tmp_path / "evil_zip.pth"
    torch.save({"x": _Payload()}, zpath)
    for p in (path, zpath):
        with pytest.raises(CheckpointError, match="refused") as err:
            load_dit(p)
        assert str(p) in str(err.value)
    assert not marker.exists()


def test_not_a_weight_file_and_missing_file(tmp_path):
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(b"not really")
    with pytest.raises(CheckpointError, match="safetensors"):
        load_dit(bad)
    with pytest.raises(CheckpointError, match="not found"):
        load_dit(tmp_path / "absent.pth")


@pytest.mark.parametrize("dtype,tol", [("bf16", 0.1), ("fp16", 0.02), ("fp8_e4m3fn", 0.5)])
def test_storage_dtypes(tiny, tmp_path, dtype, tol):
    path = tmp_path / "tiny.safetensors"
    save_dit(tiny, path)
    loaded = load_dit(path, weight_dtype=dtype, compute_dtype=torch.float32)
    expect = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8_e4m3fn": torch.float8_e4m3fn}[dtype]
    assert loaded.blocks[0].self_attn.q.weight.dtype == expect
    assert loaded.blocks[0].modulation.dtype == torch.float32  # small tensors stay exact
    inp = make_inputs(tiny.cfg)
    ref, out = run(tiny, inp), run(loaded, inp)
    err = (out - ref).abs().max().item()
    assert 0 < err < tol * ref.abs().max().item()


def test_weights_are_not_held_twice(tiny, tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save(tiny.state_dict(), path)
    loaded = load_dit(path, weight_dtype="fp32", config=tiny.cfg)
    ptrs = [p.data_ptr() for p in loaded.parameters()]
    assert len(set(ptrs)) == len(ptrs)
    assert not any(p.is_meta for p in loaded.parameters())


def test_converter_writes_bf16_safetensors_that_load(tiny, tmp_path):
    src = tmp_path / "dreamidv.pth"
    torch.save(tiny.state_dict(), src)
    dst = tmp_path / "dreamidv_bf16.safetensors"
    summary = convert_to_safetensors(src, dst, dtype="bf16")
    assert summary["kind"] == "DreamID-V DiT (full)"
    reader = read_state_dict(dst)
    assert reader.dtype("blocks.0.ffn.0.weight") == torch.bfloat16
    assert reader.dtype("blocks.0.modulation") == torch.float32
    loaded = load_dit(dst, weight_dtype="bf16", compute_dtype=torch.float32)
    assert loaded.cfg.variant == "full" and loaded.cfg.num_layers == 2
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp8_e4m3fn"])
def test_layers_the_reference_computes_in_fp32_stay_fp32(tiny, tmp_path, dtype):
    """time_embedding, time_projection and head.head run in fp32 in the reference (autocast(float32)):
    their weights are stored in fp32 whatever the storage dtype (and in converted files)."""
    from dreamidv_core.weights.checkpoints import FP32_LAYERS

    path = tmp_path / "tiny.safetensors"
    save_dit(tiny, path)
    loaded = load_dit(path, weight_dtype=dtype)
    kept = {n: p.dtype for n, p in loaded.named_parameters() if n.startswith(FP32_LAYERS)}
    assert {"time_embedding.0.weight", "time_embedding.2.weight", "time_projection.1.weight",
            "head.head.weight"} <= set(kept)
    assert set(kept.values()) == {torch.float32}
    if dtype != "fp8_e4m3fn":
        converted = tmp_path / "converted.safetensors"
        convert_to_safetensors(path, converted, dtype=dtype)
        assert read_state_dict(converted).dtype("head.head.weight") == torch.float32


def test_bf16_storage_is_bit_identical_to_bf16_compute_on_fp32_weights(tiny, tmp_path):
    """The loader's default (bf16 storage) computes exactly what the reference's bf16 run does: fp32 weights
    under bf16 autocast, i.e. our fp32-stored model computing in bf16 (benchmarks/parity_official.py shows
    that one is bit-identical to the official code)."""
    import copy

    path = tmp_path / "tiny.safetensors"
    save_dit(tiny, path)
    stored = load_dit(path)  # weight_dtype "bf16", compute bf16
    fp32_weights = copy.deepcopy(tiny)
    fp32_weights.compute_dtype = torch.bfloat16
    inp = make_inputs(tiny.cfg)
    assert torch.equal(run(stored, inp), run(fp32_weights, inp))
