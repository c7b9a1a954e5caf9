"""Occlusion benchmark (prints figures; not a test): does training with the occlusion augmentation
(:mod:`training.augment`, after VividFace) teach the tiny DiT to keep an occluder in front of the new face?

Setup (the learnability benchmark's, benchmarks/learnability.py: procedural faces of tests/synthetic_data.py,
the tiny DiT, the linear stand-in VAE ``PoolVAE``, the pack's objective, trainer and ``swap_face``):

* training set: ``--train`` procedural samples **without** any occluder;
* held-out set: ``--test`` samples from another seed where a *test* occluder - an "arm" (a long rotated
  rectangle) ending in a "fist" (an octagon) of a flat colour, sliding over the face
  (``tests/synthetic_data.py: occluder_polygons``; not one of the augmentation's shapes or textures) - is
  drawn over the face in the driving video **and** in the ground truth at the same place;
* per seed, two models from the same initialisation, with the same steps, batches and noise: ``plain``, and
  ``occlusion`` (each training sample occluded with probability ``--probability`` by the augmentation);
* measured on the swap_face output of every held-out clip (euler ``--sample-steps`` steps, identity guidance
  ``--guidance``): ``occ err`` = mean absolute RGB error (0..255) against the ground truth inside the
  occluder where it covers the face mask (what the model regenerates); ``occ kept`` = share of those pixels
  within 40 RGB of the occluder's colour; ``face err`` = the same error on the visible face (face mask minus
  occluder); ``id sim`` = the learnability benchmark's identity similarity (centred mean face colour).

The ground truth through the stand-in VAE is the ceiling (the VAE blurs 4x4 pixel blocks and 4-frame
groups); copying the driving video gets the occluder right and the face wrong.

    python benchmarks/bench_occlusion.py                         # 3 seeds x 2 runs x 1200 steps (~55 min, 1 busy core)
    python benchmarks/bench_occlusion.py --seeds 0 --steps 200   # quick look
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from typing import Dict, List

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.join(ROOT, "tests")):
    if p not in sys.path:
        sys.path.insert(0, p)

from synthetic_data import synthetic_items  # noqa: E402
from training.augment import OcclusionAugmentation  # noqa: E402
from training.trainer import TrainConfig, train  # noqa: E402

_spec = importlib.util.spec_from_file_location("learnability", os.path.join(ROOT, "benchmarks", "learnability.py"))
L = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(L)

KEPT_TOL = 40.0


class AugmentedItems(torch.utils.data.Dataset):
    """In-memory training items, each occluded with the augmentation's probability in each epoch (keys
    ``(index, epoch)`` like training.dataset.DreamIDVDataset's; items are copied before compositing)."""

    def __init__(self, items, augmentation=None):
        self.items, self.aug = items, augmentation

    def __len__(self):
        return len(self.items)

    def unit_keys(self, seed, unit, batch_size, shuffle=True):
        from training.trainer import sample_indices

        first = unit * batch_size
        return [(i, (first + k) // len(self.items))
                for k, i in enumerate(sample_indices(len(self.items), seed, first, batch_size, shuffle))]

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        src = self.items[index]
        item = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in src.items() if k != "record"}
        item["hard_chunk"] = 0
        if self.aug is not None:
            seed = self.aug.draw(epoch, index)
            if seed is not None:
                self.aug(item, seed)
                item.pop("occluder", None)
        return item


def train_run(items, vae, context, steps, seed, lr, batch, augmentation):
    model = L.tiny_model(seed)
    config = TrainConfig(steps=steps, lr=lr, batch_size=batch, seed=seed, trainable="full", warmup=10,
                         max_grad_norm=1.0, parallel="ddp")
    losses = train(model, AugmentedItems(items, augmentation), L.make_loss(vae, context, irl=False), config).losses
    return model, losses


def occlusion_figures(output: np.ndarray, it) -> Dict[str, float]:
    """output [F, H, W, 3] 0..255 vs the item's ground truth, inside the occluder on the face."""
    target = L.to_frames(it["target"].add(1).div(2)).numpy() * 255
    face = it["mask"][0].numpy() > 0.5
    occ = it["occluder"].numpy() > 0.5
    region, visible = occ & face, face & ~occ
    err = np.abs(output.astype(np.float64) - target).mean(axis=-1)  # [F, H, W]
    colour = np.asarray(it["record"]["synthetic"]["occluder_colour"], np.float64)
    kept = np.linalg.norm(output.astype(np.float64) - colour, axis=-1) < KEPT_TOL
    return {"occ_err": float(err[region].mean()), "occ_kept": float(kept[region].mean()),
            "face_err": float(err[visible].mean())}


