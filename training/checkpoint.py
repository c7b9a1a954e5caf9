"""Atomic, pickle-free training checkpoints.

A checkpoint is a folder ``<root>/step_000123/`` holding

- ``model.safetensors``: the trained tensors (only the trainable ones, or the full model), with
  metadata ``step``, ``trains`` (what trains), ``train_config`` (JSON) and, for a full model, the
  DiT config under ``dreamidv_config`` so :func:`dreamidv_core.weights.checkpoints.load_dit` loads it;
- ``optimizer.safetensors`` (or ``optimizer_rank<r>.safetensors`` per rank when the optimizer state is
  sharded): every optimizer state tensor under ``state.<param index>.<key>``;
- ``rng.safetensors``: torch CPU / CUDA / numpy generator states;
- ``state.json`` (written last): step, epoch, losses, the optimizer's non-tensor state and param groups,
  the LR-scheduler state, the Python RNG state, the training config.

The folder is written as ``<root>/.partial_step_000123_<pid>/`` and renamed into place, so a crash
mid-save never touches the last good checkpoint; :func:`find_latest` only sees complete folders.
Nothing is ever unpickled: tensors are safetensors, the rest is JSON.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional

import numpy as np
import torch

from dreamidv_core.errors import CheckpointError
from dreamidv_core.io.files import set_default_mode
from dreamidv_core.io.state_dict import read_state_dict

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step_(\d{6,})$")
STATE_FILE = "state.json"
MODEL_FILE = "model.safetensors"
RNG_FILE = "rng.safetensors"
FORMAT = "dreamidv-train-checkpoint/1"


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def find_latest(root) -> Optional[Path]:
    """The complete checkpoint folder with the highest step under ``root`` (``None`` when there is none).

    A folder counts only when its ``state.json`` exists and parses (it is written last, then the folder
    renamed), so an interrupted save is never picked."""
    root = Path(root)
    if not root.is_dir():
        return None
    best = None
    for child in root.iterdir():
        m = STEP_DIR.match(child.name)
        if not m or not child.is_dir() or not (child / STATE_FILE).is_file():
            continue
        try:
            json.loads((child / STATE_FILE).read_text())
        except (OSError, ValueError):
            continue
        if best is None or int(m.group(1)) > best[0]:
            best = (int(m.group(1)), child)
    return None if best is None else best[1]


# ---------------------------------------------------------------------------- RNG states
def capture_rng_state() -> tuple:
    """(JSON-able dict, tensor dict) of the Python, numpy, torch CPU and CUDA generator states."""
    py = random.getstate()
    np_state = np.random.get_state()
    tensors = {"torch_cpu": torch.get_rng_state(),
               "numpy_keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64))}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = s
    meta = {"python": [py[0], list(py[1]), py[2]],
            "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    return meta, tensors


def restore_rng_state(meta: dict, tensors: Dict[str, torch.Tensor]) -> None:
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        states = [tensors[f"cuda_{i}"] for i in range(torch.cuda.device_count()) if f"cuda_{i}" in tensors]
        if states:
            torch.cuda.set_rng_state_all(states)


# ---------------------------------------------------------------------------- optimizer flattening
def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (sharded optimizer state), else the tensor itself, detached on CPU."""
    if hasattr(t, "to_local"):
        t = t.to_local()
    return t.detach().to("cpu").contiguous()


def flatten_optimizer(state_dict: dict) -> tuple:
    """torch optimizer state dict -> (JSON-able dict, {"state.<idx>.<key>": tensor})."""
    tensors, scalars = {}, {}
    for idx, entry in state_dict["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{key}"] = _local(value)
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return {"scalars": scalars, "param_groups": state_dict["param_groups"]}, tensors


def unflatten_optimizer(meta: dict, tensors: Dict[str, torch.Tensor], like: Optional[List[torch.Tensor]] = None) -> dict:
    """Inverse of :func:`flatten_optimizer`. ``like[idx]`` (the parameters, in optimizer order) turns a
    local shard back into a DTensor with the parameter's layout when the parameters are sharded."""
    state: Dict[int, dict] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        p = like[int(idx)] if like is not None else None
        if p is not None and hasattr(p, "device_mesh") and value.dim() > 0:
            from torch.distributed.tensor import DTensor

            value = DTensor.from_local(value.to(p.to_local().device), p.device_mesh, p.placements,
                                       shape=p.shape, stride=p.stride())
        state.setdefault(int(idx), {})[key] = value
    for idx, entry in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(entry)
    return {"state": state, "param_groups": meta["param_groups"]}


