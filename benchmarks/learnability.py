"""Learnability benchmark: does a tiny DreamID-V DiT, trained for a few minutes on procedural faces,
transfer the reference identity while following the driving pose? And does Identity-Coherence RL
(IRL) raise the worst-chunk identity similarity compared with plain flow matching at equal steps?

Data (tests/synthetic_data.py, options :data:`DATA_OPTIONS`): a face is an ellipse whose *identity* is
its look (face colour, eye shape/colour) and whose *pose* is its per-frame centre and radius, both known
by construction. The driving video shows another identity at the same poses; the target (supervision)
shows the reference identity. In half of the samples one VAE chunk shows the face at half its radius (a
harder pose), so the identity similarity varies across chunks. 512 training samples (with 24 the model
memorises each training sample's identity from its background and copies the driving face on held-out
clips), 16 held-out samples from another seed.

Measurements (on the frames a few-step run of :func:`dreamidv_core.pipelines.swap.swap_face` returns, at each
identity guidance of ``--guidance``; 4 is the released default):

* identity similarity: a stand-in identity encoder = the mean colour inside the known face mask,
  centred on mid-grey (``c / 255 - 0.5``); similarity = cosine with the same embedding of the ground
  truth target frame. Reported per held-out sample as the mean over frames and the *worst chunk*
  (VAE temporal chunk: frame 0, then frames 4c-3..4c; the minimum over chunks of the chunk mean);
  plus the mean colour error (RGB 0..255) to the target identity and to the driving identity, and the
  share of frames nearer the target identity than the driving one ("id wins");
* pose following: the centroid of the output pixels within ``POSE_TOL`` (RGB distance) of the
  identity's face colour, against the known face centre of that frame (pixels); ``found`` = the share
  of frames where such pixels cover at least a quarter of the face's area (noise finds some too: read it
  with the IoU); IoU of those pixels with the true face mask (the right colour at the right place).

VAE: the tiny Wan VAE with random weights does not reconstruct pixels (a decode of an encode is
noise), so pixel measurements through it would mean nothing. The benchmark uses :class:`PoolVAE`, a
hand-made linear stand-in with the Wan VAE's interface and geometry (16 latent channels, 8x spatial,
causal 1 + 4n temporal: frame 0 alone, then groups of 4 frames), whose decode inverts its encode up to
4x4-pixel blocks and 4-frame averages. Everything else is the pack's code: the tiny DiT
(``tiny_config('full')``), :class:`training.objective.FlowMatchingObjective` (shift, identity dropout,
conditioning as the sampler builds it: the driving video unmasked plus the mask),
:func:`training.irl.identity_coherence_weights` (per-chunk decode of the one-step estimate, scored by
:class:`MaskedColourEncoder` against the reference photo's colour, ``Q_c = 1/(cos+delta)`` normalised)
and :func:`training.irl.irl_loss`, :func:`training.trainer.train`, and ``swap_face`` for evaluation.

IRL as the last stage (``--finetune-irl N,M``, the paper's recipe): per seed, plain N steps, then from that
checkpoint (A) plain M steps vs (B) IRL M steps (same batches and noise), and how spread the IRL weights were.

    python benchmarks/learnability.py                            # 3 seeds x (plain, IRL) x 1000 steps: ~10-20 min
    python benchmarks/learnability.py --seeds 0 --steps 300      # ~2 minutes, weaker
    python benchmarks/learnability.py --finetune-irl 1000,500 --guidance 2,4   # 3 seeds: ~12 min
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

from dreamidv_core.models.configs import tiny_config  # noqa: E402
from dreamidv_core.models.dit import DreamIDVTransformer, init_random_  # noqa: E402
from dreamidv_core.pipelines.swap import SwapSettings, swap_face  # noqa: E402
from dreamidv_core.models.frame_grid import TEMPORAL_STRIDE as TEMPORAL  # noqa: E402
from training.irl import identity_coherence_weights, irl_loss  # noqa: E402
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
                 face_colour: Sequence[float], poses: Sequence[Sequence[float]],
                 driving_colour: Optional[Sequence[float]] = None) -> Dict[str, float]:
    """One clip's figures. output/target/driving [F, H, W, 3] in 0..255, masks [F, H, W] bool, face_colour:
    the identity's face RGB, poses: per frame [cx, cy, r]; driving_colour: the driving identity's face RGB
    (for ``face_iou_drv``). Returns sim_mean, sim_worst_chunk, err_identity, err_driving (mean colour
    distances), id_wins (share of frames whose face colour is nearer the target's than the driving's),
    pose_err (px, mean over found frames; NaN if none), found (share of frames where at least a quarter of
    the face's area has the face colour), face_iou (mean over frames of the IoU between the pixels of the
    identity's face colour and the face mask: high only when the right colour is at the right place) and
    face_iou_drv (the same with the driving identity's colour: a copy of the driving face scores high)."""
    f = output.shape[0]
    out_c = masked_mean_colour(output, masks)
    tgt_c = masked_mean_colour(target, masks)
    drv_c = masked_mean_colour(driving, masks)
    sims = cosine(identity_embedding(out_c), identity_embedding(tgt_c))
    worst = min(float(np.mean(sims[idx])) for idx in chunk_of_frames(f))
    err_t = np.linalg.norm(out_c - tgt_c, axis=-1)
    err_d = np.linalg.norm(out_c - drv_c, axis=-1)
    errs = []
    for i in range(f):
        c = face_centroid(output[i], face_colour, min_pixels=int(0.25 * masks[i].sum()))
        if c is not None:
            errs.append(float(np.hypot(c[0] - poses[i][0], c[1] - poses[i][1])))

    def iou(colour):
        d = np.linalg.norm(np.asarray(output, np.float64) - np.asarray(colour, np.float64), axis=-1) < POSE_TOL
        inter, union = (d & masks).sum(axis=(1, 2)), (d | masks).sum(axis=(1, 2))
        return float(np.mean(inter / np.maximum(union, 1)))

    return {"sim_mean": float(np.mean(sims)), "sim_worst_chunk": worst,
            "err_identity": float(np.mean(err_t)), "err_driving": float(np.mean(err_d)),
            "id_wins": float(np.mean(err_t < err_d)),
            "pose_err": float(np.mean(errs)) if errs else float("nan"), "found": len(errs) / f,
            "face_iou": iou(face_colour),
            "face_iou_drv": iou(driving_colour) if driving_colour is not None else float("nan")}


# ---------------------------------------------------------------------------- data, model, losses
# The procedural data of the benchmark (tests/synthetic_data.py options): faces of radius 0.3..0.45 of
# the height (at the default 0.22..0.36 the face is a small share of the loss and 1000 steps learn to copy
# the driving face), and a "hard" chunk (the face shrunk to half its radius for 4 frames) in half of the
# samples, so that the per-chunk identity similarity varies across chunks (what IRL reweights).
DATA_OPTIONS = {"face_scale": (0.3, 0.45), "hard_chunk": 0.5, "hard_scale": 0.5}


def make_data(root: str, n_train: int, n_test: int, frames: int = 9, size=(48, 64), options=None):
    """Write and load the procedural datasets -> (train items, test items), each a list of dataset items
    (tensors prepared like the sampler's inputs; see training/dataset.py). Training and held-out samples
    come from different seeds (different backgrounds, poses and identity pairs)."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from synthetic_data import write_synthetic_dataset
    from training.dataset import DreamIDVDataset

    options = DATA_OPTIONS if options is None else options
    out = []
    for name, n, seed in (("train", n_train, 1), ("test", n_test, 2)):
        folder = os.path.join(root, name)
        write_synthetic_dataset(folder, n, frames=frames, size=size, seed=seed, direction="forward", **options)
        ds = DreamIDVDataset(folder, size[1], size[0], frames=frames, seed=0)
        out.append([ds[i] for i in range(len(ds))])
    return out


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        item = {k: v for k, v in self.items[i].items() if k != "record"}
        item["hard_chunk"] = int(self.items[i].get("record", {}).get("synthetic", {}).get("hard_chunk", 0))
        return item


def tiny_model(seed: int = 0, **overrides) -> DreamIDVTransformer:
    """``tiny_config('full')`` (dim 64, 2 layers, 4 heads of 16) with ``overrides``, seeded random init."""
    torch.manual_seed(seed)
    return init_random_(DreamIDVTransformer(tiny_config("full", text_dim=TEXT_DIM, **overrides)), seed=seed)


def text_context() -> torch.Tensor:
    return torch.randn(4, TEXT_DIM, generator=torch.Generator().manual_seed(123))


def palette_embedding(centred: torch.Tensor, width: float = 40.0) -> torch.Tensor:
    """A sharper stand-in encoder on a centred mean colour [N, 3] (0..1 - 0.5) -> [N, 6]: Gaussian
    responses (``width`` in RGB 0..255) to the 6 face colours of tests/synthetic_data.py. The cosine
    falls from 1 to ~0 within a few tens of RGB, where the plain centred colour's cosine stays above 0.8."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from synthetic_data import FACE_COLOURS

    pal = torch.tensor(FACE_COLOURS, dtype=torch.float32) / 255.0 - 0.5              # [6, 3]
    d2 = (centred.float()[:, None] - pal[None]).pow(2).sum(-1) * 255.0 ** 2           # [N, 6]
    return torch.exp(-d2 / (2 * width ** 2)) + 1e-6


def reference_identity(identity: torch.Tensor, white_tol: float = 0.12, encoder: str = "colour") -> torch.Tensor:
    """Stand-in identity embedding of the reference photos: identity [B, 3, 1, H, W] in [-1, 1] (the face
    on white) -> [B, 3] centred mean colour (0..1 - 0.5) of the pixels that are not white ("colour"), or
    its :func:`palette_embedding` [B, 6] ("palette")."""
    px = identity[:, :, 0].float().add(1).div(2)                      # [B, 3, H, W] 0..1
    m = ((1 - px).abs().amax(dim=1, keepdim=True) > white_tol).float()  # [B, 1, H, W]
    c = (px * m).sum(dim=(2, 3)) / m.sum(dim=(2, 3)).clamp(min=1) - 0.5
    return palette_embedding(c) if encoder == "palette" else c


class MaskedColourEncoder:
    """Stand-in identity encoder for :func:`training.irl.identity_coherence_weights`: the centred mean
    colour inside the known face mask. ``identity_coherence_weights`` calls it once per VAE chunk c in
    order, with frames [B * k, 3, H, W] in [0, 1] (k = 1: the chunk's last frame); the encoder picks the
    mask of that frame from ``mask`` [B, 3, F, H, W] (an ArcFace model finds the face itself)."""

    def __init__(self, mask: torch.Tensor, encoder: str = "colour"):
        self.mask, self.chunk, self.encoder = mask, 0, encoder

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        fi = 0 if self.chunk == 0 else TEMPORAL * self.chunk
        self.chunk += 1
        m = (self.mask[:, 0, fi] > 0.5).float()[:, None]                 # [B, 1, H, W]
        if frames.shape[0] != m.shape[0]:
            raise ValueError("MaskedColourEncoder scores one frame per chunk (frames_per_chunk=1)")
        c = (frames * m).sum(dim=(2, 3)) / m.sum(dim=(2, 3)).clamp(min=1) - 0.5
        return palette_embedding(c) if self.encoder == "palette" else c


def make_loss(vae, context, irl: bool, delta: float = 0.1, identity_dropout: float = 0.1, encoder: str = "colour",
              stats: Optional[List] = None, max_sigma: Optional[float] = None):
    """loss_fn(model, batch, generator) for :func:`training.trainer.train`: the flow-matching loss of
    :class:`FlowMatchingObjective` on the supervision video; with ``irl`` each chunk's loss weighted by
    :func:`training.irl.identity_coherence_weights` (Q_c = 1/(max(cos_c, 0) + delta), mean 1 per sample;
    cos_c = stand-in identity (``encoder``: "colour" or "palette") of the decoded one-step estimate vs the
    reference photo's). With ``stats`` (a list) weights are uniform where the reference was dropped (as in training/
    stages.py) or sigma >= ``max_sigma``; steps append (weights, cos [B, F'], sigma, dropped, hard chunk [B])."""
    objective = FlowMatchingObjective(shift=5.0, identity_dropout=identity_dropout)

    def loss_fn(model, batch, generator):
        with torch.no_grad():
            cond = encode_conditioning(vae, batch["video"].add(1).div(2), batch["mask"],
                                       batch["identity"][:, :, 0].add(1).div(2), context, pose=batch["pose"])
            z = vae.encode(batch["target"])
        out = objective.per_chunk_loss(model, z, cond, generator)
        if not irl:
            return out.per_chunk.mean()
        weights, cos = identity_coherence_weights(out.x0_hat, vae, MaskedColourEncoder(batch["mask"], encoder),
                                                  reference_identity(batch["identity"], encoder=encoder), 1, delta)
        if stats is not None:
            uniform = out.ref_dropped | (out.sigma.cpu() >= (math.inf if max_sigma is None else max_sigma))
            weights = torch.where(uniform[:, None], torch.ones_like(weights), weights)
            stats.append((weights, cos, out.sigma.cpu(), out.ref_dropped, torch.tensor(batch["hard_chunk"])))
        return irl_loss(out.per_chunk, weights)

    return loss_fn


def train_model(model, items, vae, context, steps: int, irl: bool, lr: float = 2e-3, batch_size: int = 4,
                seed: int = 0, identity_dropout: float = 0.1, encoder: str = "colour", delta: float = 0.1,
                stats: Optional[List] = None, max_sigma: Optional[float] = None) -> List[float]:
    from training.trainer import TrainConfig, train

    config = TrainConfig(steps=steps, lr=lr, batch_size=batch_size, seed=seed, trainable="full", warmup=10,
                         max_grad_norm=1.0, parallel="ddp")
    return train(model, ListDataset(items), make_loss(vae, context, irl, delta, identity_dropout, encoder, stats,
                                                      max_sigma), config).losses


def weight_spread(stats: List) -> Dict[str, float]:
    """``make_loss`` stats -> over the samples IRL weighted: mean/median max/min weight per sample, share > 1.5, mean
    weight of the hard chunk (1: none), mean chunk cosine, share weighted, mean max/min at sigma < / >= 0.5."""
    w, cos, sig, drop, hard = (torch.cat([s[i] for s in stats]) for i in range(5))
    ratio, weighted = w.amax(1) / w.amin(1), ~drop & ((w - 1).abs().amax(1) > 1e-7)
    hw, hc, lo = w[weighted & (hard > 0)], hard[weighted & (hard > 0)], weighted & (sig < 0.5)
    avg = lambda x: float(x.float().mean()) if len(x) else float("nan")  # noqa: E731
    med = float(ratio[weighted].median()) if weighted.any() else float("nan")
    return {"weighted": avg(weighted), "ratio_mean": avg(ratio[weighted]), "ratio_median": med,
            "ratio_gt15": avg(ratio[weighted] > 1.5), "hard_weight": avg(hw[torch.arange(len(hc)), hc]),
            "cos_mean": avg(cos[weighted]), "ratio_sig_lo": avg(ratio[lo]), "ratio_sig_hi": avg(ratio[weighted & ~lo])}


def to_frames(video: torch.Tensor) -> torch.Tensor:
    """[3, F, H, W] (any range mapped by the caller to 0..1) -> [F, H, W, 3]."""
    return video.permute(1, 2, 3, 0).contiguous()


def _measure(frames01: torch.Tensor, it) -> Dict[str, float]:
    syn = it["record"]["synthetic"]
    return measure_clip(frames01.numpy() * 255, to_frames(it["target"].add(1).div(2)).numpy() * 255,
                        to_frames(it["video"].add(1).div(2)).numpy() * 255, it["mask"][0].numpy() > 0.5,
                        syn["identity"]["identity_colour"], syn["poses"], syn["driving_identity"]["identity_colour"])


@torch.no_grad()
def evaluate(model, items, vae, context, steps: int = 8, guidance: float = 4.0) -> Dict[str, float]:
    """Run swap_face (euler, ``steps`` steps, identity guidance ``guidance``; 4 is the released default)
    on every held-out item and average :func:`measure_clip` over them."""
    model.eval()
    rows = []
    for it in items:
        f, h, w = it["video"].shape[1:]
        settings = SwapSettings(width=w, height=h, steps=steps, guidance=guidance, seed=0, sampler="euler",
                                window=f, overlap=4)
        ref_latent = vae.encode(it["identity"][None])
        res = swap_face(model, vae, to_frames(it["video"].add(1).div(2)), to_frames(it["mask"]), None, context,
                        pose=to_frames(it["pose"]), settings=settings, ref_latent=ref_latent)
        rows.append(_measure(res.frames, it))
    model.train()
    return aggregate(rows)


def evaluate_into(per: Dict[str, List[Dict]], label: str, model, items, vae, context, steps: int, guidances) -> None:
    """:func:`evaluate` at each guidance g in ``guidances``, appended to ``per[f"{label}, g {g}"]`` and printed."""
    for g in guidances:
        r = evaluate(model, items, vae, context, steps, g)
        per.setdefault(f"{label}, g {g:g}", []).append(r)
        print(f"  {label}, g {g:g}: worst-chunk {r['sim_worst_chunk']:+.3f} (min {r['sim_worst_chunk_min']:+.3f}), "
              f"id sim {r['sim_mean']:+.3f}, err->id {r['err_identity']:.1f}, pose {r['pose_err']:.2f}", flush=True)


def aggregate(rows: List[Dict[str, float]]) -> Dict[str, float]:
    out = {k: float(np.nanmean([r[k] for r in rows])) if any(not math.isnan(r[k]) for r in rows) else float("nan")
           for k in rows[0]}
    out["sim_worst_chunk_min"] = float(min(r["sim_worst_chunk"] for r in rows))
    return out


def reference_rows(items, vae) -> Dict[str, Dict[str, float]]:
    """Figures of the ground truth through the stand-in VAE and of copying the driving video (no swap)."""
    gt, copy = [], []
    for it in items:
        gt.append(_measure(to_frames(vae.decode(vae.encode(it["target"][None]))[0].add(1).div(2)), it))
        copy.append(_measure(to_frames(it["video"].add(1).div(2)), it))
    return {"target through the VAE (ceiling)": aggregate(gt), "copy the driving video": aggregate(copy)}


COLUMNS = [("sim_mean", "id sim", "{:+.3f}"), ("sim_worst_chunk", "worst-chunk", "{:+.3f}"),
           ("sim_worst_chunk_min", "min worst", "{:+.3f}"), ("err_identity", "err->id", "{:.1f}"),
           ("err_driving", "err->drv", "{:.1f}"), ("id_wins", "id wins", "{:.0%}"),
           ("pose_err", "pose px", "{:.2f}"), ("found", "found", "{:.0%}"), ("face_iou", "IoU id", "{:.2f}"),
           ("face_iou_drv", "IoU drv", "{:.2f}")]


def print_table(rows: Dict[str, Dict[str, float]]) -> None:
    width = max(len(k) for k in rows) + 2
    print("".ljust(width) + "".join(h.rjust(12) for _, h, _ in COLUMNS))
    for name, r in rows.items():
        print(name.ljust(width) + "".join(fmt.format(r[k]).rjust(12) for k, _, fmt in COLUMNS))


LEGEND = ("id sim = cosine of the centred mean face colour vs the target (stand-in identity encoder); worst-chunk "
          "= mean over clips of the lowest VAE-chunk similarity; min worst = lowest over clips; err->id / err->drv "
          "= mean colour distance (RGB) to the target / driving identity; id wins = frames nearer the target "
          "identity than the driving one; pose px = centroid error of the identity-coloured pixels; found = "
          "frames where they cover a quarter of the face; IoU id / IoU drv = IoU of the target / driving "
          f"identity's colour (tol {POSE_TOL:.0f}) with the true face mask")


def finetune(args, train_items, test_items, vae, context, seeds, guidances, per):
    """IRL as the last stage (``--finetune-irl N,M``): per seed, plain N steps, then from that same checkpoint
    (A) plain M more steps and (B) IRL M steps (same stage seed: same batches, noise, dropout; a fresh
    optimizer and warmup, as training.stages.run_curriculum starts a stage). Figures go to ``per``; returns
    (each seed's IRL :func:`weight_spread`, [(A label, B label)])."""
    n, m = (int(v) for v in args.finetune_irl.split(","))
    spread = []
    for seed in seeds:
        model, t = tiny_model(seed), time.time()
        losses = train_model(model, train_items, vae, context, n, False, args.lr, args.batch, seed,
                             args.identity_dropout)
        print(f"seed {seed} plain {n}: {time.time() - t:.0f}s, loss -> {np.mean(losses[-50:]):.3f}", flush=True)
        base = {k: v.clone() for k, v in model.state_dict().items()}
        evaluate_into(per, f"plain {n}", model, test_items, vae, context, args.sample_steps, guidances)
        for name, irl in (("A plain", False), ("B IRL", True)):
            model.load_state_dict(base)
            stats, t = ([] if irl else None), time.time()
            losses = train_model(model, train_items, vae, context, m, irl, args.lr, args.batch, seed + 1000,
                                 args.identity_dropout, args.irl_encoder, args.irl_delta, stats, args.irl_max_sigma)
            spread += [weight_spread(stats)] if irl else []
            extra = "; IRL weights: " + ", ".join(f"{k} {v:.2f}" for k, v in spread[-1].items()) if irl else ""
            print(f"seed {seed} {name} +{m}: {time.time() - t:.0f}s, loss {np.mean(losses[-50:]):.3f}{extra}")
            evaluate_into(per, f"{name} {n}+{m}", model, test_items, vae, context, args.sample_steps, guidances)
    return spread, [(f"A plain {n}+{m}", f"B IRL {n}+{m}")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps per training run (plain and IRL)")
    p.add_argument("--train", type=int, default=512, help="training samples")
    p.add_argument("--test", type=int, default=16, help="held-out samples")
    p.add_argument("--seeds", default="0,1,2", help="training seeds (model init, batches, noise); data fixed")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--identity-dropout", type=float, default=0.1)
    p.add_argument("--sample-steps", type=int, default=8)
    p.add_argument("--guidance", default="0,2,4", help="identity guidance values at evaluation (released: 4)")
    p.add_argument("--hard-chunk", type=float, default=DATA_OPTIONS["hard_chunk"])
    p.add_argument("--no-irl", action="store_true", help="plain training only")
    p.add_argument("--irl-encoder", choices=("colour", "palette"), default="colour",
                   help="stand-in identity encoder of the IRL weights (palette: sharper, see palette_embedding)")
    p.add_argument("--finetune-irl", metavar="N,M", help="IRL as the last stage: plain N steps, then from that "
                   "checkpoint plain M vs IRL M steps (instead of the from-scratch comparison)")
    p.add_argument("--irl-delta", type=float, default=0.1, help="Q_c = 1/(cos_c + delta) (--finetune-irl)")
    p.add_argument("--irl-max-sigma", type=float, help="uniform weights at sigma >= this (--finetune-irl)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    seeds = [int(v) for v in args.seeds.split(",")]
    guidances = [float(v) for v in args.guidance.split(",")]
    t0 = time.time()
    vae, context = PoolVAE(), text_context()
    with tempfile.TemporaryDirectory() as tmp:
        train_items, test_items = make_data(tmp, args.train, args.test,
                                            options=dict(DATA_OPTIONS, hard_chunk=args.hard_chunk))
    print(f"data: {len(train_items)} train / {len(test_items)} held-out samples, 9 frames 64x48, hard chunk "
          f"p={args.hard_chunk} ({time.time() - t0:.1f}s)")
    rows = reference_rows(test_items, vae)
    per_seed: Dict[str, List[Dict[str, float]]] = {}
    if args.finetune_irl:
        spread, pairs = finetune(args, train_items, test_items, vae, context, seeds, guidances, per_seed)
        keys = ("sim_worst_chunk", "sim_worst_chunk_min", "sim_mean", "err_identity", "pose_err")
    else:
        spread, keys = [], ("sim_worst_chunk", "sim_worst_chunk_min")
        pairs = [] if args.no_irl else [(f"plain {args.steps} steps", f"IRL {args.steps} steps")]
        for seed in seeds:
            evaluate_into(per_seed, "untrained", tiny_model(seed), test_items, vae, context, args.sample_steps,
                          guidances)
            for name, irl in [("plain", False)] + ([] if args.no_irl else [("IRL", True)]):
                model, t = tiny_model(seed), time.time()
                losses = train_model(model, train_items, vae, context, args.steps, irl, args.lr, args.batch, seed,
                                     args.identity_dropout, args.irl_encoder)
                print(f"seed {seed} {name}: {args.steps} steps in {time.time() - t:.0f}s, loss "
                      f"{np.mean(losses[:10]):.3f} -> {np.mean(losses[-50:]):.3f}", flush=True)
                evaluate_into(per_seed, f"{name} {args.steps} steps", model, test_items, vae, context,
                              args.sample_steps, guidances)
    rows.update({f"{name} ({len(rs)} seeds)": {k: float(np.mean([r[k] for r in rs])) for k in rs[0]}
                 for name, rs in per_seed.items()})
    print(f"\nheld-out: {len(test_items)} clips, swap_face euler {args.sample_steps} steps, g = identity guidance; "
          f"figures = mean over seeds {seeds}; IRL: delta {args.irl_delta}, encoder {args.irl_encoder}, max sigma "
          f"{args.irl_max_sigma}; {LEGEND}\n")
    print_table(rows)
    if spread:
        print("IRL weights, seed mean: " + ", ".join(f"{k} {np.mean([s[k] for s in spread]):.3f}" for k in spread[0]))
    for (a_name, b_name), g, key in ((p, g, k) for p in pairs for g in guidances for k in keys):
        d = [y[key] - x[key] for x, y in zip(per_seed[f"{a_name}, g {g:g}"], per_seed[f"{b_name}, g {g:g}"])]
        print(f"g {g:g}: {b_name} - {a_name}, {key} per seed: {', '.join(f'{v:+.3f}' for v in d)} (mean "
              f"{np.mean(d):+.3f}; higher in {sum(v > 0 for v in d)}/{len(d)} seeds)")
    print(f"total {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
