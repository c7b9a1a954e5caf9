"""IVS training: first-last-frame reconstruction on ordinary talking-head clips.

Data (training/DATASET.md, "IVS clip dataset"): a folder of clip folders, each with ``video.mp4`` and
``pose.mp4`` (same frame count and size, >= 5 frames). :class:`IVSClipDataset` returns a random 4n+1
window per clip (deterministic per seed, epoch, index), prepared like the sampler's inputs.

Objective: the clip's own first and last frames condition the model exactly as
:func:`dreamidv_core.pipelines.ivs.flf_conditioning` does at inference (``y`` = 4 mask channels + the VAE latent of
``[first, 0..., last]``), the pose video drives the pose attention, and the DiT learns the flow-matching
velocity of the whole clip's latent (:class:`training.objective.FlowMatchingObjective`, the released
convention; no reference latent). ``text_dropout`` replaces the text context by the empty context for a
fraction of the samples, so that text guidance with an empty negative works at inference.

For the trainer's stage registry: :func:`make_ivs_loss_fn` (like ``stages.make_loss_fn``) and
:func:`ivs_dataset` (like ``stages.stage_dataset``); :func:`train_ivs` runs :func:`training.trainer.train`.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from dreamidv_core.errors import InputError
from dreamidv_core.models.frame_grid import MIN_FRAMES, TEMPORAL_STRIDE
from dreamidv_core.models.ivs import flf_mask, flf_pixel_mask
from dreamidv_core.pipelines.ivs import check_ivs_model
from dreamidv_core.io.video import read_video
from dreamidv_core.preprocess.video_ops import prepare_frames
from .dataset import floor_4n1, probe_video
from .objective import FlowMatchingObjective, TrainingConditioning, frozen_vae_for
from .trainer import TrainConfig, TrainResult, collate, train

__all__ = ["IVSClipDataset", "scan_ivs_clips", "ivs_dataset", "make_ivs_loss_fn", "train_ivs", "CLIP_FILES"]

CLIP_FILES = ("video.mp4", "pose.mp4")


def scan_ivs_clips(root) -> List[Dict]:
    """Validate every clip folder of ``root`` -> [{"path", "frames", "width", "height"}] (sorted by name)."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"IVS clip dataset {root}: folder not found")
    clips = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        missing = [f for f in CLIP_FILES if not (folder / f).is_file()]
        if missing:
            raise InputError(f"IVS clip {folder}: missing {', '.join(missing)} (each clip folder needs "
                             f"{' and '.join(CLIP_FILES)}; see training/DATASET.md)")
        (n, w, h), (pn, pw, ph) = (probe_video(folder / f, folder) for f in CLIP_FILES)
        if (pn, pw, ph) != (n, w, h):
            raise InputError(f"IVS clip {folder}: pose.mp4 is {pn} frames of {pw}x{ph}, video.mp4 {n} frames of "
                             f"{w}x{h}; they must match")
        if n < MIN_FRAMES:
            raise InputError(f"IVS clip {folder}: {n} frames; at least {MIN_FRAMES} needed")
        clips.append({"path": folder, "frames": n, "width": w, "height": h})
    if not clips:
        raise InputError(f"IVS clip dataset {root}: no clip folders (each with {' and '.join(CLIP_FILES)})")
    return clips


class IVSClipDataset(Dataset):
    """Items: video [3, F, H, W] in [-1, 1], pose [3, F, H, W] in [0, 1], index, start, path.

    F = ``frames`` (4n+1 >= 5) or each clip floored to 4n+1 (None); longer clips give a random window,
    the same for the same (seed, epoch, index).
    """

    def __init__(self, root, width: int = 832, height: int = 480, frames: Optional[int] = 81, seed: int = 0):
        if frames is not None and (frames < MIN_FRAMES or (frames - 1) % TEMPORAL_STRIDE):
            raise InputError(f"frames must be 4n+1 and at least {MIN_FRAMES}, got {frames}")
        self.clips = scan_ivs_clips(root)
        short = [c for c in self.clips if frames is not None and c["frames"] < frames]
        if short:
            raise InputError(f"IVS clip {short[0]['path']}: {short[0]['frames']} frames, shorter than frames={frames}")
        self.width, self.height, self.frames, self.seed, self.epoch = width, height, frames, seed, 0

    def __len__(self) -> int:
        return len(self.clips)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> Dict:
        clip = self.clips[index]
        length = self.frames or floor_4n1(clip["frames"])
        rng = random.Random(f"{self.seed}:{self.epoch}:{index}")
        start = rng.randint(0, clip["frames"] - length)
        out = {"index": index, "start": start, "path": str(clip["path"])}
        for key, name in (("video", "video.mp4"), ("pose", "pose.mp4")):
            frames, _ = read_video(clip["path"] / name, max_frames=start + length)
            if len(frames) < start + length:
                raise InputError(f"IVS clip {clip['path']}: {name} decoded {len(frames)} frames, expected "
                                 f"{clip['frames']}")
            x = prepare_frames(frames[start:start + length], length, self.width, self.height, f"{clip['path']}/{name}")
            out[key] = x.mul(2).sub(1) if key == "video" else x
        return out

    @staticmethod
    def collate(items: List[Dict]) -> Dict:
        sizes = {tuple(i["video"].shape) for i in items}
        if len(sizes) > 1:
            raise InputError(f"IVS batch mixes prepared sizes {sorted(sizes)}; use batch_size 1 or same-size clips")
        return collate(items)


