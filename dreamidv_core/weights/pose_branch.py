"""The pose branch of a DreamID-V checkpoint on its own (:class:`~dreamidv_core.models.pose_branch.PoseBranch`),
for a host whose Wan2.1 model loads the rest of the file and drops these tensors (ComfyUI's loader does).

Only the branch's tensors are read (``project_pose.*``, every block's ``self_attn.{k_pose, v_pose, norm_k_pose,
pose_gate}`` and any ``id_projection.*``); the unused pose layers the reference declares inside every
cross-attention are skipped. An ArcFace ID-token projection may also come from a separate file (what
``trainable = "id_projection"`` training saves).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Tuple

import torch

from ..errors import CheckpointError
from ..io.state_dict import read_state_dict
from ..models.configs import DiTConfig
from ..models.id_projection import PREFIX as ID_PREFIX
from ..models.pose_branch import PoseBranch, is_branch_tensor
from .checkpoints import WEIGHT_DTYPES, _set_tensor, detect_dit_config, dit_prefix, storage_dtype
from .id_projection import read_id_projection_file


def load_pose_branch(path, weight_dtype="bf16", device="cpu", operations=None,
                     id_projection_path=None) -> Tuple[PoseBranch, DiTConfig]:
    """-> (the branch of the DreamID-V checkpoint ``path`` (empty for the faster variant, which has none, unless
    an ID projection comes with it), the checkpoint's DiT config). ``weight_dtype``: storage of the matrices
    ("bf16", "fp16", "fp32"; vectors and gates stay float32); ``operations``: the layer constructors (see
    :class:`~dreamidv_core.models.layers.CastOps`). Raises :class:`CheckpointError` naming the file."""
    if weight_dtype not in WEIGHT_DTYPES or weight_dtype == "fp8_e4m3fn":
        raise CheckpointError(path, f"pose branch weight dtype must be bf16, fp16 or fp32, got '{weight_dtype}'")
    wdt = WEIGHT_DTYPES[weight_dtype]
    reader = read_state_dict(path)
    prefix = dit_prefix(reader)
    cfg = detect_dit_config(reader, prefix)
    if cfg.variant not in ("full", "faster"):
        raise CheckpointError(path, f"is a {cfg.variant} checkpoint, not DreamID-V (full or faster)")
    sources = {n[len(prefix):]: (reader, n) for n in reader if is_branch_tensor(n[len(prefix):])}
    if id_projection_path is not None:
        if cfg.id_tokens:
            raise CheckpointError(id_projection_path, f"an ID projection was given but {path} has its own")
        tokens, embed, id_reader = read_id_projection_file(id_projection_path, cfg.dim, cfg.num_heads, cfg.num_layers,
                                                           cfg.eps)
        cfg = replace(cfg, id_tokens=tokens, id_embed_dim=embed)
        sources.update({n: (id_reader, n) for n in id_reader if n.startswith(ID_PREFIX)})
    with torch.device("meta"):
        branch = PoseBranch(cfg, operations)
    expected = {n: tuple(p.shape) for n, p in branch.named_parameters()}
    missing = sorted(set(expected) - set(sources))
    unexpected = sorted(set(sources) - set(expected))
    if missing or unexpected:
        raise CheckpointError(path, f"pose branch of a {cfg.variant} DreamID-V checkpoint does not match: "
                                    f"{len(missing)} missing (e.g. {', '.join(missing[:3])}), {len(unexpected)} "
                                    f"unexpected (e.g. {', '.join(unexpected[:3])})")
    for name, shape in expected.items():
        src, key = sources[name]
        if tuple(src.shape(key)) != shape:
            raise CheckpointError(path, f"tensor {key} is {tuple(src.shape(key))}, the pose branch needs {shape}")
        _set_tensor(branch, name, src[key].to(device=device, dtype=storage_dtype(name, shape, wdt)))
    return branch.eval().requires_grad_(False), cfg

