"""``python -m training --config cfg.json|cfg.toml [--resume]`` (also under ``torchrun --nproc_per_node=N``).

Config keys:

- ``model``: a DiT checkpoint path (:func:`dreamidv_core.weights.checkpoints.load_dit`, ``weight_dtype``
  default fp32), or ``"tiny"`` (``tiny_config('full', text_dim=32)``, ``model_seed``) for tests;
- ``dataset``: a dataset folder (training/DATASET.md) or ``{"root", "width", "height", "frames", "seed"}``
  (defaults 832, 480, 81, 0) plus ``still_ratio`` (share of still micro-batches, default the folder's
  share), ``occlusion`` (probability of the occlusion augmentation, 0), ``occlusion_scale`` ([0.3, 0.7])
  and ``latent_cache`` (a folder: cache each sample's VAE latents on disk);
  ``"toy"`` + ``dataset_size`` + ``loss: "toy"`` is the trainer's smoke test;
- ``vae``: a Wan 2.1 VAE file (:func:`dreamidv_core.models.vae.load_wan_vae`) or ``"tiny"`` (``vae_seed``);
- ``context``: a precomputed text-context file (:func:`dreamidv_core.pipelines.text_context.load_precomputed_context`)
  or ``"random:<dim>"`` (``context_seed``, 8 tokens) for tests;
- ``stages``: the curriculum, ``[{"stage": "synthetic"|"real"|"irl", "steps": n}, ...]``; or ``stage``:
  one stage run for ``train.steps`` steps; ``stage = "ivs"`` trains an Identity-Anchored Video Synthesizer
  (:mod:`training.ivs`) on a folder of talking-head clips: ``model`` is IVS weights, or a DreamID-V /
  Wan2.1-T2V file to start one from (:func:`dreamidv_core.pipelines.ivs.load_ivs`), ``ivs.text_dropout`` (0.1);
- ``identity_encoder``: ``"insightface:<pack folder>"`` (ArcFace) or ``"colour"`` (test stand-in); needed
  by ``irl``;
- ``objective``: :class:`training.objective.FlowMatchingObjective` settings (shift, identity_dropout,
  timestep_sampling, logit_mean, logit_std, temporal_tv (weight, 0 = off), temporal_tv_mode);
  ``irl``: ``{"delta": 0.1, "frames_per_chunk": 1}``;
- ``train``: every :class:`training.trainer.TrainConfig` field (``validate_every`` > 0 runs the
  identity-report validation, :mod:`training.validation`, on ``validation_samples`` samples of
  ``validation_root`` (default: the dataset folder) with ``identity_encoder``);
- ``id_tokens`` / ``id_embed_dim``: attach a fresh ArcFace ID-token projection (zero-gated) of that many
  tokens to a model without one (``trainable = "id_projection"`` trains it; ArcFace: 512);
- ``losses_out``: optional JSON file the losses (and validation numbers) are written to (rank 0).

Every key is checked (:func:`check_config`): a misspelt one is an error naming it and the file.
Example configs: ``training/configs/*.toml``.
"""
from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
from pathlib import Path

from dreamidv_core.errors import DreamIDVError, InputError

from .dataset import DATASET_KEYS


