"""Training objective: flow-matching convention, conditioning as the sampler builds it, identity dropout,
gradients, and the Identity-Coherence RL chunk weights (tiny DiT / tiny VAE, CPU)."""
import pytest
import torch

from dreamidv_core.models.configs import tiny_config
from dreamidv_core.models.dit import DreamIDVTransformer, init_random_
from dreamidv_core.sampling.samplers import shift_sigmas
from dreamidv_core.models.vae import TINY_VAE_CONFIG, WanVAE
from training.irl import chunk_frame_indices, identity_coherence_weights, irl_loss
from training.objective import (FlowMatchingObjective, TrainingConditioning, encode_conditioning,
                                prepare_conditions)

FRAMES, H, W = 9, 32, 48  # 3 latent frames of 4x6 (token grid 3x2x3)


def make_dit(seed=0):
    return init_random_(DreamIDVTransformer(tiny_config("full", text_dim=32)), seed=seed)


def make_batch(dit, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    f = (FRAMES - 1) // 4 + 1
    z = torch.randn(b, 16, f, H // 8, W // 8, generator=g)
    cond = TrainingConditioning(
        context=torch.randn(b, 5, dit.cfg.text_dim, generator=g),
        y=torch.randn(b, 32, f, H // 8, W // 8, generator=g),
        ref_latent=torch.randn(b, 16, 1, H // 8, W // 8, generator=g),
        pose=torch.rand(b, 3, FRAMES, H, W, generator=g))
    return z, cond


@pytest.fixture(scope="module")
def dit():
    return make_dit()


def test_prepare_conditions_equals_dit_prepare(dit):
    z, c = make_batch(dit, b=1)
    tokens = dit.pose_tokens(c.pose)
    for cache in (True, False):
        ref = dit.prepare(c.context[0], c.y[0], c.ref_latent, tokens, cache_pose_kv=cache)
        ours = prepare_conditions(dit, c.context[0], c.y[0], c.ref_latent, tokens, cache_pose_kv=cache)
        assert ours.grid == ref.grid
        torch.testing.assert_close(ours.y, ref.y)
        torch.testing.assert_close(ours.ref_tokens, ref.ref_tokens)
        for a, b in zip(ours.rope, ref.rope):
            torch.testing.assert_close(a, b)
        for (ka, va), (kb, vb) in zip(ours.context_kv, ref.context_kv, strict=True):
            torch.testing.assert_close(ka, kb)
            torch.testing.assert_close(va, vb)
        if cache:
            for (ka, va), (kb, vb) in zip(ours.pose_kv, ref.pose_kv, strict=True):
                torch.testing.assert_close(ka, kb)
                torch.testing.assert_close(va, vb)
        else:
            torch.testing.assert_close(ours.pose_tokens, ref.pose_tokens)
        x, t = torch.randn_like(z), torch.tensor([640.0])
        with torch.no_grad():
            torch.testing.assert_close(dit(x, t, ours), dit(x, t, ref))
    assert ours.ref_tokens.requires_grad and ours.context_kv[0][0].requires_grad


def test_batched_conditions_match_per_sample(dit):
    z, c = make_batch(dit, b=2, seed=1)
    x, t = torch.randn_like(z), torch.tensor([300.0, 800.0])
    with torch.no_grad():
        tokens = dit.project_pose(c.pose)
        out = dit(x, t, prepare_conditions(dit, c.context, c.y, c.ref_latent, tokens))
        for i in range(2):
            one = dit.prepare(c.context[i], c.y[i], c.ref_latent[i:i + 1], tokens[i:i + 1])
            torch.testing.assert_close(out[i:i + 1], dit(x[i:i + 1], t[i:i + 1], one), rtol=1e-4, atol=1e-5)


def test_stub_model_with_exact_velocity_has_zero_loss(dit, monkeypatch):
    z, c = make_batch(dit, b=3, seed=2)
    seen = {}

    def exact_velocity(x, t, cond, refs=None):  # knows z; sigma from the timestep convention t = 1000 sigma
        sigma = (t / 1000).reshape(-1, 1, 1, 1, 1)
        seen["sigma"] = sigma.flatten()
        return (x - z) / sigma  # = eps - z when x = (1 - sigma) z + sigma eps

    monkeypatch.setattr(dit, "forward", exact_velocity)
    obj = FlowMatchingObjective(identity_dropout=0.0)
    out = obj.per_chunk_loss(dit, z, c, torch.Generator().manual_seed(0))
    assert out.per_chunk.shape == (3, z.shape[2])
    assert out.per_chunk.max().item() < 1e-8
    torch.testing.assert_close(out.x0_hat, z, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(seen["sigma"], out.sigma)
    # a model predicting the opposite convention (z - eps) is penalised
    monkeypatch.setattr(dit, "forward", lambda x, t, cond, refs=None: -exact_velocity(x, t, cond))
    assert obj.per_chunk_loss(dit, z, c, torch.Generator().manual_seed(0)).per_chunk.min().item() > 0.1


def test_noising_convention():
    z, eps = torch.full((2, 1, 1, 1, 1), 2.0), torch.full((2, 1, 1, 1, 1), -1.0)
    x = FlowMatchingObjective.noisy(z, eps, torch.tensor([0.0, 1.0]))
    assert x.flatten().tolist() == [2.0, -1.0]
    assert FlowMatchingObjective.target(z, eps).flatten().tolist() == [-3.0, -3.0]
    assert FlowMatchingObjective.timestep(torch.tensor([0.25])).item() == 250.0


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal"])
def test_shift_applied_to_sampled_sigmas(sampling):
    n, shift = 40000, 5.0
    s = FlowMatchingObjective(shift=shift, timestep_sampling=sampling).sample_sigma(n, torch.Generator().manual_seed(0))
    s1 = FlowMatchingObjective(shift=1.0, timestep_sampling=sampling).sample_sigma(n, torch.Generator().manual_seed(0))
    assert s.shape == (n,) and 0 <= s.min() and s.max() < 1
    torch.testing.assert_close(s, shift_sigmas(s1.double(), shift).float(), rtol=1e-5, atol=1e-6)
    # median of u is 0.5 for both distributions -> shifted median 5*0.5/(1+4*0.5) = 0.8333
    assert abs(s.median().item() - 2.5 / 3.0) < 0.01
    if sampling == "uniform":  # CDF of the shifted uniform: P(sigma <= x) = x / (shift - (shift-1) x)
        for x in (0.3, 0.6, 0.9):
            assert abs((s <= x).float().mean().item() - x / (shift - (shift - 1) * x)) < 0.01


def test_identity_dropout_fraction_and_zeroed_reference(dit, monkeypatch):
    obj = FlowMatchingObjective(identity_dropout=0.1)
    frac = obj.sample_ref_dropout(20000, torch.Generator().manual_seed(3)).float().mean().item()
    assert abs(frac - 0.1) < 0.01
    z, c = make_batch(dit, b=4, seed=3)
    captured = {}
    real = prepare_conditions

    def spy(d, context, y, ref, pose_tokens=None, cache_pose_kv=False):
        captured["ref"] = ref.clone()
        return real(d, context, y, ref, pose_tokens, cache_pose_kv)

    monkeypatch.setattr("training.objective.prepare_conditions", spy)
    obj = FlowMatchingObjective(identity_dropout=0.5)
    for seed in range(4):
        out = obj.per_chunk_loss(dit, z, c, torch.Generator().manual_seed(seed))
        for i in range(4):
            if out.ref_dropped[i]:
                assert captured["ref"][i].abs().max() == 0  # the sampler's unconditional row
            else:
                torch.testing.assert_close(captured["ref"][i], c.ref_latent[i])
    always = FlowMatchingObjective(identity_dropout=1.0).per_chunk_loss(dit, z, c, torch.Generator().manual_seed(0))
    assert bool(always.ref_dropped.all()) and captured["ref"].abs().max() == 0


def test_gradients_reach_pose_branch_blocks_and_embeddings():
    model = make_dit(seed=1)
    z, c = make_batch(model, b=2, seed=4)
    FlowMatchingObjective().loss(model, z, c, torch.Generator().manual_seed(0)).backward()
    for name in ("project_pose.time_down.0.weight", "project_pose.out.proj.weight", "blocks.0.self_attn.pose_gate",
                 "blocks.1.self_attn.k_pose.weight", "blocks.0.self_attn.q.weight", "blocks.1.ffn.0.weight",
                 "text_embedding.0.weight", "ref_conv.weight", "patch_embedding.weight", "head.head.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_few_optimizer_steps_reduce_loss():
    model = make_dit(seed=2)
    z, c = make_batch(model, b=2, seed=5)
    obj = FlowMatchingObjective(identity_dropout=0.1)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)

    def step_loss():
        return obj.loss(model, z, c, torch.Generator().manual_seed(7))  # same sigma, noise, dropout

    with torch.no_grad():
        before = step_loss().item()
    for _ in range(8):
        opt.zero_grad()
        step_loss().backward()
        opt.step()
    with torch.no_grad():
        after = step_loss().item()
    assert after < 0.7 * before, (before, after)


def test_encode_conditioning_uses_sampler_conventions():
    vae = WanVAE(TINY_VAE_CONFIG).eval()
    g = torch.Generator().manual_seed(0)
    video, mask = torch.rand(1, 3, 5, 16, 16, generator=g), (torch.rand(1, 1, 5, 16, 16, generator=g) > 0.5).float()
    ref = torch.rand(1, 3, 16, 16, generator=g)
    c = encode_conditioning(vae, video, mask, ref, torch.zeros(3, 32))
    assert c.y.shape == (1, 32, 2, 2, 2) and c.ref_latent.shape == (1, 16, 1, 2, 2)
    torch.testing.assert_close(c.y[:, :16], vae.encode(video * 2 - 1))
    torch.testing.assert_close(c.y[:, 16:], vae.encode(mask.expand(-1, 3, -1, -1, -1)))  # mask not normalised
    torch.testing.assert_close(c.ref_latent, vae.encode(ref[:, :, None] * 2 - 1))


# ---------------------------------------------------------------------------------------------- IRL
class ColourVAE:
    """Stand-in decoder: latent channels 0..2 (per latent frame) become the frame colour in [-1, 1]."""

    def decode(self, latent):
        b, _, f, h, w = latent.shape
        rgb = latent[:, :3].clamp(-1, 1)
        frames = torch.cat([rgb[:, :, :1]] + [rgb[:, :, i:i + 1].expand(-1, -1, 4, -1, -1) for i in range(1, f)], 2)
        return frames.repeat_interleave(8, -2).repeat_interleave(8, -1)


def mean_colour(frames):  # identity encoder stand-in: [n, 3, H, W] in [0, 1] -> [n, 3]
    assert frames.dim() == 4 and frames.shape[1] == 3 and 0 <= frames.min() and frames.max() <= 1
    return frames.mean(dim=(2, 3))


def colour_latent(colours):  # colours [B, F', 3] in [0, 1] -> latent [B, 16, F', 2, 2]
    b, f, _ = colours.shape
    lat = torch.zeros(b, 16, f, 2, 2)
    lat[:, :3] = (colours * 2 - 1).permute(0, 2, 1)[..., None, None]
    return lat


def test_irl_weights_larger_on_chunks_with_lower_identity_similarity():
    red = torch.tensor([1.0, 0.0, 0.0])
    colours = torch.tensor([[[1.0, 0.0, 0.0], [1.0, 0.6, 0.0], [0.0, 1.0, 0.0], [0.9, 0.1, 0.1]],
                            [[0.2, 0.2, 1.0], [1.0, 0.0, 0.0], [1.0, 0.3, 0.3], [0.6, 0.6, 0.6]]])
    lat = colour_latent(colours).requires_grad_()
    for k in (1, 2, 4):
        w, cos = identity_coherence_weights(lat, ColourVAE(), mean_colour, red, frames_per_chunk=k, delta=0.1)
        expected = torch.nn.functional.cosine_similarity(colours, red.expand_as(colours), dim=-1)
        torch.testing.assert_close(cos, expected, rtol=1e-4, atol=1e-4)
        assert w.shape == (2, 4) and not w.requires_grad and w.grad_fn is None
        torch.testing.assert_close(w.mean(dim=1), torch.ones(2))
        for i in range(2):  # strictly decreasing weight with increasing similarity
            order = cos[i].argsort()
            assert (w[i, order].diff() < 0).all()
        q = 1 / (expected.clamp(min=0) + 0.1)
        torch.testing.assert_close(w, q / q.mean(dim=1, keepdim=True), rtol=1e-4, atol=1e-4)
    per_chunk = torch.rand(2, 4, requires_grad=True)
    loss = irl_loss(per_chunk, w)
    loss.backward()
    torch.testing.assert_close(per_chunk.grad, w / 8)


def test_irl_with_tiny_wan_vae_and_frame_choice():
    assert chunk_frame_indices(0, 3) == [0] and chunk_frame_indices(2, 1) == [3]
    assert chunk_frame_indices(1, 2) == [0, 3] and chunk_frame_indices(1, 4) == [0, 1, 2, 3]
    vae = WanVAE(TINY_VAE_CONFIG).eval()
    lat = torch.randn(2, 16, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    calls = []

    def encoder(frames):
        calls.append(frames.shape[0])
        return mean_colour(frames) + 0.1

    w, cos = identity_coherence_weights(lat, vae, encoder, torch.tensor([0.5, 0.4, 0.3]), frames_per_chunk=2)
    assert calls == [2, 4, 4]  # chunk 0 has one frame, the others two of four, for both samples
    assert w.shape == cos.shape == (2, 3) and torch.isfinite(w).all()
    torch.testing.assert_close(w.mean(dim=1), torch.ones(2))


def test_id_embedding_reaches_prepare_and_is_zeroed_with_the_reference(monkeypatch):
    from dreamidv_core.errors import InputError

    dit = init_random_(DreamIDVTransformer(tiny_config("full", text_dim=32, id_tokens=2, id_embed_dim=4)), seed=0)
    z, c = make_batch(dit, b=3)
    seen = {}
    original = dit.prepare

    def spy(*args, **kw):
        seen["id"], seen["ref"] = kw.get("id_embedding"), args[2]
        return original(*args, **kw)

    monkeypatch.setattr(dit, "prepare", spy)
    with pytest.raises(InputError, match="identity embedding"):  # the projection trains: it needs them
        FlowMatchingObjective().loss(dit, z, c)
    c.id_embedding = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(0)
    out = FlowMatchingObjective(identity_dropout=0.5).per_chunk_loss(dit, z, c, g)
    dropped = out.ref_dropped
    assert 0 < int(dropped.sum()) < 3  # this seed drops some samples, not all
    for b in range(3):
        if dropped[b]:
            assert not seen["id"][b].any() and not seen["ref"][b].any()
        else:
            assert torch.equal(seen["id"][b], c.id_embedding[b]) and seen["ref"][b].any()
    out.per_chunk.mean().backward()  # the gates get a gradient from the first step on
    assert all(blk.gate.grad is not None and blk.gate.grad.abs().sum() > 0 for blk in dit.id_projection.blocks)
