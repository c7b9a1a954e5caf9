"""The training loop: one code path for a single process (ComfyUI node, ``python -m training``) and
``torchrun --nproc_per_node=N``.

Protocols (so the loop is independent of the data and the objective):

- ``dataset``: a ``torch.utils.data.Dataset`` of dict samples (tensors are stacked into a batch, other
  values collected into lists; a ``dataset.collate(samples)`` method overrides that);
- ``loss_fn(model, batch, generator) -> scalar loss``: all randomness of the objective (noise,
  timesteps, identity dropout) must come from ``generator``.

Determinism: a step's data and noise depend only on (seed, step). The global batch of step ``s`` is
``batch_size * grad_accum * world`` samples taken from a per-epoch seeded permutation of the dataset;
it is cut into micro-batches ("units") of ``batch_size`` samples, unit ``u`` going to rank
``u // grad_accum``, and unit ``u``'s generator is seeded from (seed, step, u). So an interrupted and
resumed run repeats an uninterrupted one exactly, and N processes with grad_accum G/N compute the
same losses as one process with grad_accum G (up to float summation order).

Data: the keys of unit ``u`` come from the dataset's ``unit_keys`` when it has one
(:class:`training.dataset.DreamIDVDataset`: ``(index, epoch)`` keys, still and video micro-batches mixed by
``still_ratio``), else from :func:`sample_indices`. ``num_workers`` > 0 reads the micro-batches in DataLoader
worker processes (:class:`UnitBatches`), which gives the same batches as reading them in the loop.

Validation: ``validate_every`` > 0 runs a ``validator(model) -> metrics`` (the identity report of a few
swaps, :mod:`training.validation`) before step 1, every N steps and at the end; ``metrics.jsonl`` in the
checkpoint folder logs every step's loss and every validation.

Parallelism: ``parallel="fsdp"`` shards the model with ``torch.distributed.fsdp.fully_shard``
(FSDP2), one unit per attention layer, per block, for the PoseGuider and the root
(:func:`training.distributed.shard_fsdp`); it runs on CUDA/NCCL and on CPU/gloo. Checkpoints gather the full model, the
optimizer state stays sharded (one file per rank). ``"ddp"`` keeps a full copy per process and
averages gradients with an all-reduce after accumulation. ``"auto"`` (default): fsdp under torchrun.
"""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn as nn

from dreamidv_core.errors import CheckpointError, Cancelled, InputError
from . import checkpoint as ckpt
from . import lora as lora_mod
from .distributed import Dist as _Dist, agree as _agree, average_grads as _average_grads, init_distributed, shard_fsdp

TRAINABLE = ("full", "lora", "pose", "id_projection", "modulation")
POSE_ATTN = ("k_pose", "v_pose", "norm_k_pose", "pose_gate")


