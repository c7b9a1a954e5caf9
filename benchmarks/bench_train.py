"""Training-step benchmark (prints figures; not a test): seconds per optimizer step and peak memory of
:func:`training.trainer.train` with the real objective (``training.stages.make_loss_fn("synthetic")``:
frozen-VAE encoding of the driving video, mask, reference and supervision video, PoseGuider, flow
matching with identity dropout), random weights and random pixels, full fine-tuning and LoRA.

Each configuration runs in a fresh process; peak memory = the process's max RSS (and on CUDA
``torch.cuda.max_memory_allocated``). s/step = median of the step times after ``--warmup`` steps.

    python benchmarks/bench_train.py                          # tiny and mid-size configs on this CPU
    python benchmarks/bench_train.py --released --device cuda # the 1.3B config at 480p (832x480), random weights:
                                                              # LoRA and full fine-tuning, bf16 autocast,
                                                              # gradient checkpointing, the full Wan 2.1 VAE
    python benchmarks/bench_train.py --released --device cuda --frames 81 --steps 4
    python benchmarks/bench_train.py --released --check       # build the 1.3B model on the meta device only
                                                              # (sizes; no memory, no GPU needed)
    python benchmarks/bench_train.py --data-loading           # mid config on a procedural mp4 dataset: s/step
                                                              # with and without DataLoader workers and the
                                                              # latent cache (steady state, after one epoch)

Without a CUDA device ``--device cuda`` exits with status 2 and says so.

CPU configs: ``tiny`` = tiny_config('full') with the tiny VAE at 9 frames of 64x48; ``mid`` = dim 512,
4 blocks, 4 heads of 128, with the tiny VAE at 9 frames of 128x128. The VAE is frozen and runs under
no_grad in every step (it is part of the step's cost).
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
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

CPU_CONFIGS = {
    "tiny": {"frames": 9, "width": 64, "height": 48},
    "mid": {"frames": 9, "width": 128, "height": 128},
}


def build(name: str, device: str):
    import torch

    from dreamidv_core.models.configs import DREAMIDV_1_3B, DiTConfig, tiny_config
    from dreamidv_core.models.dit import DreamIDVTransformer, init_random_
    from dreamidv_core.models.vae import TINY_VAE_CONFIG, WAN21_VAE_CONFIG, WanVAE

    if name == "tiny":
        cfg, vae_cfg = tiny_config("full", text_dim=32), TINY_VAE_CONFIG
    elif name == "mid":
        cfg = DiTConfig(variant="full", dim=512, ffn_dim=2048, num_heads=4, num_layers=4, text_dim=64, text_len=32,
                        cross_attn_pose=False)
        vae_cfg = TINY_VAE_CONFIG
    elif name == "released":
        cfg, vae_cfg = DREAMIDV_1_3B, WAN21_VAE_CONFIG
    else:
        raise ValueError(name)
    with torch.device(device):
        model = init_random_(DreamIDVTransformer(cfg), seed=0)
        vae = WanVAE(vae_cfg).eval().requires_grad_(False)
    if name == "released":
        vae = vae.to(torch.bfloat16) if device == "cuda" else vae
    return cfg, model, vae


class RandomSamples:
    """Dataset items shaped like training.dataset.DreamIDVDataset's, random pixels."""

    def __init__(self, n, frames, height, width):
        self.n, self.shape = n, (frames, height, width)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        import torch

        g = torch.Generator().manual_seed(i)
        f, h, w = self.shape
        return {"video": torch.rand(3, f, h, w, generator=g) * 2 - 1, "mask": (torch.rand(1, f, h, w, generator=g) > 0.5)
                .float().expand(3, -1, -1, -1).contiguous(), "pose": torch.rand(3, f, h, w, generator=g),
                "identity": torch.rand(3, 1, h, w, generator=g) * 2 - 1,
                "target": torch.rand(3, f, h, w, generator=g) * 2 - 1, "index": i}


