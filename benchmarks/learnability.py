"""Learnability benchmark: does a tiny DreamID-V DiT, trained for a few minutes on procedural faces,
transfer the reference identity while following the driving pose? And does Identity-Coherence RL
(IRL) raise the worst-chunk identity similarity compared with plain flow matching at equal steps?

Data (tests/synthetic_data.py): a face is an ellipse whose *identity* is its look (face colour, eye
shape/colour) and whose *pose* is its per-frame centre and radius, both known by construction. The
driving video shows another identity at the same poses; the target (supervision) shows the reference
identity. Training and held-out samples come from different seeds.

Measurements (on the frames a few-step run of :func:`dreamidv_core.swap.swap_face` returns):

* identity similarity: a stand-in identity encoder = the mean colour inside the known face mask,
  centred on mid-grey (``c / 255 - 0.5``); similarity = cosine with the same embedding of the ground
  truth target frame. Reported per held-out sample as the mean over frames and the *worst chunk*
  (VAE temporal chunk: frame 0, then frames 4c-3..4c; the minimum over chunks of the chunk mean);
  plus the mean colour error (RGB 0..255) to the target identity and to the driving identity;
* pose following: the centroid of the output pixels within ``POSE_TOL`` (RGB distance) of the
  identity's face colour, against the known face centre of that frame (pixels); ``found`` = the share
  of frames where such pixels cover at least a quarter of the face's area (otherwise no measurable pose).

VAE: the tiny Wan VAE with random weights does not reconstruct pixels (a decode of an encode is
noise), so pixel measurements through it would mean nothing. The benchmark uses :class:`PoolVAE`, a
hand-made linear stand-in with the Wan VAE's interface and geometry (16 latent channels, 8x spatial,
causal 1 + 4n temporal: frame 0 alone, then groups of 4 frames), whose decode inverts its encode up to
4x4-pixel blocks and 4-frame averages. Everything else is the pack's code: the tiny DiT
(``tiny_config('full')``), :class:`training.objective.FlowMatchingObjective` (shift, identity dropout,
conditioning as the sampler builds it), :mod:`training.irl` (per-chunk decode, ``Q_c = 1/(cos+delta)``
normalised, :func:`irl_loss`), :func:`training.trainer.train`, and ``swap_face`` for evaluation.

    python benchmarks/learnability.py                 # ~3-4 minutes on 2 CPU cores
    python benchmarks/learnability.py --steps 100     # quicker, weaker
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from dreamidv_core.configs import tiny_config  # noqa: E402
from dreamidv_core.dit import DreamIDVTransformer, init_random_  # noqa: E402
from dreamidv_core.swap import SwapSettings, swap_face  # noqa: E402
from training.irl import TEMPORAL, decode_chunk_frames, irl_loss  # noqa: E402
from training.objective import FlowMatchingObjective, encode_conditioning  # noqa: E402

POSE_TOL = 60.0  # RGB distance (0..255) under which an output pixel counts as the identity's face colour
TEXT_DIM = 32


# ---------------------------------------------------------------------------- stand-in VAE
class PoolVAE:
    """Linear stand-in for the Wan VAE (see the module docstring): video [B, 3, F=4n+1, H, W] in [-1, 1]
    <-> latent [B, 16, 1+n, H/8, W/8]. Channels 0..11: the 4x4-pooled RGB of each 8x8 block's four
    quadrants, scaled by ``scale``; 12..15: zero. Temporal: frame 0 alone, then means of 4 frames."""

    z_dim = 16

    def __init__(self, scale: float = 2.0):
        self.scale = float(scale)

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        b, c, f, h, w = video.shape
        if c != 3 or (f - 1) % TEMPORAL or h % 8 or w % 8:
            raise ValueError(f"PoolVAE.encode: expected [B, 3, 4n+1, 8k, 8m], got {list(video.shape)}")
        video = video.float()
        groups = [video[:, :, :1]] + [video[:, :, 1 + TEMPORAL * i:1 + TEMPORAL * (i + 1)].mean(2, keepdim=True)
                                      for i in range((f - 1) // TEMPORAL)]
        v = torch.cat(groups, dim=2)                                    # [B, 3, F', H, W]
        fl = v.shape[2]
        pooled = F.avg_pool2d(v.transpose(1, 2).reshape(b * fl, 3, h, w), 4)  # [B F', 3, H/4, W/4]
        z = F.pixel_unshuffle(pooled, 2)                                # [B F', 12, H/8, W/8]
        z = torch.cat([z, z.new_zeros(b * fl, 4, h // 8, w // 8)], 1) * self.scale
        return z.reshape(b, fl, 16, h // 8, w // 8).transpose(1, 2).contiguous()

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        b, c, fl, h8, w8 = latent.shape
        if c != 16:
            raise ValueError(f"PoolVAE.decode: expected 16 latent channels, got {list(latent.shape)}")
        z = latent.float().transpose(1, 2).reshape(b * fl, 16, h8, w8)[:, :12] / self.scale
        px = F.interpolate(F.pixel_shuffle(z, 2), scale_factor=4, mode="nearest")  # [B F', 3, H, W]
        px = px.reshape(b, fl, 3, 8 * h8, 8 * w8).transpose(1, 2)
        frames = [px[:, :, :1]] + [px[:, :, i:i + 1].expand(-1, -1, TEMPORAL, -1, -1) for i in range(1, fl)]
        return torch.cat(frames, dim=2).clamp(-1, 1)


# ---------------------------------------------------------------------------- measurements
def chunk_of_frames(frames: int) -> List[List[int]]:
    """Frame indices of each VAE temporal chunk of a 4n+1 clip: [[0], [1..4], [5..8], ...]."""
    return [[0]] + [list(range(1 + TEMPORAL * c, 1 + TEMPORAL * (c + 1))) for c in range((frames - 1) // TEMPORAL)]


def masked_mean_colour(frames: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """frames [F, H, W, 3] (0..255 or 0..1 floats: any scale), masks [F, H, W] bool -> [F, 3] mean colour
    inside each mask (NaN where the mask is empty)."""
    frames = np.asarray(frames, np.float64)
    m = np.asarray(masks, bool)[..., None]
    n = m.sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (frames * m).sum(axis=(1, 2)) / n


def identity_embedding(colour: np.ndarray) -> np.ndarray:
    """Stand-in identity encoder on a mean colour (RGB 0..255) [..., 3] -> centred [..., 3]."""
    return np.asarray(colour, np.float64) / 255.0 - 0.5


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of [..., D] arrays."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)


def face_centroid(frame: np.ndarray, colour: Sequence[float], tol: float = POSE_TOL,
                  min_pixels: int = 1) -> Optional[np.ndarray]:
    """frame [H, W, 3] (0..255) -> (x, y) centroid in pixels of the pixels within ``tol`` of ``colour``,
    or None when there are fewer than ``min_pixels``. Pixel (i, j) has centre (j + 0.5, i + 0.5) - 0.5 = (j, i), matching
    OpenCV's drawing coordinates used by the generator."""
    d = np.linalg.norm(np.asarray(frame, np.float64) - np.asarray(colour, np.float64), axis=-1)
    ys, xs = np.nonzero(d < tol)
    if len(xs) < max(1, int(min_pixels)):
        return None
    return np.array([xs.mean(), ys.mean()])


