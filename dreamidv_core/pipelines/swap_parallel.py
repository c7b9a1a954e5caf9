"""The face swap of one clip on the ranks of one group (``torchrun``; :mod:`dreamidv_core.parallel`).

:func:`swap_face_parallel` is :func:`.swap.swap_face` cut at its stages:

1. the group's leader reads and checks the clip and encodes it (:func:`.swap.encode_inputs`: VAE latents,
   PoseGuider tokens, the seeded noise, the face mask) — once, and with the same kernels as one process;
2. the leader's inputs, plan and text context are broadcast to the group (:meth:`Mesh.share`);
3. every rank samples (:func:`.swap.sample_latent` with the mesh): Ulysses shares each DiT evaluation's tokens,
   guidance-parallel its two passes; every rank ends with the same latent;
4. the leader decodes and writes (or hands the frames back).

A failure on the leader (an unreadable file, too few frames, ...) is raised on every rank of the group, so
none waits for the others. The result equals one process's (``tests/test_parallel_torchrun.py``).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..models.dit import DreamIDVTransformer
from ..progress import Cancel, Progress, reporter
from .plan import ClipPlan
from .swap import (SwapInputs, SwapResult, SwapSettings, check_settings, decode_frames, encode_inputs, plan_for,
                   sample_latent, swap_face)


def group_cancel(mesh, cancel: Cancel) -> Callable[[], bool]:
    """A cancel hook every rank of the group polls at the same points: True on all when any asks."""
    return lambda: mesh.agree(bool(cancel is not None and cancel()))


@torch.no_grad()
def swap_face_parallel(mesh, dit: DreamIDVTransformer, vae, video, mask, reference, context: Optional[torch.Tensor],
                       pose=None, settings: SwapSettings = SwapSettings(), progress: Progress = None,
                       cancel: Cancel = None, pose_tokens: Optional[torch.Tensor] = None,
                       ref_latent: Optional[torch.Tensor] = None,
                       sink: Optional[Callable[[torch.Tensor, int], None]] = None, id_embedding=None,
                       plan: Optional[ClipPlan] = None) -> SwapResult:
    """:func:`.swap.swap_face` on every rank of ``mesh``'s group (arguments as there; called by every rank).

    Only the leader's ``vae``, ``video``, ``mask``, ``reference``, ``pose``, ``context``, ``id_embedding``,
    ``progress`` and ``sink`` are used (the other ranks may pass ``None``). The leader gets the frames (or its
    ``sink`` them); the other ranks get ``frames=None``. Every rank gets the latent.
    """
    if mesh.group is None:  # a group of one: the plain swap
        return swap_face(dit, vae, video, mask, reference, context, pose=pose, settings=settings, progress=progress,
                         cancel=cancel, pose_tokens=pose_tokens, ref_latent=ref_latent, sink=sink,
                         id_embedding=id_embedding, plan=plan)
    s = settings
    check_settings(s)
    report = reporter(progress if mesh.is_leader else None)

    def read_and_encode():
        p = plan or plan_for(video, s)
        inputs = encode_inputs(dit, vae, video, mask, reference, p, s, pose=pose, pose_tokens=pose_tokens,
                               ref_latent=ref_latent, id_embedding=id_embedding, progress=report, cancel=cancel)
        return p, inputs

    encoded = mesh.run_on_leader(read_and_encode, "reading and encoding the clip")
    plan = mesh.share_object(encoded[0] if mesh.is_leader else None)
    inputs = SwapInputs(**mesh.share(encoded[1].tensors() if mesh.is_leader else None))
    del encoded
    context = mesh.share({"context": context if mesh.is_leader else None})["context"]
    latent, evaluations, skipped = sample_latent(dit, inputs, context, plan, s, progress=report,
                                                 cancel=group_cancel(mesh, cancel), mesh=mesh)
    del inputs
    frames = mesh.run_on_leader(lambda: decode_frames(vae, latent, plan, s, sink, report, cancel), "decoding")
    return SwapResult(frames=frames, latent=latent, frames_used=plan.frames, plan=plan, evaluations=evaluations,
                      skipped=skipped)