@dataclass
class TrainConfig:
    steps: int = 100
    lr: float = 1e-4
    batch_size: int = 1            # samples per forward pass (per process)
    grad_accum: int = 1            # forward passes per optimizer step (per process)
    weight_decay: float = 0.0
    warmup: int = 0                # linear LR warmup steps
    max_grad_norm: float = 0.0     # 0: no clipping
    trainable: str = "full"        # full | lora | pose | id_projection | modulation
    lora_rank: int = 16
    lora_alpha: float = 16.0
    lora_targets: str = ",".join(lora_mod.DEFAULT_TARGETS)
    gradient_checkpointing: bool = False
    autocast: str = "none"         # bf16 | none
    checkpoint_dir: Optional[str] = None
    save_every: int = 0            # 0: save only at the end (and on cancel)
    save_full_model: Optional[bool] = None  # default: full model when trainable == "full"
    seed: int = 0
    resume: bool = False
    shuffle: bool = True
    parallel: str = "auto"         # auto | fsdp | ddp
    validate_every: int = 0        # > 0: identity-report validation before step 1, every N steps and at the end
    validation_samples: int = 2    # held-out samples swapped per validation
    validation_steps: int = 4      # sampler steps per validation swap
    validation_root: Optional[str] = None  # held-out dataset folder (default: the training folder's first samples)
    num_workers: int = 0           # DataLoader worker processes reading and decoding samples (0: in the loop)
    prefetch_factor: int = 2       # micro-batches each worker prepares ahead

    def validate(self) -> "TrainConfig":
        if self.trainable not in TRAINABLE:
            raise InputError(f"trainable must be one of {TRAINABLE}, got {self.trainable!r}")
        if self.autocast not in ("bf16", "none"):
            raise InputError(f"autocast must be 'bf16' or 'none', got {self.autocast!r}")
        if self.parallel not in ("auto", "fsdp", "ddp"):
            raise InputError(f"parallel must be 'auto', 'fsdp' or 'ddp', got {self.parallel!r}")
        for name in ("validate_every", "num_workers"):
            if int(getattr(self, name)) < 0:
                raise InputError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("steps", "batch_size", "grad_accum", "validation_samples", "validation_steps", "prefetch_factor"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.resume and not self.checkpoint_dir:
            raise InputError("resume needs a checkpoint_dir")
        return self

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(f"unknown training settings {unknown}; known: {sorted(known)}")
        return cls(**d)


@dataclass
class TrainResult:
    losses: List[float] = field(default_factory=list)   # one per optimizer step, from step 1
    steps: int = 0
    last_checkpoint: Optional[Path] = None
    validation: List[dict] = field(default_factory=list)  # {"step", "val_mean_similarity", ...} per validation


# ---------------------------------------------------------------------------- determinism helpers
def derive_seed(*parts) -> int:
    """A 63-bit seed that depends only on ``parts``."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2 ** 63 - 1)


def sample_indices(n: int, seed: int, start: int, count: int, shuffle: bool = True) -> List[int]:
    """Dataset indices of global sample positions ``start .. start+count-1`` (a fresh seeded
    permutation per epoch of ``n`` samples)."""
    out, perms = [], {}
    for pos in range(start, start + count):
        epoch, i = divmod(pos, n)
        if epoch not in perms:
            perms[epoch] = (torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, "epoch", epoch)))
                            if shuffle else torch.arange(n))
        out.append(int(perms[epoch][i]))
    return out


def collate(samples: List[dict]) -> dict:
    """Stack tensors of the same key into a batch; anything else becomes a list."""
    out = {}
    for key in samples[0]:
        vals = [s[key] for s in samples]
        out[key] = torch.stack(vals) if all(isinstance(v, torch.Tensor) for v in vals) else vals
    return out


def _to_device(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list):
        return [_to_device(v, device) for v in batch]
    return batch


# ---------------------------------------------------------------------------- what trains
def select_trainable(model: nn.Module, config: TrainConfig) -> Dict[str, nn.Parameter]:
    """Set ``requires_grad`` for the chosen parameters only (adding LoRA adapters for ``lora``)."""
    mode = config.trainable
    if mode == "lora" and not lora_mod.lora_modules(model):
        lora_mod.add_lora(model, config.lora_rank, config.lora_alpha, config.lora_targets,
                          seed=derive_seed(config.seed, "lora") % (2 ** 31))
    chosen = {}
    for name, p in model.named_parameters():
        if mode == "full":
            keep = ".lora_" not in name
        elif mode == "lora":
            keep = ".lora_A." in name or ".lora_B." in name
        elif mode == "pose":
            parts = name.split(".")
            keep = name.startswith("project_pose.") or (
                len(parts) >= 4 and parts[0] == "blocks" and parts[2] == "self_attn" and parts[3] in POSE_ATTN)
        elif mode == "modulation":
            keep = is_modulation_parameter(name)
        else:
            keep = name.startswith("id_projection")
        p.requires_grad_(keep)
        if keep:
            chosen[name] = p
    if not chosen:
        what = {"pose": "a pose branch (project_pose / self_attn.k_pose...): this is not the full DreamID-V variant",
                "id_projection": "an ID-token projection (parameters named 'id_projection...')",
                "modulation": "adaptive-norm modulation parameters (blocks.N.modulation, head.modulation, "
                              "time_projection)"}.get(mode, "parameters")
        raise InputError(f"trainable={mode!r} but the model has no {what}")
    return chosen


def is_modulation_parameter(name: str) -> bool:
    """The adaptive-norm modulation of the Wan DiT: each block's ``modulation`` table [1, 6, dim] and the
    head's [1, 2, dim] (learned shift/scale/gate offsets), and ``time_projection`` (the layer that turns
    the timestep embedding into the shared 6 x dim modulation). ``trainable = "modulation"`` trains only
    these, after Magic Mirror (Zhang et al. 2025, arXiv:2501.03931), which adapts a video DiT to a new data
    distribution through its (conditioned) adaptive normalisation; counting ``time_projection`` in (and
    the timestep MLP ``time_embedding`` out) is our reading of "modulation layers" for Wan's layout."""
    return name.endswith(".modulation") or name == "modulation" or name.startswith("time_projection.")


