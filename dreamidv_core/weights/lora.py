"""LoRA files applied to a DiT at inference: ``W += strength * alpha / rank * B @ A`` per adapted layer.

A LoRA file (safetensors) holds ``<module>.lora_A.weight`` [rank, in], ``<module>.lora_B.weight`` [out, rank]
and optionally ``<module>.alpha`` (a scalar; default: the rank) per adapted linear layer, module names as
the DiT's (optionally behind a ``diffusion_model.`` style prefix). Training such adapters: ``training/lora.py``.
"""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn as nn

from ..errors import CheckpointError
from ..io.state_dict import read_state_dict, strip_prefix

LORA_PREFIXES = ("diffusion_model.", "model.diffusion_model.", "model.")


def apply_lora_file(dit: nn.Module, path, strength: float = 1.0) -> List[str]:
    """Merge a LoRA file into ``dit``'s weights in place: ``W += strength * alpha/rank * B @ A``.

    Returns the patched module names. Raises :class:`CheckpointError` naming the file when it is not a
    LoRA file or does not fit the model (unknown module, wrong shapes)."""
    reader = read_state_dict(path)
    names = list(reader)
    prefix = strip_prefix(names, LORA_PREFIXES) or ""
    groups: Dict[str, Dict[str, str]] = {}
    for n in names:
        base = n[len(prefix):]
        for suffix in (".lora_A.weight", ".lora_B.weight", ".alpha"):
            if base.endswith(suffix):
                groups.setdefault(base[: -len(suffix)], {})[suffix] = n
                break
        else:
            raise CheckpointError(path, f"not a LoRA file: tensor '{n}' is not <module>.lora_A.weight / "
                                        "<module>.lora_B.weight / <module>.alpha")
    if not groups:
        raise CheckpointError(path, "holds no LoRA tensors")
    modules = dict(dit.named_modules())
    patched = []
    for mod_name, parts in sorted(groups.items()):
        if ".lora_A.weight" not in parts or ".lora_B.weight" not in parts:
            raise CheckpointError(path, f"module '{mod_name}' lacks its lora_A or lora_B tensor")
        mod = modules.get(mod_name)
        if mod is None or not isinstance(getattr(mod, "weight", None), torch.Tensor) or mod.weight.dim() != 2:
            raise CheckpointError(path, f"LoRA for '{mod_name}', which is not a linear layer of this model "
                                        "(a LoRA trained for another model?)")
        a = reader[parts[".lora_A.weight"]].float()
        b = reader[parts[".lora_B.weight"]].float()
        rank = a.shape[0]
        if b.shape[1] != rank or (b.shape[0], a.shape[1]) != tuple(mod.weight.shape):
            raise CheckpointError(path, f"LoRA for '{mod_name}' gives a {b.shape[0]}x{a.shape[1]} update; the "
                                        f"layer is {tuple(mod.weight.shape)} (a LoRA trained for another model?)")
        alpha = float(reader[parts[".alpha"]]) if ".alpha" in parts else float(rank)
        with torch.no_grad():
            w = mod.weight
            delta = (b.to(w.device) @ a.to(w.device)) * (strength * alpha / rank)
            w.copy_((w.float() + delta).to(w.dtype))
        patched.append(mod_name)
    return patched
