"""DiT sampling-step benchmark on this machine (prints figures; not a test).

For several token counts it times one identity-guided sampling step (two DiT evaluations) of a
mid-size random DreamID-V model, in two modes:

* ``reuse``   : PoseGuider tokens, text K/V, reference tokens and per-block pose K/V computed once
                per video (this pack);
* ``tokens``    : the same, except the per-block pose K/V, recomputed per evaluation (what the swap
                does when the K/V cache would not fit in a quarter of free memory);
* ``recompute``: all of them recomputed in every evaluation (what the reference code does);

and reports seconds per step, peak RSS (each configuration in a fresh process), the achieved
GFLOP/s of the step's DiT matrix work (the PoseGuider's convolutions are not counted), and the GEMM
rate of the same process for comparison.

    python benchmarks/bench_dit.py                 # default sizes
    python benchmarks/bench_dit.py --dtype bf16 --grids 3x16x16 6x16x28
    python benchmarks/bench_dit.py --released --grids 2x16x16 --repeats 1   # the 1.3B model, random weights
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

DEFAULT_GRIDS = ["2x16x16", "3x24x24", "5x24x32", "6x32x40"]  # latent frames x latent h x latent w


def step_flops(cfg, grid, ref_tokens, mode: str) -> float:
    """Multiply-add FLOPs (x2) of the matrix work in one guided step (2 evaluations)."""
    f, h, w = grid
    lv = f * (h // 2) * (w // 2)
    L = lv + ref_tokens
    C, Ff, T = cfg.dim, cfg.ffn_dim, cfg.text_len
    per_block = (4 * 2 * L * C * C          # q k v o
                 + 2 * 2 * L * L * C        # self attention
                 + 2 * 2 * L * L * C        # pose attention
                 + 2 * 2 * L * C * C        # cross q, o
                 + 2 * 2 * L * T * C        # cross attention
                 + 2 * 2 * L * C * Ff)      # ffn
    pose_kv, text_kv = 2 * 2 * L * C * C, 2 * 2 * T * C * C  # per block and evaluation, when not cached
    extra = {"reuse": 0, "tokens": pose_kv, "recompute": pose_kv + text_kv}[mode]
    total = cfg.num_layers * 2 * (per_block + extra)
    return float(total)


def gemm_rate(dtype) -> float:
    import torch

    a = torch.randn(2048, 2048, dtype=dtype)
    b = torch.randn(2048, 2048, dtype=dtype)
    for _ in range(2):
        a @ b
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < 1.5:
        a @ b
        n += 1
    return 2 * 2048 ** 3 * n / (time.perf_counter() - start) / 1e9


def child(args) -> dict:
    import torch

    from dreamidv_core.weights.checkpoints import _set_tensor, storage_dtype
    from dreamidv_core.models.configs import DiTConfig
    from dreamidv_core.models.dit import DreamIDVTransformer, init_random_

    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if args.released:
        from dreamidv_core.models.configs import DREAMIDV_1_3B as cfg
    else:
        cfg = DiTConfig(variant="full", dim=args.dim, ffn_dim=args.dim * 4, num_heads=args.dim // 128,
                        num_layers=args.layers, text_len=512, cross_attn_pose=False)
    # built on meta and materialised in the storage dtypes the loader uses: RSS is the real footprint
    with torch.device("meta"):
        model = DreamIDVTransformer(cfg, compute_dtype=dtype)
    for name, p in list(model.named_parameters()):
        _set_tensor(model, name, torch.empty(p.shape, dtype=storage_dtype(name, tuple(p.shape), dtype)))
    model = init_random_(model).eval()
    f, h, w = (int(v) for v in args.grid.split("x"))
    frames = 4 * (f - 1) + 1
    g = torch.Generator().manual_seed(0)
    context = torch.randn(6, cfg.text_dim, generator=g)
    y = torch.randn(32, f, h, w, generator=g)
    refs = torch.randn(2, 16, 1, h, w, generator=g)
    refs[1] = 0
    pose = torch.rand(1, 3, frames, h * 8, w * 8, generator=g)
    x = torch.randn(1, 16, f, h, w, generator=g)
    t = torch.tensor([500.0])

    def step_reuse(cond):
        with torch.no_grad():
            model(x, t, cond, refs=[0])
            model(x, t, cond, refs=[1])

    def step_recompute():
        with torch.no_grad():
            for r in (0, 1):
                cond = model.prepare(context, y, refs, model.pose_tokens(pose), cache_pose_kv=False)
                model(x, t, cond, refs=[r])

    with torch.no_grad():
        t0 = time.perf_counter()
        cond = None
        if args.mode in ("reuse", "tokens"):
            cond = model.prepare(context, y, refs, model.pose_tokens(pose), cache_pose_kv=args.mode == "reuse")
        prep = time.perf_counter() - t0
    run = (lambda: step_reuse(cond)) if cond is not None else step_recompute
    run()  # warm-up
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    sec = min(times)
    ref_tokens = (h // 2) * (w // 2)
    flops = step_flops(cfg, (f, h, w), ref_tokens, args.mode)
    return {"grid": args.grid, "mode": args.mode, "tokens": f * (h // 2) * (w // 2) + ref_tokens,
            "sec_per_step": sec, "prepare_sec": prep, "gflops": flops / sec / 1e9,
            "gemm_gflops": gemm_rate(dtype), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grids", nargs="+", default=DEFAULT_GRIDS, help="latent FxHxW per run")
    ap.add_argument("--dtype", default="bf16", choices=("fp32", "bf16"))
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--released", action="store_true", help="the released 1.3B configuration (random weights)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--grid", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    size = "released 1.3B config" if args.released else f"dim {args.dim}, {args.layers} blocks, head_dim 128"
    print(f"DiT step benchmark: {size}, {args.dtype}, "
          f"{args.threads} threads; one step = 2 evaluations (identity guidance)")
    print(f"{'grid':>10} {'tokens':>7} {'mode':>10} {'s/step':>8} {'GFLOP/s':>8} {'GEMM GFLOP/s':>13} "
          f"{'% GEMM':>7} {'peak RSS MB':>12} {'prepare s':>10}")
    for grid in args.grids:
        rows = {}
        for mode in ("reuse", "tokens", "recompute"):
            cmd = [sys.executable, __file__, "--child", "--grid", grid, "--mode", mode, "--dtype", args.dtype,
                   "--dim", str(args.dim), "--layers", str(args.layers), "--repeats", str(args.repeats),
                   "--threads", str(args.threads)] + (["--released"] if args.released else [])
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            r = rows[mode] = json.loads(out)
            print(f"{grid:>10} {r['tokens']:>7} {mode:>10} {r['sec_per_step']:>8.3f} {r['gflops']:>8.1f} "
                  f"{r['gemm_gflops']:>13.1f} {100 * r['gflops'] / r['gemm_gflops']:>6.0f}% "
                  f"{r['peak_rss_mb']:>12.0f} {r['prepare_sec']:>10.3f}", flush=True)
        base = rows["recompute"]["sec_per_step"]
        print(f"{'':>10} speed-up over recompute: reuse {base / rows['reuse']['sec_per_step']:.2f}x, "
              f"tokens {base / rows['tokens']['sec_per_step']:.2f}x")


if __name__ == "__main__":
    main()