def ivs_dataset(root, width: int, height: int, frames: Optional[int], seed: int = 0) -> IVSClipDataset:
    """The IVS stage's dataset (like ``stages.stage_dataset``)."""
    return IVSClipDataset(root, width, height, frames, seed)


@torch.no_grad()
def encode_ivs_batch(vae, video: torch.Tensor):
    """video [B, 3, F, H, W] in [-1, 1] (F = 4n+1) -> (z [B, 16, F', h, w], y [B, 20, F', h, w]): the
    clip's latent and the FLF conditioning of its own first and last frames (as at inference)."""
    if video.dim() != 5 or video.shape[1] != 3 or (video.shape[2] - 1) % TEMPORAL_STRIDE or video.shape[2] < MIN_FRAMES:
        raise InputError(f"IVS batch video must be [B, 3, 4n+1 >= 5, H, W], got {list(video.shape)}")
    z = vae.encode(video)
    known = torch.zeros_like(video)
    known[:, :, 0], known[:, :, -1] = video[:, :, 0], video[:, :, -1]
    fl = vae.encode(known)
    mask = flf_mask(flf_pixel_mask(video.shape[2]), *fl.shape[-2:]).to(fl)
    return z, torch.cat([mask.expand(fl.shape[0], -1, -1, -1, -1), fl], dim=1)


def make_ivs_loss_fn(vae, context: torch.Tensor, objective: Optional[FlowMatchingObjective] = None,
                     text_dropout: float = 0.1) -> Callable:
    """-> ``loss_fn(model, batch, generator)`` (training.trainer protocol) for the IVS.

    batch: collated :class:`IVSClipDataset` items (video [B, 3, F, H, W] in [-1, 1], pose [B, 3, F, H, W] in
    [0, 1]); vae: frozen, ``encode`` on normalised latents; context [L, text_dim]. Randomness: the
    text-dropout draw, then the objective's (sigma, dropout, noise), all from ``generator``.
    """
    if not torch.is_tensor(context) or context.dim() != 2:
        raise InputError("text context must be a tensor [tokens, text_dim]")
    if not 0.0 <= text_dropout <= 1.0:
        raise InputError(f"text_dropout must be in [0, 1], got {text_dropout}")
    objective = objective or FlowMatchingObjective()
    if isinstance(vae, nn.Module):
        vae.requires_grad_(False).eval()

    def loss_fn(model, batch: Dict, generator: torch.Generator) -> torch.Tensor:
        dit = getattr(model, "module", model)
        check_ivs_model(dit)
        missing = [k for k in ("video", "pose") if k not in batch]
        if missing:
            raise InputError(f"IVS training batch lacks {missing}; expected training.ivs.IVSClipDataset items")
        device = batch["video"].device
        with frozen_vae_for(vae, device):
            z, y = encode_ivs_batch(vae, batch["video"].float())
        b = z.shape[0]
        drop = torch.rand(b, generator=generator) < text_dropout
        ctx = context.to(device)
        empty = ctx.new_zeros(0, ctx.shape[1])
        contexts = [empty if d else ctx for d in drop.tolist()]
        cond = TrainingConditioning(context=contexts if b > 1 else contexts[0], y=y, ref_latent=None,
                                    pose=batch["pose"].float())
        return objective.loss(dit, z, cond, generator)

    return loss_fn


def train_ivs(model: nn.Module, root, config: TrainConfig, vae, context: torch.Tensor, width: int = 832,
              height: int = 480, frames: Optional[int] = 81, text_dropout: float = 0.1,
              objective: Optional[FlowMatchingObjective] = None, progress=None, cancel=None,
              dataset_seed: int = 0) -> TrainResult:
    """Train an IVS (``dreamidv_core.pipelines.ivs``) in place on the clip folder ``root`` with :func:`training.trainer.train`."""
    check_ivs_model(model)
    data = ivs_dataset(root, width, height, frames, dataset_seed)
    return train(model, data, make_ivs_loss_fn(vae, context, objective, text_dropout), config,
                 progress=progress, cancel=cancel)