# ---------------------------------------------------------------------------- save / load
def _save_st(tensors: Dict[str, torch.Tensor], path: Path, metadata: Optional[Dict[str, str]] = None) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    set_default_mode(path)  # the safetensors writer makes private (0600) files


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class CheckpointWriter:
    """Writes one checkpoint folder atomically; in a distributed run every rank writes its own files
    between :meth:`begin` and :meth:`commit` (rank 0 creates, finishes and renames the folder)."""

    def __init__(self, root, step: int, rank: int = 0, barrier: Callable[[], None] = lambda: None):
        self.root, self.step, self.rank, self.barrier = Path(root), step, rank, barrier
        self.final = self.root / step_dir_name(step)
        self.tmp = self.root / f".partial_{step_dir_name(step)}"

    def begin(self) -> Path:
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if self.tmp.exists():
                shutil.rmtree(self.tmp)
            self.tmp.mkdir()
        self.barrier()
        return self.tmp

    def write_tensors(self, name: str, tensors: Dict[str, torch.Tensor], metadata: Optional[Dict[str, str]] = None):
        _save_st(tensors, self.tmp / name, metadata)

    def commit(self, state: dict, write_hook: Optional[Callable[[str], None]] = None) -> Path:
        """Write ``state.json`` (rank 0) and move the folder into place. ``write_hook(stage)`` is called
        before the state file and before the rename (tests use it to simulate a crash)."""
        self.barrier()
        if self.rank == 0:
            try:
                if write_hook:
                    write_hook("state")
                (self.tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
                for f in self.tmp.iterdir():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
                if write_hook:
                    write_hook("rename")
                old = None
                if self.final.exists():  # re-saving the same step: swap the old folder out first
                    old = self.root / f".old_{self.final.name}"
                    if old.exists():
                        shutil.rmtree(old)
                    os.replace(self.final, old)
                os.replace(self.tmp, self.final)
                _fsync_dir(self.root)
                if old is not None:
                    shutil.rmtree(old, ignore_errors=True)
            except BaseException:
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise
        self.barrier()
        return self.final

    def abort(self) -> None:
        if self.rank == 0:
            shutil.rmtree(self.tmp, ignore_errors=True)


def check_tensors_match(path, file_shapes: Dict[str, tuple], expected: Dict[str, tuple], what: str) -> None:
    """Raise :class:`CheckpointError` naming ``path`` when names or shapes differ."""
    missing = sorted(set(expected) - set(file_shapes))
    unexpected = sorted(set(file_shapes) - set(expected))
    wrong = sorted(n for n in set(expected) & set(file_shapes) if tuple(expected[n]) != tuple(file_shapes[n]))
    if not (missing or unexpected or wrong):
        return
    parts = [f"this checkpoint was written for another model than the {what}"]
    if missing:
        parts.append(f"{len(missing)} tensors missing (e.g. {', '.join(missing[:4])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected tensors (e.g. {', '.join(unexpected[:4])})")
    if wrong:
        parts.append("shape mismatch: " + ", ".join(f"{n} is {tuple(file_shapes[n])} in the file, "
                                                    f"{tuple(expected[n])} in the model" for n in wrong[:3]))
    raise CheckpointError(path, "; ".join(parts))


def read_state(folder) -> dict:
    folder = Path(folder)
    path = folder / STATE_FILE
    if not path.is_file():
        raise CheckpointError(folder, f"not a complete training checkpoint (no {STATE_FILE}); "
                                      "expected a step_NNNNNN folder written by the trainer")
    try:
        state = json.loads(path.read_text())
    except ValueError as exc:
        raise CheckpointError(path, f"unreadable checkpoint state ({exc})") from None
    if state.get("format") != FORMAT:
        raise CheckpointError(path, f"unknown checkpoint format {state.get('format')!r}; expected {FORMAT}")
    return state


def load_model_tensors(folder, expected_shapes: Dict[str, tuple], what: str = "model being trained") -> Dict[str, torch.Tensor]:
    """Read ``model.safetensors`` of a checkpoint folder, checking names and shapes against ``expected_shapes``."""
    path = Path(folder) / MODEL_FILE
    reader = read_state_dict(path)
    check_tensors_match(path, reader.shapes(), expected_shapes, what)
    return {k: reader[k] for k in reader}


def load_tensor_file(path) -> Dict[str, torch.Tensor]:
    reader = read_state_dict(path)
    return {k: reader[k] for k in reader}


def json_safe(obj: Any) -> Any:
    """Convert tuples to lists and 0-d tensors to numbers so a scheduler/optimizer state can be JSON."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, torch.Tensor) and obj.dim() == 0:
        return obj.item()
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint's JSON state")


def existing_steps(root) -> Iterable[int]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for c in root.iterdir() if (m := STEP_DIR.match(c.name)) and (c / STATE_FILE).is_file())


def best_step(root) -> Optional[int]:
    """The step of the complete checkpoint with the best ``score`` in its state (the trainer writes it: the
    validation's mean identity similarity, else the mean loss since the previous checkpoint); ``None`` when
    no checkpoint has a score. Checkpoints scored by validation beat those scored by loss."""
    best = None
    for step in existing_steps(root):
        try:
            score = json.loads((Path(root) / step_dir_name(step) / STATE_FILE).read_text()).get("score") or {}
        except (OSError, ValueError):
            continue
        value = score.get("value")
        if value is None:
            continue
        key = (bool(score.get("higher_is_better")), float(value) if score.get("higher_is_better") else -float(value))
        if best is None or key > best[0]:
            best = (key, step)
    return None if best is None else best[1]


def prune_checkpoints(root, keep_last: int, final_step: Optional[int] = None) -> List[int]:
    """Delete the step folders of ``root`` except the newest ``keep_last``, the one of ``final_step`` and the
    best one (:func:`best_step`); returns the steps deleted (logged). Only complete ``step_NNNNNN`` folders
    are touched."""
    steps = list(existing_steps(root))
    if keep_last <= 0 or len(steps) <= keep_last:
        return []
    keep = set(steps[-keep_last:]) | {s for s in (final_step, best_step(root)) if s is not None}
    removed = []
    for step in steps:
        if step not in keep:
            shutil.rmtree(Path(root) / step_dir_name(step), ignore_errors=True)
            removed.append(step)
    if removed:
        log.info("DreamID-V training: keep_last=%d: removed checkpoint(s) %s of %s (kept %s)", keep_last,
                 ", ".join(step_dir_name(s) for s in removed), root, ", ".join(step_dir_name(s) for s in sorted(keep)
                                                                              if s in steps))
    return removed
