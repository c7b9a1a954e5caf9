"""Long-video and speed-switch benchmark (prints figures; not a test).

1. Clip length: time per frame and peak RSS of a whole swap (encode, windowed sampling, decode) for
   clips of 1 to 4 windows, each in a fresh process, with a mid-size random DiT and a tiny VAE.
2. Switches at a fixed 2-window configuration: the speed-up of each switch against the default run
   (batched guidance, weight dtypes, pose K/V cache, block offload, background preservation), and
   the step cache's speed-up with its error against the uncached run (PSNR of the decoded frames).
3. ``--released --device cuda``: seconds and peak VRAM of a 20-step, 81-frame 832x480 swap with the
   released 1.3B configuration (random weights) against the arithmetic floor of ~533 TFLOP per forward.

    python benchmarks/bench_long.py                     # 1 and 2 on this machine (a few minutes)
    python benchmarks/bench_long.py --released --device cuda
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def build(args, device="cpu", weight_dtype="fp32"):
    import torch

    from dreamidv_core.weights.checkpoints import WEIGHT_DTYPES, _set_tensor, storage_dtype
    from dreamidv_core.models.configs import DREAMIDV_1_3B, DiTConfig
    from dreamidv_core.models.dit import DreamIDVTransformer, init_random_
    from dreamidv_core.models.vae import WAN21_VAE_CONFIG, WanVAE, WanVAEConfig

    wdt = WEIGHT_DTYPES[weight_dtype]
    cdt = torch.bfloat16 if wdt == torch.float8_e4m3fn else wdt
    cfg = DREAMIDV_1_3B if args.released else DiTConfig(
        variant="full", dim=args.dim, ffn_dim=4 * args.dim, num_heads=args.dim // 128, num_layers=args.layers,
        text_dim=64, text_len=64, pose_widths=(16, 16, 32, 32), cross_attn_pose=False)
    with torch.device("meta"):
        dit = DreamIDVTransformer(cfg, compute_dtype=cdt)
    for name, p in list(dit.named_parameters()):
        _set_tensor(dit, name, torch.empty(p.shape, dtype=storage_dtype(name, tuple(p.shape), torch.float32)))
    init_random_(dit)
    for name, p in list(dit.named_parameters()):
        _set_tensor(dit, name, p.data.to(device, storage_dtype(name, tuple(p.shape), wdt)))
    vae = WanVAE(WAN21_VAE_CONFIG if args.released else WanVAEConfig(dim=8, num_res_blocks=1)).to(device).eval()
    return dit.eval(), vae


def inputs(frames, size, text_dim, seed=0):
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    video = np.stack([np.stack([(xx * 3 + t) % 256, (yy * 2 + t) % 256, (xx + yy + t) % 256], -1)
                      for t in range(frames)]).astype(np.uint8)
    mask = np.zeros((frames, h, w), np.uint8)
    mask[:, h // 4:3 * h // 4, w // 4:3 * w // 4] = 255
    pose = np.zeros((frames, h, w, 3), np.uint8)
    pose[:, h // 3:h // 3 + 4, w // 2:w // 2 + 4] = 255
    ref = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    return video, mask, pose, ref, torch.randn(4, text_dim, generator=torch.Generator().manual_seed(1))


def swap_once(args, dit, vae, frames, device="cpu", repeats=None, **settings):
    """-> (best seconds of ``repeats`` runs, result)."""
    import torch

    from dreamidv_core.pipelines.swap import SwapSettings, swap_face

    video, mask, pose, ref, ctx = inputs(frames, args.size, dit.cfg.text_dim)
    s = SwapSettings(width=args.size[1], height=args.size[0], steps=args.steps, window=args.window,
                     overlap=args.overlap, **settings)
    best, result = float("inf"), None
    for _ in range(repeats or args.repeats):
        if device != "cpu":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        result = swap_face(dit, vae, video, mask, ref, ctx.to(device), pose=pose, settings=s)
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best, result


def child(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    dit, vae = build(args)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sec, result = swap_once(args, dit, vae, args.frames, repeats=1)
    return {"frames": args.frames, "windows": result.layout.count, "sec": sec,
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "base_mb": rss0 / 1024}


def psnr(a, b) -> float:
    mse = (a.float() - b.float()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * __import__("math").log10(1.0 / mse)


def switches(args) -> None:
    import torch

    from dreamidv_core.sampling.offload import disable_block_offload, enable_block_offload

    frames = args.window + (args.window - 1 - args.overlap)  # exactly 2 windows
    dit, vae = build(args)
    swap_once(args, dit, vae, frames, repeats=1)  # warm-up
    base_s, base = swap_once(args, dit, vae, frames)
    print(f"\nswitches at {frames} frames ({base.layout.count} windows), {args.steps} steps, "
          f"{args.size[1]}x{args.size[0]}: default run {base_s:.2f} s")
    rows = [("batched guidance", lambda: swap_once(args, dit, vae, frames, batch_guidance=True)),
            ("no pose K/V cache", lambda: swap_once(args, dit, vae, frames, cache_pose_kv=False)),
            ("pose K/V cache", lambda: swap_once(args, dit, vae, frames, cache_pose_kv=True)),
            ("background strength 0.5", lambda: swap_once(args, dit, vae, frames, background_strength=0.5))]
    for name, fn in rows:
        sec, _ = fn()
        print(f"  {name:<28} {sec:7.2f} s   speed-up {base_s / sec:5.2f}x")
    for wd in ("bf16", "fp16", "fp8_e4m3fn"):
        d2, _ = build(args, weight_dtype=wd)
        sec, r = swap_once(args, d2, vae, frames)
        print(f"  weights {wd:<20} {sec:7.2f} s   speed-up {base_s / sec:5.2f}x   PSNR vs fp32 "
              f"{psnr(r.frames, base.frames):5.1f} dB")
    n = max(3, len(dit.blocks) // 2)
    enable_block_offload(dit, n, "cpu", "cpu")
    sec, r = swap_once(args, dit, vae, frames)
    disable_block_offload(dit, "cpu")
    print(f"  block offload {n}/{len(dit.blocks)} (CPU->CPU) {sec:7.2f} s   speed-up {base_s / sec:5.2f}x   "
          f"identical: {torch.equal(r.frames, base.frames)}")
    for th in args.cache_thresholds:
        sec, r = swap_once(args, dit, vae, frames, step_cache=th)
        print(f"  step cache {th:<17g} {sec:7.2f} s   speed-up {base_s / sec:5.2f}x   skipped {r.skipped}/"
              f"{r.evaluations}   PSNR vs uncached {psnr(r.frames, base.frames):5.1f} dB")


def released_gpu(args) -> None:
    import torch

    dit, vae = build(args, device=args.device, weight_dtype="bf16")
    torch.cuda.reset_peak_memory_stats()
    sec, r = swap_once(args, dit, vae, 81, device=args.device)
    tflop = 533 * 2 * args.steps  # two guidance passes per step
    print(f"released 1.3B, 81 frames {args.size[1]}x{args.size[0]}, {args.steps} steps: {sec:.1f} s, peak VRAM "
          f"{torch.cuda.max_memory_allocated() / 2 ** 30:.1f} GiB; floor at 790 TFLOP/s bf16: {tflop / 790:.1f} s "
          f"({tflop} TFLOP)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--size", type=lambda t: tuple(int(v) for v in t.split("x")), default=(64, 96), help="HxW")
    ap.add_argument("--window", type=int, default=17)
    ap.add_argument("--overlap", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--cache-thresholds", type=float, nargs="+", default=[0.1, 0.3, 0.6])
    ap.add_argument("--repeats", type=int, default=3, help="runs per switch (the best is reported)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--released", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--frames", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.released:
        args.size, args.steps, args.window, args.overlap = (480, 832), 20, 81, 16
        return released_gpu(args)
    if args.child:
        print(json.dumps(child(args)))
        return
    stride = args.window - 1 - args.overlap
    print(f"clip length: DiT dim {args.dim} x {args.layers} blocks, tiny VAE, {args.size[1]}x{args.size[0]}, "
          f"window {args.window} / overlap {args.overlap}, {args.steps} steps, {args.threads} threads")
    print(f"{'frames':>7} {'windows':>8} {'s':>8} {'s/frame':>8} {'peak RSS MB':>12} {'vs 1 window':>12}  "
          "(one run each, fresh process)")
    first = None
    for k in range(1, 5):
        frames = args.window + (k - 1) * stride
        cmd = [sys.executable, __file__, "--child", "--frames", str(frames), "--dim", str(args.dim), "--layers",
               str(args.layers), "--size", f"{args.size[0]}x{args.size[1]}", "--window", str(args.window),
               "--overlap", str(args.overlap), "--steps", str(args.steps), "--threads", str(args.threads)]
        # freed memory goes back to the OS at once, so peak RSS follows the live tensors, not the allocator
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
                       .stdout.strip().splitlines()[-1])
        first = first or r
        growth = 100 * (r["peak_mb"] - first["peak_mb"]) / first["peak_mb"]
        print(f"{r['frames']:>7} {r['windows']:>8} {r['sec']:>8.2f} {r['sec'] / r['frames']:>8.3f} "
              f"{r['peak_mb']:>12.0f} {growth:>+11.1f}%", flush=True)
    switches(args)


if __name__ == "__main__":
    main()
