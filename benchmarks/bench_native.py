"""DreamID-V on ComfyUI's own model (nodes/native) against the pack's sampler, on the same random-weight model (prints
figures; not a test). Needs a ComfyUI ($COMFYUI_DIR, else .cache/ComfyUI).

1. Time per sampling step (identity guidance: two DiT evaluations per step): the pack's sampler (DreamIDVSampler's
   path: WindowedModel + the released UniPC), the native path (core Wan model + DreamID-V Apply, CFGGuider with
   cfg 5, DreamID-V UniPC Sampler and Sigmas), and the native path under core's TorchCompileModel where
   torch.compile runs.
2. Agreement with the pack's sampler: PSNR of the final latent of the native exact recipe, and of core KSampler
   (``--ksampler`` sampler/scheduler pairs) with the released step count.
3. The pack's per-window caches: time per step with the conditioning latent embedded once per window vs at every
   evaluation, and (several windows) with and without the automatic pose K/V cache.
4. Memory as ComfyUI's model manager counts it: the native model after a run; the pack's loader with offload_blocks
   (what stays on the device, one more block streamed when ComfyUI asks for memory, freed).

    python benchmarks/bench_native.py                       # dim 512, 4 blocks, 17 frames of 128x128, 6 steps
    python benchmarks/bench_native.py --dim 1536 --layers 2 --size 480x832 --frames 21 --steps 4
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def setup_comfy():
    comfy_dir = Path(os.environ.get("COMFYUI_DIR", ROOT / ".cache" / "ComfyUI"))
    if not (comfy_dir / "main.py").is_file():
        sys.exit(f"no ComfyUI at {comfy_dir}: set COMFYUI_DIR")
    sys.path.insert(0, str(comfy_dir))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401
    import importlib.util

    spec = importlib.util.spec_from_file_location("dreamidv_bench_pack", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = pack
    spec.loader.exec_module(pack)
    return pack


def psnr(a, b) -> float:
    mse = (a - b).pow(2).mean().item()
    peak = (b.max() - b.min()).item()
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)


REPEATS = 3


def timed(*fns, repeats=None):
    """-> [(result, seconds)] per function: one warm-up run each (allocations, compilation), then ``repeats``
    rounds running them in turn; the fastest run of each is reported (the figure least disturbed by other work on
    the machine, and the functions see the same conditions)."""
    outs = [fn() for fn in fns]
    best = [math.inf] * len(fns)
    for _ in range(repeats or REPEATS):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            outs[i] = fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return list(zip(outs, best))


def recompute_share(dim: int, ffn: int, layers: int, tokens: int, text_len: int = 512, text_dim: int = 4096) -> float:
    """Share of one DiT evaluation's multiply-adds (linear layers and attention) that is the text embedding and the
    per-block text K/V, which the pack computes once per clip and core's Wan at every evaluation."""
    text = text_len * (text_dim * dim + dim * dim) + layers * 2 * text_len * dim * dim
    per_block = tokens * (4 * dim * dim + 2 * dim * dim + 2 * dim * ffn) + 2 * tokens * tokens * dim \
        + 2 * tokens * text_len * dim
    return text / (text + layers * per_block)