def load_config(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: config file not found")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".toml":
            import tomllib
            return tomllib.loads(text)
        return json.loads(text)
    except ValueError as exc:
        raise InputError(f"{path}: not a valid {path.suffix.lstrip('.').upper() or 'JSON'} config ({exc})") from None


TOP_KEYS = ("model", "model_seed", "weight_dtype", "id_tokens", "id_embed_dim", "dataset", "dataset_size", "loss",
            "vae", "vae_seed", "context", "context_seed", "stages", "stage", "identity_encoder", "objective", "irl",
            "train", "losses_out", "ivs")
OBJECTIVE_KEYS = ("shift", "identity_dropout", "timestep_sampling", "logit_mean", "logit_std", "temporal_tv",
                  "temporal_tv_mode")
SECTION_KEYS = {"objective": OBJECTIVE_KEYS,
                "irl": ("delta", "frames_per_chunk"),
                "dataset": DATASET_KEYS,
                "ivs": ("text_dropout",)}
STAGE_ENTRY_KEYS = ("stage", "steps")  # a [[stages]] entry; extend with a new stage's per-stage settings


def _unknown(keys, known, where: str, path) -> None:
    for key in keys:
        if key not in known:
            near = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise InputError(f"{path}: unknown setting '{where}{key}'{hint}; known: {', '.join(known)}")


def check_config(cfg: dict, path="config") -> dict:
    """Reject unknown keys (top level, ``train``, ``objective``, ``irl``, a ``dataset`` table, ``stages``
    entries) with an error naming the key and the file; returns ``cfg``."""
    from dataclasses import fields

    from .trainer import TrainConfig

    if not isinstance(cfg, dict):
        raise InputError(f"{path}: expected a table of settings at the top level")
    _unknown(cfg, TOP_KEYS, "", path)
    for name, known in SECTION_KEYS.items():
        value = cfg.get(name)
        if isinstance(value, dict):
            _unknown(value, known, f"{name}.", path)
        elif value is not None and name != "dataset":
            raise InputError(f"{path}: '{name}' must be a table of settings, got {value!r}")
    train = cfg.get("train", {})
    if not isinstance(train, dict):
        raise InputError(f"{path}: 'train' must be a table of settings, got {train!r}")
    _unknown(train, tuple(f.name for f in fields(TrainConfig)), "train.", path)
    for i, st in enumerate(cfg.get("stages") or []):
        if isinstance(st, dict):
            _unknown(st, STAGE_ENTRY_KEYS, f"stages[{i}].", path)
    return cfg


def build_model(cfg: dict):
    spec = cfg.get("model", "tiny")
    if cfg.get("stage") == "ivs":
        return build_ivs_model(cfg, spec)
    if spec == "tiny":
        from .toy import tiny_model
        model = tiny_model(int(cfg.get("model_seed", 0)), text_dim=32)
    elif not isinstance(spec, str) or not spec:
        raise InputError(f"model: expected a DiT checkpoint path or 'tiny', got {spec!r}")
    else:
        from dreamidv_core.weights.checkpoints import load_dit
        model = load_dit(spec, weight_dtype=cfg.get("weight_dtype", "fp32"))
    tokens = int(cfg.get("id_tokens", 0))
    if tokens > 0 and getattr(model, "id_projection", None) is None:
        model.attach_id_projection(tokens, int(cfg.get("id_embed_dim", 512)))
    return model


def build_ivs_model(cfg: dict, spec):
    """The IVS to train: 'tiny' (tests), IVS weights, or a new IVS initialised from a DreamID-V / Wan file."""
    if spec == "tiny":
        from .toy import tiny_model
        return tiny_model(int(cfg.get("model_seed", 0)), variant="ivs", text_dim=32)
    if not isinstance(spec, str) or not spec:
        raise InputError(f"model: expected IVS, DreamID-V or Wan2.1-T2V weights (a file) or 'tiny', got {spec!r}")
    from dreamidv_core.weights.checkpoints import load_ivs
    model, report = load_ivs(spec, weight_dtype=cfg.get("weight_dtype", "fp32"), seed=int(cfg.get("model_seed", 0)))
    if report is not None and int(os.environ.get("RANK", "0")) == 0:
        print(report.summary(), flush=True)
    return model


def run_ivs(cfg: dict, tc, progress):
    """``stage = "ivs"``: first/last-frame reconstruction training of an IVS on a clip folder."""
    from .ivs import train_ivs

    if "stages" in cfg:
        raise InputError("stage 'ivs' trains a separate model (the IVS): give 'stage = \"ivs\"' and train.steps, "
                         "not a 'stages' curriculum")
    if tc.validate_every:
        raise InputError("train.validate_every: the IVS has no identity input to validate; leave it 0")
    spec = cfg.get("dataset")
    spec = {"root": spec} if isinstance(spec, str) and spec else spec
    if not isinstance(spec, dict) or not spec.get("root"):
        raise InputError(f"dataset: expected a folder of clip folders (video.mp4 + pose.mp4) or {{'root', ...}}, "
                         f"got {cfg.get('dataset')!r}")
    data = _section({"dataset": spec}, "dataset", ("root", "width", "height", "frames", "seed"))
    ivs = _section(cfg, "ivs", ("text_dropout",))
    model = build_model(cfg)
    vae = build_vae(cfg)
    context = build_context(cfg, model.cfg.text_dim)
    return train_ivs(model, data["root"], tc, vae, context, width=int(data.get("width", 832)),
                     height=int(data.get("height", 480)), frames=data.get("frames", 81),
                     text_dropout=float(ivs.get("text_dropout", 0.1)), progress=progress,
                     dataset_seed=int(data.get("seed", 0)))


def build_vae(cfg: dict):
    spec = cfg.get("vae")
    if spec == "tiny":
        import torch
        from dreamidv_core.models.vae import TINY_VAE_CONFIG, WanVAE
        torch.manual_seed(int(cfg.get("vae_seed", 0)))
        return WanVAE(TINY_VAE_CONFIG).eval()
    if not isinstance(spec, str) or not spec:
        raise InputError(f"vae: expected a Wan 2.1 VAE file (Wan2.1_VAE.pth / wan_2.1_vae.safetensors) or 'tiny', "
                         f"got {spec!r}")
    from dreamidv_core.models.vae import load_wan_vae
    return load_wan_vae(spec)


def build_context(cfg: dict, text_dim: int):
    spec = cfg.get("context")
    if isinstance(spec, str) and spec.startswith("random:"):
        import torch
        try:
            dim = int(spec.split(":", 1)[1])
        except ValueError:
            raise InputError(f"context: 'random:<dim>' needs an integer dim, got {spec!r}") from None
        if dim != text_dim:
            raise InputError(f"context: {spec!r} has width {dim} but the model's text_dim is {text_dim}")
        return torch.randn(8, dim, generator=torch.Generator().manual_seed(int(cfg.get("context_seed", 0))))
    if not isinstance(spec, str) or not spec:
        raise InputError(f"context: expected a precomputed text-context file or 'random:<dim>', got {spec!r}")
    from dreamidv_core.pipelines.text_context import load_precomputed_context
    return load_precomputed_context(spec, text_dim=text_dim)


def build_identity_encoder(cfg: dict):
    spec = cfg.get("identity_encoder")
    if spec is None:
        return None
    from .stages import colour_identity_encoder, insightface_identity_encoder
    if spec == "colour":
        return colour_identity_encoder
    if isinstance(spec, str) and spec.startswith("insightface:") and spec.split(":", 1)[1]:
        return insightface_identity_encoder(spec.split(":", 1)[1])
    raise InputError(f"identity_encoder: expected 'insightface:<pack folder>' or 'colour', got {spec!r}")


def build_stages(cfg: dict, steps: int) -> list:
    if "stages" in cfg and "stage" in cfg:
        raise InputError("give either 'stages' (a curriculum) or 'stage' (one stage), not both")
    if "stages" in cfg:
        return cfg["stages"]
    return [{"stage": cfg.get("stage", "synthetic"), "steps": steps}]


def _section(cfg: dict, key: str, allowed: tuple) -> dict:
    value = cfg.get(key, {})
    if not isinstance(value, dict):
        raise InputError(f"{key}: expected a table of settings, got {value!r}")
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise InputError(f"{key}: unknown settings {unknown}; known: {list(allowed)}")
    return value


def run_stages(cfg: dict, tc, progress):
    """The real objective: the curriculum (or one stage) on a dataset folder."""
    from .objective import FlowMatchingObjective
    from .stages import parse_stages, run_curriculum

    if cfg.get("loss", "stages") != "stages":
        raise InputError(f"loss: {cfg['loss']!r} is unknown; use 'toy' (with dataset 'toy') or leave it out "
                         "to train the stages")
    spec = cfg.get("dataset")
    if isinstance(spec, str) and spec:
        spec = {"root": spec}
    if not isinstance(spec, dict) or not spec.get("root"):
        raise InputError(f"dataset: expected a dataset folder or {{'root', 'width', 'height', 'frames', 'seed'}}, "
                         f"got {cfg.get('dataset')!r}")
    data = _section({"dataset": spec}, "dataset", DATASET_KEYS)
    stages = parse_stages(build_stages(cfg, tc.steps))
    obj = FlowMatchingObjective(**_section(cfg, "objective", OBJECTIVE_KEYS))
    irl = _section(cfg, "irl", ("delta", "frames_per_chunk"))
    encoder = build_identity_encoder(cfg)
    if encoder is None and any(s["stage"] == "irl" for s in stages):
        raise InputError("identity_encoder: stage 'irl' needs 'insightface:<pack folder>' (or 'colour' for tests)")
    model = build_model(cfg)
    vae = build_vae(cfg)
    context = build_context(cfg, model.cfg.text_dim)
    width, height, frames = int(data.get("width", 832)), int(data.get("height", 480)), data.get("frames", 81)
    validator = None
    if tc.validate_every:
        if encoder is None:
            raise InputError("train.validate_every: the identity-report validation needs identity_encoder "
                             "('insightface:<pack folder>')")
        from .dataset import DreamIDVDataset
        from .validation import make_identity_validator, validation_items
        held_out = DreamIDVDataset(tc.validation_root or data["root"], width, height, frames, int(data.get("seed", 0)))
        validator = make_identity_validator(validation_items(held_out, tc.validation_samples), vae, context,
                                            encoder, steps=tc.validation_steps, seed=tc.seed)
    from .dataset import DataOptions
    from .trainer import use_validator
    with use_validator(validator):
        return run_curriculum(model, data["root"], stages, tc, vae, context, encoder, width=width, height=height,
                              frames=frames, progress=progress, objective=obj,
                              identity_delta=float(irl.get("delta", 0.1)),
                              frames_per_chunk=int(irl.get("frames_per_chunk", 1)),
                              dataset_seed=int(data.get("seed", 0)), data_options=DataOptions.from_spec(data))


def build_dataset(cfg: dict):
    spec = cfg.get("dataset")
    if spec == "toy":
        from .toy import ToyDataset
        return ToyDataset(int(cfg.get("dataset_size", 8)))
    if not spec:
        raise InputError("the config needs 'dataset' (a dataset folder, or 'toy')")
    try:
        from . import dataset as dataset_mod
    except ImportError:
        raise InputError("training.dataset is not available in this install; use dataset: 'toy'") from None
    return dataset_mod.open_dataset(spec) if hasattr(dataset_mod, "open_dataset") else dataset_mod.TrainingDataset(spec)


def build_loss(cfg: dict):
    spec = cfg.get("loss", "toy")
    if spec == "toy":
        from .toy import toy_flow_loss
        return toy_flow_loss
    raise InputError(f"unknown loss {spec!r}; available: 'toy'")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training", description="Fine-tune a DreamID-V DiT.")
    parser.add_argument("--config", required=True, help="JSON or TOML config file")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    args = parser.parse_args(argv)
    from .trainer import TrainConfig, train

    try:
        cfg = check_config(load_config(args.config), args.config)
        tc = TrainConfig.from_dict(dict(cfg.get("train", {})))
        if args.resume:
            tc.resume = True
        rank = int(os.environ.get("RANK", "0"))
        progress = (lambda s, n, loss: print(f"step {s}/{n} loss {loss:.6f}", flush=True)) if rank == 0 else None
        if cfg.get("loss", "stages") == "toy" or cfg.get("dataset") == "toy":
            if tc.validate_every:
                raise InputError(f"{args.config}: train.validate_every needs a dataset folder and a VAE, not the toy "
                                 "loss")
            model, dataset, loss_fn = build_model(cfg), build_dataset(cfg), build_loss(cfg)
            result = train(model, dataset, loss_fn, tc, progress=progress)
        elif cfg.get("stage") == "ivs":
            result = run_ivs(cfg, tc, progress)
        else:
            result = run_stages(cfg, tc, progress)
        if rank == 0 and cfg.get("losses_out"):
            validation = list(getattr(result, "validation", []))
            for _name, stage_res in getattr(result, "stages", []):
                validation += list(getattr(stage_res, "validation", []))
            Path(cfg["losses_out"]).write_text(json.dumps({"losses": result.losses, "steps": result.steps,
                                                            "last_checkpoint": str(result.last_checkpoint),
                                                            "validation": validation}))
    except DreamIDVError as exc:
        where = "" if str(args.config) in str(exc) else f"{args.config}: "
        print(f"error: {where}{exc}", file=sys.stderr)
        return 2
    finally:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
