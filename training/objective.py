"""Flow-matching training objective in the released DreamID-V convention, with identity dropout.

Convention (the one :mod:`dreamidv_core.sampling.samplers` integrates):

* ``x_sigma = (1 - sigma) * z + sigma * eps`` with ``z`` the normalised VAE latent of the supervision
  video and ``eps ~ N(0, I)``; the DiT predicts the velocity ``v = eps - z``;
* training sigmas are ``u ~ U(0, 1)`` (or logit-normal) passed through the sampler's time shift
  ``shift * u / (1 + (shift - 1) * u)`` (:func:`dreamidv_core.sampling.samplers.shift_sigmas`), so training sees
  noise levels where the released 20-step schedule spends its steps;
* the model timestep is ``sigma * 1000`` as a float. The sampler feeds ``trunc(sigma * 1000)``
  (:func:`dreamidv_core.sampling.samplers.sigma_to_timestep`); the sinusoidal embedding is smooth in t, so the
  float timestep trains the same function at the integer points and between them.

The conditioning is built exactly as :func:`dreamidv_core.pipelines.swap.swap_face` builds it: ``y`` = [VAE(video in
[-1, 1]), VAE(mask in [0, 1], not normalised)], the reference image latent (replaced by zeros - the
sampler's unconditional identity-guidance row - for a fraction ``identity_dropout`` of the samples), the
PoseGuider tokens of the pose video and the text context. :func:`prepare_conditions` is the
grad-enabled twin of :meth:`DreamIDVTransformer.prepare` (which runs under ``no_grad``), batched.
A model with an active ArcFace ID-token projection (``dit.id_projection_active``: trained gates, or gates
that train) also gets each sample's identity embedding (``TrainingConditioning.id_embedding``), zeroed
together with the reference for the dropped samples: the sampler's unconditional row has zeros too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence, Union

import torch

from dreamidv_core.models.dit import DiTConditions, DreamIDVTransformer
from dreamidv_core.errors import InputError
from dreamidv_core.sampling.samplers import NUM_TRAIN_TIMESTEPS, shift_sigmas

__all__ = ["FlowMatchingObjective", "TrainingConditioning", "ChunkLoss", "prepare_conditions",
           "encode_conditioning", "encode_latents", "temporal_tv"]

Context = Union[torch.Tensor, Sequence[torch.Tensor]]


@dataclass
class TrainingConditioning:
    """One batch's conditioning, as the sampler builds it (B samples of one size).

    context: [L, text_dim] (shared), [B, L, text_dim] or a list of B [L_i, text_dim] (umT5 contexts);
    y: [B, 32, F', h, w] (normalised video latent, then the latent of the mask video in [0, 1]);
    ref_latent: [B, 16, 1, h, w] (latent of the letterboxed reference image in [-1, 1]);
    pose: [B, 3, F, H, W] pose video in [0, 1] (full model; ignored by the faster one), or
    pose_tokens: [B, F' * h/2 * w/2, C] precomputed PoseGuider tokens (a frozen pose branch);
    id_embedding: [B, E] identity (ArcFace) embedding of each sample's reference, for a model with an
    ID-token projection (:mod:`dreamidv_core.models.id_projection`).
    """

    context: Context
    y: torch.Tensor
    ref_latent: torch.Tensor
    pose: Optional[torch.Tensor] = None
    pose_tokens: Optional[torch.Tensor] = None
    id_embedding: Optional[torch.Tensor] = None


class ChunkLoss(NamedTuple):
    """per_chunk [B, F'] float32 MSE per latent frame (VAE temporal chunk; graph attached);
    x0_hat [B, 16, F', h, w] detached one-step estimate ``x_t - sigma * v_pred``; sigma [B];
    ref_dropped [B] bool (reference replaced by zeros); x0 the same estimate with its graph (for
    regularisers such as :func:`temporal_tv`)."""

    per_chunk: torch.Tensor
    x0_hat: torch.Tensor
    sigma: torch.Tensor
    ref_dropped: torch.Tensor
    x0: Optional[torch.Tensor] = None


TV_MODES = ("prediction", "residual")


def temporal_tv(x0: torch.Tensor, target: Optional[torch.Tensor] = None, mode: str = "prediction") -> torch.Tensor:
    """Total variation across time of a predicted clean latent -> [B] (graph kept).

    x0, target: [B, C, F', h, w]. ``"prediction"``: mean |x0[t+1] - x0[t]| over latent frames, channels and
    pixels; ``"residual"``: the same of (x0 - target), i.e. only the frame-to-frame change the supervision
    video does not have (real motion is not penalised). A clip of one latent frame (a still, F = 1) has no
    pair: 0 (with a graph, so the sum of losses still backpropagates).

    After DynamicFace (Wang et al. 2025, arXiv:2501.08553), which smooths the denoised latents across time
    (its "FusionTVO" total-variation optimisation, applied at inference). Here the penalty is a *training*
    loss on the one-step estimate ``x0 = x_t - sigma * v`` - our interpretation of the issue, not the paper's
    procedure.
    """
    if mode not in TV_MODES:
        raise InputError(f"temporal_tv_mode must be one of {TV_MODES}, got {mode!r}")
    x = x0.float()
    if mode == "residual":
        if target is None:
            raise InputError("temporal_tv mode 'residual' needs the target latent")
        x = x - target.to(x)
    if x.shape[2] < 2:
        return x.sum(dim=(1, 2, 3, 4)) * 0.0
    return (x[:, :, 1:] - x[:, :, :-1]).abs().mean(dim=(1, 2, 3, 4))


@torch.no_grad()
def encode_conditioning(vae, video: torch.Tensor, mask: torch.Tensor, reference: torch.Tensor,
                        context: Context, pose: Optional[torch.Tensor] = None) -> TrainingConditioning:
    """Prepared pixels -> :class:`TrainingConditioning`, with the sampler's conventions.

    video: [B, 3, F, H, W] in [0, 1] (F = 4n+1, H, W multiples of 16); mask: [B, 1 or 3, F, H, W] in [0, 1];
    reference: [B, 3, H, W] in [0, 1], already letterboxed and resized like the video
    (:func:`dreamidv_core.preprocess.video_ops.prepare_reference`); pose: [B, 3, F, H, W] in [0, 1].
    """
    if video.dim() != 5 or mask.dim() != 5 or reference.dim() != 4:
        raise InputError(f"encode_conditioning: expected video [B,3,F,H,W], mask [B,1|3,F,H,W], reference [B,3,H,W]; "
                         f"got {list(video.shape)}, {list(mask.shape)}, {list(reference.shape)}")
    if mask.shape[1] == 1:
        mask = mask.expand(-1, 3, -1, -1, -1)
    if mask.shape[0] != video.shape[0] or mask.shape[2:] != video.shape[2:]:
        raise InputError(f"mask {list(mask.shape)} does not match the video {list(video.shape)}")
    if reference.shape[0] != video.shape[0] or reference.shape[-2:] != video.shape[-2:]:
        raise InputError(f"reference {list(reference.shape)} must be letterboxed to the video size {list(video.shape)}")
    video_lat, mask_lat, ref = encode_latents(vae, video, mask, reference)
    return TrainingConditioning(context=context, y=torch.cat([video_lat, mask_lat], dim=1), ref_latent=ref, pose=pose)


@torch.no_grad()
def encode_latents(vae, video: torch.Tensor, mask: torch.Tensor, reference: torch.Tensor):
    """The three conditioning latents, in the sampler's conventions: video [B, 3, F, H, W] in [0, 1] ->
    VAE(video in [-1, 1]); mask [B, 3, F, H, W] in [0, 1] -> VAE(mask, not normalised); reference [B, 3, H, W]
    in [0, 1] -> VAE(reference in [-1, 1] as one frame) [B, 16, 1, h, w]. Shapes are not checked here
    (:func:`encode_conditioning` does)."""
    return vae.encode(video.mul(2).sub(1)), vae.encode(mask), vae.encode(reference.mul(2).sub(1)[:, :, None])


def prepare_conditions(dit: DreamIDVTransformer, context: Context, y: torch.Tensor,
                       ref_latents: Optional[torch.Tensor], pose_tokens: Optional[torch.Tensor] = None,
                       cache_pose_kv: bool = False, id_embedding: Optional[torch.Tensor] = None) -> DiTConditions:
    """:meth:`DreamIDVTransformer.prepare` for a training batch, with autograd (the same code the sampler uses).

    y: [B, 32, F', h, w] (or [32, F', h, w]); ref_latents: [B, 16, 1, h, w], one row per sample (element b
    uses row b in ``dit.forward``); pose_tokens: [B, Lv, C] (or [1, Lv, C]) with graph if the pose branch
    trains; context as in :class:`TrainingConditioning`. ``cache_pose_kv=False`` keeps the pose tokens and
    lets every block compute its pose K/V inside its own forward (cheaper to checkpoint). id_embedding:
    [B, E] one row per sample (used by a model with an active ID projection).
    """
    if y is None:
        raise InputError("prepare_conditions needs the video and mask latents (y)")
    batch = 1 if y.dim() == 4 else y.shape[0]
    if ref_latents is not None and dit.cfg.has_ref:
        rows = 1 if ref_latents.dim() == 4 else ref_latents.shape[0]
        if rows != batch:
            raise InputError(f"{rows} reference latents for a batch of {batch}")
    contexts = [context] if torch.is_tensor(context) and context.dim() == 2 else list(context)
    if len(contexts) not in (1, batch):
        raise InputError(f"{len(contexts)} text contexts for a batch of {batch}")
    if id_embedding is not None and getattr(dit, "id_projection_active", False):
        if id_embedding.dim() != 2 or id_embedding.shape[0] != batch:
            raise InputError(f"identity embeddings must be [{batch}, E] (one per sample), got {list(id_embedding.shape)}")
    return dit.prepare(contexts[0] if len(contexts) == 1 else contexts, y, ref_latents, pose_tokens,
                       cache_pose_kv=cache_pose_kv, id_embedding=id_embedding)


class FlowMatchingObjective:
    """Rectified-flow loss of the released model (see the module docstring).

    shift: the sampler's time shift (5.0 in the released recipe); identity_dropout: probability that a
    sample's reference latent is replaced by zeros; timestep_sampling: "uniform" or "logit_normal"
    (u = sigmoid(N(logit_mean, logit_std))), before the shift; temporal_tv: weight of the temporal
    total-variation penalty on the one-step estimate (:func:`temporal_tv`; 0 = off), temporal_tv_mode its
    kind ("prediction" or "residual").
    """

    def __init__(self, shift: float = 5.0, identity_dropout: float = 0.1, timestep_sampling: str = "uniform",
                 logit_mean: float = 0.0, logit_std: float = 1.0, temporal_tv: float = 0.0,
                 temporal_tv_mode: str = "prediction"):
        if not shift > 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        if not 0.0 <= identity_dropout <= 1.0:
            raise ValueError(f"identity_dropout must be in [0, 1], got {identity_dropout}")
        if timestep_sampling not in ("uniform", "logit_normal"):
            raise ValueError(f"timestep_sampling must be 'uniform' or 'logit_normal', got {timestep_sampling!r}")
        self.shift, self.identity_dropout, self.timestep_sampling = float(shift), float(identity_dropout), timestep_sampling
        self.logit_mean, self.logit_std = float(logit_mean), float(logit_std)
        if isinstance(temporal_tv, bool) or not isinstance(temporal_tv, (int, float)) or not temporal_tv >= 0:
            raise InputError(f"temporal_tv must be a weight >= 0 (0 = off), got {temporal_tv!r}")
        if temporal_tv_mode not in TV_MODES:
            raise InputError(f"temporal_tv_mode must be one of {TV_MODES}, got {temporal_tv_mode!r}")
        self.temporal_tv, self.temporal_tv_mode = float(temporal_tv), temporal_tv_mode

    # ------------------------------------------------------------------ pieces
    def sample_sigma(self, batch: int, generator: Optional[torch.Generator] = None,
                     device: Union[str, torch.device] = "cpu") -> torch.Tensor:
        """-> sigma [batch] float32 in [0, 1): the sampler's shift of u ~ U(0,1) or logit-normal u."""
        if self.timestep_sampling == "uniform":
            u = torch.rand(batch, generator=generator, dtype=torch.float64)
        else:
            n = torch.randn(batch, generator=generator, dtype=torch.float64)
            u = torch.sigmoid(self.logit_mean + self.logit_std * n)
        return shift_sigmas(u, self.shift).float().to(device)

    def sample_ref_dropout(self, batch: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """-> [batch] bool, True where the reference latent is replaced by zeros."""
        return torch.rand(batch, generator=generator) < self.identity_dropout

    @staticmethod
    def noisy(z: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """z, eps [B, ...], sigma [B] -> x_sigma = (1 - sigma) z + sigma eps."""
        s = sigma.reshape(-1, *([1] * (z.dim() - 1))).to(z)
        return (1 - s) * z + s * eps

    @staticmethod
    def target(z: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The velocity the model predicts: eps - z."""
        return eps - z

    @staticmethod
    def timestep(sigma: torch.Tensor) -> torch.Tensor:
        """sigma [B] -> model timestep sigma * 1000 (float; the sampler feeds trunc(sigma * 1000))."""
        return sigma.float() * NUM_TRAIN_TIMESTEPS

    # ------------------------------------------------------------------ the loss
    def per_chunk_loss(self, dit: DreamIDVTransformer, batch_latents: torch.Tensor,
                       conditioning: TrainingConditioning, generator: Optional[torch.Generator] = None) -> ChunkLoss:
        """batch_latents z [B, 16, F', h, w] (normalised latent of the supervision video) -> :class:`ChunkLoss`.

        Noise, sigmas and the identity dropout are drawn from ``generator`` (CPU), in that order
        (sigma, dropout, noise), so a seeded generator reproduces a step exactly.
        """
        z = batch_latents
        if z.dim() != 5 or z.shape[1] != dit.cfg.out_dim:
            raise InputError(f"batch latents must be [B, {dit.cfg.out_dim}, F, h, w], got {list(z.shape)}")
        b = z.shape[0]
        device = dit.patch_embedding.weight.device
        z = z.to(device, torch.float32)
        sigma = self.sample_sigma(b, generator, device)
        dropped = self.sample_ref_dropout(b, generator)
        eps = torch.randn(z.shape, generator=generator, dtype=torch.float32).to(device)

        ref = conditioning.ref_latent
        if ref is not None:
            ref = ref.to(device, torch.float32)
            if ref.dim() == 4:
                ref = ref[None]
            ref = torch.where(dropped.to(device).reshape(-1, 1, 1, 1, 1), torch.zeros_like(ref), ref)
        pose_tokens = conditioning.pose_tokens
        if dit.cfg.has_pose and pose_tokens is None:
            if conditioning.pose is None:
                raise InputError("the full DreamID-V model trains with a pose video (conditioning.pose)")
            # dit.pose_tokens runs under no_grad; the PoseGuider is called directly so it can train
            pose_tokens = dit.project_pose(conditioning.pose.to(device, dit.compute_dtype)).to(dit.compute_dtype)
        if not dit.cfg.has_pose:
            pose_tokens = None
        id_emb = None
        if getattr(dit, "id_projection_active", False):
            if conditioning.id_embedding is None:
                raise InputError("this model has an ArcFace ID-token projection that is used or trained: the "
                                 "conditioning needs each sample's identity embedding (give the stage an identity "
                                 "encoder, e.g. 'insightface:<pack folder>')")
            id_emb = conditioning.id_embedding.to(device, torch.float32)
            id_emb = torch.where(dropped.to(device).reshape(-1, 1), torch.zeros_like(id_emb), id_emb)
        extra = {} if id_emb is None else {"id_embedding": id_emb}
        cond = prepare_conditions(dit, conditioning.context, conditioning.y, ref, pose_tokens, **extra)
        if tuple(cond.y.shape[2:]) != tuple(z.shape[2:]) or cond.y.shape[0] != b:
            raise InputError(f"conditioning y {list(cond.y.shape)} does not match the latents {list(z.shape)}")

        x_t = self.noisy(z, eps, sigma)
        v = dit(x_t, self.timestep(sigma), cond).float()
        per_chunk = (v - self.target(z, eps)).pow(2).mean(dim=(1, 3, 4))
        x0 = x_t - sigma.reshape(-1, 1, 1, 1, 1) * v
        return ChunkLoss(per_chunk, x0.detach(), sigma, dropped, x0)

    def regulariser(self, chunks: ChunkLoss, batch_latents: torch.Tensor) -> torch.Tensor:
        """``temporal_tv`` x the batch mean of :func:`temporal_tv` of ``chunks.x0`` (a scalar; 0 when off)."""
        if not self.temporal_tv:
            return chunks.per_chunk.new_zeros(())
        tv = temporal_tv(chunks.x0, batch_latents, self.temporal_tv_mode)
        return self.temporal_tv * tv.mean()

    def loss(self, dit: DreamIDVTransformer, batch_latents: torch.Tensor, conditioning: TrainingConditioning,
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Plain flow-matching loss: the mean of :meth:`per_chunk_loss` (a scalar), plus :meth:`regulariser`."""
        chunks = self.per_chunk_loss(dit, batch_latents, conditioning, generator)
        return chunks.per_chunk.mean() + self.regulariser(chunks, batch_latents)


def frozen_vae_for(vae, device: torch.device):
    """Move a frozen ``nn.Module`` VAE to the batch's device (once) and return a context that encodes
    without gradients and outside autocast (the VAE runs in its own precision, as at inference)."""
    import contextlib

    if isinstance(vae, torch.nn.Module):
        p = next(vae.parameters(), None)
        if p is not None and p.device != device:
            vae.to(device)
    stack = contextlib.ExitStack()
    stack.enter_context(torch.no_grad())
    if device.type in ("cpu", "cuda"):
        stack.enter_context(torch.autocast(device.type, enabled=False))
    return stack

