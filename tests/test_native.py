"""DreamID-V on ComfyUI's own Wan model (nodes/native), in-process, on tiny random-weight models.

The native model is core's ``UNETLoader`` output patched by ``DreamIDVApply``; the reference is the pack's DiT
(``dreamidv_core``) loaded from the same file. ComfyUI's model detection fixes head_dim 128, freq_dim 256 and
text_dim 4096, so the tiny configs here use those (dim 256, 2 heads).
"""
from __future__ import annotations

import math

import pytest
import torch

from dreamidv_core.models.configs import tiny_config
from dreamidv_core.models.dit import DreamIDVTransformer, init_random_
from dreamidv_core.pipelines.plan import ClipPlan
from dreamidv_core.pipelines.swap import SwapSettings, pose_tokens_for, swap_face
from dreamidv_core.pipelines.adapters import PixelSpaceVAE
from dreamidv_core.sampling.guidance import identity_guidance
from dreamidv_core.sampling.samplers import flow_sigmas, sample_unipc, sigma_to_timestep
from dreamidv_core.sampling.windows import WindowedModel, plan_windows
from dreamidv_core.weights.checkpoints import load_dit, save_dit
from tests.node_helpers import model_folders

pytestmark = pytest.mark.comfyui

N, H, W = 9, 64, 64  # pixel frames and size: 3 latent frames of 8x8, 4x4 tokens each
F8, H8, W8 = 3, 8, 8


def core_tiny(variant="full", **kw):
    """A tiny DreamID-V config ComfyUI's Wan detection can load (head_dim 128, freq_dim 256, text_dim 4096)."""
    base = dict(dim=256, num_heads=2, ffn_dim=256, num_layers=2, freq_dim=256, text_dim=4096, text_len=512,
                pose_widths=(8, 8, 16, 16))
    base.update(kw)
    return tiny_config(variant, **base)


def write_checkpoint(folder, name, variant="full", seed=1, **kw):
    dit = init_random_(DreamIDVTransformer(core_tiny(variant, **kw)), seed=seed)
    if getattr(dit, "id_projection", None) is not None:
        with torch.no_grad():
            for blk in dit.id_projection.blocks:
                blk.gate.fill_(0.5)
    save_dit(dit, folder / name)
    return folder / name


@pytest.fixture(scope="module")
def folders(comfy, tmp_path_factory):
    root = tmp_path_factory.mktemp("native_models")
    with model_folders(root, ("diffusion_models", "loras")) as dirs:
        dm = dirs["diffusion_models"]
        write_checkpoint(dm, "dreamidv.safetensors", "full")
        write_checkpoint(dm, "dreamidv_faster.safetensors", "faster", seed=2)
        write_checkpoint(dm, "dreamidv_id.safetensors", "full", seed=3, id_tokens=2, id_embed_dim=8)
        write_checkpoint(dm, "other.safetensors", "full", seed=4)
        yield dirs


@pytest.fixture(scope="module")
def native(pack):
    return pack.nodes.native


def core_model(name, dtype="default"):
    import nodes

    return nodes.UNETLoader().load_unet(name, dtype)[0]


def pack_model(folders, name):
    return load_dit(folders["diffusion_models"] / name, "fp32")


def inputs(seed=5, frames=N):
    """Normalised video+mask latent y, reference latent, text context, pose frames, noisy latent x."""
    g = torch.Generator().manual_seed(seed)
    f8 = (frames - 1) // 4 + 1
    return dict(y=torch.randn(32, f8, H8, W8, generator=g), ref=torch.randn(1, 16, 1, H8, W8, generator=g),
                ctx=torch.randn(7, 4096, generator=g), pose=torch.rand(frames, H, W, 3, generator=g),
                x=torch.randn(1, 16, f8, H8, W8, generator=g), plan=ClipPlan.build(W, H, frames, None, W, H))


def core_conds(native, inp, embedding=None):
    """ComfyUI conditionings as DreamIDVConditioning builds them, from latents (raw VAE space)."""
    import comfy.conds
    import comfy.latent_formats

    fmt = comfy.latent_formats.Wan21()
    ctx = torch.zeros(1, 512, 4096)
    ctx[0, :inp["ctx"].shape[0]] = inp["ctx"]
    y = inp["y"][None]
    raw_y = torch.cat([fmt.process_out(y[:, :16]), fmt.process_out(y[:, 16:])], 1)
    source = comfy.conds.CONDConstant(native.branch.PoseSource(inp["pose"], inp["plan"]))
    conds = []
    for ref, emb in ((fmt.process_out(inp["ref"]), embedding),
                     (fmt.process_out(torch.zeros_like(inp["ref"])), None if embedding is None else embedding * 0)):
        mc = {native.branch.POSE_COND: source}
        if emb is not None:
            mc[native.branch.ID_COND] = comfy.conds.CONDRegular(emb[None])
        conds.append([[ctx, {"concat_latent_image": raw_y, "reference_latents": [ref], "model_conds": mc}]])
    return conds


