"""``python -m training --config cfg.json|cfg.toml [--resume]`` (also under ``torchrun --nproc_per_node=N``).

Config keys: ``model`` (a DiT checkpoint path, or ``"tiny"`` for tests), ``model_seed`` (tiny only),
``dataset`` (a dataset folder, or ``"toy"``), ``dataset_size`` (toy only), ``loss`` (``"toy"``; the
real objective plugs in here), ``losses_out`` (optional JSON file the losses are written to, rank 0),
and every :class:`training.trainer.TrainConfig` field under ``train``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from dreamidv_core.errors import DreamIDVError, InputError


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


def build_model(cfg: dict):
    spec = cfg.get("model", "tiny")
    if spec == "tiny":
        from .toy import tiny_model
        return tiny_model(int(cfg.get("model_seed", 0)))
    from dreamidv_core.checkpoints import load_dit
    return load_dit(spec, weight_dtype=cfg.get("weight_dtype", "fp32"))


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
        cfg = load_config(args.config)
        tc = TrainConfig.from_dict(dict(cfg.get("train", {})))
        if args.resume:
            tc.resume = True
        model, dataset, loss_fn = build_model(cfg), build_dataset(cfg), build_loss(cfg)
        rank = int(os.environ.get("RANK", "0"))
        progress = (lambda s, n, loss: print(f"step {s}/{n} loss {loss:.6f}", flush=True)) if rank == 0 else None
        result = train(model, dataset, loss_fn, tc, progress=progress)
        if rank == 0 and cfg.get("losses_out"):
            Path(cfg["losses_out"]).write_text(json.dumps({"losses": result.losses, "steps": result.steps,
                                                            "last_checkpoint": str(result.last_checkpoint)}))
    except DreamIDVError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
