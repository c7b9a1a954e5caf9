"""DreamID-V node: fine-tuning (synthetic, real-augmentation, Identity-Coherence RL, or the curriculum).

``DreamIDVIRLFineTune``: model + VAE + text context + a dataset folder (training/DATASET.md) -> the tuned
model (a new DREAMIDV_MODEL; the input model is never modified: its weights are copied first), a
loss-curve image and the path of the last checkpoint (safetensors; for LoRA it holds ``lora.safetensors``,
which DreamIDVModelLoader's ``lora`` option applies).

The training itself is :func:`training.stages.run_curriculum` (one checkpoint folder per stage under the
checkpoint folder; ``resume`` continues the last run there). ComfyUI's Cancel stops training before the
next step: the trainer saves a resumable checkpoint, then the node raises ComfyUI's interruption.
``validate_every`` > 0 adds the identity-report validation (:mod:`training.validation`): its mean
similarity is drawn on the loss curve, every number goes to ``metrics.jsonl`` in each stage's folder.
The appended recipe widgets (:func:`training_recipe`) switch on image-video hybrid training (``still_ratio``),
the occlusion augmentation, the temporal TV penalty, the on-disk latent cache (under the checkpoint folder)
and DataLoader workers; ``trains=modulation`` trains only the adaptive-norm modulation.
"""
from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import List, Sequence

import numpy as np
import torch

import comfy.model_management as mm
import comfy.model_patcher
import comfy.utils
import folder_paths
from comfy_api.latest import io

from dreamidv_core.pipelines.adapters import PixelSpaceVAE
from dreamidv_core.errors import Cancelled, InputError

from . import common
from .loaders import LoadedDiT
from .sampler import conditioning_context

log = logging.getLogger(__name__)

STAGE_CHOICES = ("synthetic", "real", "irl", "curriculum", "ivs")
CURRICULUM = ("synthetic", "real", "irl")
TRAINS = ("lora", "pose", "full", "id_projection", "modulation")
ID_TOKENS, ARCFACE_DIM = 4, 512  # a fresh ID-token projection: tokens, ArcFace embedding width
DEFAULT_CHECKPOINT_DIR = "dreamidv_training"
VALIDATION_SAMPLES = 2
VALIDATION_STEPS = 4


def _stages():
    """training.stages, imported when a run starts (the pack loads without the training extras)."""
    from ..training import stages
    return stages


def resolve_checkpoint_folder(value: str) -> Path:
    """An absolute path as given; a relative one under ComfyUI's output folder."""
    value = (value or "").strip() or DEFAULT_CHECKPOINT_DIR
    path = Path(os.path.expanduser(value))
    return path if path.is_absolute() else Path(folder_paths.get_output_directory()) / path


def resolve_dataset_folder(value: str) -> Path:
    """The dataset folder, or an InputError naming it and what was expected."""
    raw = (value or "").strip()
    if not raw:
        raise InputError("dataset_folder: empty; give the folder of training samples (format: training/DATASET.md)")
    path = Path(os.path.expanduser(raw))
    if not path.is_dir():
        raise InputError(f"dataset_folder '{raw}' is not a folder; give a folder of sample folders "
                         "(identity.png, driving.mp4, mask.mp4, target.mp4, record.json: training/DATASET.md)")
    return path


def stage_plan(stage: str, steps: int) -> List[dict]:
    """``[{"stage", "steps"}]``: one stage, or synthetic -> real -> irl with ``steps`` each."""
    if stage == "curriculum":
        return [{"stage": s, "steps": int(steps)} for s in CURRICULUM]
    if stage not in STAGE_CHOICES:
        raise InputError(f"stage must be one of {', '.join(STAGE_CHOICES)}, got '{stage}'")
    return [{"stage": stage, "steps": int(steps)}]


