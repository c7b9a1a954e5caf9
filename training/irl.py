"""Identity-Coherence RL weighting: weight each VAE temporal chunk's flow-matching loss by how badly the
one-step estimate of that chunk keeps the identity.

For a latent clip of F' latent frames, latent frame 0 decodes to video frame 0 and latent frame c >= 1
to video frames 4c-3 .. 4c (a "VAE temporal chunk"). Per chunk c a few decoded frames of ``x0_hat`` are
scored with an identity encoder (ArcFace in practice) against the identity embedding; with cos_c the mean
cosine of the chunk, ``Q_c = 1 / (max(cos_c, 0) + delta)``, normalised per sample so the weights average
1 over its chunks (the loss keeps the plain loss's scale). No gradient flows through the weights.

Decoding: the Wan VAE decoder is causal (each latent frame's decode uses a cache of the frames before it),
so a chunk's frames cannot be decoded alone without changing them. The clip is decoded once, streamed
latent frame by latent frame (``decode_iter`` when the VAE has it), keeping only the scored frames; this
costs what decoding every prefix's last chunk costs, and gives exactly the frames of a whole-clip decode.
"""
from __future__ import annotations

from typing import Callable, List, Tuple

import torch
import torch.nn.functional as F

from dreamidv_core.errors import InputError
from dreamidv_core.models.frame_grid import TEMPORAL_STRIDE

__all__ = ["chunk_frame_indices", "decode_chunk_frames", "identity_coherence_weights", "irl_loss"]



def chunk_frame_indices(chunk: int, frames_per_chunk: int = 1) -> List[int]:
    """Offsets inside a decoded chunk to score: chunk 0 has 1 frame, later chunks 4 (evenly spread,
    the last frame first when only one is taken)."""
    n = 1 if chunk == 0 else TEMPORAL_STRIDE
    k = max(1, min(int(frames_per_chunk), n))
    if k == 1:
        return [n - 1]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


@torch.no_grad()
def decode_chunk_frames(latent: torch.Tensor, vae, frames_per_chunk: int = 1) -> List[torch.Tensor]:
    """latent [B, 16, F', h, w] -> per chunk c a tensor [B, k_c, 3, H, W] in [0, 1] of the scored frames."""
    picked: List[torch.Tensor] = []

    def keep(c: int, video: torch.Tensor) -> None:  # video [B, 3, n, H, W] in [-1, 1]
        idx = chunk_frame_indices(c, frames_per_chunk)
        picked.append(video[:, :, idx].permute(0, 2, 1, 3, 4).float().add(1).div(2).clamp(0, 1))

    if hasattr(vae, "decode_iter"):
        for c, video in enumerate(vae.decode_iter(latent)):
            keep(c, video)
    else:
        video = vae.decode(latent)
        keep(0, video[:, :, :1])
        for c in range(1, latent.shape[2]):
            keep(c, video[:, :, 1 + TEMPORAL_STRIDE * (c - 1):1 + TEMPORAL_STRIDE * c])
    return picked


@torch.no_grad()
def identity_coherence_weights(x0_hat_latent: torch.Tensor, vae, identity_encoder: Callable[[torch.Tensor], torch.Tensor],
                               identity_embedding: torch.Tensor, frames_per_chunk: int = 1,
                               delta: float = 0.1) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-chunk IRL weights.

    x0_hat_latent: [B, 16, F', h, w] (normalised latents, e.g. :attr:`ChunkLoss.x0_hat`); vae: ``decode``
    (and optionally ``decode_iter``) on normalised latents, output in [-1, 1];
    identity_encoder(frames [n, 3, H, W] in [0, 1]) -> embeddings [n, D];
    identity_embedding: [D] (one identity for the batch) or [B, D].
    Returns (weights [B, F'] float32, detached, mean 1 per sample; cosines [B, F'] float32).
    """
    if x0_hat_latent.dim() != 5:
        raise InputError(f"x0_hat latent must be [B, 16, F, h, w], got {list(x0_hat_latent.shape)}")
    if not delta > 0:
        raise InputError(f"delta must be > 0, got {delta}")
    b, _, f = x0_hat_latent.shape[:3]
    ident = identity_embedding.detach().float()
    if ident.dim() == 1:
        ident = ident[None].expand(b, -1)
    if ident.dim() != 2 or ident.shape[0] != b:
        raise InputError(f"identity embedding must be [D] or [{b}, D], got {list(identity_embedding.shape)}")
    chunks = decode_chunk_frames(x0_hat_latent.detach(), vae, frames_per_chunk)
    cos = torch.empty(b, f, dtype=torch.float32)
    for c, frames in enumerate(chunks):
        k = frames.shape[1]
        emb = identity_encoder(frames.reshape(b * k, *frames.shape[2:])).float()
        if emb.dim() != 2 or emb.shape[0] != b * k or emb.shape[1] != ident.shape[1]:
            raise InputError(f"identity encoder returned {list(emb.shape)} for {b * k} frames; expected "
                             f"[{b * k}, {ident.shape[1]}] like the identity embedding")
        sim = F.cosine_similarity(emb.reshape(b, k, -1), ident.to(emb.device)[:, None], dim=-1)
        cos[:, c] = sim.mean(dim=1).cpu()
    q = 1.0 / (cos.clamp(min=0.0) + delta)
    weights = q / q.mean(dim=1, keepdim=True)
    return weights.to(x0_hat_latent.device), cos


def irl_loss(per_chunk_loss: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """per_chunk_loss [B, F'] (graph), weights [B, F'] -> scalar mean(weights * loss); weights are detached."""
    if per_chunk_loss.shape != weights.shape:
        raise InputError(f"per-chunk loss {list(per_chunk_loss.shape)} and weights {list(weights.shape)} differ")
    return (weights.detach().to(per_chunk_loss) * per_chunk_loss).mean()
