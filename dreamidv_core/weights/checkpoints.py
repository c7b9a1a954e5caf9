"""Loading and converting DreamID-V DiT checkpoints.

``dreamidv.pth`` / ``dreamidv_faster.pth`` (official pickles, read with ``weights_only=True``), their
safetensors conversions, ComfyUI-prefixed files and plain Wan2.1-T2V-1.3B all load through
:func:`load_dit`. The model is built on the ``meta`` device and every tensor is moved straight into
place (converted to its storage dtype on the way), so RAM never holds two copies of the weights.
The variant (full / faster / wan_t2v) is decided from the tensor names in :func:`detect_dit_config`,
and nowhere else.
"""
from __future__ import annotations

import json
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..errors import CheckpointError, InputError
from ..io.state_dict import StateDictReader, check_floating, read_state_dict, save_safetensors, strip_prefix
from ..models.configs import DiTConfig
from ..models.dit import DreamIDVTransformer
from ..models.id_projection import PREFIX as ID_PREFIX, id_projection_shape
from ..models.ivs import init_ivs_state_dict, ivs_config_from

WEIGHT_DTYPES = {
    "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8_e4m3fn": torch.float8_e4m3fn,
}
DIT_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")
CONFIG_METADATA_KEY = "dreamidv_config"
# Declared by the reference inside every cross-attention (class inheritance) and never used.
UNUSED_CROSS_ATTN_POSE = ("cross_attn.k_pose.", "cross_attn.v_pose.", "cross_attn.norm_k_pose.", "cross_attn.pose_gate")


def dit_prefix(reader) -> str:
    """The prefix the DiT's tensor names carry in a checkpoint (``model.``, ``diffusion_model.``, ... or "")."""
    return strip_prefix(reader.keys(), DIT_PREFIXES) or ""


def dit_tensor(path, name: str) -> torch.Tensor:
    """One DiT tensor of the checkpoint file ``path`` by its model name (e.g. ``blocks.0.modulation``), whatever
    prefix the file gives it; read alone (the file is opened lazily)."""
    reader = read_state_dict(path)
    key = dit_prefix(reader) + name
    if key not in reader:
        raise CheckpointError(path, f"has no DiT tensor '{name}'")
    return reader[key]


