"""The DiT: released shapes, pose attention, reference tokens, conditions computed once."""
import json
from pathlib import Path

import pytest
import torch

from dreamidv_core.models.configs import RELEASED_CONFIGS, tiny_config
from dreamidv_core.models.dit import DreamIDVTransformer, init_random_
from dreamidv_core.errors import InputError
from dreamidv_core.models.layers import rope_table

DATA = Path(__file__).parent / "data"
MANIFESTS = {
    "dreamidv": "dreamidv_param_manifest.json",
    "dreamidv_faster": "dreamidv_faster_param_manifest.json",
    "wan21_t2v_1_3b": "wan21_t2v_1_3b_param_manifest.json",
}


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_released_config_on_meta_matches_manifest(name):
    manifest = json.loads((DATA / MANIFESTS[name]).read_text())
    with torch.device("meta"):
        model = DreamIDVTransformer(RELEASED_CONFIGS[name])
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    expected = manifest["params"]
    assert sorted(set(ours) - set(expected)) == []
    assert sorted(set(expected) - set(ours)) == []
    assert {k: v for k, v in ours.items() if expected[k] != v} == {}
    assert sum(torch.Size(v).numel() for v in ours.values()) == manifest["_meta"]["num_params"]


def make_inputs(cfg, frames=9, h8=4, w8=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    f_lat = (frames - 1) // 4 + 1
    return dict(
        context=torch.randn(5, cfg.text_dim, generator=g),
        y=torch.randn(32, f_lat, h8, w8, generator=g),
        ref=torch.randn(1, 16, 1, h8, w8, generator=g),
        pose=torch.rand(1, 3, frames, h8 * 8, w8 * 8, generator=g),
        x=torch.randn(1, 16, f_lat, h8, w8, generator=g),
    )


@pytest.fixture(scope="module")
def full_model():
    return init_random_(DreamIDVTransformer(tiny_config("full")), seed=3).eval()


def run(model, inp, pose=True, t=700.0, cache_pose_kv=True):
    with torch.no_grad():
        tokens = model.pose_tokens(inp["pose"]) if pose else None
        cond = model.prepare(inp["context"], inp["y"], inp["ref"], tokens, cache_pose_kv=cache_pose_kv)
        return model(inp["x"], torch.tensor([t]), cond)


def test_output_shape_matches_latent(full_model):
    inp = make_inputs(full_model.cfg)
    out = run(full_model, inp)
    assert out.shape == inp["x"].shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_pose_gate_zero_makes_pose_branch_a_noop(full_model):
    inp = make_inputs(full_model.cfg)
    gates = [blk.self_attn.pose_gate for blk in full_model.blocks]
    saved = [g.detach().clone() for g in gates]
    try:
        with torch.no_grad():
            for g in gates:
                g.zero_()
        with_pose = run(full_model, inp, pose=True)
        without = run(full_model, inp, pose=False)
        assert torch.equal(with_pose, without)
    finally:
        with torch.no_grad():
            for g, s in zip(gates, saved):
                g.copy_(s)


def test_pose_video_changes_output_when_gate_open(full_model):
    inp = make_inputs(full_model.cfg)
    a = run(full_model, inp)
    inp2 = dict(inp, pose=torch.roll(inp["pose"], shifts=8, dims=-1))
    b = run(full_model, inp2)
    assert (a - b).abs().max() > 1e-4


def test_pose_kv_cache_equals_recomputation(full_model):
    inp = make_inputs(full_model.cfg)
    torch.testing.assert_close(run(full_model, inp, cache_pose_kv=True), run(full_model, inp, cache_pose_kv=False),
                               rtol=1e-5, atol=1e-6)


def test_reference_tokens_never_reach_the_head(full_model):
    inp = make_inputs(full_model.cfg, h8=4, w8=6)
    seen = []
    hook = full_model.head.register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    try:
        run(full_model, inp)
    finally:
        hook.remove()
    f_lat, h, w = inp["x"].shape[2], 4 // 2, 6 // 2
    assert seen == [torch.Size([1, f_lat * h * w, full_model.cfg.dim])]


def test_reference_changes_output_and_zero_reference_is_a_separate_row(full_model):
    inp = make_inputs(full_model.cfg)
    refs = torch.cat([inp["ref"], torch.zeros_like(inp["ref"])])
    with torch.no_grad():
        cond = full_model.prepare(inp["context"], inp["y"], refs, full_model.pose_tokens(inp["pose"]))
        both = full_model(inp["x"].expand(2, -1, -1, -1, -1), torch.tensor([700.0]), cond)
        c = full_model(inp["x"], torch.tensor([700.0]), cond, refs=[0])
        u = full_model(inp["x"], torch.tensor([700.0]), cond, refs=[1])
    torch.testing.assert_close(both[0:1], c, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(both[1:2], u, rtol=1e-5, atol=1e-5)
    assert (c - u).abs().max() > 1e-4


def test_reference_tokens_take_temporal_rope_index_zero():
    cos, sin = rope_table((3, 2, 2), head_dim=16)
    # time axis uses the first 4 frequency pairs: index 0 -> angle 0 for the first h*w tokens only
    assert torch.equal(cos[:4, :4], torch.ones(4, 4)) and torch.equal(sin[:4, :4], torch.zeros(4, 4))
    assert not torch.equal(sin[4:8, :4], torch.zeros(4, 4))


def test_faster_variant_has_no_pose_branch_and_refuses_pose_tokens():
    model = init_random_(DreamIDVTransformer(tiny_config("faster")))
    assert not hasattr(model, "project_pose")
    inp = make_inputs(model.cfg)
    with torch.no_grad():
        cond = model.prepare(inp["context"], inp["y"], inp["ref"], None)
        assert model(inp["x"], torch.tensor([500.0]), cond).shape == inp["x"].shape
    with pytest.raises(InputError, match="no pose branch"):
        model.pose_tokens(inp["pose"])


def test_mismatched_reference_size_is_a_clear_error(full_model):
    inp = make_inputs(full_model.cfg)
    with pytest.raises(InputError, match="letterboxed"):
        full_model.prepare(inp["context"], inp["y"], inp["ref"][..., :2, :], None)


def test_pose_frames_must_match_video(full_model):
    inp = make_inputs(full_model.cfg, frames=9)
    short_pose = full_model.pose_tokens(inp["pose"][:, :, :5])
    with pytest.raises(InputError, match="pose"):
        full_model.prepare(inp["context"], inp["y"], inp["ref"], short_pose)


def test_context_longer_than_text_len_is_refused(full_model):
    inp = make_inputs(full_model.cfg)
    with pytest.raises(InputError, match="at most"):
        full_model.prepare(torch.randn(full_model.cfg.text_len + 1, full_model.cfg.text_dim), inp["y"], inp["ref"])


def test_missing_attention_backend_is_a_clear_error(monkeypatch):
    from dreamidv_core.models import attention as attn

    monkeypatch.setattr(attn, "available_backends", lambda: ["sdpa"])
    assert attn.check_backend("sdpa") == "sdpa"
    with pytest.raises(Exception, match="flash-attn"):
        attn.check_backend("flash")
    with pytest.raises(Exception, match="unknown attention backend"):
        attn.check_backend("xformers")


def test_pose_kv_cache_size_and_automatic_choice(full_model, monkeypatch):
    import psutil

    # (3 latent frames + 1 reference frame) x (4/2) x (6/2) tokens, K and V, dim 64, 2 blocks, float32
    assert full_model.pose_kv_cache_bytes((3, 4, 6)) == 2 * (4 * 2 * 3) * 64 * 2 * 4
    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("M", (), {"available": 10 ** 12})())
    assert full_model.should_cache_pose_kv((3, 4, 6))
    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("M", (), {"available": 1000})())
    assert not full_model.should_cache_pose_kv((3, 4, 6))