@torch.no_grad()
def evaluate(model, items, vae, context, steps, guidance) -> Dict[str, float]:
    from dreamidv_core.pipelines.swap import SwapSettings, swap_face

    model.eval()
    rows = []
    for it in items:
        f, h, w = it["video"].shape[1:]
        settings = SwapSettings(width=w, height=h, steps=steps, guidance=guidance, seed=0, sampler="euler",
                                window=f, overlap=4)
        res = swap_face(model, vae, L.to_frames(it["video"].add(1).div(2)), L.to_frames(it["mask"]), None, context,
                        pose=L.to_frames(it["pose"]), settings=settings, ref_latent=vae.encode(it["identity"][None]))
        rows.append(_row(res.frames.numpy() * 255, it))
    model.train()
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def _row(output: np.ndarray, it) -> Dict[str, float]:
    row = occlusion_figures(output, it)
    row["id_sim"] = L._measure(torch.from_numpy(output / 255.0), it)["sim_mean"]
    return row


def reference_rows(items, vae) -> Dict[str, Dict[str, float]]:
    gt, copy = [], []
    for it in items:
        gt.append(_row(L.to_frames(vae.decode(vae.encode(it["target"][None]))[0].add(1).div(2)).numpy() * 255, it))
        copy.append(_row(L.to_frames(it["video"].add(1).div(2)).numpy() * 255, it))
    mean = lambda rows: {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}  # noqa: E731
    return {"ground truth through the VAE": mean(gt), "copy the driving video": mean(copy)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--train", type=int, default=256)
    ap.add_argument("--test", type=int, default=16)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--probability", type=float, default=0.8, help="occlusion augmentation probability")
    ap.add_argument("--sample-steps", type=int, default=8)
    ap.add_argument("--guidance", default="1,4", help="identity guidance values at evaluation (released: 4)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for this tiny model on a busy CPU)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    train_items = synthetic_items(args.train, frames=9, size=(48, 64), seed=1, **L.DATA_OPTIONS)
    test_items = synthetic_items(args.test, frames=9, size=(48, 64), seed=2, occluder=True, **L.DATA_OPTIONS)
    vae, context = L.PoolVAE(), L.text_context()
    print(f"data: {len(train_items)} train clips without occluders, {len(test_items)} held-out clips with a test "
          f"occluder, 9 frames 64x48 ({time.time() - t0:.1f}s)", flush=True)
    guidances = [float(g) for g in str(args.guidance).split(",")]
    per: Dict[str, List[Dict[str, float]]] = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name, aug in (("plain", None), ("occlusion", OcclusionAugmentation(args.probability, seed=seed))):
            t = time.time()
            model, losses = train_run(train_items, vae, context, args.steps, seed, args.lr, args.batch, aug)
            for g in guidances:
                r = evaluate(model, test_items, vae, context, args.sample_steps, g)
                per.setdefault(f"{name}, g {g:g}", []).append(r)
                print(f"seed {seed} {name:>9} g {g:g}: {args.steps} steps {time.time() - t:.0f}s, loss "
                      f"{np.mean(losses[-50:]):.3f}; occ err {r['occ_err']:.1f}, occ kept {r['occ_kept']:.0%}, "
                      f"face err {r['face_err']:.1f}, id sim {r['id_sim']:+.3f}", flush=True)
    rows = reference_rows(test_items, vae)
    for name, rs in per.items():
        rows[f"{name} ({len(rs)} seeds)"] = {k: float(np.mean([r[k] for r in rs])) for k in rs[0]}
    print(f"\nheld-out {len(test_items)} clips; swap_face euler {args.sample_steps} steps, g = identity guidance; "
          f"augmentation probability {args.probability}; {args.steps} steps; mean over seeds {args.seeds}")
    width = max(len(k) for k in rows) + 2
    print("".ljust(width) + "".join(h.rjust(11) for h in ("occ err", "occ kept", "face err", "id sim")))
    for name, r in rows.items():
        print(name.ljust(width) + f"{r['occ_err']:>11.1f}{r['occ_kept']:>11.0%}{r['face_err']:>11.1f}{r['id_sim']:>+11.3f}")
    for g in guidances:
        d = [b["occ_err"] - a["occ_err"] for a, b in zip(per[f"plain, g {g:g}"], per[f"occlusion, g {g:g}"])]
        print(f"g {g:g}: occlusion - plain, occ err per seed: {', '.join(f'{v:+.1f}' for v in d)} (lower in "
              f"{sum(v < 0 for v in d)}/{len(d)} seeds)")
    print(f"total {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
