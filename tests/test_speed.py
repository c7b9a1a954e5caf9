"""Speed switches on tiny models: block offload (CPU path) and the step cache."""
import pytest
import torch

from dreamidv_core.models.configs import tiny_config
from dreamidv_core.models.dit import DreamIDVTransformer, init_random_
from dreamidv_core.errors import InputError
from dreamidv_core.sampling.samplers import flow_sigmas, sample_unipc
from dreamidv_core.sampling.offload import disable_block_offload, enable_block_offload, offload_memory
from dreamidv_core.sampling.step_cache import StepCache, attach_step_cache, measure_step_cache
from dreamidv_core.sampling.guidance import make_guided_model


def make_model(layers=4, seed=3):
    return init_random_(DreamIDVTransformer(tiny_config("full", num_layers=layers)), seed=seed).eval()


def make_cond(model, seed=0, frames=9, h8=4, w8=6, cache_pose_kv=True):
    g = torch.Generator().manual_seed(seed)
    f_lat = (frames - 1) // 4 + 1
    context = torch.randn(5, model.cfg.text_dim, generator=g)
    y = torch.randn(32, f_lat, h8, w8, generator=g)
    ref = torch.randn(1, 16, 1, h8, w8, generator=g)
    pose = torch.rand(1, 3, frames, h8 * 8, w8 * 8, generator=g)
    x = torch.randn(1, 16, f_lat, h8, w8, generator=g)
    with torch.no_grad():
        cond = model.prepare(context, y, torch.cat([ref, torch.zeros_like(ref)]), model.pose_tokens(pose),
                             cache_pose_kv=cache_pose_kv)
    return cond, x


def block_ptrs(model):
    return [[p.data_ptr() for p in blk.parameters()] for blk in model.blocks]


# ------------------------------------------------------------------------------------ block offload
@pytest.mark.parametrize("cache_pose_kv", [True, False])
def test_block_offload_output_equals_no_offload(cache_pose_kv):
    model = make_model()
    cond, x = make_cond(model, cache_pose_kv=cache_pose_kv)
    t = torch.tensor([700.0])
    x2 = x.expand(2, -1, -1, -1, -1)
    with torch.no_grad():
        expected = [model(x, t, cond, refs=[0]), model(x2, t, cond, refs=[0, 1])]
        mem = enable_block_offload(model, 3, "cpu", "cpu")
        cond2, _ = make_cond(model, cache_pose_kv=cache_pose_kv)  # prepare() streams the blocks too
        for c in (cond, cond2):
            got = [model(x, t, c, refs=[0]), model(x2, t, c, refs=[0, 1])]
            assert all(torch.equal(a, b) for a, b in zip(got, expected))
    prepare_passes = 2 if cache_pose_kv else 1  # text K/V, then pose K/V
    assert model.block_offload.fetches == 3 * (4 + prepare_passes)
    assert mem.offloaded == 3 and mem.saved == mem.block_bytes and mem.staging == 2 * mem.block_bytes


def test_blocks_live_in_storage_between_calls_and_in_slots_during():
    model = make_model()
    cond, x = make_cond(model)
    before = block_ptrs(model)
    enable_block_offload(model, 3, "cpu", "cpu")
    off = model.block_offload
    assert off.indices == [1, 2, 3]
    host = {b: [h.data_ptr() for h in off.host[b]] for b in off.indices}
    assert block_ptrs(model)[0] == before[0]  # resident block untouched
    for b in off.indices:
        assert block_ptrs(model)[b] == host[b]
    slot_ptrs = [{t.data_ptr() for t in s} for s in off.slots]
    seen = {}

    def spy(i):
        def hook(module, args):
            seen[i] = {p.data_ptr() for p in module.parameters()}
        return hook

    handles = [blk.register_forward_pre_hook(spy(i)) for i, blk in enumerate(model.blocks)]
    with torch.no_grad():
        model(x, torch.tensor([500.0]), cond, refs=[0])
    for h in handles:
        h.remove()
    assert seen[0] == set(before[0])
    assert seen[1] == slot_ptrs[0] and seen[2] == slot_ptrs[1] and seen[3] == slot_ptrs[0]
    for b in off.indices:  # back in storage after the call
        assert block_ptrs(model)[b] == host[b]
    disable_block_offload(model)
    assert model.block_offload is None
    with torch.no_grad():
        model(x, torch.tensor([500.0]), cond, refs=[0])
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_disable_restores_weights_and_outputs():
    model = make_model()
    cond, x = make_cond(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = model(x, torch.tensor([300.0]), cond, refs=[1])
    enable_block_offload(model, 4, "cpu")
    assert model.block_offload.indices == [0, 1, 2, 3]
    enable_block_offload(model, 2, "cpu")  # replaces the previous offload
    assert model.block_offload.indices == [2, 3]
    disable_block_offload(model)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(x, torch.tensor([300.0]), cond, refs=[1]), expected)


