"""Evaluation sanity table (prints figures; not a test): the evaluation of ``python -m dreamidv_core evaluate``
(:mod:`dreamidv_core.eval.benchmark`) on procedural faces whose truth is known (tests/synthetic_data.py:
identity = face colour and eyes, pose = centre, size and in-plane turn), with the deterministic face models
of tests/eval_fakes.py (a palette identity embedder, an ellipse-fitting observer).

Rows: the ground truth (the target video), a copy of the driving video, the reference photo pasted on every
frame, and the ground truth under a known distortion (noise in the background, one pair of frames swapped,
the head turned by 15 degrees). Expected: high identity and low pose error for the ground truth; low identity
and low pose error for the copy; high identity, high pose error and no face motion for the pasted photo; and
each distortion moving its own metrics. Mean over ``--clips`` clips.

    python benchmarks/eval_sanity.py
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from dreamidv_core.eval.benchmark import score_clip  # noqa: E402
from tests.eval_fakes import ellipse_observer, palette_embedder  # noqa: E402
from tests.synthetic_data import render_synthetic_sample  # noqa: E402

COLUMNS = [("id_mean", "id mean", "{:.3f}"), ("id_stability", "id stab", "{:.3f}"),
           ("pose_error", "pose deg", "{:.2f}"), ("landmark_error", "lmk err", "{:.3f}"),
           ("expression_error", "expr err", "{:.3f}"), ("bg_psnr", "bg PSNR", "{:.1f}"), ("bg_ssim", "bg SSIM", "{:.3f}"),
           ("flicker_excess", "flick+", "{:+.4f}"), ("fm_ref", "FM_ref", "{:.3f}"), ("fm_inter", "FM_inter", "{:.4f}"),
           ("fm_inter_gap", "FM gap", "{:.4f}")]


def variants(seed: int, frames: int, size, sample: dict):
    arrays, _ = render_synthetic_sample(frames, size, seed=seed, **sample)
    still = np.asarray(Image.fromarray(arrays["identity"]).resize((size[1], size[0])))
    noisy = arrays["target"].astype(np.float64)
    bg = arrays["mask"][..., 0] < 128
    noisy[bg] += np.random.default_rng(seed).normal(0, 20, size=noisy[bg].shape)
    shuffled = arrays["target"].copy()
    shuffled[[3, frames - 4]] = shuffled[[frames - 4, 3]]
    rotated, _ = render_synthetic_sample(frames, size, seed=seed, target_roll_offset=15.0, **sample)
    return arrays, {"ground truth": arrays["target"], "copy of the driving video": arrays["driving"],
                    "reference pasted on every frame": np.stack([still] * frames),
                    "ground truth + background noise": np.clip(noisy, 0, 255).astype(np.uint8),
                    "ground truth, 2 frames swapped": shuffled, "ground truth, head turned 15 deg": rotated["target"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clips", type=int, default=4)
    ap.add_argument("--frames", type=int, default=17)
    args = ap.parse_args(argv)
    t0 = time.time()
    size = (96, 128)
    embed, observe = palette_embedder(), ellipse_observer()
    rows = {}
    for k in range(args.clips):
        # target identity colour 0..5 and a driving identity of another colour, turning heads
        sample = dict(identity=3 * (k % 6), driving_identity=3 * ((k + 3) % 6), face_scale=(0.3, 0.4), roll=(-30, 30))
        arrays, cases = variants(100 + k, args.frames, size, sample)
        for name, video in cases.items():
            m = score_clip(video, arrays["driving"], arrays["identity"], embed, observe, mask=arrays["mask"]).metrics
            rows.setdefault(name, []).append(m)
    width = max(len(n) for n in rows) + 2
    print(f"evaluation sanity: {args.clips} procedural clips of {args.frames} frames {size[1]}x{size[0]}, palette "
          f"embedder and ellipse observer (tests/eval_fakes.py); mean over clips")
    print("".ljust(width) + "".join(h.rjust(10) for _, h, _ in COLUMNS))
    for name, ms in rows.items():
        cells = []
        for key, _, fmt in COLUMNS:
            vals = [m[key] for m in ms if m[key] is not None]
            cells.append((fmt.format(float(np.mean(vals))) if vals else "-").rjust(10))
        print(name.ljust(width) + "".join(cells))
    print(f"({time.time() - t0:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