def one_evaluation(model, positive, negative, cfg, x, sigma):
    """x0 of the model at ``sigma`` through ComfyUI's CFGGuider (conds processed exactly as in sampling)."""
    import comfy.latent_formats
    import comfy.samplers

    def one_eval(m, noise, sigmas, extra_args=None, callback=None, disable=False):
        return m(noise, sigmas[0] * noise.new_ones(noise.shape[0]), **extra_args)

    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    out = guider.sample(x / sigma, torch.zeros_like(x), comfy.samplers.KSAMPLER(one_eval), torch.tensor([sigma, 0.0]),
                        seed=0, disable_pbar=True)
    return comfy.latent_formats.Wan21().process_in(out)


def pack_x0(dit, inp, sigma, embedding=None):
    refs = torch.cat([inp["ref"], torch.zeros_like(inp["ref"])])
    rows = None if embedding is None else torch.stack([embedding, embedding * 0])
    with torch.no_grad():
        tokens = pose_tokens_for(dit, inp["pose"], inp["plan"]) if dit.cfg.has_pose else None
        cond = dit.prepare(inp["ctx"], inp["y"], refs, tokens, id_embedding=rows)
        t = sigma_to_timestep(torch.tensor(sigma, dtype=torch.float64)).float()
        c, u = dit(inp["x"], t, cond, refs=[0]), dit(inp["x"], t, cond, refs=[1])
    x = inp["x"]
    return x - sigma * c, x - sigma * u, x - sigma * identity_guidance(c, u, 4.0)


# ----------------------------------------------------------------------------------------- exactness

@pytest.mark.parametrize("name", ["dreamidv.safetensors", "dreamidv_faster.safetensors"], ids=["full", "faster"])
def test_native_evaluation_equals_the_pack_dit(folders, native, name):
    """cond, uncond and the guided x0 (CFG 5 == identity guidance 4) of core's Wan model + DreamIDVApply equal the
    pack's DiT within 1e-4 (fp32); the full model unpatched (core drops the pose branch) does not."""
    inp = inputs()
    sigma = 0.7
    model = core_model(name)
    patched = native.nodes.DreamIDVApply.execute(model, name).result[0]
    pos, neg = core_conds(native, inp)
    want = pack_x0(pack_model(folders, name), inp, sigma)
    got = (one_evaluation(patched, pos, neg, 1.0, inp["x"], sigma), one_evaluation(patched, neg, pos, 1.0, inp["x"], sigma),
           one_evaluation(patched, pos, neg, 5.0, inp["x"], sigma))
    for what, a, b in zip(("cond", "uncond", "guided"), got, want):
        err = (a - b).abs().max().item()
        print(f"[native] {name} {what}: max |native - pack| = {err:.2e} (|x0| max {b.abs().max().item():.2f})")
        assert err < 1e-4, (what, err)
    if name == "dreamidv.safetensors":
        plain = one_evaluation(model, pos, neg, 1.0, inp["x"], sigma)  # no pose branch, float timestep
        assert (plain - want[0]).abs().max().item() > 1e-3


def test_native_id_projection_equals_the_pack(folders, native):
    name = "dreamidv_id.safetensors"
    inp = inputs(seed=6)
    emb = torch.randn(8, generator=torch.Generator().manual_seed(1))
    patched = native.nodes.DreamIDVApply.execute(core_model(name), name).result[0]
    pos, neg = core_conds(native, inp, emb)
    want = pack_x0(pack_model(folders, name), inp, 0.5, emb)
    got = one_evaluation(patched, pos, neg, 5.0, inp["x"], 0.5)
    assert (got - want[2]).abs().max().item() < 1e-4
    nopose = core_conds(native, inp)  # without the embedding: a clear error
    from dreamidv_core.errors import InputError

    with pytest.raises(InputError, match="ID-token projection"):
        one_evaluation(patched, nopose[0], nopose[1], 5.0, inp["x"], 0.5)