def child(args) -> dict:
    import torch

    from training.trainer import TrainConfig, train

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    cfg, model, vae = build(args.config, args.device)
    frames, width, height = args.frames, args.width, args.height
    context = torch.randn(8, cfg.text_dim, generator=torch.Generator().manual_seed(0)).to(args.device)
    try:
        from training.stages import make_loss_fn
        loss_fn = make_loss_fn("synthetic", vae, context)
        objective_name = "training.stages.make_loss_fn('synthetic')"
    except ImportError:  # the stages module is not there: the same objective, built directly
        from training.objective import FlowMatchingObjective, encode_conditioning
        objective = FlowMatchingObjective()

        def loss_fn(m, batch, generator):
            with torch.no_grad():
                cond = encode_conditioning(vae, batch["video"].add(1).div(2), batch["mask"],
                                           batch["identity"][:, :, 0].add(1).div(2), context, pose=batch["pose"])
                z = vae.encode(batch["target"])
            return objective.loss(m, z, cond, generator)
        objective_name = "training.objective.FlowMatchingObjective"
    steps = args.warmup + args.steps
    config = TrainConfig(steps=steps, lr=1e-5, batch_size=1, trainable=args.trainable, lora_rank=args.lora_rank,
                         lora_alpha=float(args.lora_rank), gradient_checkpointing=args.gradient_checkpointing,
                         autocast=args.autocast, parallel="ddp" if args.device == "cpu" else "auto")
    stamps = []
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def progress(step, total, loss):
        if args.device == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    t0 = time.perf_counter()
    result = train(model, RandomSamples(steps, frames, height, width), loss_fn, config, progress=progress)
    times = [b - a for a, b in zip([t0] + stamps[:-1], stamps)][args.warmup:]
    times.sort()
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    out = {"s_per_step": times[len(times) // 2], "first_step_s": stamps[0] - t0,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "trainable_m": n_train / 1e6,
           "tokens": ((frames - 1) // 4 + 1) * (height // 16) * (width // 16), "last_loss": result.losses[-1],
           "objective": objective_name}
    if args.device == "cuda":
        out["cuda_peak_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
    return out


def data_child(args) -> dict:
    """One data-loading configuration: the mid config, LoRA, stage 'synthetic' on a folder of procedural mp4
    samples (training.dataset.DreamIDVDataset), ``--workers`` DataLoader workers, the latent cache on or off.
    Times every step; the first epoch (which decodes everything and fills the cache) is reported apart."""
    import torch

    from training.dataset import DreamIDVDataset
    from training.latent_cache import LatentCache
    from training.stages import make_loss_fn
    from training.trainer import TrainConfig, train

    torch.set_num_threads(args.threads)
    cfg, model, vae = build("mid", "cpu")
    context = torch.randn(8, cfg.text_dim, generator=torch.Generator().manual_seed(0))
    cache = LatentCache.for_vae(args.cache_dir, vae) if args.cache_dir else None
    ds = DreamIDVDataset(args.data_dir, args.width, args.height, args.frames, latent_cache=cache)
    n = len(ds)
    config = TrainConfig(steps=n + args.steps, lr=1e-5, trainable="lora", lora_rank=16, lora_alpha=16.0,
                         num_workers=args.workers, parallel="ddp", seed=0)
    stamps = []
    t0 = time.perf_counter()
    train(model, ds, make_loss_fn("synthetic", vae, context, latent_cache=cache), config,
          progress=lambda *a: stamps.append(time.perf_counter()))
    times = [b - a for a, b in zip([t0] + stamps[:-1], stamps)]
    later = sorted(times[n:])
    return {"first_epoch_s_per_step": sum(times[:n]) / n, "s_per_step": later[len(later) // 2],
            "mean_s_per_step": sum(later) / len(later), "steps": len(later)}


def data_loading(args) -> int:
    """Write a procedural dataset of mp4 samples, then time each data-loading configuration in a fresh process."""
    import tempfile

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from synthetic_data import write_synthetic_dataset

    frames, width, height = args.frames or 9, 128, 128
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data")
        write_synthetic_dataset(data, args.samples, frames=frames, size=(height, width), seed=0)
        print(f"data-loading benchmark: mid config (dim 512, 4 blocks), LoRA, stage 'synthetic' on {args.samples} "
              f"procedural mp4 samples of {frames} frames {width}x{height} (driving, mask, pose, target, identity); "
              f"tiny VAE; {args.threads} training threads; {args.steps} timed steps after one epoch "
              f"({args.samples} steps) that decodes everything and fills the cache")
        print(f"{'workers':>8} {'latent cache':>13} {'s/step':>8} {'mean s/step':>12} {'1st epoch s/step':>17}")
        for workers, cached in ((0, False), (args.workers, False), (0, True), (args.workers, True)):
            cache_dir = os.path.join(tmp, f"cache_{workers}") if cached else ""
            cmd = [sys.executable, os.path.abspath(__file__), "--child-data", "--data-dir", data, "--cache-dir",
                   cache_dir, "--workers", str(workers), "--steps", str(args.steps), "--threads", str(args.threads),
                   "--frames", str(frames), "--width", str(width), "--height", str(height)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{workers:>8} {str(cached):>13} failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{workers:>8} {'on' if cached else 'off':>13} {r['s_per_step']:>8.3f} {r['mean_s_per_step']:>12.3f} "
                  f"{r['first_epoch_s_per_step']:>17.3f}", flush=True)
    return 0


def check(names, modes, lora_rank: int) -> int:
    """Build the DiT of each configuration on the meta device, select what trains, print the sizes."""
    import torch

    from dreamidv_core.models.configs import DREAMIDV_1_3B, DiTConfig, tiny_config
    from dreamidv_core.models.dit import DreamIDVTransformer
    from training.trainer import TrainConfig, select_trainable

    cfgs = {"tiny": tiny_config("full", text_dim=32), "released": DREAMIDV_1_3B,
            "mid": DiTConfig(variant="full", dim=512, ffn_dim=2048, num_heads=4, num_layers=4, text_dim=64,
                             text_len=32, cross_attn_pose=False)}
    for name in names:
        for mode in modes:
            with torch.device("meta"):
                model = DreamIDVTransformer(cfgs[name])
                chosen = select_trainable(model, TrainConfig(trainable=mode, lora_rank=lora_rank,
                                                             lora_alpha=float(lora_rank)))
            total = sum(p.numel() for p in model.parameters()) / 1e6
            print(f"{name:>9} {mode:>5} builds: {total:.1f} M parameters, {sum(p.numel() for p in chosen.values()) / 1e6:.3f} "
                  f"M trained ({len(chosen)} tensors)")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--released", action="store_true", help="the released 1.3B config (random weights) at 480p")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--configs", nargs="+", default=list(CPU_CONFIGS), choices=list(CPU_CONFIGS))
    ap.add_argument("--modes", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    ap.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--frames", type=int, default=None, help="frames per sample (released default 33)")
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--check", action="store_true",
                    help="build each configuration on the meta device (no memory, no run) and print its size")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--trainable", help=argparse.SUPPRESS)
    ap.add_argument("--width", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--height", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--gradient-checkpointing", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--autocast", default="none", help=argparse.SUPPRESS)
    ap.add_argument("--data-loading", action="store_true",
                    help="time the mid config with and without DataLoader workers and the latent cache")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers of --data-loading")
    ap.add_argument("--samples", type=int, default=6, help="procedural mp4 samples of --data-loading")
    ap.add_argument("--child-data", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--data-dir", help=argparse.SUPPRESS)
    ap.add_argument("--cache-dir", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    if args.child_data:
        print(json.dumps(data_child(args)))
        return 0
    if args.data_loading:
        return data_loading(args)
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            print(f"error: --device cuda, but this torch {torch.__version__} sees no CUDA device "
                  f"(CUDA build: {torch.version.cuda or 'none'}); run it on a GPU machine, or use "
                  "--check to build the configuration without running it", file=sys.stderr)
            return 2
    if args.check:
        return check(["released"] if args.released else args.configs, args.modes, args.lora_rank)
    if args.released:
        runs = [("released", {"frames": args.frames or 33, "width": 832, "height": 480})]
        extra = ["--gradient-checkpointing", "--autocast", "bf16"] if args.device == "cuda" else ["--gradient-checkpointing"]
    else:
        runs = [(c, dict(CPU_CONFIGS[c], **({"frames": args.frames} if args.frames else {}))) for c in args.configs]
        extra = []
    print(f"training-step benchmark on {args.device}, {args.threads if args.device == 'cpu' else 'all'} threads, "
          f"batch 1, AdamW, {args.steps} timed steps after {args.warmup} warm-up; each row a fresh process")
    print(f"{'config':>9} {'mode':>5} {'clip':>12} {'tokens':>7} {'params M':>9} {'trained M':>10} {'s/step':>8} "
          f"{'1st step s':>10} {'peak RSS MB':>12}" + (f" {'CUDA peak GB':>13}" if args.device == "cuda" else ""))
    objective = "?"
    for name, size in runs:
        for mode in args.modes:
            cmd = [sys.executable, os.path.abspath(__file__), "--child", "--config", name, "--trainable", mode,
                   "--device", args.device, "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--frames", str(size["frames"]), "--width", str(size["width"]), "--height", str(size["height"]),
                   "--lora-rank", str(args.lora_rank), "--threads", str(args.threads)] + extra
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{name:>9} {mode:>5} failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            objective = r["objective"]
            clip = f"{size['frames']}x{size['width']}x{size['height']}"
            print(f"{name:>9} {mode:>5} {clip:>12} {r['tokens']:>7} {r['params_m']:>9.2f} {r['trainable_m']:>10.3f} "
                  f"{r['s_per_step']:>8.3f} {r['first_step_s']:>10.2f} {r['peak_rss_mb']:>12.0f}"
                  + (f" {r['cuda_peak_gb']:>13.2f}" if args.device == "cuda" else ""))
    print(f"objective: {objective}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