def measure_clip(output: np.ndarray, target: np.ndarray, driving: np.ndarray, masks: np.ndarray,
                 face_colour: Sequence[float], poses: Sequence[Sequence[float]]) -> Dict[str, float]:
    """One clip's figures. output/target/driving [F, H, W, 3] in 0..255, masks [F, H, W] bool, face_colour:
    the identity's face RGB, poses: per frame [cx, cy, r]. Returns sim_mean, sim_worst_chunk,
    err_identity, err_driving (mean colour distances), pose_err (px, mean over found frames; NaN if
    none), found (share of frames where at least a quarter of the face's area has the face colour)."""
    f = output.shape[0]
    out_c = masked_mean_colour(output, masks)
    tgt_c = masked_mean_colour(target, masks)
    drv_c = masked_mean_colour(driving, masks)
    sims = cosine(identity_embedding(out_c), identity_embedding(tgt_c))
    worst = min(float(np.mean(sims[idx])) for idx in chunk_of_frames(f))
    errs = []
    for i in range(f):
        c = face_centroid(output[i], face_colour, min_pixels=int(0.25 * masks[i].sum()))
        if c is not None:
            errs.append(float(np.hypot(c[0] - poses[i][0], c[1] - poses[i][1])))
    return {"sim_mean": float(np.mean(sims)), "sim_worst_chunk": worst,
            "err_identity": float(np.mean(np.linalg.norm(out_c - tgt_c, axis=-1))),
            "err_driving": float(np.mean(np.linalg.norm(out_c - drv_c, axis=-1))),
            "pose_err": float(np.mean(errs)) if errs else float("nan"), "found": len(errs) / f}