def gaussian_sampler_psnr(pairs, steps: int = 20, shift: float = 5.0, dim: int = 4096) -> list:
    """KSampler's samplers/schedulers vs the released flow UniPC on an exact denoiser (data x0 ~ N(mu, s^2) per
    dimension, so E[x0 | x_sigma] is known): the discretisation error alone. -> [(pair, PSNR dB)]."""
    import torch

    import comfy.model_sampling
    import comfy.samplers
    from dreamidv_core.sampling.samplers import flow_sigmas, sample_unipc_x0

    g = torch.Generator().manual_seed(0)
    mu, s = torch.randn(dim, generator=g) * 0.5, torch.rand(dim, generator=g) * 0.9 + 0.1

    def denoise(x, sigma):
        a = 1 - sigma.reshape(-1, 1)
        return mu + a * s ** 2 * (x - a * mu) / (a * a * s ** 2 + (1 - a) ** 2)

    class Flow(comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.CONST):
        pass

    ms = Flow()
    ms.set_parameters(shift=shift, multiplier=1000)
    noise = torch.randn(1, dim, generator=g)
    ref_sig = flow_sigmas(steps, shift, dtype=torch.float32)
    ref = sample_unipc_x0(lambda x, j: denoise(x, ref_sig[j].reshape(1)), noise.clone(), ref_sig)

    class Model:
        inner_model = type("Inner", (), {"model_sampling": ms})()

        def __call__(self, x, sigma, **kwargs):
            return denoise(x, sigma)

    out = []
    for pair in pairs:
        name, sched = pair.split("/")
        discard = name in comfy.samplers.KSampler.DISCARD_PENULTIMATE_SIGMA_SAMPLERS
        sig = comfy.samplers.calculate_sigmas(ms, sched, steps + (1 if discard else 0))
        if discard:
            sig = torch.cat([sig[:-2], sig[-1:]])
        sampler = comfy.samplers.sampler_object(name)
        x = sampler.sampler_function(Model(), ms.noise_scaling(sig[0], noise.clone(), torch.zeros_like(noise)), sig,
                                     extra_args={}, callback=None, disable=True, **sampler.extra_options)
        out.append((pair, psnr(x, ref)))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--size", default="128x128", help="HxW in pixels (multiples of 16)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ksampler", default="uni_pc_bh2/normal,euler/simple,dpmpp_2m/sgm_uniform,deis/simple")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per figure (the fastest is printed)")
    args = ap.parse_args()
    global REPEATS
    REPEATS = args.repeats
    pack = setup_comfy()

    import torch

    import comfy.conds
    import comfy.latent_formats
    import comfy.samplers
    import folder_paths
    import nodes as comfy_nodes
    from dreamidv_core.models.configs import tiny_config
    from dreamidv_core.models.dit import DreamIDVTransformer, init_random_
    from dreamidv_core.pipelines.plan import ClipPlan
    from dreamidv_core.pipelines.swap import pose_tokens_for
    from dreamidv_core.sampling.samplers import flow_sigmas, sample_unipc
    from dreamidv_core.sampling.windows import WindowedModel, plan_windows
    from dreamidv_core.weights.checkpoints import load_dit, save_dit

    torch.set_num_threads(args.threads)
    native = pack.nodes.native
    h, w = (int(v) for v in args.size.split("x"))
    cfg = tiny_config("full", dim=args.dim, num_heads=args.dim // 128, ffn_dim=4 * args.dim, num_layers=args.layers,
                      freq_dim=256, text_dim=4096, text_len=512, pose_widths=(16, 16, 32, 32))
    tmp = Path(tempfile.mkdtemp(prefix="dreamidv-bench-native-"))
    (tmp / "diffusion_models").mkdir()
    folder_paths.folder_names_and_paths["diffusion_models"] = ([str(tmp / "diffusion_models")], {".safetensors"})
    folder_paths.filename_list_cache.clear()
    save_dit(init_random_(DreamIDVTransformer(cfg), seed=1), tmp / "diffusion_models" / "bench.safetensors")

    g = torch.Generator().manual_seed(0)
    f8 = (args.frames - 1) // 4 + 1
    y = torch.randn(32, f8, h // 8, w // 8, generator=g)
    ref = torch.randn(1, 16, 1, h // 8, w // 8, generator=g)
    ctx = torch.randn(12, 4096, generator=g) * 0.1
    pose = torch.rand(args.frames, h, w, 3, generator=g)
    noise = torch.randn(1, 16, f8, h // 8, w // 8, generator=g)
    plan = ClipPlan.build(w, h, args.frames, None, w, h)
    sigmas = flow_sigmas(args.steps, 5.0)
    tokens_total = (f8 + 1) * (h // 16) * (w // 16)
    print(f"model: dim {args.dim}, {args.layers} blocks, {sum(p.numel() for p in DreamIDVTransformer(cfg).parameters()) / 1e6:.1f} M "
          f"parameters; clip {args.frames} frames of {w}x{h}: {tokens_total} tokens per evaluation; {args.steps} steps, "
          f"{args.threads} threads, fp32 CPU")

    # ---------------------------------------------------------------- the pack's sampler
    dit = load_dit(tmp / "diffusion_models" / "bench.safetensors", "fp32")
    refs = torch.cat([ref, torch.zeros_like(ref)])
    with torch.no_grad():
        tokens = pose_tokens_for(dit, pose, plan)
    layout = plan_windows(args.frames, 81, 16)

    def pack_run(embed=True, frames=None, cache=None, lay=layout, yy=y, tk=tokens, x=noise):
        with torch.no_grad():
            shared = dit.prepare(ctx, yy[:, :lay.latent_window], refs, None)
            model = WindowedModel(dit, shared, lay, yy, tk, 4.0, False, cache_pose_kv=cache,
                                  cache_budget=None if cache is True else dit.cache_budget_bytes(), embed_condition=embed)
            return sample_unipc(model, x, sigmas)


    # ---------------------------------------------------------------- native
    fmt = comfy.latent_formats.Wan21()
    model = comfy_nodes.UNETLoader().load_unet("bench.safetensors", "default")[0]
    patched = native.nodes.DreamIDVApply.execute(model, "bench.safetensors").result[0]
    c512 = torch.zeros(1, 512, 4096)
    c512[0, :ctx.shape[0]] = ctx
    raw_y = torch.cat([fmt.process_out(y[None, :16]), fmt.process_out(y[None, 16:])], 1)
    source = comfy.conds.CONDConstant(native.branch.PoseSource(pose, plan))
    pos = [[c512, {"concat_latent_image": raw_y, "reference_latents": [fmt.process_out(ref)],
                   "model_conds": {native.branch.POSE_COND: source}}]]
    neg = [[c512, {"concat_latent_image": raw_y, "reference_latents": [fmt.process_out(torch.zeros_like(ref))],
                   "model_conds": {native.branch.POSE_COND: source}}]]
    unipc = native.nodes.DreamIDVUniPCSampler.execute(2).result[0]

    def native_run(m=patched, sampler=unipc, sig=sigmas.float()):
        guider = comfy.samplers.CFGGuider(m)
        guider.set_conds(pos, neg)
        guider.set_cfg(5.0)
        out = guider.sample(noise, torch.zeros_like(noise), sampler, sig, seed=0, disable_pbar=True)
        return fmt.process_in(out)

    compiled = None
    if not args.no_compile:
        try:
            from comfy_api.torch_helpers import set_torch_compile_wrapper

            compiled = patched.clone()
            set_torch_compile_wrapper(compiled, backend="inductor")
            native_run(compiled)
        except Exception as exc:  # torch.compile needs a working C++ toolchain on CPU
            print(f"TorchCompileModel does not run here ({type(exc).__name__}: {str(exc)[:160]})")
            compiled = None
    runs = [pack_run, native_run] + ([lambda: native_run(compiled)] if compiled is not None else [])
    results = timed(*runs)
    (want, t_pack), (got, t_native) = results[:2]
    print(f"\n1. time per step (2 DiT evaluations):\n  pack sampler (DreamIDVSampler's path)          {t_pack / args.steps:7.3f} s")
    print(f"  native (core Wan + DreamID-V Apply, CFGGuider) {t_native / args.steps:7.3f} s "
          f"({t_native / t_pack:.2f}x the pack's)")
    share = recompute_share(args.dim, 4 * args.dim, args.layers, tokens_total)
    released = recompute_share(1536, 8960, 30, 22 * 30 * 52)
    print(f"  (core's Wan embeds the 512-token text and every block's text K/V at every evaluation, the pack once: "
          f"{100 * share:.0f}% of an evaluation's multiply-adds here, {100 * released:.2f}% at the released size, "
          "81 frames of 832x480)")
    if compiled is not None:
        out, t_comp = results[2]
        print(f"  native + TorchCompileModel (inductor)          {t_comp / args.steps:7.3f} s "
              f"({t_comp / t_pack:.2f}x the pack's; max |compiled - eager| {(out - got).abs().max().item():.1e})")

    print(f"\n2. final latent vs the pack's sampler ({args.steps} steps):")
    print(f"  native exact recipe (DreamID-V Sigmas/UniPC)   PSNR {psnr(got, want):6.1f} dB, "
          f"max |d| {(got - want).abs().max().item():.1e}")
    ms = patched.get_model_object("model_sampling")
    for pair in args.ksampler.split(","):
        name, sched = pair.split("/")
        discard = name in comfy.samplers.KSampler.DISCARD_PENULTIMATE_SIGMA_SAMPLERS
        sig = comfy.samplers.calculate_sigmas(ms, sched, args.steps + (1 if discard else 0))
        if discard:
            sig = torch.cat([sig[:-2], sig[-1:]])
        out = native_run(sampler=comfy.samplers.sampler_object(name), sig=sig)
        print(f"  KSampler {name:11s} {sched:12s} (shift 5)   PSNR {psnr(out, want):6.1f} dB")
    print("  (a random DiT is no denoiser; on an exact Gaussian flow denoiser, 20 steps, vs the released UniPC:)")
    for pair, value in gaussian_sampler_psnr(args.ksampler.split(",")):
        print(f"  KSampler {pair:24s}           PSNR {value:6.1f} dB")

    print("\n3. the pack's per-window caches:")
    (_, t_once), (_, t_every) = timed(pack_run, lambda: pack_run(embed=False))
    print(f"  conditioning latent embedded once per window  {t_once / args.steps:7.3f} s per step")
    print(f"  ... at every evaluation                       {t_every / args.steps:7.3f} s per step "
          f"(embedding once saves {100 * (t_every - t_once) / t_every:+.2f}%; costs "
          f"{4 * f8 * (h // 16) * (w // 16) * args.dim / 2 ** 20:.2f} MiB per window)")
    frames2 = 2 * args.frames - 1
    f2 = (frames2 - 1) // 4 + 1
    lay2 = plan_windows(frames2, args.frames, 4)
    y2 = torch.randn(32, f2, h // 8, w // 8, generator=g)
    with torch.no_grad():
        tk2 = pose_tokens_for(dit, torch.rand(frames2, h, w, 3, generator=g), ClipPlan.build(w, h, frames2, None, w, h,
                                                                                             args.frames, 4))
    x2 = torch.randn(1, 16, f2, h // 8, w // 8, generator=g)
    (_, t_auto), (_, t_off) = timed(lambda: pack_run(lay=lay2, yy=y2, tk=tk2, x=x2, cache=None),
                                    lambda: pack_run(lay=lay2, yy=y2, tk=tk2, x=x2, cache=False))
    print(f"  {lay2.count} windows, pose K/V cache auto (cached) {t_auto / args.steps:7.3f} s per step")
    print(f"  {lay2.count} windows, pose K/V recomputed          {t_off / args.steps:7.3f} s per step "
          f"(the cache saves {100 * (t_off - t_auto) / t_off:.1f}%)")
    memory_accounting(pack, patched, native_run, args.layers)
    return 0


def memory_accounting(pack, patched, native_run, layers: int) -> None:
    """4. What ComfyUI's model manager sees: the native model after a run, and the pack loader with block offload
    (counted, partially unloaded when ComfyUI asks for one block, freed)."""
    import comfy.model_management as mm
    from dreamidv_core.sampling.offload import offload_memory

    mib = lambda b: f"{b / 2 ** 20:.1f} MiB"  # noqa: E731
    print("\n4. ComfyUI's model manager:")
    native_run()
    for lm in mm.current_loaded_models:
        print(f"  native run: {type(lm.model.model).__name__:22s} size {mib(lm.model.model_size())}, "
              f"counted on the device {mib(lm.model_loaded_memory())}")
    mm.unload_all_models()
    k = max(1, layers - 1)
    handle = pack.nodes.loaders.load_model("bench.safetensors", "fp32", "sdpa", "cpu", offload_blocks=k)
    handle.load()
    dit = handle.dit
    lm = next(m for m in mm.current_loaded_models if m.model is handle.patcher)
    plan = offload_memory(dit, k)
    print(f"  pack loader, offload_blocks {k}: size {mib(handle.patcher.model_size())}, counted on the device "
          f"{mib(lm.model_loaded_memory())} (expected {mib(plan.device_weights)}: {k} blocks streamed through "
          f"{min(2, k)} staging slots), streamed blocks {dit.block_offload.indices}")
    handle.release()
    still = lm in mm.current_loaded_models
    lm.model_unload(memory_to_free=plan.block_bytes)
    print(f"  after the run still counted: {still}; ComfyUI asks for one block ({mib(plan.block_bytes)}): counted "
          f"{mib(lm.model_loaded_memory())}, streamed blocks {dit.block_offload.indices}")
    mm.free_memory(1e30, handle.patcher.load_device)
    gone = not any(m.model is handle.patcher for m in mm.current_loaded_models)
    print(f"  free_memory: unloaded {gone}, loaded size {mib(handle.patcher.loaded_size())}, "
          f"offload hooks removed {dit.block_offload is None}")


if __name__ == "__main__":
    sys.exit(main())
