"""One SyncID-Pipe run as a function: a real clip V_r and a new face I_g -> the forward and backward samples.

The stages and their wiring are those of the bundled graph (``workflows/syncid_data_synthesis.json``):

1. V_r is cut to the model's frame (resized down to the area, centre-cropped to multiples of 16), so the
   generated clip and the real one share one size;
2. the face mask of V_r (MediaPipe, its own face) and the expression adaptation: V_r's expressions and head pose
   on I_g's face shape (pose video and face mask of the future generated clip);
3. the first and last frames of V_r, each face-swapped to I_g with DreamID-V (:func:`.image_swap.swap_image`,
   pose = the adapted pose);
4. the IVS generates V_g from the two swapped frames and the adapted pose;
5. V_r's person is removed (background plate + inpainting; SAM 2 grows the masks when a predictor is given) and
   V_g is recomposed over it: V'_g;
6. the pose and mask of V'_g, retargeted onto the real person (their photo, or V_r's frame 0);
7. the quadruplet writer: forward {I_g, V_r -> V_g} and backward {real person, V'_g -> V_r} with ArcFace
   similarities; pairs whose identity is off are rejected.

The models are passed in (:class:`SyncIDModels`): the command line loads MediaPipe's face landmarker and
insightface's ArcFace; tests pass stand-ins.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

import torch

from ..pipelines.ivs import IVSSettings, sample_ivs
from ..pipelines.swap import SwapSettings
from ..preprocess.pose import extract_mediapipe
from ..preprocess.video_ops import prepare_frames
from ..progress import Progress, reporter
from .background import clean_background, recompose
from .expression import adapt_expression
from .frames import first_last_frames
from .image_swap import swap_image
from .similarity import Encoder
from .writer import QuadrupletSettings, SampleReport, write_quadruplet


@dataclass
class SyncIDModels:
    """dit: DreamID-V (image swap); ivs: the IVS DiT; vae: the Wan 2.1 VAE (the swap's protocol); context: the
    text context [L, 4096]; landmarker: MediaPipe's face landmarker (RGB uint8 -> face or None); encoder:
    ArcFace (:mod:`.similarity`); sam2: a SAM 2 video predictor or None."""

    dit: object
    ivs: object
    vae: object
    context: torch.Tensor
    landmarker: Callable
    encoder: Encoder
    sam2: Optional[object] = None

    def close(self) -> None:
        """Release what holds native resources (MediaPipe's landmarker)."""
        close = getattr(self.landmarker, "close", None)
        if close is not None:
            close()


@dataclass
class SyncIDSettings:
    """The graph's widgets: the area, sampling (image swap and IVS), background recomposition, writer."""

    width: int = 832
    height: int = 480
    frame_num: Optional[int] = None  # use the first N frames of each clip (None: all)
    steps: int = 20
    shift: float = 5.0
    identity_guidance: float = 4.0  # image swap
    ivs_guidance: float = 1.0  # IVS text guidance (1: one pass)
    seed: int = 0
    sampler: str = "unipc"
    window: int = 81  # IVS windows (frames)
    overlap: int = 16
    background_mode: str = "plate"
    removal_dilation: int = 8
    smoothing: float = 0.6
    inpaint_radius: int = 5
    mask_dilation: int = 0
    feather: int = 0
    prompt_frames: int = 4  # SAM 2 prompts
    writer: QuadrupletSettings = field(default_factory=QuadrupletSettings)


def model_frames(frames, settings: SyncIDSettings, what: str) -> torch.Tensor:
    """Frames [F, H, W, C] -> [F, H', W', 3] float32 0..1 at the model's size (the area, multiples of 16)."""
    count = len(frames) if settings.frame_num is None else min(len(frames), settings.frame_num)
    return prepare_frames(frames[:count], count, settings.width, settings.height, what).permute(1, 2, 3, 0)


def _grow_with_sam2(predictor, frames: torch.Tensor, mask: torch.Tensor, prompt_frames: int) -> torch.Tensor:
    from ..preprocess.segmentation import track_head

    return torch.maximum(mask, track_head(predictor, frames, mask, prompt_frames).float())


@torch.no_grad()
def synthesize_clip(models: SyncIDModels, real_frames, identity, root, prefix: str,
                    settings: SyncIDSettings = SyncIDSettings(), real_identity=None, fps: float = 24.0,
                    source: Optional[dict] = None, progress: Progress = None) -> List[SampleReport]:
    """One SyncID-Pipe run (module docstring) -> the writer's reports (written / skipped / rejected).

    real_frames: V_r [F, H, W, C] (uint8 or float 0..1, or a lazy reader); identity: I_g [H, W, C] image;
    real_identity: a photo of V_r's person (default: V_r's frame 0); root / prefix: the dataset folder and the
    sample names (``<prefix>_forward``, ``<prefix>_backward``). Progress stages: "stage" (1..7 of 7), then those
    of the swap, the IVS and the writer.
    """
    s, report = settings, reporter(progress)
    real = model_frames(real_frames, s, "real clip")
    report("stage", 1, 7)
    face_r = extract_mediapipe(real, models.landmarker, what="real clip")
    adapted = adapt_expression(real, models.landmarker, identity)
    mask_r, pose_g = torch.from_numpy(face_r.mask), torch.from_numpy(adapted.pose)
    mask_g = torch.from_numpy(adapted.mask)
    report("stage", 2, 7)
    first, last, count = first_last_frames(real, "real clip")
    swap = SwapSettings(width=s.width, height=s.height, steps=s.steps, shift=s.shift, guidance=s.identity_guidance,
                        seed=s.seed, sampler=s.sampler, window=5, overlap=4)
    swapped = [swap_image(models.dit, models.vae, img, mask_r[i:i + 1], identity, models.context,
                          pose=pose_g[i:i + 1], settings=swap) for img, i in ((first, 0), (last, count - 1))]
    report("stage", 3, 7)
    ivs = IVSSettings(width=s.width, height=s.height, frames=count, steps=s.steps, shift=s.shift,
                      guidance=s.ivs_guidance, seed=s.seed, sampler=s.sampler, window=s.window, overlap=s.overlap)
    generated = sample_ivs(models.ivs, models.vae, swapped[0][0], swapped[1][0], pose_g, models.context, ivs)
    report("stage", 4, 7)
    if models.sam2 is not None:
        mask_r = _grow_with_sam2(models.sam2, real, mask_r, s.prompt_frames)
        mask_g = _grow_with_sam2(models.sam2, generated, mask_g, s.prompt_frames)
    background = clean_background(real, mask_r, s.removal_dilation, s.background_mode, s.smoothing, s.inpaint_radius)
    recomposed = recompose(generated, mask_g, background, s.mask_dilation, s.feather)
    report("stage", 5, 7)
    reference = real[0] if real_identity is None else real_identity
    face_b = extract_mediapipe(recomposed, models.landmarker, reference=reference, what="recomposed generated clip")
    report("stage", 6, 7)
    writer = QuadrupletSettings(**{**s.writer.__dict__, "fps": float(fps), "source": source})
    reports = write_quadruplet(Path(root), prefix, real, generated, identity, models.encoder, forward_mask=mask_r,
                               forward_pose=pose_g, backward_mask=torch.from_numpy(face_b.mask),
                               backward_pose=torch.from_numpy(face_b.pose), generated_recomposed=recomposed,
                               real_identity=real_identity, settings=writer)
    report("stage", 7, 7)
    return reports