def trainable_copy(model) -> torch.nn.Module:
    """A deep copy of ``model.dit`` with ordinary (grad-capable) tensors, even when the input was loaded
    under ComfyUI's ``torch.inference_mode`` (inference tensors cannot take part in autograd)."""
    with torch.inference_mode(False):
        dit = copy.deepcopy(model.dit)
        with torch.no_grad():
            for mod in dit.modules():
                for name, p in list(mod._parameters.items()):
                    if p is not None:
                        mod._parameters[name] = torch.nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
                for name, b in list(mod._buffers.items()):
                    if b is not None:
                        mod._buffers[name] = b.detach().clone()
    return dit


def training_recipe(checkpoint_dir: Path, still_ratio: float, occlusion: float, temporal_tv: float,
                    latent_cache: bool):
    """The node's recipe widgets -> (training.dataset.DataOptions, training.objective.FlowMatchingObjective)."""
    from ..training.dataset import DataOptions
    from ..training.objective import FlowMatchingObjective

    ratio = None if float(still_ratio) < 0 else float(still_ratio)
    options = DataOptions(still_ratio=ratio, occlusion=float(occlusion or 0.0),
                          latent_cache=str(Path(checkpoint_dir) / "latent_cache") if latent_cache else None)
    return options, FlowMatchingObjective(temporal_tv=float(temporal_tv or 0.0))


VALIDATION_COLOUR = (40, 160, 60)