def detect_dit_config(reader: StateDictReader, prefix: str = "") -> DiTConfig:
    """Work out the variant and the sizes of a DiT from its tensor names and shapes.

    Safetensors written by this pack carry the exact config in their metadata; official files are
    read from their shapes (head_dim 128, as in every Wan2.1 model).
    """
    names = [n[len(prefix):] for n in reader]
    meta = reader.metadata.get(CONFIG_METADATA_KEY) if reader.metadata else None
    if meta:
        return _config_from_metadata(meta, reader.path)
    if "patch_embedding.weight" not in names or "blocks.0.self_attn.q.weight" not in names:
        found = ", ".join(sorted(names)[:4]) + (", ..." if len(names) > 4 else "")
        raise CheckpointError(reader.path, "this is not a DreamID-V / Wan2.1 diffusion-transformer checkpoint "
                                           f"(no 'patch_embedding' or 'blocks.0.self_attn'; it holds {found})")
    shape = lambda n: reader.shape(prefix + n)  # noqa: E731
    has_pose = any(n.startswith("project_pose.") for n in names) or "blocks.0.self_attn.k_pose.weight" in names
    has_ref = "ref_conv.weight" in names
    variant = "full" if has_pose else ("faster" if has_ref else "wan_t2v")
    pe = shape("patch_embedding.weight")
    if has_pose and not has_ref:  # the IVS (dreamidv_core.pipelines.ivs): 16 noise + 4 mask + 16 latent input channels
        if pe[1] != 36:
            raise CheckpointError(reader.path, f"has pose-attention tensors, no 'ref_conv' and {pe[1]} input "
                                               "channels: not a known DreamID-V layout (an IVS has 36)")
        variant = "ivs"
    dim = pe[0]
    widths = tuple(shape(f"project_pose.convs.{i}.weight")[0] for i in (0, 3, 6, 9)) if has_pose else (128, 256, 512, 512)
    return DiTConfig(
        variant=variant, dim=dim, ffn_dim=shape("blocks.0.ffn.0.weight")[0], num_heads=max(1, dim // 128),
        num_layers=1 + max(int(n.split(".")[1]) for n in names if n.startswith("blocks.")),
        freq_dim=shape("time_embedding.0.weight")[1], text_dim=shape("text_embedding.0.weight")[1],
        in_dim=pe[1], out_dim=shape("head.head.weight")[0] // (pe[2] * pe[3] * pe[4]),
        patch_size=tuple(pe[2:]), ref_dim=shape("ref_conv.weight")[1] if has_ref else 16,
        pose_widths=widths, cross_attn_pose="blocks.0.cross_attn.k_pose.weight" in names,
        **_id_projection_fields(reader, prefix, names),
    )


def _config_from_metadata(text: str, path) -> DiTConfig:
    """The DiTConfig this pack wrote under ``dreamidv_config``, every field checked: a damaged or edited entry
    is a :class:`CheckpointError` (guessing the sizes instead could load a model that computes garbage)."""
    def bad(problem: str) -> CheckpointError:
        return CheckpointError(path, f"its '{CONFIG_METADATA_KEY}' metadata is not a valid DreamID-V config "
                                     f"({problem}). This pack's converter and trainer write it; the file was "
                                     "edited or damaged since: convert the original checkpoint again "
                                     "(python -m dreamidv_core convert SRC DST)")
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise bad(f"not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise bad(f"expected a JSON object, found {type(raw).__name__}")
    types = {f.name: f.type for f in dataclass_fields(DiTConfig)}
    unknown = sorted(set(raw) - set(types))
    if unknown:
        raise bad(f"unknown fields {unknown}")
    values = {}
    for name, value in raw.items():
        kind = str(types[name])
        if "Tuple" in kind:
            ok = isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                                            for v in value)
            value = tuple(value) if ok else value
        elif kind == "bool":
            ok = isinstance(value, bool)
        elif kind == "int":
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
        elif kind == "float":
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
        else:
            ok = isinstance(value, str) and value in VARIANT_NAMES
        if not ok:
            raise bad(f"field '{name}' = {value!r}")
        values[name] = value
    cfg = DiTConfig(**values)
    if cfg.dim % max(cfg.num_heads, 1) or cfg.num_heads < 1 or cfg.num_layers < 1 or len(cfg.patch_size) != 3:
        raise bad(f"dim {cfg.dim}, num_heads {cfg.num_heads}, num_layers {cfg.num_layers}, "
                  f"patch_size {cfg.patch_size} do not describe a transformer")
    return cfg


def _id_projection_fields(reader: StateDictReader, prefix: str, names) -> Dict[str, int]:
    """id_tokens / id_embed_dim of the ArcFace ID-token projection (``id_projection.*``), {} without one."""
    shapes = {n[len(ID_PREFIX):]: tuple(reader.shape(prefix + n)) for n in names if n.startswith(ID_PREFIX)}
    if not shapes:
        return {}
    try:
        tokens, embed = id_projection_shape(shapes)
    except ValueError as exc:
        raise CheckpointError(reader.path, str(exc)) from None
    if not tokens:
        raise CheckpointError(reader.path, "has 'id_projection.*' tensors but not the ID projection's MLP "
                                           "(id_projection.mlp.0.weight / mlp.2.weight)")
    return {"id_tokens": tokens, "id_embed_dim": embed}


# Layers the reference computes in float32 inside ``autocast(dtype=float32)`` whatever the run's dtype (the
# timestep embedding and projection, the output head): their weights stay float32 in every storage dtype, so
# a bf16 load computes exactly what the reference's bf16 run does (they are small: ~16 M values at 1.3B).
FP32_LAYERS = ("time_embedding.", "time_projection.", "head.head.")


def storage_dtype(name: str, tensor_shape: Tuple[int, ...], weight_dtype: torch.dtype) -> torch.dtype:
    """Matrices take the requested weight dtype (fp8 only for linear weights, convs then bf16);
    vectors, modulation tables, gates and the :data:`FP32_LAYERS` stay float32 (kept exact as in the
    reference)."""
    if len(tensor_shape) < 2 or name.endswith("modulation") or name.startswith(FP32_LAYERS):
        return torch.float32
    if weight_dtype == torch.float8_e4m3fn and len(tensor_shape) != 2:
        return torch.bfloat16
    return weight_dtype


SWAP_VARIANTS = ("full", "faster")  # the DiTs the face swap runs
VARIANT_NAMES = {
    "full": "a DreamID-V DiT (full, with pose attention)",
    "faster": "a DreamID-V faster DiT (no pose branch)",
    "wan_t2v": "a plain Wan2.1-T2V text-to-video DiT (no reference input, no pose attention), not DreamID-V",
    "ivs": "a DreamID-V IVS (Identity-Anchored Video Synthesizer, for the data-synthesis workflow)",
}


def wrong_variant(variant: str, allowed: Sequence[str], purpose: str = "the face swap") -> str:
    """What a DiT of ``variant`` is and which files ``purpose`` needs instead (for a CheckpointError)."""
    from .model_files import get_entry

    what = VARIANT_NAMES.get(variant, f"a '{variant}' DiT")
    if set(allowed) <= set(SWAP_VARIANTS):
        names = get_entry("dit").accepted_names + get_entry("dit_faster").accepted_names
        need = (f"{purpose} needs the DreamID-V DiT from the DreamID-V release: one of {', '.join(names)} "
                "(README: Model files)")
    else:
        need = f"{purpose} needs {' or '.join(VARIANT_NAMES.get(v, v) for v in allowed)}"
    hint = {"wan_t2v": "; a Wan2.1-T2V file only serves to start training an IVS (DreamID-V IVS Loader, "
                       "training/configs/ivs_from_dreamidv.toml)",
            "ivs": "; load an IVS with the DreamID-V IVS Loader node"}.get(variant, "")
    return f"this is {what}; {need}{hint}"


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_path, _, attr = name.rpartition(".")
    module = model.get_submodule(module_path) if module_path else model
    module._parameters[attr] = nn.Parameter(value, requires_grad=False)


def load_dit(path, weight_dtype="bf16", compute_dtype: Optional[torch.dtype] = None, device="cpu",
             config: Optional[DiTConfig] = None, attention_backend: str = "sdpa",
             variants: Optional[Sequence[str]] = None) -> DreamIDVTransformer:
    """Load a DiT checkpoint into a ready-to-run :class:`DreamIDVTransformer` (eval mode, no grad).

    weight_dtype: "fp32" | "bf16" | "fp16" | "fp8_e4m3fn" (storage); compute_dtype defaults to the
    weight dtype (bf16 for fp8). ``variants``: the variants the caller can use (e.g. :data:`SWAP_VARIANTS`),
    checked from the tensor names before any weight is read. Raises :class:`CheckpointError` naming the
    file on a foreign layout or variant, missing or unexpected tensors, shape mismatches or non-float weights.
    """
    path = Path(path)
    if weight_dtype not in WEIGHT_DTYPES:
        raise CheckpointError(path, f"unknown weight dtype '{weight_dtype}'; choose one of {', '.join(WEIGHT_DTYPES)}")
    wdt = WEIGHT_DTYPES[weight_dtype]
    if compute_dtype is None:
        compute_dtype = torch.bfloat16 if wdt == torch.float8_e4m3fn else wdt
    reader = read_state_dict(path)
    prefix = dit_prefix(reader)
    cfg = config or detect_dit_config(reader, prefix)
    if variants is not None and cfg.variant not in variants:
        raise CheckpointError(path, wrong_variant(cfg.variant, variants))
    with torch.device("meta"):
        model = DreamIDVTransformer(cfg, compute_dtype=compute_dtype, attention_backend=attention_backend)
    expected = {n: tuple(p.shape) for n, p in model.named_parameters()}
    found = {n[len(prefix):]: n for n in reader}
    missing = [n for n in expected if n not in found and not (n.startswith("blocks.") and _is_unused(n))]
    unexpected = [n for n in found if n not in expected]
    if missing or unexpected:
        raise CheckpointError(path, _key_report(cfg, missing, unexpected))
    bad = [f"{n}: file {tuple(reader.shape(found[n]))}, model {s}" for n, s in expected.items()
           if n in found and tuple(reader.shape(found[n])) != s]
    if bad:
        raise CheckpointError(path, f"{len(bad)} tensors have the wrong shape for a {cfg.variant} DiT of dim "
                                    f"{cfg.dim}: " + "; ".join(bad[:5]))
    check_floating(reader, [found[n] for n in expected if n in found], "DiT")
    for name, shp in expected.items():
        if name not in found:  # an allowed-absent unused tensor: zeros keep it inert
            value = torch.zeros(shp, dtype=torch.float32, device=device)
        else:
            src = reader[found[name]]
            value = src.to(device=device, dtype=storage_dtype(name, shp, wdt))
        _set_tensor(model, name, value)
    return model.eval().requires_grad_(False)


def _is_unused(name: str) -> bool:
    return any(part in name for part in UNUSED_CROSS_ATTN_POSE)


def _key_report(cfg: DiTConfig, missing, unexpected) -> str:
    parts = [f"does not match the {cfg.variant} DreamID-V DiT layout"]
    if missing:
        parts.append(f"{len(missing)} missing tensors (e.g. {', '.join(missing[:5])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected tensors (e.g. {', '.join(unexpected[:5])})")
    return "; ".join(parts)


def dit_state_dict_for_saving(model: DreamIDVTransformer, dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
    """The model's tensors under the official names, optionally cast (matrices only, as at load)."""
    out = {}
    for name, p in model.state_dict().items():
        out[name] = p if dtype is None else p.to(storage_dtype(name, tuple(p.shape), dtype))
    return out


def save_dit(model: DreamIDVTransformer, path, dtype: Optional[torch.dtype] = None) -> None:
    """Write a DiT as safetensors (atomic), with its exact config in the metadata."""
    save_safetensors(dit_state_dict_for_saving(model, dtype), path, metadata=_config_metadata(model.cfg))


def _config_metadata(cfg: DiTConfig) -> Dict[str, str]:
    fields = cfg.to_dict()
    if not fields.get("id_tokens"):  # no ID projection: the metadata stays what it was before it existed
        fields.pop("id_tokens", None)
        fields.pop("id_embed_dim", None)
    return {CONFIG_METADATA_KEY: json.dumps(fields), "format": "pt"}


def convert_to_safetensors(src, dst, dtype: Optional[str] = None) -> Dict[str, str]:
    """Convert a weight file (official .pth DiT or VAE, or anything safe to read) to safetensors.

    DiT files get their detected config in the metadata. ``dtype`` ("bf16", "fp16", "fp32") casts
    floating matrices. The source is memory-mapped and the output written atomically.
    Returns a small summary for the command line.
    """
    reader = read_state_dict(src)
    target = WEIGHT_DTYPES[dtype] if dtype else None
    if target == torch.float8_e4m3fn:
        raise CheckpointError(dst, "fp8 is a load-time choice; convert to bf16 or fp16 instead")
    metadata = {"format": "pt"}
    kind = "weights"
    prefix = dit_prefix(reader)
    names = [n[len(prefix):] for n in reader]
    if "patch_embedding.weight" in names:
        cfg = detect_dit_config(reader, prefix)
        metadata.update(_config_metadata(cfg))
        kind = f"DreamID-V DiT ({cfg.variant})"
    tensors = {}
    for name in reader:
        t = reader[name]
        if target is not None and t.is_floating_point() and t.dtype != target:
            t = t.to(storage_dtype(name, tuple(t.shape), target)) if kind != "weights" else t.to(target)
        tensors[name[len(prefix):]] = t
    save_safetensors(tensors, dst, metadata=metadata)
    return {"kind": kind, "tensors": str(len(tensors)), "dtype": dtype or "unchanged", "output": str(dst)}


def load_ivs(path, weight_dtype: str = "bf16", compute_dtype: Optional[torch.dtype] = None, device="cpu",
             attention_backend: str = "sdpa", seed: int = 0):
    """An IVS from ``path``: IVS weights load as they are (:func:`load_dit`); a DreamID-V or
    Wan2.1-T2V file initialises a new IVS (:func:`dreamidv_core.models.ivs.init_ivs_state_dict`). -> (model, InitReport or None)."""
    if weight_dtype not in WEIGHT_DTYPES:
        raise CheckpointError(path, f"unknown weight dtype '{weight_dtype}'; choose one of {', '.join(WEIGHT_DTYPES)}")
    reader = read_state_dict(path)
    prefix = dit_prefix(reader)
    src_cfg = detect_dit_config(reader, prefix)
    if src_cfg.variant == "ivs":
        return load_dit(path, weight_dtype, compute_dtype, device, attention_backend=attention_backend), None
    cfg = ivs_config_from(src_cfg)
    check_floating(reader, list(reader), "DiT")
    source = {n[len(prefix):]: reader[n] for n in reader}
    try:
        tensors, report = init_ivs_state_dict(source, cfg, seed)
    except InputError as exc:
        raise CheckpointError(path, str(exc)) from None
    wdt = WEIGHT_DTYPES[weight_dtype]
    if compute_dtype is None:
        compute_dtype = torch.bfloat16 if wdt == torch.float8_e4m3fn else wdt
    with torch.device("meta"):
        model = DreamIDVTransformer(cfg, compute_dtype=compute_dtype, attention_backend=attention_backend)
    for name, p in list(model.named_parameters()):
        _set_tensor(model, name, tensors.pop(name).to(device=device, dtype=storage_dtype(name, tuple(p.shape), wdt)))
    return model.eval().requires_grad_(False), report
