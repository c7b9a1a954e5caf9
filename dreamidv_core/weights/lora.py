"""LoRA files for the DiT: which tensors adapt which layer, in the formats Wan2.1 LoRAs come in, and merging one.

An adapted layer ``x`` (a linear layer of the model) is described by, in any of these formats:

* this pack's (``training/lora.py``), ComfyUI's and diffusers/PEFT's: ``x.lora_A.weight`` [rank, in] and
  ``x.lora_B.weight`` [out, rank];
* kohya's / musubi-tuner's: ``x.lora_down.weight`` and ``x.lora_up.weight``;
* optionally ``x.alpha`` (a scalar; the update is scaled by alpha / rank, default alpha = rank), and full-rank
  ``x.diff`` (a weight delta) / ``x.diff_b`` (a bias delta) some Wan LoRAs carry for norms and biases.

The layer name ``x`` is the model's own (``blocks.0.self_attn.q``), optionally behind a prefix
(``diffusion_model.``, ``model.diffusion_model.``, ``transformer.``), in kohya's underscore form
(``lora_unet_blocks_0_self_attn_q``) or in diffusers' Wan names (``blocks.0.attn1.to_q``, ``ffn.net.0.proj``...).
:func:`lora_layers` resolves every adapted layer against the model's layer names; a host with its own LoRA
machinery (ComfyUI) hands its loader the mapping file name -> layer, and :func:`apply_lora_file` merges
``W += strength * alpha / rank * up @ down`` for a model held outside any host.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional

import torch
import torch.nn as nn

from ..errors import CheckpointError
from ..io.state_dict import read_state_dict

# role of each tensor name suffix
LORA_SUFFIXES = (
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".alpha", "alpha"), (".diff_b", "diff_b"), (".diff", "diff"),
)
LORA_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "model.")
KOHYA_PREFIXES = ("lora_unet_", "lora_transformer_")
FILE_PREFIX = "diffusion_model."  # what this pack writes (ComfyUI's own LoRA loaders then read the file too)

# diffusers' Wan2.1 layer names -> the model's (block layers and the embedders)
_DIFFUSERS = (
    (r"^blocks\.(\d+)\.attn1\.to_q$", r"blocks.\1.self_attn.q"),
    (r"^blocks\.(\d+)\.attn1\.to_k$", r"blocks.\1.self_attn.k"),
    (r"^blocks\.(\d+)\.attn1\.to_v$", r"blocks.\1.self_attn.v"),
    (r"^blocks\.(\d+)\.attn1\.to_out\.0$", r"blocks.\1.self_attn.o"),
    (r"^blocks\.(\d+)\.attn2\.to_q$", r"blocks.\1.cross_attn.q"),
    (r"^blocks\.(\d+)\.attn2\.to_k$", r"blocks.\1.cross_attn.k"),
    (r"^blocks\.(\d+)\.attn2\.to_v$", r"blocks.\1.cross_attn.v"),
    (r"^blocks\.(\d+)\.attn2\.to_out\.0$", r"blocks.\1.cross_attn.o"),
    (r"^blocks\.(\d+)\.ffn\.net\.0\.proj$", r"blocks.\1.ffn.0"),
    (r"^blocks\.(\d+)\.ffn\.net\.2$", r"blocks.\1.ffn.2"),
    (r"^condition_embedder\.text_embedder\.linear_1$", "text_embedding.0"),
    (r"^condition_embedder\.text_embedder\.linear_2$", "text_embedding.2"),
    (r"^condition_embedder\.time_embedder\.linear_1$", "time_embedding.0"),
    (r"^condition_embedder\.time_embedder\.linear_2$", "time_embedding.2"),
    (r"^condition_embedder\.time_proj$", "time_projection.1"),
    (r"^proj_out$", "head.head"),
)


@dataclass
class LoraLayer:
    """One adapted layer: ``module`` (the model's layer name), ``base`` (its name in the file) and the file's
    tensor names by role (``down``, ``up``, ``alpha``, ``diff``, ``diff_b``)."""

    module: str
    base: str
    tensors: Dict[str, str] = field(default_factory=dict)

    @property
    def low_rank(self) -> bool:
        return "down" in self.tensors or "up" in self.tensors


def _split(name: str):
    for suffix, role in LORA_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)], role
    return None, None


def _strip_prefix(base: str) -> str:
    for prefix in LORA_PREFIXES:
        if base.startswith(prefix):
            return base[len(prefix):]
    return base


def resolve_layer(base: str, modules: Iterable[str], kohya: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The model layer (one of ``modules``) a LoRA file's layer name ``base`` adapts, or None."""
    modules = modules if isinstance(modules, (set, frozenset, dict)) else set(modules)
    for prefix in KOHYA_PREFIXES:
        if base.startswith(prefix):
            kohya = kohya if kohya is not None else {m.replace(".", "_"): m for m in modules}
            return kohya.get(base[len(prefix):])
    name = _strip_prefix(base)
    if name in modules:
        return name
    for pattern, target in _DIFFUSERS:
        if re.match(pattern, name):
            mapped = re.sub(pattern, target, name)
            return mapped if mapped in modules else None
    return None


def lora_layers(names: Iterable[str], modules: Iterable[str], path="LoRA file") -> List[LoraLayer]:
    """The adapted layers of a LoRA file whose tensors are ``names``, resolved against the model's layer names
    ``modules``. Raises :class:`CheckpointError` naming ``path`` for a tensor that is no LoRA tensor, a layer the
    model lacks, or a layer missing its down or up matrix."""
    modules = set(modules)
    kohya = {m.replace(".", "_"): m for m in modules}
    by_base: Dict[str, LoraLayer] = {}
    for n in names:
        base, role = _split(n)
        if base is None:
            raise CheckpointError(path, f"not a LoRA file: tensor '{n}' is none of <layer>.lora_A.weight / "
                                        "lora_B.weight / lora_down.weight / lora_up.weight / alpha / diff / diff_b")
        layer = by_base.get(base)
        if layer is None:
            module = resolve_layer(base, modules, kohya)
            if module is None:
                raise CheckpointError(path, f"adapts '{base}', which is not a layer of this model (a LoRA trained "
                                            "for another model?); layers are named like 'blocks.0.self_attn.q'")
            layer = by_base[base] = LoraLayer(module, base)
        layer.tensors[role] = n
    if not by_base:
        raise CheckpointError(path, "holds no LoRA tensors")
    for layer in by_base.values():
        if layer.low_rank and not ("down" in layer.tensors and "up" in layer.tensors):
            raise CheckpointError(path, f"layer '{layer.base}' lacks its down (lora_A / lora_down) or up "
                                        "(lora_B / lora_up) matrix")
    return sorted(by_base.values(), key=lambda layer: layer.module)


def lora_weight_delta(reader, layer: LoraLayer, shape, path="LoRA file") -> Optional[torch.Tensor]:
    """float32 delta of ``layer``'s weight (shape ``shape``) at strength 1: alpha / rank * up @ down (+ diff);
    None when the file changes only the bias."""
    delta = None
    if layer.low_rank:
        down, up = reader[layer.tensors["down"]].float(), reader[layer.tensors["up"]].float()
        rank = down.shape[0]
        if up.shape[1] != rank or (up.shape[0], *down.shape[1:]) != tuple(shape):
            raise CheckpointError(path, f"LoRA for '{layer.base}' gives a {up.shape[0]}x{down.shape[1]} update; the "
                                        f"layer is {tuple(shape)} (a LoRA trained for another model?)")
        alpha = float(reader[layer.tensors["alpha"]]) if "alpha" in layer.tensors else float(rank)
        delta = (up.flatten(1) @ down.flatten(1)).reshape(shape) * (alpha / rank)
    if "diff" in layer.tensors:
        diff = reader[layer.tensors["diff"]].float()
        if tuple(diff.shape) != tuple(shape):
            raise CheckpointError(path, f"'{layer.tensors['diff']}' is {tuple(diff.shape)}; the layer is {tuple(shape)}")
        delta = diff if delta is None else delta + diff
    return delta


def apply_lora_file(dit: nn.Module, path, strength: float = 1.0) -> List[str]:
    """Merge a LoRA file into ``dit``'s weights in place: ``W += strength * alpha/rank * up @ down`` (and the
    full-rank deltas). Returns the patched layer names. Raises :class:`CheckpointError` naming the file when it
    is not a LoRA file or does not fit the model (unknown layer, wrong shapes). Hosts with their own weight
    patching (ComfyUI) use :func:`lora_layers` instead and never modify the weights."""
    reader = read_state_dict(path)
    modules = {n: m for n, m in dit.named_modules() if isinstance(getattr(m, "weight", None), torch.Tensor)}
    patched = []
    for layer in lora_layers(list(reader), modules, path):
        mod = modules[layer.module]
        delta = lora_weight_delta(reader, layer, tuple(mod.weight.shape), path)
        with torch.no_grad():
            if delta is not None:
                w = mod.weight
                w.copy_((w.float() + strength * delta.to(w.device)).to(w.dtype))
            if "diff_b" in layer.tensors and getattr(mod, "bias", None) is not None:
                b = mod.bias
                b.copy_((b.float() + strength * reader[layer.tensors["diff_b"]].float().to(b.device)).to(b.dtype))
        patched.append(layer.module)
    return patched