# ---------------------------------------------------------------------------- data, model, losses
def make_data(root: str, n_train: int, n_test: int, frames: int = 9, size=(48, 64)):
    """Write and load the procedural datasets -> (train items, test items), each a list of dataset items
    (tensors prepared like the sampler's inputs; see training/dataset.py)."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from synthetic_data import write_synthetic_dataset
    from training.dataset import DreamIDVDataset

    out = []
    for name, n, seed in (("train", n_train, 1), ("test", n_test, 2)):
        folder = os.path.join(root, name)
        write_synthetic_dataset(folder, n, frames=frames, size=size, seed=seed, direction="forward")
        ds = DreamIDVDataset(folder, size[1], size[0], frames=frames, seed=0)
        out.append([ds[i] for i in range(len(ds))])
    return out


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return {k: v for k, v in self.items[i].items() if k != "record"}


def tiny_model(seed: int = 0) -> DreamIDVTransformer:
    torch.manual_seed(seed)
    return init_random_(DreamIDVTransformer(tiny_config("full", text_dim=TEXT_DIM)), seed=seed)


def text_context() -> torch.Tensor:
    return torch.randn(4, TEXT_DIM, generator=torch.Generator().manual_seed(123))


def chunk_identity_cos(x0_hat: torch.Tensor, vae, target_latent: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """IRL scores with the stand-in identity encoder: per chunk, the cosine of the centred mean colour
    inside the mask of the decoded one-step estimate (last frame of the chunk, as training.irl scores it)
    and of the decoded supervision. -> [B, F'] float32."""
    est = decode_chunk_frames(x0_hat, vae, 1)
    ref = decode_chunk_frames(target_latent, vae, 1)
    cos = []
    for c, (e, r) in enumerate(zip(est, ref)):
        fi = 0 if c == 0 else TEMPORAL * c  # the chunk's last frame
        m = (mask[:, 0, fi] > 0.5).float()[:, None]  # [B, 1, H, W]
        n = m.sum(dim=(2, 3)).clamp(min=1)
        ce = (e[:, 0] * m).sum(dim=(2, 3)) / n - 0.5
        cr = (r[:, 0] * m).sum(dim=(2, 3)) / n - 0.5
        cos.append(F.cosine_similarity(ce, cr, dim=-1))
    return torch.stack(cos, dim=1).float()


def make_loss(vae, context, irl: bool, delta: float = 0.1, identity_dropout: float = 0.1):
    """loss_fn(model, batch, generator) for :func:`training.trainer.train`: the flow-matching loss of
    :class:`FlowMatchingObjective` on the supervision video; with ``irl`` each chunk's loss weighted by
    Q_c = 1/(max(cos_c, 0) + delta), normalised to mean 1 per sample (training.irl's formula)."""
    objective = FlowMatchingObjective(shift=5.0, identity_dropout=identity_dropout)

    def loss_fn(model, batch, generator):
        with torch.no_grad():
            cond = encode_conditioning(vae, batch["video"].add(1).div(2), batch["mask"],
                                       batch["identity"][:, :, 0].add(1).div(2), context, pose=batch["pose"])
            z = vae.encode(batch["target"])
        out = objective.per_chunk_loss(model, z, cond, generator)
        if not irl:
            return out.per_chunk.mean()
        cos = chunk_identity_cos(out.x0_hat, vae, z, batch["mask"])
        q = 1.0 / (cos.clamp(min=0.0) + delta)
        return irl_loss(out.per_chunk, q / q.mean(dim=1, keepdim=True))

    return loss_fn


def train_model(model, items, vae, context, steps: int, irl: bool, lr: float = 2e-3, batch_size: int = 4,
                seed: int = 0) -> List[float]:
    from training.trainer import TrainConfig, train

    config = TrainConfig(steps=steps, lr=lr, batch_size=batch_size, seed=seed, trainable="full", warmup=10,
                         max_grad_norm=1.0, parallel="ddp")
    return train(model, ListDataset(items), make_loss(vae, context, irl), config).losses


def to_frames(video: torch.Tensor) -> torch.Tensor:
    """[3, F, H, W] (any range mapped by the caller to 0..1) -> [F, H, W, 3]."""
    return video.permute(1, 2, 3, 0).contiguous()


@torch.no_grad()
def evaluate(model, items, vae, context, steps: int = 8, guidance: float = 0.0) -> Dict[str, float]:
    """Run swap_face on every held-out item and average :func:`measure_clip` over them."""
    model.eval()
    rows = []
    for it in items:
        syn = it["record"]["synthetic"]
        f, h, w = it["video"].shape[1:]
        settings = SwapSettings(width=w, height=h, steps=steps, guidance=guidance, seed=0, sampler="euler"
                                if "euler" in __import__("dreamidv_core.samplers", fromlist=["SAMPLERS"]).SAMPLERS
                                else "unipc", window=f, overlap=4)
        ref_latent = vae.encode(it["identity"][None])
        res = swap_face(model, vae, to_frames(it["video"].add(1).div(2)), to_frames(it["mask"]), None, context,
                        pose=to_frames(it["pose"]), settings=settings, ref_latent=ref_latent)
        rows.append(measure_clip(res.frames.numpy() * 255, to_frames(it["target"].add(1).div(2)).numpy() * 255,
                                 to_frames(it["video"].add(1).div(2)).numpy() * 255,
                                 it["mask"][0].numpy() > 0.5, syn["identity"]["identity_colour"], syn["poses"]))
    model.train()
    return aggregate(rows)


def aggregate(rows: List[Dict[str, float]]) -> Dict[str, float]:
    out = {k: float(np.nanmean([r[k] for r in rows])) if any(not math.isnan(r[k]) for r in rows) else float("nan")
           for k in rows[0]}
    out["sim_worst_chunk_min"] = float(min(r["sim_worst_chunk"] for r in rows))
    return out


def reference_rows(items, vae) -> Dict[str, Dict[str, float]]:
    """Figures of the ground truth through the stand-in VAE and of copying the driving video (no swap)."""
    gt, copy = [], []
    for it in items:
        syn = it["record"]["synthetic"]
        tgt = to_frames(it["target"].add(1).div(2)).numpy() * 255
        drv = to_frames(it["video"].add(1).div(2)).numpy() * 255
        m = it["mask"][0].numpy() > 0.5
        rec = to_frames(vae.decode(vae.encode(it["target"][None]))[0].add(1).div(2)).numpy() * 255
        gt.append(measure_clip(rec, tgt, drv, m, syn["identity"]["identity_colour"], syn["poses"]))
        copy.append(measure_clip(drv, tgt, drv, m, syn["identity"]["identity_colour"], syn["poses"]))
    return {"target through the VAE (ceiling)": aggregate(gt), "copy the driving video": aggregate(copy)}


COLUMNS = [("sim_mean", "id sim", "{:+.3f}"), ("sim_worst_chunk", "worst-chunk", "{:+.3f}"),
           ("sim_worst_chunk_min", "min worst", "{:+.3f}"), ("err_identity", "err->id", "{:.1f}"),
           ("err_driving", "err->drv", "{:.1f}"), ("pose_err", "pose px", "{:.2f}"), ("found", "found", "{:.0%}")]


def print_table(rows: Dict[str, Dict[str, float]]) -> None:
    width = max(len(k) for k in rows) + 2
    print("".ljust(width) + "".join(h.rjust(12) for _, h, _ in COLUMNS))
    for name, r in rows.items():
        print(name.ljust(width) + "".join(fmt.format(r[k]).rjust(12) for k, _, fmt in COLUMNS))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1500, help="optimizer steps per training run (plain and IRL)")
    p.add_argument("--train", type=int, default=24, help="training samples")
    p.add_argument("--test", type=int, default=8, help="held-out samples")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--sample-steps", type=int, default=8)
    p.add_argument("--guidance", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    t0 = time.time()
    vae, context = PoolVAE(), text_context()
    with tempfile.TemporaryDirectory() as tmp:
        train_items, test_items = make_data(tmp, args.train, args.test)
    print(f"data: {len(train_items)} train / {len(test_items)} held-out samples, 9 frames 64x48 "
          f"({time.time() - t0:.1f}s)")
    rows = reference_rows(test_items, vae)
    base = tiny_model(args.seed)
    rows["untrained"] = evaluate(base, test_items, vae, context, args.sample_steps, args.guidance)
    curves = {}
    for name, irl in (("plain flow matching", False), ("IRL", True)):
        model = tiny_model(args.seed)
        t = time.time()
        losses = train_model(model, train_items, vae, context, args.steps, irl, args.lr, args.batch, args.seed)
        dt = time.time() - t
        curves[name] = losses
        rows[f"{name}, {args.steps} steps"] = evaluate(model, test_items, vae, context, args.sample_steps,
                                                        args.guidance)
        print(f"{name}: {args.steps} steps in {dt:.1f}s; loss first 10 {np.mean(losses[:10]):.4f} -> "
              f"last 10 {np.mean(losses[-10:]):.4f}")
    print(f"\nheld-out: {len(test_items)} clips, swap_face {args.sample_steps} steps, guidance {args.guidance}; "
          "id sim = cosine of the centred mean face colour vs the target (stand-in identity encoder); "
          "worst-chunk = mean over clips of the lowest VAE-chunk similarity; min worst = lowest over clips; "
          "err->id / err->drv = mean colour distance (RGB) to the target / driving identity; pose px = face "
          f"centroid error; found = frames with face-coloured pixels (tol {POSE_TOL:.0f})\n")
    print_table(rows)
    plain, irl = rows[f"plain flow matching, {args.steps} steps"], rows[f"IRL, {args.steps} steps"]
    print(f"\nIRL - plain worst-chunk similarity: {irl['sim_worst_chunk'] - plain['sim_worst_chunk']:+.3f} "
          f"(mean), {irl['sim_worst_chunk_min'] - plain['sim_worst_chunk_min']:+.3f} (min); total {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