def test_offload_memory_arithmetic_and_bad_count():
    model = make_model()
    block = sum(p.numel() * p.element_size() for p in model.blocks[0].parameters())
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    m = offload_memory(model, 4)
    assert (m.block_bytes, m.stored_off_device, m.staging, m.saved) == (block, 4 * block, 2 * block, 2 * block)
    assert m.device_weights == total - 2 * block and "4/4 blocks" in m.describe()
    assert offload_memory(model, 1).saved == 0 and offload_memory(model, 0).saved == 0
    with pytest.raises(InputError, match="between 0 and 4"):
        enable_block_offload(model, 5, "cpu")


# ------------------------------------------------------------------------------------ step cache
def run_unipc(model, cond, x, cache=None, steps=8, guidance=4.0, batch=False):
    attach_step_cache(cond, cache)
    try:
        return sample_unipc(make_guided_model(model, cond, guidance, batch), x, flow_sigmas(steps, shift=5.0))
    finally:
        attach_step_cache(cond, None)


@pytest.fixture(scope="module")
def model_cond():
    model = make_model(layers=2)
    cond, x = make_cond(model)
    return model, cond, x


def test_threshold_zero_is_bit_identical(model_cond):
    model, cond, x = model_cond
    base = run_unipc(model, cond, x)
    cache = StepCache(0.0, steps=8)
    assert torch.equal(run_unipc(model, cond, x, cache), base)
    assert cache.evaluations == 16 and cache.skipped == 0


def test_large_threshold_skips_and_stays_close(model_cond):
    model, cond, x = model_cond
    base = run_unipc(model, cond, x, steps=12)
    cache = StepCache(0.3, steps=12)
    got = run_unipc(model, cond, x, cache, steps=12)
    assert cache.evaluations == 24 and 0 < cache.skipped < 20
    assert cache.skipped % 2 == 0  # guided and unguided passes take the same decisions
    rel = (got - base).norm() / base.norm()
    assert rel < 0.25, rel
    huge = StepCache(1e9, steps=12)
    run_unipc(model, cond, x, huge, steps=12)
    assert huge.skipped == 2 * (12 - 2)  # first and last steps always computed


def test_batched_guidance_cache(model_cond):
    model, cond, x = model_cond
    base = run_unipc(model, cond, x, batch=True)
    assert torch.equal(run_unipc(model, cond, x, StepCache(0.0, steps=8), batch=True), base)
    batched, separate = StepCache(0.3, steps=8), StepCache(0.3, steps=8)
    run_unipc(model, cond, x, batched, batch=True)
    run_unipc(model, cond, x, separate)
    assert batched.evaluations == 8 and 2 * batched.skipped == separate.skipped


def test_separate_state_per_pass_and_window(model_cond):
    model, cond, x = model_cond
    cache = StepCache(1e9, steps=3)
    t = torch.tensor([900.0])
    with torch.no_grad():
        attach_step_cache(cond, cache)
        c0 = model(x, t, cond, refs=[0])
        u0 = model(x, t, cond, refs=[1])
        assert cache.skipped == 0 and len(cache.states) == 2  # each pass computes its own first step
        c1 = model(x, t, cond, refs=[0])
        u1 = model(x, t, cond, refs=[1])
        assert cache.skipped == 2
        # same input again: the stored residual reproduces the outputs (up to float rounding)
        assert torch.allclose(c1, c0, atol=1e-5) and torch.allclose(u1, u0, atol=1e-5)
        assert not torch.allclose(c1, u1, atol=1e-2)
        attach_step_cache(cond, cache, window=1)  # another window: fresh state, computed
        model(x, t, cond, refs=[0])
        assert cache.skipped == 2 and len(cache.states) == 3
        attach_step_cache(cond, None)
        cond.extra.pop("window")
    assert cache.memory_bytes() > 0
    cache.reset()
    assert cache.memory_bytes() == 0 and cache.evaluations == 0


def test_cache_with_offload_and_measure_helper(model_cond):
    model, cond, x = model_cond
    rows = measure_step_cache(model, cond, x, thresholds=(0.0, 0.3), steps=6)
    assert [r["threshold"] for r in rows] == [None, 0.0, 0.3]
    assert rows[1]["psnr"] == float("inf") and rows[1]["skipped"] == 0
    assert rows[2]["skipped"] > 0 and rows[2]["psnr"] > 10
    assert "step_cache" not in cond.extra
    base = run_unipc(model, cond, x, StepCache(0.3, steps=6), steps=6)
    enable_block_offload(model, 2, "cpu")
    try:
        assert torch.equal(run_unipc(model, cond, x, StepCache(0.3, steps=6), steps=6), base)
    finally:
        disable_block_offload(model)


def test_bad_settings():
    with pytest.raises(InputError, match="threshold"):
        StepCache(-1)
    with pytest.raises(InputError, match="warmup"):
        StepCache(0.1, warmup=0)
