"""ArcFace ID-token projection files: recognise them and load them into a DiT.

The projection itself (:class:`~dreamidv_core.models.id_projection.IDProjection`) is a model part; a file of
only ``id_projection.*`` tensors is what ``trainable = "id_projection"`` training saves.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..errors import CheckpointError
from ..io.state_dict import read_state_dict
from ..models.id_projection import PREFIX, IDProjection, id_projection_shape
from .checkpoints import storage_dtype


def is_id_projection_file(path) -> bool:
    """True when the weight file holds ``id_projection.*`` tensors only (what ``trainable="id_projection"`` saves)."""
    names = list(read_state_dict(path))
    return bool(names) and all(n.startswith(PREFIX) for n in names)


def read_id_projection_file(path, dim: int, num_heads: int, num_layers: int, eps: float = 1e-6,
                            existing: Optional[IDProjection] = None):
    """Check a file of ``id_projection.*`` tensors against a model of width ``dim`` with ``num_layers`` blocks
    (and its ``existing`` projection, if any) -> (num_tokens, embed_dim, reader). Raises :class:`CheckpointError`
    naming the file when it is not an ID projection or does not fit."""
    reader = read_state_dict(path)
    names = list(reader)
    foreign = [n for n in names if not n.startswith(PREFIX)]
    if not names or foreign:
        raise CheckpointError(path, "is not an ArcFace ID-projection file: expected only 'id_projection.*' tensors "
                                    f"(the model.safetensors of an id_projection training run), found "
                                    f"{', '.join((foreign or ['nothing'])[:3])}")
    shapes = {n[len(PREFIX):]: tuple(reader.shape(n)) for n in names}
    try:
        tokens, embed = id_projection_shape(shapes)
    except ValueError as exc:
        raise CheckpointError(path, str(exc)) from None
    if not tokens:
        raise CheckpointError(path, "lacks the ID projection's MLP (id_projection.mlp.0.weight / mlp.2.weight)")
    like = existing
    if like is None:  # check against the projection this file would add before touching the model
        with torch.device("meta"):
            like = IDProjection(dim, num_heads, num_layers, tokens, embed, eps)
    expected = {n: tuple(p.shape) for n, p in like.named_parameters()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    bad = [f"{n}: file {shapes[n]}, model {s}" for n, s in expected.items() if n in shapes and shapes[n] != s]
    if missing or unexpected or bad:
        parts = [f"{len(missing)} missing (e.g. {', '.join(missing[:3])})" if missing else "",
                 f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})" if unexpected else "",
                 "wrong shapes: " + "; ".join(bad[:3]) if bad else ""]
        raise CheckpointError(path, "does not fit this model's ID projection "
                                    f"({num_layers} blocks, width {dim}): " + "; ".join(p for p in parts if p))
    return tokens, embed, reader


def apply_id_projection_file(dit: nn.Module, path) -> IDProjection:
    """Load a file of ``id_projection.*`` tensors (a training checkpoint's ``model.safetensors`` in
    ``id_projection`` mode, or those tensors of a full save) into ``dit``, adding the projection when the
    model has none. Matrices take the dtype of the model's linear weights, vectors and gates float32 (as
    :func:`.checkpoints.load_dit` stores them). Raises :class:`CheckpointError` naming the
    file when it is not an ID projection or its shapes do not fit the model.
    """
    cfg = dit.cfg
    proj = getattr(dit, "id_projection", None)
    tokens, embed, reader = read_id_projection_file(path, cfg.dim, cfg.num_heads, cfg.num_layers, cfg.eps, proj)
    if proj is None:
        proj = dit.attach_id_projection(tokens, embed)
    linear = dit.blocks[0].self_attn.q.weight.dtype if len(dit.blocks) else torch.float32
    params = dict(proj.named_parameters())
    with torch.no_grad():
        for n, p in params.items():
            value = reader[PREFIX + n].to(p.device, storage_dtype(PREFIX + n, tuple(p.shape), linear))
            p.data = value
    proj.requires_grad_(dit.patch_embedding.weight.requires_grad)  # a loaded (frozen) model stays frozen
    return proj