# ---------------------------------------------------------------------------- data feeding
def unit_keys(dataset, n_data: int, config: "TrainConfig", unit: int) -> list:
    """Dataset keys of micro-batch number ``unit`` of the run (unit = step * units per step + the unit
    within the step, units going to ranks as in the module docstring): the dataset's own
    ``unit_keys(seed, unit, batch_size, shuffle)`` when it has one (:class:`training.dataset.DreamIDVDataset`:
    (index, epoch) keys, still/video micro-batches), else :func:`sample_indices`."""
    own = getattr(dataset, "unit_keys", None)
    if own is not None:
        return own(config.seed, unit, config.batch_size, config.shuffle)
    return sample_indices(n_data, config.seed, unit * config.batch_size, config.batch_size, config.shuffle)


class _UnitKeys:
    """The key lists of this rank's micro-batches from step ``start`` to the end, in training order
    (a DataLoader ``batch_sampler``)."""

    def __init__(self, dataset, n_data, config, rank, units, start):
        self.dataset, self.n_data, self.config = dataset, n_data, config
        self.rank, self.units, self.start = rank, units, start

    def __iter__(self):
        cfg = self.config
        for step in range(self.start, cfg.steps):
            for k in range(cfg.grad_accum):
                yield unit_keys(self.dataset, self.n_data, cfg, step * self.units + self.rank * cfg.grad_accum + k)

    def __len__(self):
        return (self.config.steps - self.start) * self.config.grad_accum


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)  # decoding workers must not compete with the training threads


class UnitBatches:
    """This rank's collated micro-batches from step ``start`` on, in training order: read in the loop
    (``num_workers`` 0) or prepared ahead by ``num_workers`` DataLoader worker processes (decoding,
    resizing, reading cached latents), ``prefetch_factor`` micro-batches each. Both give the same
    batches (the dataset's items depend only on their keys). :meth:`close` stops the workers."""

    def __init__(self, dataset, config: "TrainConfig", rank: int, world: int, start: int, collate_fn, device):
        keys = _UnitKeys(dataset, len(dataset), config, rank, config.grad_accum * world, start)
        self.device = device
        if config.num_workers > 0:
            loader = torch.utils.data.DataLoader(
                dataset, batch_sampler=keys, num_workers=config.num_workers, collate_fn=collate_fn,
                prefetch_factor=config.prefetch_factor, worker_init_fn=_worker_init,
                pin_memory=torch.device(device).type == "cuda")
            self._it = iter(loader)
        else:
            self._it = (collate_fn([dataset[k] for k in ks]) for ks in keys)

    def __next__(self):
        return _to_device(next(self._it), self.device)

    def close(self) -> None:
        stop = getattr(self._it, "_shutdown_workers", None) or getattr(self._it, "close", None)
        if stop is not None:
            stop()


# ---------------------------------------------------------------------------- gradient checkpointing
def enable_gradient_checkpointing(model: nn.Module) -> Callable[[], None]:
    """Recompute each DiT block's activations in backward. Returns a function that undoes it."""
    from torch.utils.checkpoint import checkpoint

    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise InputError("gradient checkpointing needs a model with .blocks (a DreamID-V DiT)")
    originals = []
    for blk in blocks:
        orig = blk.forward

        def fwd(*args, _orig=orig, **kwargs):
            if not torch.is_grad_enabled():
                return _orig(*args, **kwargs)
            return checkpoint(_orig, *args, use_reentrant=False, **kwargs)

        blk.forward = fwd
        originals.append(blk)

    def undo():
        for blk in originals:
            blk.__dict__.pop("forward", None)
    return undo


# ---------------------------------------------------------------------------- saving
def _full_tensor(t: torch.Tensor) -> torch.Tensor:
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach().to("cpu")


def _model_tensors(model: nn.Module, trainable: Dict[str, nn.Parameter], full: bool) -> Dict[str, torch.Tensor]:
    if full:  # every rank takes part in the gathers of sharded tensors
        return {n: _full_tensor(t) for n, t in model.state_dict().items() if ".lora_" not in n}
    return {n: _full_tensor(p) for n, p in trainable.items()}


