"""Ulysses sequence parallelism and guidance-parallel without processes: the sequence layout arithmetic, the
DiT's seams (off: today's numbers bit for bit), P ranks simulated by threads (every layout of a 12-head model
equals one process), the step cache's agreement, and the clear errors of impossible layouts."""
from __future__ import annotations

import threading

import pytest
import torch

from dreamidv_core.errors import InputError
from dreamidv_core.models.attention import attention
from dreamidv_core.models.configs import tiny_config
from dreamidv_core.models.dit import DreamIDVTransformer, init_random_
from dreamidv_core.models.layers import apply_rope, sinusoidal_embedding
from dreamidv_core.parallel.mesh import Mesh, ParallelConfig
from dreamidv_core.parallel.ulysses import SequenceParallel
from dreamidv_core.sampling.guidance import make_guided_model
from dreamidv_core.sampling.samplers import flow_sigmas, sample_unipc
from dreamidv_core.sampling.step_cache import StepCache, attach_step_cache


# ------------------------------------------------------------------------------------------------ P ranks as threads

class Threads:
    """P "ranks" as threads exchanging through shared slots (a barrier with a timeout: a mismatch fails, never hangs)."""

    def __init__(self, p: int):
        self.p, self.slots, self.barrier = p, [None] * p, threading.Barrier(p, timeout=60)

    def exchange(self, rank: int, item):
        self.slots[rank] = item
        self.barrier.wait()
        got = list(self.slots)
        self.barrier.wait()
        return got

    def run(self, fn):
        """fn(rank) on every rank, concurrently -> results by rank (re-raising the first error)."""
        out, errors = [None] * self.p, []

        def body(r):
            try:
                out[r] = fn(r)
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
                self.barrier.abort()

        threads = [threading.Thread(target=body, args=(r,)) for r in range(self.p)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return out


class ThreadSP(SequenceParallel):
    """The real SequenceParallel (layouts, padding, head slices) with its two collectives done by :class:`Threads`."""

    def __init__(self, threads: Threads, rank: int):
        super().__init__(None, rank, threads.p)
        self.threads = threads

    def all_to_all(self, send):
        parts = self.threads.exchange(self.rank, send.contiguous())
        return torch.stack([parts[j][self.rank] for j in range(self.size)])

    def all_gather(self, t):
        return torch.cat(self.threads.exchange(self.rank, t.contiguous()), dim=1)


# ------------------------------------------------------------------------------------------------ inputs

def model12(variant="full", id_gate=0.3):
    """12 heads like the released model (head_dim 8), 2 blocks; ``id_gate``: an active ArcFace ID projection."""
    kw = dict(dim=96, num_heads=12, id_tokens=2) if variant == "full" else dict(dim=96, num_heads=12)
    dit = init_random_(DreamIDVTransformer(tiny_config(variant, **kw)), seed=5).eval()
    if variant == "full":
        with torch.no_grad():
            for blk in dit.id_projection.blocks:
                blk.gate.fill_(id_gate)
    return dit


def inputs(dit, f=2, h8=4, w8=6, seed=1):
    """Grid (f, h8/2, w8/2): with f=2, 4x6 -> 6 tokens per frame, L = 3 * 6 = 18 (padding for P = 4, 12)."""
    g = torch.Generator().manual_seed(seed)
    cfg = dit.cfg
    y = torch.randn(cfg.in_dim - cfg.out_dim, f, h8, w8, generator=g) if cfg.in_dim != cfg.out_dim else None
    refs = torch.cat([torch.randn(1, 16, 1, h8, w8, generator=g), torch.zeros(1, 16, 1, h8, w8)]) if cfg.has_ref \
        else None
    pose = torch.randn(1, f * (h8 // 2) * (w8 // 2), cfg.dim, generator=g) if cfg.has_pose else None
    emb = torch.cat([torch.randn(1, 512, generator=g), torch.zeros(1, 512)]) if cfg.id_tokens else None
    ctx = torch.randn(5, cfg.text_dim, generator=g)
    x = torch.randn(1, 16, f, h8, w8, generator=g)
    return dict(context=ctx, y=y, ref_latents=refs, pose_tokens=pose, id_embedding=emb,
                latent_grid=(f, h8, w8)), x


# ------------------------------------------------------------------------------------------------ layout arithmetic

def test_sequence_shard_pads_and_splits_evenly():
    sp = SequenceParallel(None, rank=3, size=4)
    shard = sp.bind(27)  # 27 tokens over 4 ranks: padded to 28, 7 each; rank 3 holds 21..27 (27 is padding)
    assert (shard.padded, shard.local, shard.start, shard.stop) == (28, 7, 21, 28)
    x = torch.arange(27.0).view(1, 27, 1)
    assert shard.take(x)[0, :, 0].tolist() == [21, 22, 23, 24, 25, 26, 0]
    cos, sin = torch.rand(27, 4), torch.rand(27, 4)
    lc, ls = shard.rope((cos, sin))
    assert torch.equal(lc[:6], cos[21:]) and torch.equal(lc[6], torch.ones(4)) and torch.equal(ls[6], torch.zeros(4))
    assert SequenceParallel(None, 0, 4).bind(27).take(x)[0, :, 0].tolist() == list(range(7))
    kv = torch.arange(12.0).view(1, 1, 12, 1)
    assert SequenceParallel(None, 2, 3).heads(kv).flatten().tolist() == [8, 9, 10, 11]


def test_all_to_all_layouts_round_trip_and_give_the_whole_sequence_per_head_group():
    p, length, n, d = 3, 10, 6, 2  # 10 tokens over 3 ranks (padded to 12), 6 heads: 2 per rank
    full = torch.randn(1, length, n, d)
    threads = Threads(p)

    def rank(r):
        shard = ThreadSP(threads, r).bind(length)
        local = shard.take(full)
        (heads,) = shard.to_heads(local)
        back = shard.to_seq(heads.flatten(2))
        return heads, back, shard.gather(local.flatten(2))

    for r, (heads, back, gathered) in enumerate(threads.run(rank)):
        assert torch.equal(heads, full[:, :, 2 * r:2 * r + 2])  # every token, this rank's heads, no padding
        assert torch.equal(back, SequenceParallel(None, r, p).bind(length).take(full).flatten(2))
        assert torch.equal(gathered, full.flatten(2))


# ------------------------------------------------------------------------------------------------ the DiT's seams

def _old_self_attention(attn, x, rope, pose_kv, backend, id_attn=None):
    """SelfAttention.forward as it was before the sequence-parallel seam (the oracle of the default path)."""
    q0 = attn._heads(attn.norm_q(attn.q(x)))
    q = apply_rope(q0, *rope).to(x.dtype)
    k = apply_rope(attn._heads(attn.norm_k(attn.k(x))), *rope).to(x.dtype)
    out = attention(q, k, attn._heads(attn.v(x)), backend)
    if pose_kv is not None:
        out = out.float() + attn.pose_gate.float() * attention(q, *pose_kv, backend).float()
    if id_attn is not None:
        id_k, id_v, gate = id_attn
        out = out.float() + gate.float() * attention(q0.to(x.dtype), id_k, id_v, backend).float()
    return attn.o(out.to(x.dtype))


def _old_forward(dit, x, t, cond, refs):
    """DreamIDVTransformer.forward before the seams, for one reference row per element (no step cache)."""
    cd, b = dit.compute_dtype, x.shape[0]
    inp = torch.cat([x.to(cd), cond.y.expand(b, -1, -1, -1, -1)], dim=1)
    tokens = dit.patch_embedding(inp).flatten(2).transpose(1, 2)
    ref = cond.ref_tokens[list(refs)]
    tokens = torch.cat([ref, tokens], dim=1)
    id_kv = [(k[list(refs)], v[list(refs)]) for k, v in cond.id_kv]
    e = dit.time_embedding(sinusoidal_embedding(dit.cfg.freq_dim, torch.as_tensor(t).reshape(-1).expand(b)))
    e0 = dit.time_projection(e).unflatten(1, (6, dit.cfg.dim))
    h = tokens
    for i, blk in enumerate(dit.blocks):
        pose_kv = cond.pose_kv[i] if cond.pose_kv is not None else blk.self_attn.pose_kv(cond.pose_tokens, cond.rope)
        ee = (blk.modulation.float() + e0).chunk(6, dim=1)
        m = blk.norm1(h).float() * (1 + ee[1]) + ee[0]
        id_attn = (*id_kv[i], dit.id_projection.blocks[i].gate)
        h = h + _old_self_attention(blk.self_attn, m.to(cd), cond.rope, pose_kv, "sdpa", id_attn).float() * ee[2]
        h = h + blk.cross_attn(blk.norm3(h).to(cd), cond.context_kv[i], "sdpa").float()
        m = blk.norm2(h).float() * (1 + ee[4]) + ee[3]
        h = h + blk.ffn(m.to(cd)).float() * ee[5]
    return dit.unpatchify(dit.head(h[:, ref.shape[1]:], e), cond.grid)


@pytest.mark.parametrize("cache_pose_kv", [True, False])
def test_without_parallel_the_dit_computes_exactly_what_it_did_before(cache_pose_kv):
    dit = model12()
    kw, x = inputs(dit)
    with torch.no_grad():
        cond = dit.prepare(cache_pose_kv=cache_pose_kv, **kw)
        assert cond.parallel is None
        for r in (0, 1):
            assert torch.equal(dit(x, torch.tensor([600.0]), cond, refs=[r]), _old_forward(dit, x, 600.0, cond, [r]))


@pytest.mark.parametrize("p", [2, 3, 4, 6, 12])
def test_ulysses_over_p_threads_equals_one_process(p, one_thread):
    """Every degree of the released head count, with padding (18 tokens), pose tokens and cached pose K/V, an
    active ID projection, both reference rows; and the ``faster`` and ``ivs`` variants at P = 3."""
    dit = model12()
    kw, x = inputs(dit)
    t = torch.tensor([600.0])
    with torch.no_grad():
        want = {(c, r): dit(x, t, dit.prepare(cache_pose_kv=c, **kw), refs=[r]) for c in (True, False) for r in (0, 1)}
    threads = Threads(p)

    def rank(r):
        sp = ThreadSP(threads, r)
        with torch.no_grad():
            return {(c, ref): dit(x, t, dit.prepare(cache_pose_kv=c, parallel=sp, **kw), refs=[ref])
                    for c in (True, False) for ref in (0, 1)}

    for got in threads.run(rank):
        for key, ref in want.items():
            assert torch.allclose(got[key], ref, rtol=0, atol=1e-5), (p, key, (got[key] - ref).abs().max().item())


@pytest.mark.parametrize("variant", ["faster", "ivs"])
def test_ulysses_without_reference_or_pose_tokens(variant, one_thread):
    dit = model12(variant)
    kw, x = inputs(dit)
    t = torch.tensor([300.0])
    with torch.no_grad():
        want = dit(x, t, dit.prepare(**kw))
    threads = Threads(3)
    for got in threads.run(lambda r: dit(x, t, dit.prepare(parallel=ThreadSP(threads, r), **kw))):
        assert torch.allclose(got, want, rtol=0, atol=1e-5)


def test_guided_sampling_with_step_cache_agrees_across_ranks(one_thread):
    """Two ranks whose own step-cache decisions differ (threshold 0: never skip; 1e9: always skip) run the same
    evaluations when they agree; the sampled latent is the uncached one's, on both."""
    dit = model12()
    kw, x = inputs(dit)
    sigmas = flow_sigmas(4, shift=5.0)
    with torch.no_grad():
        want = sample_unipc(make_guided_model(dit, dit.prepare(**kw), 4.0, False), x, sigmas)
    threads = Threads(2)

    def rank(r):
        sp = ThreadSP(threads, r)
        agree = lambda flag: any(threads.exchange(r, flag))  # noqa: E731
        cache = StepCache(0.0 if r == 0 else 1e9, steps=4, agree=agree)
        with torch.no_grad():
            cond = attach_step_cache(dit.prepare(parallel=sp, **kw), cache)
            return sample_unipc(make_guided_model(dit, cond, 4.0, False), x, sigmas), cache.skipped

    for latent, skipped in threads.run(rank):
        assert skipped == 0 and torch.allclose(latent, want, rtol=1e-5, atol=1e-5)


def test_guidance_pair_keeps_the_one_process_arithmetic():
    """make_guided_model with a pair function (guidance-parallel hands c and u over unchanged) is bit-identical."""
    dit = model12()
    kw, x = inputs(dit)
    calls = []

    def pair(cond, uncond):
        calls.append(1)
        u = uncond()  # another order than one process: the values do not depend on it
        return cond(), u

    with torch.no_grad():
        cond = dit.prepare(**kw)
        a = make_guided_model(dit, cond, 4.0, False)(x, torch.tensor(0.7))
        b = make_guided_model(dit, cond, 4.0, False, pair=pair)(x, torch.tensor(0.7))
    assert calls and torch.equal(a, b)


# ------------------------------------------------------------------------------------------------ layouts and errors

def test_layout_arithmetic_and_a_single_process_mesh():
    assert ParallelConfig(ulysses=2, cfg_parallel=True).group_size == 4
    assert ParallelConfig(ulysses=3).check_world(6, one_job=False) == 2
    assert ParallelConfig().check_world(5, one_job=False) == 5
    mesh = Mesh()
    assert mesh.is_leader and mesh.is_main and not mesh.active
    assert mesh.share({"a": torch.ones(2)})["a"].tolist() == [1, 1]
    assert mesh.pair(lambda: torch.zeros(1), lambda: torch.ones(1))[1].item() == 1
    assert mesh.agree(False) is False and mesh.run_on_leader(lambda: 5, "x") == 5


@pytest.mark.parametrize("config,kw,match", [
    (ParallelConfig(ulysses=5), dict(num_heads=12), "does not divide the model's 12 attention heads.*1, 2, 3, 4, 6, 12"),
    (ParallelConfig(cfg_parallel=True), dict(guidance=0.0), "guidance 0 runs one pass"),
    (ParallelConfig(cfg_parallel=True), dict(batch_guidance=True), "choose one"),
    (ParallelConfig(ulysses=2, fsdp=True), dict(offload_blocks=3), "--dit-fsdp and --offload-blocks"),
    (ParallelConfig(ulysses=2, fsdp=True), dict(step_cache=0.1), "--step-cache"),
    (ParallelConfig(fsdp=True), {}, "one rank per clip"),
    (ParallelConfig(ulysses=0), {}, "1 or more"),
])
def test_impossible_layouts_are_clear_errors(config, kw, match):
    with pytest.raises(InputError, match=match):
        config.check(**kw)


@pytest.mark.parametrize("config,world,one_job,match", [
    (ParallelConfig(ulysses=2), 1, True, "needs 2 processes per clip: start it under torchrun"),
    (ParallelConfig(ulysses=2, cfg_parallel=True), 6, False, "6 processes cannot be cut into groups of 4"),
    (ParallelConfig(ulysses=2), 4, True, "needs exactly 2 processes, but 4 were started.*swap-batch"),
])
def test_world_size_must_fit_the_layout(config, world, one_job, match):
    with pytest.raises(InputError, match=match):
        config.check_world(world, one_job)