def test_apply_checks_the_checkpoint_and_leaves_the_model_alone(folders, native):
    from dreamidv_core.errors import CheckpointError, InputError

    model = core_model("dreamidv.safetensors")
    with pytest.raises(CheckpointError, match="not the checkpoint"):
        native.nodes.DreamIDVApply.execute(model, "other.safetensors")
    with pytest.raises(CheckpointError, match="choose the file"):
        native.nodes.DreamIDVApply.execute(model, "dreamidv_faster.safetensors")
    patched = native.nodes.DreamIDVApply.execute(model, "dreamidv.safetensors").result[0]
    assert patched is not model and patched.model is model.model  # a clone sharing the weights
    assert not model.model_options["transformer_options"].get("patches_replace")
    assert not model.get_additional_models() and len(patched.get_additional_models()) == 1
    with pytest.raises(InputError, match="already applied"):
        native.nodes.DreamIDVApply.execute(patched, "dreamidv.safetensors")


# ----------------------------------------------------------------------------------------- whole sampling

@pytest.fixture(scope="module")
def comfy_vae(comfy):
    """ComfyUI's VAE with a tiny random Wan 2.1 VAE."""
    from tests.node_helpers import as_comfy_vae, tiny_wan_vae

    return as_comfy_vae(tiny_wan_vae())


def pixel_clip(seed=0, frames=N):
    g = torch.Generator().manual_seed(seed)
    video = torch.rand(frames, H, W, 3, generator=g)
    mask = torch.zeros(frames, H, W)
    mask[:, 16:48, 16:48] = 1
    pose = torch.rand(frames, H, W, 3, generator=g)
    ref = torch.rand(1, 48, 40, 3, generator=g)
    ctx = torch.randn(6, 4096, generator=g)
    return video, mask, pose, ref, ctx


def native_sample(native, model, vae, video, mask, pose, ref, ctx, steps, seed, frames=0):
    """DreamIDVConditioning -> SamplerCustomAdvanced(DreamIDVNoise, CFGGuider cfg 5, DreamIDVUniPCSampler,
    DreamIDVSigmas) -> (normalised latent [16, F, h, w], the sampled LATENT)."""
    import comfy.latent_formats
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import SamplerCustomAdvanced

    n = native.nodes
    pos, neg, latent = n.DreamIDVConditioning.execute([[ctx[None], {}]], vae, video, mask, ref, W, H, frames,
                                                      pose_video=pose).result
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(pos, neg)
    guider.set_cfg(5.0)
    out = SamplerCustomAdvanced.execute(n.DreamIDVNoise.execute(seed, "cpu").result[0], guider,
                                        n.DreamIDVUniPCSampler.execute(2).result[0],
                                        n.DreamIDVSigmas.execute(steps, 5.0).result[0], latent).result[0]
    return comfy.latent_formats.Wan21().process_in(out["samples"])[0], out


def psnr(a, b) -> float:
    mse = (a - b).pow(2).mean().item()
    peak = (b.max() - b.min()).item()
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)


@pytest.mark.slow
def test_native_sampling_with_the_released_recipe_matches_the_pack_sampler(folders, native, comfy_vae):
    """Conditioning node + SamplerCustomAdvanced with the released sigmas, sampler and noise == the pack's
    DreamIDVSampler path (swap_face with ComfyUI's VAE) on the same model file; then the Decode node."""
    name = "dreamidv.safetensors"
    video, mask, pose, ref, ctx = pixel_clip()
    patched = native.nodes.DreamIDVApply.execute(core_model(name), name).result[0]
    got, sampled = native_sample(native, patched, comfy_vae, video, mask, pose, ref, ctx, steps=3, seed=3)
    want = swap_face(pack_model(folders, name), PixelSpaceVAE(comfy_vae), video, mask, ref[0], ctx, pose=pose,
                     settings=SwapSettings(width=W, height=H, steps=3, seed=3)).latent
    value = psnr(got, want)
    print(f"[native] released recipe, 3 steps: max |native - pack| = {(got - want).abs().max().item():.2e}, "
          f"PSNR {value:.1f} dB")
    assert got.shape == want.shape and value > 80
    frames, in_source, count = native.nodes.DreamIDVDecode.execute(comfy_vae, sampled, video).result
    assert count == N and frames.shape == (N, H, W, 3) and in_source.shape == video.shape
    assert torch.isfinite(frames).all() and 0 <= frames.min() and frames.max() <= 1