def _expected_shapes(model: nn.Module, trainable: Dict[str, nn.Parameter], full: bool) -> Dict[str, tuple]:
    if full:
        return {n: tuple(t.shape) for n, t in model.state_dict().items() if ".lora_" not in n}
    return {n: tuple(p.shape) for n, p in trainable.items()}


def save_training_state(config: TrainConfig, dist_ctx: _Dist, model, trainable, optimizer, scheduler,
                        step: int, losses: List[float], sharded: bool, n_data: int, write_hook=None,
                        validation: Optional[List[dict]] = None) -> Path:
    """Write ``<checkpoint_dir>/step_NNNNNN`` atomically (every rank must call it)."""
    full = config.save_full_model if config.save_full_model is not None else config.trainable == "full"
    writer = ckpt.CheckpointWriter(config.checkpoint_dir, step, dist_ctx.rank, dist_ctx.barrier)
    writer.begin()
    try:
        model_tensors = _model_tensors(model, trainable, full)
        lora_tensors = lora_mod.lora_state_dict(model) if config.trainable == "lora" else None  # all ranks gather
        opt_meta, opt_tensors = ckpt.flatten_optimizer(optimizer.state_dict())
        if dist_ctx.rank == 0:
            meta = {"format": "pt", "step": str(step), "trains": config.trainable,
                    "train_config": json.dumps(asdict(config))}
            cfg = getattr(model, "cfg", None)
            if full and cfg is not None and hasattr(cfg, "to_dict"):
                from dreamidv_core.weights.checkpoints import CONFIG_METADATA_KEY
                meta[CONFIG_METADATA_KEY] = json.dumps(cfg.to_dict())
            writer.write_tensors(ckpt.MODEL_FILE, model_tensors, meta)
            if config.trainable == "lora":
                lora_mod.save_lora(model, writer.tmp / "lora.safetensors", {"step": str(step)}, lora_tensors)
            rng_meta, rng_tensors = ckpt.capture_rng_state()
            writer.write_tensors(ckpt.RNG_FILE, rng_tensors)
        if sharded:
            writer.write_tensors(f"optimizer_rank{dist_ctx.rank}.safetensors", opt_tensors)
        elif dist_ctx.rank == 0:
            writer.write_tensors("optimizer.safetensors", opt_tensors)
        if write_hook:
            write_hook("tensors")
        state = None
        if dist_ctx.rank == 0:
            state = {"format": ckpt.FORMAT, "step": step, "epoch": (step * config.batch_size * config.grad_accum
                                                                    * dist_ctx.world) // max(1, n_data),
                     "losses": losses, "world_size": dist_ctx.world, "optimizer_sharded": sharded,
                     "optimizer": ckpt.json_safe(opt_meta), "scheduler": ckpt.json_safe(scheduler.state_dict()),
                     "rng": rng_meta, "full_model": full, "config": asdict(config),
                     "validation": ckpt.json_safe(list(validation or [])),
                     "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        return writer.commit(state, write_hook)
    except BaseException:
        writer.abort()
        raise


def load_model_weights(model: nn.Module, folder, trainable: Dict[str, nn.Parameter], full: bool) -> None:
    """Copy a checkpoint folder's model tensors (the full model, or only the ``trainable`` ones) into
    ``model``; FSDP-sharded parameters get their shard of each full tensor."""
    tensors = ckpt.load_model_tensors(folder, _expected_shapes(model, trainable, full))
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for name, value in tensors.items():
            target = params.get(name, buffers.get(name))
            if hasattr(target, "device_mesh"):
                from torch.distributed.tensor import distribute_tensor
                target.copy_(distribute_tensor(value.to(target.dtype), target.device_mesh, target.placements))
            else:
                target.copy_(value.to(target.dtype))


def load_training_state(folder, config: TrainConfig, dist_ctx: _Dist, model, trainable, optimizer, scheduler,
                        sharded: bool) -> dict:
    """Restore model, optimizer, scheduler and RNG from a checkpoint folder; returns its state dict."""
    folder = Path(folder)
    state = ckpt.read_state(folder)
    full = state["full_model"]
    if state["config"].get("trainable") != config.trainable:
        raise CheckpointError(folder, f"was trained with trainable={state['config'].get('trainable')!r}; "
                                      f"this run uses {config.trainable!r}")
    load_model_weights(model, folder, trainable, full)
    if sharded:
        if state["world_size"] != dist_ctx.world:
            raise CheckpointError(folder, f"has optimizer state sharded over {state['world_size']} processes; "
                                          f"this run has {dist_ctx.world}")
        opt_file = folder / f"optimizer_rank{dist_ctx.rank}.safetensors"
    else:
        opt_file = folder / "optimizer.safetensors"
        if not opt_file.is_file():
            raise CheckpointError(folder, "holds sharded (FSDP) optimizer state; resume it with FSDP and the same "
                                          "number of processes")
    order = [p for g in optimizer.param_groups for p in g["params"]]
    opt_sd = ckpt.unflatten_optimizer(state["optimizer"], ckpt.load_tensor_file(opt_file), order)
    try:
        optimizer.load_state_dict(opt_sd)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(opt_file, f"optimizer state does not fit this run ({exc})") from None
    scheduler.load_state_dict(state["scheduler"])
    if dist_ctx.rank == 0 or True:
        ckpt.restore_rng_state(state["rng"], ckpt.load_tensor_file(folder / ckpt.RNG_FILE))
    return state


# ---------------------------------------------------------------------------- validation and metrics
_VALIDATOR: contextvars.ContextVar = contextvars.ContextVar("dreamidv_validator", default=None)


@contextlib.contextmanager
def use_validator(validator: Optional[Callable[[nn.Module], dict]]):
    """Every :func:`train` call inside (e.g. each stage of :func:`training.stages.run_curriculum`) uses
    ``validator`` unless it is given one explicitly."""
    token = _VALIDATOR.set(validator)
    try:
        yield
    finally:
        _VALIDATOR.reset(token)


def _run_validation(model: nn.Module, validator, step: int) -> dict:
    """``validator(model)`` in eval mode without gradients, then back to train mode -> {"step", ...}."""
    model.eval()
    try:
        with torch.no_grad():
            metrics = dict(validator(model))
    finally:
        model.train()
    return {"step": step, **metrics}


class MetricsLog:
    """``<checkpoint_dir>/metrics.jsonl`` (rank 0): one JSON line per step ``{"step", "loss", "lr"}`` and
    one per validation ``{"step", "val_mean_similarity", ...}``. A resumed run drops the lines after
    the step it resumes from, so the file always describes the run that produced the weights."""

    def __init__(self, folder: Optional[str], rank: int, resume_step: Optional[int]):
        self.path = Path(folder) / "metrics.jsonl" if folder and rank == 0 else None
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step is not None and self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if int(rec.get("step", 0)) <= resume_step:
                    kept.append(line)
        self.path.write_text("".join(k + "\n" for k in kept))

    def write(self, record: dict) -> None:
        if self.path is not None:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(ckpt.json_safe(record)) + "\n")


