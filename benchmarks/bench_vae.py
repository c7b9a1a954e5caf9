"""Time and peak memory of the Wan 2.1 VAE (real architecture, random weights): chunked vs one-shot.

Each mode runs in a fresh subprocess, so one mode's allocations cannot raise another's peak.
"Peak" is the process's maximum resident memory minus its resident memory just before the run
(i.e. without the Python runtime and the ~0.5 GB of fp32 weights).

    python benchmarks/bench_vae.py                       # 81 frames at 128x128
    python benchmarks/bench_vae.py --frames 17 --size 64x64 --modes decode_chunked,decode_oneshot
    python benchmarks/bench_vae.py --frames 9 --size 640x352 --modes decode_chunked,decode_tiled,decode_tiled_whole

``decode_tiled`` streams with spatial tiles (``decode_iter(tile=--tile, overlap=--overlap)``: every
tile's temporal cache stays alive), ``decode_tiled_whole`` is the tile-major ``decode(tile=...)``
(one tile's cache at a time; its float32 output clip is part of its peak). "est" is
``decode_peak_bytes`` for the same call.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
MODES = ("decode_chunked", "decode_oneshot", "decode_tiled", "decode_tiled_whole", "encode_chunked",
         "encode_oneshot")


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field)) / 1024


def run_mode(mode: str, frames: int, height: int, width: int, threads: int, tile: int, overlap: int) -> dict:
    """Run one mode in this process and return its figures (called inside the child process)."""
    import time

    import torch

    from dreamidv_core.models.vae import WanVAE, decode_peak_bytes

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    vae = WanVAE().eval().requires_grad_(False)
    if mode.startswith("decode"):
        data = torch.randn(1, 16, 1 + (frames - 1) // 4, height // 8, width // 8)
    else:
        data = torch.rand(1, 3, frames, height, width) * 2 - 1
    before = _rss_mb("VmRSS")
    start = time.perf_counter()
    if mode == "decode_chunked":
        for _ in vae.decode_iter(data):  # a streaming consumer: each chunk is written out and dropped
            pass
    elif mode == "decode_tiled":
        for _ in vae.decode_iter(data, tile=tile, overlap=overlap):
            pass
    elif mode == "decode_tiled_whole":
        vae.decode(data, tile=tile, overlap=overlap)
    elif mode == "decode_oneshot":
        vae.decode_oneshot(data)
    elif mode == "encode_chunked":
        vae.encode(data)
    else:
        vae.encode_oneshot(data)
    seconds = time.perf_counter() - start
    result = {"mode": mode, "seconds": seconds, "peak_mb": _rss_mb("VmHWM") - before}
    if mode in ("decode_chunked", "decode_tiled", "decode_tiled_whole"):
        result["estimate_mb"] = decode_peak_bytes(data.shape, None if mode == "decode_chunked" else tile,
                                                  overlap, streaming=mode != "decode_tiled_whole") / 2**20
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=81, help="video frames (4n+1)")
    parser.add_argument("--size", default="128x128", help="WIDTHxHEIGHT, multiples of 8")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {MODES}")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads")
    parser.add_argument("--tile", type=int, default=24, help="tile size in latent pixels (tiled modes)")
    parser.add_argument("--overlap", type=int, default=8, help="tile overlap in latent pixels (tiled modes)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))

    if args.child:
        print(json.dumps(run_mode(args.child, args.frames, height, width, args.threads, args.tile, args.overlap)))
        return

    print(f"Wan 2.1 VAE, random weights, fp32, CPU x{args.threads} threads: {args.frames} frames "
          f"at {width}x{height} (latent {1 + (args.frames - 1) // 4} x {height // 8}x{width // 8}); tiled modes: "
          f"tile {args.tile}, overlap {args.overlap} latent px")
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for mode in args.modes.split(","):
        if mode not in MODES:
            parser.error(f"unknown mode {mode!r}; choose from {MODES}")
        cmd = [sys.executable, __file__, "--child", mode, "--frames", str(args.frames),
               "--size", args.size, "--threads", str(args.threads), "--tile", str(args.tile),
               "--overlap", str(args.overlap)]
        done = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{mode:18s} failed:\n{done.stderr}")
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        est = f"   est {r['estimate_mb']:8.0f} MB" if "estimate_mb" in r else ""
        print(f"{mode:18s} {r['seconds']:8.1f} s   peak +{r['peak_mb']:8.0f} MB{est}", flush=True)


if __name__ == "__main__":
    main()
