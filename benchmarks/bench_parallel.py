"""Multi-process inference: communication volume per sampling step (computed, and counted in a run) and time per
step for 1, 2 and 4 processes (prints figures; not a test).

Layouts: ``u<P>`` Ulysses degree P, ``cfg`` guidance-parallel, ``u2_cfg`` both (4 ranks), ``+fsdp`` block weights
sharded over the clip's ranks. One *step* is one identity-guided sampler step: a conditional and an unconditional
DiT evaluation (in turn on the same ranks, or one per rank with ``cfg``).

    python benchmarks/bench_parallel.py                      # volumes + CPU/gloo timings (mid-size random model)
    python benchmarks/bench_parallel.py --volumes-only
    python benchmarks/bench_parallel.py --device cuda --procs 1,2,4,8 --released --grid 21x60x104 --dtype bf16 \
        --steps 5
                                                             # on a GPU node: NCCL, the 1.3B model at 480p, 81 frames

A CPU says little about GPUs: on this 2-core machine 2 or 4 processes share two cores, so the timings show the
overhead of splitting the work (and that the results stay exact), not the speed-up; on GPUs each rank has its own
device and the all-to-alls run over NVLink/PCIe. The volumes are what a GPU run moves per step and rank.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

LAYOUTS = {  # name: (processes, ulysses, cfg_parallel, fsdp)
    "1": (1, 1, False, False),
    "cfg": (2, 1, True, False),
    "u2": (2, 2, False, False),
    "u2+fsdp": (2, 2, False, True),
    "u4": (4, 4, False, False),
    "u2_cfg": (4, 2, True, False),
    "u3": (3, 3, False, False),  # the rest: for GPU nodes (--procs 1,2,4,6,8,12)
    "u6": (6, 6, False, False),
    "u3_cfg": (6, 3, True, False),
    "u4_cfg": (8, 4, True, False),
    "u12": (12, 12, False, False),
    "u6_cfg": (12, 6, True, False),
}


# ------------------------------------------------------------------------------------------------ computed volumes

def tokens(grid, patch=(1, 2, 2), ref=True) -> int:
    """Sequence length L of a latent grid (F, h, w): (F (+1 reference frame)) * (h/2) * (w/2)."""
    f, h, w = grid
    return (f + (1 if ref else 0)) * (h // patch[1]) * (w // patch[2])


def step_volume(cfg, grid, ulysses: int, cfg_parallel: bool, fsdp: bool, itemsize: int, id_active=False) -> dict:
    """Bytes one rank sends per guided step (receives the same) -> {"ulysses", "head", "guidance", "fsdp", "total"}.

    Per DiT evaluation and block, Ulysses makes one all-to-all of q, k, v (+ the pre-RoPE q with an active ID
    projection) and one of the attention output, each a [B, Lp/P, C] tensor per rank of which (P-1)/P leaves it;
    the head's [B, Lp/P, 64] float32 output is all-gathered once. Guidance-parallel exchanges the float32 velocity
    once per step. FSDP all-gathers each block's weights (its (G-1)/G share from the others) per evaluation.
    """
    p = ulysses
    L = tokens(grid)
    lp = -(-L // p) * p
    evals = 1 if cfg_parallel else 2
    per_block = (5 if id_active else 4) * lp * cfg.dim * itemsize * (p - 1) / p ** 2
    out = dict(ulysses=evals * cfg.num_layers * per_block,
               head=evals * lp * (cfg.out_dim * 4) * 4 * (p - 1) / p,  # 64 = out_dim 16 x patch 1x2x2, float32
               guidance=(cfg.out_dim * grid[0] * grid[1] * grid[2] * 4) if cfg_parallel else 0.0, fsdp=0.0)
    if fsdp:
        g = p * (2 if cfg_parallel else 1)
        block_bytes = sum(v for k, v in param_counts(cfg).items() if k == "blocks") * itemsize
        out["fsdp"] = evals * block_bytes * (g - 1) / g
    out["total"] = sum(out.values())
    return out


def param_counts(cfg) -> dict:
    import torch

    from dreamidv_core.models.dit import DreamIDVTransformer

    with torch.device("meta"):
        model = DreamIDVTransformer(cfg)
    blocks = sum(p.numel() for n, p in model.named_parameters() if n.startswith("blocks."))
    return {"blocks": blocks, "all": sum(p.numel() for p in model.parameters())}


def print_volumes(cases) -> None:
    print("Communication per guided step and rank (sent; the same is received), computed:")
    print(f"{'model / clip':34s} {'L':>6s} {'layout':>8s} {'all-to-all':>11s} {'head':>9s} {'guidance':>9s} "
          f"{'FSDP':>9s} {'total':>10s}")
    for label, cfg, grid, itemsize in cases:
        for name, (_, u, c, f) in LAYOUTS.items():
            if name == "1" or cfg.num_heads % u:
                continue
            v = step_volume(cfg, grid, u, c, f, itemsize)
            print(f"{label:34s} {tokens(grid):6d} {name:>8s} {mb(v['ulysses']):>11s} {mb(v['head']):>9s} "
                  f"{mb(v['guidance']):>9s} {mb(v['fsdp']):>9s} {mb(v['total']):>10s}")
    print()


def mb(x: float) -> str:
    return "-" if not x else (f"{x / 1e9:.2f} GB" if x >= 1e9 else f"{x / 1e6:.2f} MB")


# ------------------------------------------------------------------------------------------------ timed runs

def model_config(args):
    from dreamidv_core.models.configs import RELEASED_CONFIGS, tiny_config

    if args.released:
        return RELEASED_CONFIGS["dreamidv"]
    return tiny_config("full", dim=args.dim, ffn_dim=4 * args.dim, num_heads=args.heads, num_layers=args.layers,
                       text_dim=64)


def worker(args) -> None:
    """One rank of a timed run (started by torchrun, or alone for 1 process): rank 0 writes the JSON figures."""
    import torch

    from dreamidv_core.models.dit import DreamIDVTransformer, init_random_
    from dreamidv_core.parallel.mesh import Mesh, ParallelConfig, init_mesh
    from dreamidv_core.sampling.guidance import make_guided_model
    from dreamidv_core.sampling.samplers import flow_sigmas

    procs, u, c, f = LAYOUTS[args.worker]
    config = ParallelConfig(ulysses=u, cfg_parallel=c, fsdp=f)
    mesh = init_mesh(config, one_job=True) if procs > 1 else Mesh(device=torch.device(args.device))
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    cfg = model_config(args)
    device = mesh.device
    dit = DreamIDVTransformer(cfg, compute_dtype=dtype).to(device if not f else "cpu")
    init_random_(dit, seed=0)
    dit = dit.to(dtype=dtype) if dtype != torch.float32 else dit
    if f:
        from dreamidv_core.parallel.fsdp import shard_for_inference

        shard_for_inference(dit, device, mesh.groups, mesh.group_size)
    dit.eval()
    sent = {"bytes": 0}
    if mesh.sp is not None:  # count what the all-to-alls and the gathers really send
        a2a, gather = mesh.sp.all_to_all, mesh.sp.all_gather

        def counted_a2a(send):
            sent["bytes"] += send.numel() * send.element_size() * (mesh.sp.size - 1) / mesh.sp.size
            return a2a(send)

        def counted_gather(t):
            sent["bytes"] += t.numel() * t.element_size() * (mesh.sp.size - 1)
            return gather(t)

        mesh.sp.all_to_all, mesh.sp.all_gather = counted_a2a, counted_gather
    f_, h, w = (int(v) for v in args.grid.split("x"))
    g = torch.Generator().manual_seed(0)
    y = torch.randn(32, f_, h, w, generator=g)
    ref = torch.randn(1, 16, 1, h, w, generator=g)
    refs = torch.cat([ref, torch.zeros_like(ref)])
    pose = torch.randn(1, f_ * (h // 2) * (w // 2), cfg.dim, generator=g) * 0.1
    ctx = torch.randn(8, cfg.text_dim, generator=g)
    x = torch.randn(1, 16, f_, h, w, generator=g).to(device)
    with torch.no_grad():
        cond = dit.prepare(ctx, y, refs, pose, cache_pose_kv=True, parallel=mesh.sp)
        model = make_guided_model(dit, cond, 4.0, False, pair=mesh.pair)
        sigmas = flow_sigmas(args.steps + 1, shift=5.0)

        def sync():
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        v = model(x, sigmas[0])  # warm-up
        sync()
        sent["bytes"] = 0
        times = []
        for i in range(1, args.steps + 1):
            t0 = time.perf_counter()
            v = model(x, sigmas[i])
            sync()
            times.append(time.perf_counter() - t0)
    if c:  # the velocity exchange of mesh.pair, per step
        sent["bytes"] += v.numel() * v.element_size() * args.steps
    if mesh.is_main:
        with open(args.out, "w") as fh:
            json.dump({"seconds": sorted(times)[len(times) // 2], "sent_per_step": sent["bytes"] / args.steps,
                       "velocity_checksum": float(v.double().abs().sum())}, fh)
    mesh.close()


def timed(args, layout: str) -> dict:
    procs = LAYOUTS[layout][0]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", layout, "--out", out, *args.passthrough]
        if procs > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
                   *cmd[1:]]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        if done.returncode != 0:
            raise SystemExit(f"{layout}: failed\n{done.stderr[-3000:]}")
        return json.load(open(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--procs", default="1,2,4", help="process counts to time (layouts with these many ranks)")
    ap.add_argument("--released", action="store_true", help="time the 1.3B configuration (random weights)")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--grid", default="5x16x24", help="latent frames x height x width of the timed clip")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per rank (a busy 2-core machine makes two "
                                                           "threads per process spin-wait)")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--volumes-only", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    args.passthrough = [a for a in sys.argv[1:] if a not in ("--volumes-only",)]

    from dreamidv_core.models.configs import RELEASED_CONFIGS

    cfg = model_config(args)
    released = RELEASED_CONFIGS["dreamidv"]
    f_, h, w = (int(v) for v in args.grid.split("x"))
    item = 2 if args.dtype == "bf16" else 4
    print_volumes([(f"timed model ({cfg.dim}d, {cfg.num_heads}h, {cfg.num_layers}L) {args.grid} {args.dtype}", cfg,
                    (f_, h, w), item),
                   ("1.3B, 832x480, 81 frames, bf16", released, (21, 60, 104), 2),
                   ("1.3B, 1280x720, 81 frames, bf16", released, (21, 90, 160), 2)])
    if args.volumes_only:
        return
    counts = {int(p) for p in args.procs.split(",")}
    print(f"Time per guided step on {args.device} ({'NCCL' if args.device == 'cuda' else 'gloo'}), "
          f"{args.grid} latent ({tokens((f_, h, w))} tokens), {args.dtype}, median of {args.steps}:")
    base = ref_sum = None
    for layout, (procs, u, c, f) in LAYOUTS.items():
        if procs not in counts or cfg.num_heads % u:
            continue
        r = timed(args, layout)
        base = base or r["seconds"]
        computed = step_volume(cfg, (f_, h, w), u, c, False, item)["total"]
        if layout == "1":
            ref_sum, same = r["velocity_checksum"], ""
        elif ref_sum is None:
            same = ""
        else:
            same = "  (same velocity as 1 process)" if abs(r["velocity_checksum"] - ref_sum) <= 1e-4 * abs(ref_sum) \
                else "  (VELOCITY DIFFERS from 1 process)"
        print(f"  {layout:8s} {procs} process{'es' if procs > 1 else '  '}  {r['seconds']:8.3f} s/step  "
              f"x{base / r['seconds']:.2f}  sent/rank/step counted {mb(r['sent_per_step']):>9s}, "
              f"computed {mb(computed):>9s}{' + FSDP weights' if f else ''}{same}")


if __name__ == "__main__":
    main()