def _due(config: TrainConfig, step: int) -> bool:
    every = int(config.validate_every)
    return every > 0 and (step == 0 or step % every == 0 or step == config.steps)


# ---------------------------------------------------------------------------- the loop
def train(model: nn.Module, dataset, loss_fn, config: TrainConfig, progress=None, cancel=None,
          _save_hook=None, validator: Optional[Callable[[nn.Module], dict]] = None) -> TrainResult:
    """Train ``model`` in place. ``progress(step, total, loss)`` after every step; ``cancel()`` -> True
    stops the run before the next step, saves a resumable checkpoint (if ``checkpoint_dir``) and raises
    :class:`Cancelled`. Returns the losses of every step from step 1 (including resumed ones).

    ``validator(model) -> metrics dict`` (default: the one set by :func:`use_validator`;
    :func:`training.validation.make_identity_validator` builds the identity-report one) runs when
    ``config.validate_every > 0``: before step 1, every ``validate_every`` steps and after the last one;
    its results go to ``TrainResult.validation`` and ``<checkpoint_dir>/metrics.jsonl``."""
    config.validate()
    n_data = len(dataset)
    if n_data == 0:
        raise InputError("the training dataset is empty")
    dist_ctx = init_distributed()
    parallel = config.parallel
    if parallel == "auto":
        parallel = "fsdp" if dist_ctx.active else "ddp"
    sharded = dist_ctx.active and parallel == "fsdp"
    model.to(dist_ctx.device)
    trainable = select_trainable(model, config)
    if sharded:
        shard_fsdp(model, dist_ctx.device)
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    elif dist_ctx.active:  # same start everywhere
        import torch.distributed as dist
        with torch.no_grad():
            for p in trainable.values():
                dist.broadcast(p.data, src=0)
    optimizer = torch.optim.AdamW(list(trainable.values()), lr=config.lr, weight_decay=config.weight_decay)
    warmup = max(0, int(config.warmup))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    result = TrainResult()
    start = 0
    if config.resume:
        folder = ckpt.find_latest(config.checkpoint_dir)
        if folder is not None:
            state = load_training_state(folder, config, dist_ctx, model, trainable, optimizer, scheduler, sharded)
            start, result.losses = int(state["step"]), list(state["losses"])[: int(state["step"])]
            result.last_checkpoint = folder
            result.validation = [v for v in state.get("validation", []) if int(v["step"]) <= start]
    if validator is None:
        validator = _VALIDATOR.get()
    if config.validate_every and validator is None:
        raise InputError("validate_every is set but no validator was given (training.validation.make_identity_validator)")
    metrics = MetricsLog(config.checkpoint_dir, dist_ctx.rank, start if config.resume else None)
    undo_gc = enable_gradient_checkpointing(model) if config.gradient_checkpointing else (lambda: None)
    get = getattr(dataset, "collate", None) or collate
    amp = (torch.autocast(dist_ctx.device.type, dtype=torch.bfloat16) if config.autocast == "bf16"
           else torch.autocast(dist_ctx.device.type, enabled=False))

    def save(step):
        if not config.checkpoint_dir:
            return None
        return save_training_state(config, dist_ctx, model, trainable, optimizer, scheduler, step,
                                   result.losses, sharded, n_data, _save_hook, result.validation)

    def validate(step):
        if _due(config, step) and not any(v["step"] == step for v in result.validation):
            record = _run_validation(model, validator, step)
            result.validation.append(record)
            metrics.write(record)

    feed = None
    model.train()
    try:
        feed = UnitBatches(dataset, config, dist_ctx.rank, dist_ctx.world, start, get, dist_ctx.device)
        validate(start)
        for step in range(start, config.steps):
            if cancel is not None and _agree(dist_ctx, bool(cancel())):
                result.last_checkpoint = save(step) or result.last_checkpoint
                result.steps = step
                raise Cancelled(f"training cancelled at step {step}; resumable checkpoint: {result.last_checkpoint}")
            _seed_globals(config.seed, step, dist_ctx.rank)
            optimizer.zero_grad(set_to_none=True)
            step_loss = torch.zeros((), device=dist_ctx.device)
            for k in range(config.grad_accum):
                unit = dist_ctx.rank * config.grad_accum + k
                batch = next(feed)
                gen = torch.Generator(device=dist_ctx.device).manual_seed(derive_seed(config.seed, "unit", step, unit))
                with amp:
                    loss = loss_fn(model, batch, gen)
                if not torch.is_tensor(loss) or loss.dim() != 0:
                    raise InputError(f"loss_fn must return a scalar tensor, got {type(loss).__name__}")
                (loss.float() / config.grad_accum).backward()
                step_loss += loss.detach().float() / config.grad_accum
            if dist_ctx.active and not sharded:
                _average_grads(trainable.values(), dist_ctx.world)
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(list(trainable.values()), config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            value = float(dist_ctx.mean(step_loss))
            result.losses.append(value)
            result.steps = step + 1
            metrics.write({"step": step + 1, "loss": value, "lr": scheduler.get_last_lr()[0]})
            if progress is not None:
                progress(step + 1, config.steps, value)
            validate(step + 1)
            if (config.save_every and (step + 1) % config.save_every == 0) or step + 1 == config.steps:
                result.last_checkpoint = save(step + 1) or result.last_checkpoint
    finally:
        if feed is not None:
            feed.close()
        undo_gc()
    return result


def _seed_globals(seed: int, step: int, rank: int) -> None:
    """Global generators (anything a model draws without the step generator) depend on (seed, step, rank)."""
    s = derive_seed(seed, "global", step, rank)
    random.seed(s)
    np.random.seed(s % (2 ** 32))
    torch.manual_seed(s)
