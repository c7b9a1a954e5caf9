"""LoRA (low-rank adapters) for the DiT's linear layers, saved as a file the model loader can merge.

Each targeted ``nn.Linear`` / ``CastLinear`` keeps its own weights and names; it gains two child
layers ``lora_A`` (in -> rank, random) and ``lora_B`` (rank -> out, zero-initialised, so the adapter is
a no-op at the start) and a forward hook adding ``scale * lora_B(lora_A(x))`` with
``scale = alpha / rank``. Parameter names become ``<module>.lora_A.weight`` / ``<module>.lora_B.weight``.

A LoRA file (safetensors) holds those two tensors per module plus ``<module>.alpha`` (a scalar), each name
behind ``diffusion_model.`` (ComfyUI's key names: its LoRA loaders apply the file to its Wan model too), and
metadata ``lora_rank``, ``lora_alpha``, ``lora_targets``. Applying such a file at inference belongs to the
core: :func:`dreamidv_core.weights.lora.apply_lora_file`.
"""
from __future__ import annotations

import fnmatch
import json
import math
from pathlib import Path
from typing import Dict, List, Sequence, Union

import torch
import torch.nn as nn

from dreamidv_core.errors import InputError
from dreamidv_core.io.state_dict import save_safetensors
from dreamidv_core.weights.lora import FILE_PREFIX as LORA_FILE_PREFIX

DEFAULT_TARGETS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "ffn.0", "ffn.2")
_HOOK_ATTR = "_lora_hook_handle"


def parse_targets(targets: Union[str, Sequence[str]]) -> List[str]:
    if isinstance(targets, str):
        targets = targets.split(",")
    out = [t.strip() for t in targets if t.strip()]
    if not out:
        raise InputError("LoRA target modules are empty; give names like 'self_attn.q,ffn.0'")
    return out


def _matches(name: str, pattern: str) -> bool:
    """``pattern`` matches a module name equal to it, ending with ``.pattern``, or as a glob."""
    return name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern)


def _lora_forward_hook(module, inputs, output):
    x = inputs[0]
    a = module.lora_A.weight
    delta = module.lora_B(module.lora_A(x.to(a.dtype)))
    return output + (delta * module.lora_scale).to(output.dtype)


def add_lora(model: nn.Module, rank: int = 16, alpha: float = 16.0,
             targets: Union[str, Sequence[str]] = DEFAULT_TARGETS, seed: int = 0) -> List[str]:
    """Attach adapters to every linear layer whose name matches a target; returns the module names.

    ``lora_A`` gets Kaiming-uniform noise from ``seed``, ``lora_B`` zeros. Raises :class:`InputError`
    when nothing matches."""
    if rank < 1:
        raise InputError(f"LoRA rank must be >= 1, got {rank}")
    patterns = parse_targets(targets)
    gen = torch.Generator().manual_seed(seed)
    names = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or hasattr(mod, "lora_A") or ".lora_" in name:
            continue
        if not any(_matches(name, p) for p in patterns):
            continue
        dev = mod.weight.device
        mod.lora_A = nn.Linear(mod.in_features, rank, bias=False, device=dev, dtype=torch.float32)
        mod.lora_B = nn.Linear(rank, mod.out_features, bias=False, device=dev, dtype=torch.float32)
        bound = 1.0 / math.sqrt(mod.in_features)
        with torch.no_grad():
            mod.lora_A.weight.copy_((torch.rand(rank, mod.in_features, generator=gen) * 2 - 1) * bound)
            mod.lora_B.weight.zero_()
        mod.lora_scale = float(alpha) / rank
        mod.lora_rank, mod.lora_alpha = rank, float(alpha)
        setattr(mod, _HOOK_ATTR, mod.register_forward_hook(_lora_forward_hook))
        names.append(name)
    if not names:
        raise InputError(f"no linear layer matches the LoRA targets {patterns}; the model's linear layers "
                         "are named like 'blocks.0.self_attn.q', 'blocks.0.ffn.0'")
    model.lora_config = {"rank": rank, "alpha": float(alpha), "targets": patterns}
    return names


def lora_modules(model: nn.Module) -> Dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, _HOOK_ATTR)}


def lora_parameters(model: nn.Module) -> Dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}


def lora_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """``<module>.lora_A.weight`` [rank, in], ``<module>.lora_B.weight`` [out, rank], ``<module>.alpha`` []."""
    out = {}
    for name, mod in lora_modules(model).items():
        out[f"{name}.lora_A.weight"] = _full(mod.lora_A.weight)
        out[f"{name}.lora_B.weight"] = _full(mod.lora_B.weight)
        out[f"{name}.alpha"] = torch.tensor(mod.lora_alpha, dtype=torch.float32)
    if not out:
        raise InputError("the model has no LoRA adapters (call add_lora first)")
    return out


def _full(t: torch.Tensor) -> torch.Tensor:
    if hasattr(t, "full_tensor"):  # FSDP-sharded parameter
        t = t.full_tensor()
    return t.detach().to("cpu", torch.float32).clone()


def save_lora(model: nn.Module, path, extra_metadata: Dict[str, str] = None,
              tensors: Dict[str, torch.Tensor] = None) -> Path:
    """Write the adapters as safetensors (atomic). ``tensors``: a :func:`lora_state_dict` gathered
    beforehand (under FSDP every rank must take part in that gather; one rank then writes)."""
    cfg = getattr(model, "lora_config", {})
    meta = {"format": "pt", "lora_rank": str(cfg.get("rank", "")), "lora_alpha": str(cfg.get("alpha", "")),
            "lora_targets": json.dumps(cfg.get("targets", [])), "kind": "dreamidv_lora"}
    meta.update(extra_metadata or {})
    tensors = tensors if tensors is not None else lora_state_dict(model)
    # under ComfyUI's key names (diffusion_model.<layer>...), so its own LoRA loaders read the file too
    save_safetensors({LORA_FILE_PREFIX + n: t for n, t in tensors.items()}, path, metadata=meta)
    return Path(path)


def remove_lora(model: nn.Module, merge: bool = True) -> None:
    """Detach the adapters (merging them into the weights first when ``merge``)."""
    for mod in lora_modules(model).values():
        if merge:
            with torch.no_grad():
                delta = (mod.lora_B.weight.float() @ mod.lora_A.weight.float()) * mod.lora_scale
                mod.weight.copy_((mod.weight.float() + delta).to(mod.weight.dtype))
        getattr(mod, _HOOK_ATTR).remove()
        for attr in ("lora_A", "lora_B"):
            delattr(mod, attr)
        for attr in (_HOOK_ATTR, "lora_scale", "lora_rank", "lora_alpha"):
            mod.__dict__.pop(attr, None)