@pytest.mark.slow
def test_windows_node_blends_windows_like_the_pack(folders, native):
    """DreamIDVWindows (ComfyUI's context windows, the pack's layout and blending) == the pack's WindowedModel."""
    import comfy.latent_formats
    import comfy.samplers

    name = "dreamidv.safetensors"
    frames = 17  # 5 latent frames; windows of 9 frames (3 latent) overlapping by 4 (1): two windows
    inp = inputs(seed=7, frames=frames)
    lay = plan_windows(frames, 9, 4)
    assert lay.count == 2
    dit = pack_model(folders, name)
    sigmas = flow_sigmas(3, 5.0)
    with torch.no_grad():
        tokens = pose_tokens_for(dit, inp["pose"], inp["plan"])
        refs = torch.cat([inp["ref"], torch.zeros_like(inp["ref"])])
        shared = dit.prepare(inp["ctx"], inp["y"][:, :lay.latent_window], refs, None)
        want = sample_unipc(WindowedModel(dit, shared, lay, inp["y"], tokens, 4.0, False), inp["x"], sigmas)
    patched = native.nodes.DreamIDVApply.execute(core_model(name), name).result[0]
    windowed = native.nodes.DreamIDVWindows.execute(patched, 9, 4).result[0]
    pos, neg = core_conds(native, inp)
    guider = comfy.samplers.CFGGuider(windowed)
    guider.set_conds(pos, neg)
    guider.set_cfg(5.0)
    sampler = native.nodes.DreamIDVUniPCSampler.execute(2).result[0]
    out = guider.sample(inp["x"], torch.zeros_like(inp["x"]), sampler, sigmas.float(), seed=0, disable_pbar=True)
    got = comfy.latent_formats.Wan21().process_in(out)
    err = (got - want).abs().max().item()
    print(f"[native] 2 windows, 3 steps: max |native - pack| = {err:.2e}, PSNR {psnr(got, want):.1f} dB")
    assert err < 1e-3
    # ComfyUI's own Wan context windows run too (the conditioning latent is sliced to the window)
    from comfy_extras.nodes_context_windows import WanContextWindowsManualNode

    core_windows = WanContextWindowsManualNode.execute(patched, 9, 4, "standard_static", 1, False, "pyramid").result[0]
    guider = comfy.samplers.CFGGuider(core_windows)
    guider.set_conds(pos, neg)
    guider.set_cfg(5.0)
    other = guider.sample(inp["x"], torch.zeros_like(inp["x"]), sampler, sigmas.float(), seed=0, disable_pbar=True)
    assert other.shape == out.shape and torch.isfinite(other).all()


def test_official_pth_layout_loads_natively_with_its_pose_branch(folders, native):
    """An official-style .pth (a pickled state dict, no metadata) loads through Load Diffusion Model, and DreamID-V
    Apply reads its pose branch from it (never unpickling code): the same evaluation as the safetensors file."""
    from safetensors.torch import load_file

    src = folders["diffusion_models"] / "dreamidv.safetensors"
    torch.save(load_file(str(src)), folders["diffusion_models"] / "dreamidv_official.pth")
    import folder_paths

    folder_paths.filename_list_cache.clear()
    inp = inputs(seed=8)
    pos, neg = core_conds(native, inp)
    a = one_evaluation(native.nodes.DreamIDVApply.execute(core_model("dreamidv.safetensors"),
                                                          "dreamidv.safetensors").result[0], pos, neg, 5.0, inp["x"], 0.6)
    b = one_evaluation(native.nodes.DreamIDVApply.execute(core_model("dreamidv_official.pth"),
                                                          "dreamidv_official.pth").result[0], pos, neg, 5.0, inp["x"], 0.6)
    assert torch.equal(a, b)


def test_native_lora_node_patches_the_pose_branch_too(folders, native):
    """DreamID-V LoRA (native): a LoRA in this pack's older bare format that also adapts a pose layer equals the
    same LoRA merged into the checkpoint by hand (core's loaders reach only the Wan layers)."""
    from tests.test_lora_formats import LAYERS, adapters, hand_merge, lora_file

    dit = init_random_(DreamIDVTransformer(core_tiny("full")), seed=1)  # what dreamidv.safetensors holds
    ad = adapters(dit)
    assert any("k_pose" in layer for layer in LAYERS)
    lora_file(folders["loras"], "legacy", ad)
    hand_merge(dit, ad, "legacy", 0.8)
    save_dit(dit, folders["diffusion_models"] / "merged_pose.safetensors")
    import folder_paths

    folder_paths.filename_list_cache.clear()
    inp = inputs(seed=9)
    pos, neg = core_conds(native, inp)
    n = native.nodes
    base = n.DreamIDVApply.execute(core_model("dreamidv.safetensors"), "dreamidv.safetensors").result[0]
    patched = n.DreamIDVLoraLoader.execute(base, "legacy.safetensors", 0.8).result[0]
    merged = n.DreamIDVApply.execute(core_model("merged_pose.safetensors"), "merged_pose.safetensors").result[0]
    got, want = (one_evaluation(m, pos, neg, 5.0, inp["x"], 0.6) for m in (patched, merged))
    plain = one_evaluation(base, pos, neg, 5.0, inp["x"], 0.6)
    assert (got - want).abs().max().item() < 1e-4 and (got - plain).abs().max().item() > 1e-3