def plot_losses(losses: Sequence[float], boundaries: Sequence[int] = (), width: int = 640,
                height: int = 320, validation: Sequence[tuple] = ()) -> np.ndarray:
    """Loss per step as a line plot -> uint8 [height, width, 3] (stage boundaries as vertical lines).

    validation: (step, mean identity similarity) pairs (step 0 = before training), drawn in green on
    a 0..1 scale (right axis)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 60, width - 15, 25, height - 35
    d.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    vals = np.asarray([v for v in losses], np.float64)
    finite = vals[np.isfinite(vals)]
    d.text((left, 5), f"training loss ({len(vals)} steps)", fill=(0, 0, 0))
    if finite.size:
        lo, hi = float(finite.min()), float(finite.max())
        if hi - lo < 1e-12:
            lo, hi = lo - 0.5, hi + 0.5
        n = max(1, len(vals) - 1)

        def xy(i, v):
            return (left + (right - left) * i / n, bottom - (bottom - top) * (v - lo) / (hi - lo))
        for b in boundaries:
            x = left + (right - left) * b / n
            d.line([x, top, x, bottom], fill=(190, 190, 190))
        pts = [xy(i, v) for i, v in enumerate(vals) if np.isfinite(v)]
        if len(pts) > 1:
            d.line(pts, fill=(30, 90, 200), width=2)
        for p in pts if len(pts) <= 60 else []:
            d.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=(30, 90, 200))
        d.text((5, top), f"{hi:.4g}", fill=(0, 0, 0))
        d.text((5, bottom - 10), f"{lo:.4g}", fill=(0, 0, 0))
        d.text((left, bottom + 8), "step 1", fill=(0, 0, 0))
        d.text((right - 60, bottom + 8), f"step {len(vals)}", fill=(0, 0, 0))
    val = [(float(st), float(v)) for st, v in validation if v is not None and np.isfinite(v)]
    if val:
        span = max(1.0, float(len(vals)))
        pts = [(left + (right - left) * st / span, bottom - (bottom - top) * min(max(v, 0.0), 1.0)) for st, v in val]
        if len(pts) > 1:
            d.line(pts, fill=VALIDATION_COLOUR, width=2)
        for p in pts:
            d.rectangle([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=VALIDATION_COLOUR)
        d.text((width - 250, 5), f"identity sim (validation): {val[-1][1]:.3f}", fill=VALIDATION_COLOUR)
    return np.array(img, np.uint8)


class DreamIDVIRLFineTune(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        from dreamidv_core.preprocess import identity as face_core

        return io.Schema(
            node_id="DreamIDVIRLFineTune",
            display_name="DreamID-V Fine-Tune (IRL)",
            category=common.CATEGORY,
            description="Fine-tunes a DreamID-V model on a dataset folder: synthetic pairs, real augmentation, "
                        "Identity-Coherence RL, or all three in order. Returns a tuned copy (the input model is "
                        "unchanged), the loss curve and the checkpoint folder.",
            is_output_node=True,
            inputs=[
                common.DreamIDVModel.Input("model", tooltip="From DreamIDVModelLoader (weight_dtype fp32 or bf16 to "
                                                            "train the full model; any for LoRA)."),
                io.Vae.Input("vae", tooltip="The Wan 2.1 VAE (frozen; encodes the videos, decodes frames for IRL)."),
                io.Conditioning.Input("positive", tooltip="The text context of \"chang face\" (DreamIDVTextContext)."),
                io.Combo.Input("stage", options=list(STAGE_CHOICES), default="curriculum",
                               tooltip="synthetic: forward samples, supervised by the generated video; real: backward "
                                       "samples, supervised by the real video; irl: Identity-Coherence RL (chunks "
                                       "with a weaker ArcFace identity weigh more); curriculum: the three in order, "
                                       "'steps' each; ivs: first/last-frame reconstruction of an IVS model "
                                       "(DreamIDVIVSLoader) on a folder of talking-head clips (training/DATASET.md)."),
                io.String.Input("dataset_folder", default="",
                                tooltip="Folder of sample folders (identity.png, driving.mp4, mask.mp4, target.mp4, "
                                        "pose.mp4 or keypoints.json, record.json: see training/DATASET.md)."),
                io.Int.Input("steps", default=200, min=1, max=1000000,
                             tooltip="Optimizer steps (per stage for the curriculum)."),
                io.Float.Input("learning_rate", default=1e-4, min=1e-8, max=1.0, step=1e-6,
                               tooltip="AdamW learning rate (LoRA: 1e-4; full or pose: 1e-5 or less)."),
                io.Combo.Input("trains", options=list(TRAINS), default="lora",
                               tooltip="lora: low-rank adapters on attention and FFN (small file, saved as "
                                       "lora.safetensors for the loader's lora option); pose: the pose branch only "
                                       "(full model); full: every weight (needs the most memory); id_projection: a "
                                       "new ArcFace ID-token projection; modulation: only the adaptive-norm "
                                       "modulation (blocks' and head's modulation tables, time_projection)."),
                io.Int.Input("lora_rank", default=16, min=1, max=512, tooltip="LoRA rank (alpha = rank)."),
                io.Int.Input("width", default=832, min=16, max=4096, step=16,
                             tooltip="Training area width: samples are resized (down only) into width x height, "
                                     "as the sampler does."),
                io.Int.Input("height", default=480, min=16, max=4096, step=16, tooltip="Training area height."),
                io.Int.Input("frames", default=81, min=5, max=1001, step=4,
                             tooltip="Frames per training clip (4n+1); longer samples give a random window."),
                io.Int.Input("seed", default=0, min=0, max=2 ** 31 - 1,
                             tooltip="Seed of data order, noise and timesteps (same seed: same run)."),
                io.String.Input("checkpoint_folder", default=DEFAULT_CHECKPOINT_DIR,
                                tooltip="Where checkpoints go: a relative path is under ComfyUI's output folder. One "
                                        "sub-folder per stage."),
                io.Boolean.Input("resume", default=True,
                                 tooltip="Continue the run saved in checkpoint_folder (after an interrupt) instead of "
                                         "starting over."),
                io.Combo.Input("insightface_pack", options=list(face_core.PACK_NAMES), default="antelopev2",
                               optional=True,
                               tooltip="ArcFace for the irl stage: insightface pack in models/insightface/models/<pack>/."),
                common.onnx_provider_input("ArcFace (irl stage)", optional=True),
                io.Int.Input("validate_every", default=0, min=0, max=1000000, optional=True,
                             tooltip="0: off. N: before training, every N steps and at the end, swap the first "
                                     f"{VALIDATION_SAMPLES} dataset samples ({VALIDATION_STEPS} sampler steps) and "
                                     "score them with the identity report (ArcFace, insightface_pack); the mean "
                                     "similarity is drawn on the loss curve, all numbers go to metrics.jsonl."),
                io.Float.Input("still_ratio", default=-1.0, min=-1.0, max=1.0, step=0.05, optional=True,
                               tooltip="Image-video hybrid training: share of the steps trained on still samples "
                                       "(folders with driving.png/mask.png/target.png, one-frame clips). -1: the "
                                       "folder's share of stills; 0: videos only."),
                io.Float.Input("occlusion", default=0.0, min=0.0, max=1.0, step=0.05, optional=True,
                               tooltip="Occlusion augmentation: probability that a training sample gets a moving "
                                       "hand- or object-like occluder in front of the face, in the driving and the "
                                       "supervision video alike (the mask unchanged), so the model learns to keep "
                                       "occluders. 0: off. Never used in validation."),
                io.Float.Input("temporal_tv", default=0.0, min=0.0, max=100.0, step=0.01, optional=True,
                               tooltip="Weight of a temporal total-variation penalty on the predicted clean latent "
                                       "(smoother video, DynamicFace-style). 0: off."),
                io.Boolean.Input("latent_cache", default=False, optional=True,
                                 tooltip="Cache each sample's VAE latents on disk (<checkpoint_folder>/latent_cache, "
                                         "keyed by the files' contents and the VAE): later epochs skip decoding "
                                         "and encoding. Occluded samples are never cached."),
                io.Int.Input("num_workers", default=0, min=0, max=64, optional=True,
                             tooltip="Worker processes that read and decode samples while the model trains "
                                     "(0: in the training loop)."),
            ],
            outputs=[common.DreamIDVModel.Output(display_name="model"),
                     io.Image.Output("loss_curve", display_name="loss_curve", tooltip="Loss per step."),
                     io.String.Output("checkpoint", display_name="checkpoint",
                                      tooltip="The last checkpoint folder (model.safetensors / lora.safetensors).")],
        )

    @classmethod
    def identity_encoder(cls, pack: str, provider: str):
        from dreamidv_core.preprocess import identity as face_core

        pack_dir = face_core.find_pack(folder_paths.get_folder_paths("insightface"), pack)
        return _stages().insightface_identity_encoder(pack_dir, provider)

    @classmethod
    def execute(cls, model, vae, positive, stage, dataset_folder, steps, learning_rate, trains, lora_rank,
                width, height, frames, seed, checkpoint_folder, resume, insightface_pack="antelopev2",
                provider="auto", validate_every=0, still_ratio=-1.0, occlusion=0.0, temporal_tv=0.0,
                latent_cache=False, num_workers=0) -> io.NodeOutput:
        if not isinstance(model, LoadedDiT):
            raise InputError(f"model: expected the output of DreamIDVModelLoader, got {type(model).__name__}")
        if trains not in TRAINS:
            raise InputError(f"trains must be one of {', '.join(TRAINS)}, got '{trains}'")
        if trains == "pose" and not model.dit.cfg.has_pose:
            raise InputError("trains=pose needs the full DreamID-V model (the faster one has no pose branch)")
        is_ivs = model.dit.cfg.variant == "ivs"
        if (stage == "ivs") != is_ivs:
            raise InputError("stage 'ivs' trains an IVS model (DreamIDVIVSLoader) and an IVS model trains only with "
                             f"stage 'ivs'; got stage '{stage}' with a '{model.dit.cfg.variant}' model")
        if is_ivs and (trains == "id_projection" or validate_every):
            raise InputError("the IVS has no identity input: trains=id_projection and validate_every do not apply")
        if is_ivs and (float(still_ratio) > 0 or occlusion or temporal_tv or latent_cache):
            raise InputError("stage 'ivs' trains on plain clips: still_ratio, occlusion, temporal_tv and latent_cache "
                             "apply to the DreamID-V stages only (leave them at -1 / 0 / off)")
        root = resolve_dataset_folder(dataset_folder)
        plan = stage_plan(stage, steps)
        stages = _stages()
        from ..training.trainer import TrainConfig

        context = conditioning_context(positive, model.dit.cfg.text_dim)
        validate_every = int(validate_every or 0)
        need_encoder = (validate_every > 0 or any(p["stage"] == "irl" for p in plan) or trains == "id_projection"
                        or model.dit.id_projection_active)
        encoder = cls.identity_encoder(insightface_pack, provider) if need_encoder else None
        out_dir = resolve_checkpoint_folder(checkpoint_folder)
        config = TrainConfig(steps=int(steps), lr=float(learning_rate), trainable=trains, lora_rank=int(lora_rank),
                             lora_alpha=float(lora_rank), checkpoint_dir=str(out_dir), seed=int(seed),
                             resume=bool(resume), autocast="none", validate_every=validate_every,
                             validation_samples=VALIDATION_SAMPLES, validation_steps=VALIDATION_STEPS,
                             num_workers=int(num_workers or 0))
        data_options, objective = training_recipe(out_dir, still_ratio, occlusion, temporal_tv, latent_cache)
        train_vae = PixelSpaceVAE(vae)
        validator = None
        if validate_every:
            from ..training.dataset import DreamIDVDataset
            from ..training.validation import make_identity_validator, validation_items
            items = validation_items(DreamIDVDataset(root, int(width), int(height), int(frames)), VALIDATION_SAMPLES)
            validator = make_identity_validator(items, train_vae, context, encoder, steps=VALIDATION_STEPS,
                                                seed=int(seed))
        total = sum(p["steps"] for p in plan)
        bar = comfy.utils.ProgressBar(total)
        seen: List[float] = []

        def progress(step, n, loss):  # step counts over the whole curriculum
            seen.append(float(loss))
            bar.update_absolute(min(int(step), total), total)

        def cancel() -> bool:
            return mm.processing_interrupted()

        with torch.inference_mode(False), torch.enable_grad():
            dit = trainable_copy(model)
            if trains == "id_projection" and getattr(dit, "id_projection", None) is None:
                dit.attach_id_projection(ID_TOKENS, ARCFACE_DIM)  # zero-gated: a no-op until trained
            try:
                from ..training.trainer import use_validator
                if is_ivs:
                    from ..training.ivs import train_ivs
                    result = train_ivs(dit, root, config, train_vae, context, width=int(width), height=int(height),
                                       frames=int(frames), progress=progress, cancel=cancel)
                else:
                    with use_validator(validator):
                        result = stages.run_curriculum(dit, root, plan, config, train_vae, context,
                                                       identity_encoder=encoder, width=int(width), height=int(height),
                                                       frames=int(frames), progress=progress, cancel=cancel,
                                                       objective=objective, data_options=data_options)
            except Cancelled as exc:
                log.info("DreamID-V: %s", exc)
                mm.throw_exception_if_processing_interrupted()
                raise mm.InterruptProcessingException() from None
            if trains == "lora":
                from ..training.lora import remove_lora
                remove_lora(dit, merge=True)
            for p in dit.parameters():
                p.requires_grad_(False)
            dit.eval()
        dit.to(model.patcher.offload_device)
        losses = list(getattr(result, "losses", None) or seen)
        bounds, acc = [], 0
        for p in plan[:-1]:
            acc += p["steps"]
            bounds.append(acc)
        validation, offset = [], 0
        for (_name, stage_res), p in zip(getattr(result, "stages", []), plan):
            validation += [(offset + v["step"], v.get("val_mean_similarity")) for v in stage_res.validation]
            offset += p["steps"]
        curve = torch.from_numpy(plot_losses(losses, bounds, validation=validation)).float().div(255)[None]
        ckpt = getattr(result, "last_checkpoint", None)
        patcher = comfy.model_patcher.ModelPatcher(dit, load_device=model.patcher.load_device,
                                                   offload_device=model.patcher.offload_device)
        tuned = LoadedDiT(patcher=patcher, name=f"{model.name} (tuned {stage}/{trains})", path=str(ckpt or ""),
                          key=f"{model.key}|tuned|{ckpt}|{len(losses)}", offload_after=model.offload_after)
        return io.NodeOutput(tuned, curve, str(ckpt or ""))


NODES = [DreamIDVIRLFineTune]
