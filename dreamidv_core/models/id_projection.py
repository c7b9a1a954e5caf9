"""ArcFace ID-token projection: an identity embedding -> a few tokens every self-attention also attends to.

Not part of the released DreamID-V (whose identity is the VAE latent of the reference photo); this pack
adds it so fine-tuning can inject the ArcFace identity directly, IP-adapter style (decoupled attention).

Shapes (E = ``id_embed_dim``, 512 for ArcFace; T = ``num_tokens``; C = model dim; N heads of D = C / N):

* ``tokens``: ``LayerNorm(W2 GELU(W1 e))`` reshaped: embedding rows [R, E] -> ID tokens [R, T, C];
* block ``i``: ``K_i = RMSNorm(k_i(tokens))``, ``V_i = v_i(tokens)`` -> [R, T, N, D] each, computed once per
  video in :meth:`~dreamidv_core.models.dit.DreamIDVTransformer.prepare` (like the text K/V);
* block ``i``'s self-attention output becomes ``Attn(q, k, v) [+ pose] + gate_i * Attn(q, K_i, V_i)`` with
  the query *before* RoPE (the ID tokens have no position), ``gate_i`` a scalar initialised to 0.

With every gate at 0 the model computes exactly what it computes without the projection; while no gate
requires grad and all are 0, :meth:`IDProjection.is_noop` lets ``prepare`` skip the ID attention entirely,
so an untrained projection costs nothing and changes nothing. All parameters live under this module, so
on the DiT they are named ``id_projection.*`` (``mlp``, ``norm``, ``blocks.<i>.k|v|norm_k|gate``) and the
trainer's ``trainable="id_projection"`` mode picks exactly them. They are not block-offloaded (they are
only used in ``prepare``).

Training and use
----------------
Build or load a model with the projection: ``DiTConfig(id_tokens=4)`` (``tiny_config(..., id_tokens=4)``),
or ``dit.attach_id_projection(4)`` on a loaded released checkpoint. Train with
``TrainConfig(trainable="id_projection")`` and a stage loss built with an ``identity_encoder`` that returns
[n, E] embeddings (``insightface:<pack folder>`` for ArcFace, see :func:`training.stages.make_loss_fn`):
each sample's reference image is embedded, and the embedding is zeroed whenever identity dropout zeroes
the reference, so the unconditional guidance row learns "no identity". The checkpoint folder's
``model.safetensors`` then holds only the ``id_projection.*`` tensors: copy it into ``models/loras`` and
pick it in the DreamID-V Model Loader's ``id_projection`` input (applied on top of the released weights),
or save the whole model with :func:`dreamidv_core.weights.checkpoints.save_dit`. The sampler feeds the identity
bundle's ArcFace embedding (the identity node must detect a face), with a zero embedding for the
identity-guidance pass without the reference.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import torch.nn as nn

from ..errors import InputError
from .layers import CastOps

PREFIX = "id_projection."
KV = Tuple[torch.Tensor, torch.Tensor]


class IDBlockLayers(nn.Module):
    """One DiT block's ID K/V layers: k, v [C -> C], RMSNorm on K, scalar gate (0 at init)."""

    def __init__(self, dim: int, eps: float, operations=None):
        super().__init__()
        ops = operations or CastOps
        self.k, self.v = ops.Linear(dim, dim), ops.Linear(dim, dim)
        self.norm_k = ops.RMSNorm(dim, eps)
        self.gate = nn.Parameter(torch.zeros(1))


class IDProjection(nn.Module):
    """ArcFace embedding [R, E] -> ``num_tokens`` ID tokens [R, T, C] and every block's ID K/V.
    ``operations``: the layer constructors (:class:`~.layers.CastOps` by default)."""

    def __init__(self, dim: int, num_heads: int, num_layers: int, num_tokens: int = 4, embed_dim: int = 512,
                 eps: float = 1e-6, operations=None):
        super().__init__()
        if num_tokens < 1 or embed_dim < 1:
            raise InputError(f"ID projection needs num_tokens >= 1 and embed_dim >= 1, got {num_tokens}, {embed_dim}")
        self.dim, self.num_heads, self.num_tokens, self.embed_dim = dim, num_heads, num_tokens, embed_dim
        ops = operations or CastOps
        self.mlp = nn.Sequential(ops.Linear(embed_dim, dim), nn.GELU(approximate="tanh"),
                                 ops.Linear(dim, num_tokens * dim))
        self.norm = ops.LayerNorm(dim, eps, affine=True)
        self.blocks = nn.ModuleList([IDBlockLayers(dim, eps, ops) for _ in range(num_layers)])

    def is_noop(self) -> bool:
        """True when every gate is exactly 0 and none trains: the ID attention cannot change anything."""
        gates = [b.gate for b in self.blocks]
        return not any(g.requires_grad for g in gates) and all(bool((g == 0).all()) for g in gates)

    def tokens(self, embedding: torch.Tensor, dtype: torch.dtype, device=None) -> torch.Tensor:
        """embedding [R, E] (any float dtype) -> ID tokens [R, T, C] in ``dtype`` on ``device`` (default: where
        the projection's weights are)."""
        if embedding.dim() == 1:
            embedding = embedding[None]
        if embedding.dim() != 2 or embedding.shape[1] != self.embed_dim:
            raise InputError(f"ID embedding must be [rows, {self.embed_dim}] (ArcFace), got {list(embedding.shape)}")
        device = self.mlp[0].weight.device if device is None else device
        t = self.mlp(embedding.to(device, dtype)).unflatten(-1, (self.num_tokens, self.dim))
        return self.norm(t).to(dtype)

    def block_kv(self, i: int, tokens: torch.Tensor) -> KV:
        """tokens [R, T, C] -> block i's ID K, V [R, T, N, D] in the tokens' dtype."""
        layers = self.blocks[i]
        k = layers.norm_k(layers.k(tokens)).unflatten(-1, (self.num_heads, -1))
        v = layers.v(tokens).unflatten(-1, (self.num_heads, -1))
        return k.to(tokens.dtype), v.to(tokens.dtype)

    def all_kv(self, embedding: torch.Tensor, dtype: torch.dtype, device=None) -> List[KV]:
        """embedding [R, E] -> every block's (K, V), each [R, T, N, D] (on ``device``, see :meth:`tokens`)."""
        tokens = self.tokens(embedding, dtype, device)
        return [self.block_kv(i, tokens) for i in range(len(self.blocks))]


def id_projection_shape(shapes: Dict[str, Tuple[int, ...]]) -> Tuple[int, int]:
    """(num_tokens, embed_dim) from ``id_projection.*`` tensor shapes (names without the prefix's
    ``id_projection.``); (0, 512) when there are none. ``mlp.0.weight`` is [C, E], ``mlp.2.weight`` [T*C, C]."""
    first, second = shapes.get("mlp.0.weight"), shapes.get("mlp.2.weight")
    if first is None or second is None:
        return 0, 512
    if len(first) != 2 or len(second) != 2 or second[0] % first[0]:
        raise ValueError(f"ID projection tensors have unexpected shapes: mlp.0 {first}, mlp.2 {second}")
    return second[0] // first[0], first[1]
