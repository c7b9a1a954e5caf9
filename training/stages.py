"""Training stages and the sync-to-real curriculum.

Stages (the paper's recipe; the dataset format is training/DATASET.md):

* ``"synthetic"``: forward samples ``{I_r, V_g, V_r}``, supervised by their target (V_g);
* ``"real"``: backward samples ``{I_r, V_r, V_g'}``, supervised by their target (the real V_r);
* ``"irl"``: every sample, each VAE temporal chunk's flow-matching loss weighted by the
  Identity-Coherence RL weight of its one-step estimate (:mod:`training.irl`).

:func:`make_loss_fn` turns a stage into the trainer's ``loss_fn(model, batch, generator)``: the frozen
VAE encodes the collated batch (:mod:`training.dataset` keys, tensors [B, 3, F, H, W]) under ``no_grad``
exactly as the sampler builds its conditioning (:func:`training.objective.encode_conditioning`), then
:class:`training.objective.FlowMatchingObjective` computes the loss.

:func:`run_curriculum` runs stages in order with per-stage step counts, one checkpoint folder per stage
(``<checkpoint_dir>/stage<k>_<name>/step_NNNNNN``). With ``config.resume`` a finished stage (its latest
checkpoint is at its step count) is skipped, the first unfinished stage resumes from its own checkpoint,
or, when it has none, starts from the previous stage's final weights.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from dreamidv_core.errors import InputError
from . import checkpoint as ckpt
from .dataset import DataOptions, DreamIDVDataset, scan_dataset
from .irl import identity_coherence_weights, irl_loss
from .latent_cache import batch_latents
from .objective import FlowMatchingObjective, TrainingConditioning, frozen_vae_for
from .trainer import TrainConfig, TrainResult, derive_seed, load_model_weights, select_trainable, train

__all__ = ["STAGES", "STAGE_DIRECTIONS", "make_loss_fn", "stage_dataset", "parse_stages", "run_curriculum",
           "CurriculumResult", "colour_identity_encoder", "insightface_identity_encoder"]

STAGES = ("synthetic", "real", "irl")
STAGE_DIRECTIONS = {"synthetic": ("forward",), "real": ("backward",), "irl": ("forward", "backward")}

IdentityEncoder = Callable[[torch.Tensor], torch.Tensor]  # [n, 3, H, W] in [0, 1] -> [n, D]


def _check_stage(stage, what: str = "stage") -> str:
    if stage not in STAGES:
        raise InputError(f"{what}: unknown stage {stage!r}; known stages: {', '.join(STAGES)}")
    return stage


# ---------------------------------------------------------------------------- identity encoders
def colour_identity_encoder(images: torch.Tensor) -> torch.Tensor:
    """A stand-in identity encoder for tests: images [n, 3, H, W] in [0, 1] -> unit mean colour [n, 3]."""
    return torch.nn.functional.normalize(images.float().mean(dim=(2, 3)), dim=1, eps=1e-6)


def insightface_identity_encoder(pack_dir, provider: str = "CPU", dim: int = 512) -> IdentityEncoder:
    """ArcFace (insightface pack folder) as an identity encoder: [n, 3, H, W] in [0, 1] -> [n, dim];
    a frame without a detected face embeds to zeros (cosine 0: the largest IRL weight)."""
    import numpy as np

    from dreamidv_core.eval.identity_report import insightface_embedder

    embed = insightface_embedder(pack_dir, provider)

    def encode(images: torch.Tensor) -> torch.Tensor:
        frames = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
        frames = frames.permute(0, 2, 3, 1).cpu().numpy()  # [n, H, W, 3] RGB uint8
        out = torch.zeros(len(frames), dim)
        for i, e in enumerate(embed(frames)):
            if e is not None:
                out[i] = torch.from_numpy(np.asarray(e, np.float32).reshape(-1)[:dim])
        return out

    return encode


# ---------------------------------------------------------------------------- the loss
def make_loss_fn(stage: str, vae, context: torch.Tensor, objective: Optional[FlowMatchingObjective] = None,
                 identity_encoder: Optional[IdentityEncoder] = None, identity_delta: float = 0.1,
                 frames_per_chunk: int = 1, latent_cache=None) -> Callable:
    """-> ``loss_fn(model, batch, generator)`` -> scalar loss for ``stage``.

    The VAE latents come from :func:`training.latent_cache.batch_latents`: read from the dataset's latent
    cache where the item was served from it, else encoded (and written to ``latent_cache``). The objective's
    temporal TV penalty (``objective.temporal_tv`` > 0) is added to every stage's loss.

    batch: collated :class:`training.dataset.DreamIDVDataset` items (video/target [B, 3, F, H, W] in
    [-1, 1], mask/pose [B, 3, F, H, W] in [0, 1], identity [B, 3, 1, H, W] in [-1, 1]); vae: frozen,
    ``encode``/``decode`` on normalised latents (moved to the batch's device on first use);
    context: [L, text_dim] text context shared by the batch. For ``"irl"``, ``identity_encoder``
    (frames [n, 3, H, W] in [0, 1] -> [n, D]) scores the decoded one-step estimate against the
    encoder's embedding of ``batch["identity"]``. A model with an active ArcFace ID-token projection
    (training it: ``trainable="id_projection"``, or a trained one) gets the same embedding of
    ``batch["identity"]`` as its ``id_embedding`` (D must be the projection's ``id_embed_dim``; zeroed
    with the reference under identity dropout), so it needs ``identity_encoder`` in every stage.
    """
    _check_stage(stage)
    if stage == "irl" and identity_encoder is None:
        raise InputError("stage 'irl' needs an identity encoder (ArcFace, 'insightface:<pack folder>')")
    if not torch.is_tensor(context) or context.dim() != 2:
        raise InputError(f"text context must be a tensor [tokens, text_dim], got "
                         f"{list(context.shape) if torch.is_tensor(context) else type(context).__name__}")
    objective = objective or FlowMatchingObjective()
    if isinstance(vae, nn.Module):
        vae.requires_grad_(False).eval()

    def loss_fn(model, batch: Dict, generator: torch.Generator) -> torch.Tensor:
        dit = getattr(model, "module", model)
        if "identity" not in batch:
            raise InputError("training batch lacks 'identity'; expected training.dataset.DreamIDVDataset items")
        device = batch["identity"].device
        with frozen_vae_for(vae, device):
            ref01 = batch["identity"][:, :, 0].float().add(1).div(2)
            lat = batch_latents(batch, vae, latent_cache)
            cond = TrainingConditioning(context=context.to(device), y=torch.cat([lat["video"], lat["mask"]], dim=1),
                                        ref_latent=lat["identity"], pose=batch.get("pose"))
            z = lat["target"]
            ident = None
            if getattr(dit, "id_projection_active", False):
                cond.id_embedding = ident = _id_embedding(dit, identity_encoder, ref01)
        if stage != "irl":
            return objective.loss(dit, z, cond, generator)
        chunks = objective.per_chunk_loss(dit, z, cond, generator)
        with frozen_vae_for(vae, device):
            ident = identity_encoder(ref01) if ident is None else ident
            weights, _ = identity_coherence_weights(chunks.x0_hat, vae, identity_encoder, ident,
                                                    frames_per_chunk, identity_delta)
            # a sample whose reference was dropped cannot know the identity: plain (uniform) weights
            dropped = chunks.ref_dropped.to(weights.device)[:, None]
            weights = torch.where(dropped, torch.ones_like(weights), weights)
        return irl_loss(chunks.per_chunk, weights) + objective.regulariser(chunks, z)

    return loss_fn


def _id_embedding(dit, identity_encoder: Optional[IdentityEncoder], ref01: torch.Tensor) -> torch.Tensor:
    """references [B, 3, H, W] in [0, 1] -> [B, id_embed_dim] embeddings for the ID-token projection."""
    dim = dit.cfg.id_embed_dim
    if identity_encoder is None:
        raise InputError("this model's ArcFace ID-token projection trains or is used: give an identity encoder "
                         "(identity_encoder: 'insightface:<pack folder>') to embed each sample's reference")
    emb = identity_encoder(ref01).float()
    if emb.dim() != 2 or emb.shape != (ref01.shape[0], dim):
        raise InputError(f"the identity encoder gave {list(emb.shape)} for {ref01.shape[0]} references; the ID "
                         f"projection takes [{ref01.shape[0]}, {dim}] (ArcFace: 512)")
    return emb.to(ref01.device)


# ---------------------------------------------------------------------------- data
def stage_dataset(root, stage: str, width: int, height: int, frames: Optional[int], seed: int = 0,
                  **options) -> DreamIDVDataset:
    """The samples of ``root`` that ``stage`` trains on (synthetic: forward, real: backward, irl: all).
    ``options``: :class:`training.dataset.DreamIDVDataset` options (still_ratio, occlusion, latent_cache)."""
    _check_stage(stage)
    samples = scan_dataset(root)
    wanted = STAGE_DIRECTIONS[stage]
    chosen = [s for s in samples if s.direction in wanted]
    if not chosen:
        found = sorted({s.direction for s in samples})
        raise InputError(f"dataset folder {root} has no {'/'.join(wanted)} samples for stage {stage!r} "
                         f"(its {len(samples)} samples are {', '.join(found)}); record.json 'direction' decides")
    return DreamIDVDataset(root, width, height, frames, seed, samples=chosen, **options)


def parse_stages(stages) -> List[Dict]:
    """Validate a curriculum: a list of ``{"stage": name, "steps": n}`` -> the same, normalised."""
    if isinstance(stages, dict) or not isinstance(stages, (list, tuple)) or not stages:
        raise InputError(f"stages: expected a non-empty list of {{'stage': one of {list(STAGES)}, 'steps': n}}, "
                         f"got {stages!r}")
    out = []
    for i, s in enumerate(stages):
        if not isinstance(s, dict) or set(s) - {"stage", "steps"} or "stage" not in s or "steps" not in s:
            raise InputError(f"stages[{i}]: expected {{'stage': name, 'steps': n}}, got {s!r}")
        _check_stage(s["stage"], f"stages[{i}].stage")
        steps = s["steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise InputError(f"stages[{i}].steps must be a positive integer, got {steps!r}")
        out.append({"stage": s["stage"], "steps": steps})
    return out


# ---------------------------------------------------------------------------- curriculum
@dataclasses.dataclass
class CurriculumResult(TrainResult):
    """losses: every optimizer step of every stage, in order; stages: (name, that stage's TrainResult)."""
    stages: List[tuple] = dataclasses.field(default_factory=list)


def _load_final_weights(model: nn.Module, folder: Path, config: TrainConfig) -> None:
    """Copy the trained tensors of a finished stage's checkpoint into ``model``."""
    params = select_trainable(model, config)  # adds the LoRA adapters first when they train
    load_model_weights(model, folder, params, ckpt.read_state(folder)["full_model"])


def run_curriculum(model: nn.Module, root, stages: Sequence[Dict], config: TrainConfig, vae,
                   context: torch.Tensor, identity_encoder: Optional[IdentityEncoder] = None,
                   width: int = 832, height: int = 480, frames: Optional[int] = 81, progress=None, cancel=None,
                   objective: Optional[FlowMatchingObjective] = None, identity_delta: float = 0.1,
                   frames_per_chunk: int = 1, dataset_seed: int = 0, validator=None,
                   data_options: Optional[DataOptions] = None) -> CurriculumResult:
    """Run ``stages`` ([{"stage", "steps"}]) in order on the dataset folder ``root``.

    ``data_options`` (:class:`training.dataset.DataOptions`): still/video mixing, occlusion augmentation
    and the latent cache of every stage's dataset (default: none of them).

    Each stage trains ``model`` in place with ``config`` (its ``steps`` replaced by the stage's, its seed
    derived from (config.seed, stage index, name), its checkpoints in
    ``<config.checkpoint_dir>/stage<k>_<name>``). ``progress(step, total, loss)`` counts over the whole
    curriculum; ``cancel`` as in :func:`training.trainer.train` (raises Cancelled after saving);
    ``validator`` as in :func:`training.trainer.train` (every stage; default: :func:`trainer.use_validator`'s).
    Everything is validated (stages, datasets, the IRL encoder) before the first step.
    """
    plan = parse_stages(stages)
    config.validate()
    if any(s["stage"] == "irl" for s in plan) and identity_encoder is None:
        raise InputError("the curriculum has an 'irl' stage: give an identity encoder "
                         "(identity_encoder: 'insightface:<pack folder>')")
    if config.trainable == "id_projection" and identity_encoder is None:
        raise InputError("trainable='id_projection' trains the ArcFace ID-token projection: give an identity "
                         "encoder (identity_encoder: 'insightface:<pack folder>')")
    options = (data_options or DataOptions()).build(dataset_seed, vae)
    datasets = [stage_dataset(root, s["stage"], width, height, frames, dataset_seed, **options) for s in plan]
    total = sum(s["steps"] for s in plan)
    result = CurriculumResult()
    done = 0
    previous: Optional[Path] = None  # final checkpoint of the last skipped (finished) stage
    for k, (spec, data) in enumerate(zip(plan, datasets), start=1):
        name, steps = spec["stage"], spec["steps"]
        stage_dir = Path(config.checkpoint_dir) / f"stage{k}_{name}" if config.checkpoint_dir else None
        stage_cfg = dataclasses.replace(config, steps=steps, checkpoint_dir=str(stage_dir) if stage_dir else None,
                                        seed=derive_seed(config.seed, "stage", k, name) % (2 ** 31))
        if config.resume:
            latest = ckpt.find_latest(stage_dir)
            state = ckpt.read_state(latest) if latest is not None else None
            if state is not None and int(state["step"]) >= steps:  # finished: skip, keep its record
                stage_res = TrainResult(list(state["losses"])[:steps], steps, latest)
                result.stages.append((name, stage_res))
                result.losses += stage_res.losses
                done += steps
                result.steps, result.last_checkpoint, previous = done, latest, latest
                continue
            if latest is None and previous is not None:
                _load_final_weights(model, previous, stage_cfg)
            previous = None
        loss_fn = make_loss_fn(name, vae, context, objective, identity_encoder, identity_delta, frames_per_chunk,
                               latent_cache=options["latent_cache"])
        offset = done
        stage_progress = None if progress is None else (lambda s, n, loss, _o=offset: progress(_o + s, total, loss))
        stage_res = train(model, data, loss_fn, stage_cfg, progress=stage_progress, cancel=cancel, validator=validator)
        result.stages.append((name, stage_res))
        result.losses += stage_res.losses
        done += steps
        result.steps, result.last_checkpoint = done, stage_res.last_checkpoint or result.last_checkpoint
    if previous is not None:  # every remaining stage was already finished: hand back the trained weights
        _load_final_weights(model, previous, dataclasses.replace(config, steps=1))
    return result
