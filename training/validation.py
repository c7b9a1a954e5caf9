"""Validation during training with the identity report: swap a few held-out samples with the model being
trained and score the result with :func:`dreamidv_core.eval.identity_report.identity_report` (the code the
identity-report node and command use).

:func:`make_identity_validator` -> ``validator(model) -> metrics dict``; the trainer calls it every
``TrainConfig.validate_every`` steps (model in eval mode, no grad, back to train mode after), logs the
numbers to ``<checkpoint_dir>/metrics.jsonl`` and keeps them in ``TrainResult.validation``.

Per sample: :func:`dreamidv_core.pipelines.swap.swap_face` on the sample's driving video, mask and pose with its
identity image as the reference (``steps`` sampler steps), then the evaluation of the swapped clip
(:func:`dreamidv_core.eval.benchmark.score_clip`, the code of ``python -m dreamidv_core evaluate``: its identity
part is the identity report's) against the same identity image, the driving video and the mask. Metrics: the
mean over samples of the report's mean similarity, the lowest per-frame similarity over all samples, the mean
frame-to-frame change of the similarity and the mean cosine between consecutive frames' embeddings
(stability); the background PSNR / SSIM outside the face mask and the flicker excess; with an ``observer``
(a landmarker) the head-pose and expression errors; and each sample's numbers. Still samples (one frame)
are not validated: the sampler needs a clip.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from dreamidv_core.errors import InputError

TorchEncoder = Callable[[torch.Tensor], torch.Tensor]  # [n, 3, H, W] in [0, 1] -> [n, D]


def embedder_from_encoder(encoder: TorchEncoder) -> Callable[[np.ndarray], List[Optional[np.ndarray]]]:
    """A training identity encoder (torch, [n, 3, H, W] in [0, 1] -> [n, D]) as an identity-report embedder
    (uint8 [n, H, W, 3] -> n embeddings; an all-zero row, the encoders' "no face", becomes None)."""

    def embed(images: np.ndarray) -> List[Optional[np.ndarray]]:
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(255)
        with torch.no_grad():
            out = encoder(x).detach().float().cpu().numpy()
        return [None if not np.any(row) else row for row in out]

    return embed


def _finite_mean(values: Sequence[float]) -> Optional[float]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def _finite_min(values: Sequence[float]) -> Optional[float]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.min(vals)) if vals else None


EVAL_METRICS = ("bg_psnr", "bg_ssim", "flicker_excess", "pose_error", "expression_error", "fm_inter_gap")


def summarise(reports: Sequence[dict]) -> Dict:
    """Per-sample ``IdentityReport.as_dict()`` (with the evaluation's numbers under ``"metrics"``) -> the
    validation metrics (None where nothing was measured)."""
    out = {
        "val_mean_similarity": _finite_mean([r["mean_similarity"] for r in reports]),
        "val_min_similarity": _finite_min([r["min_similarity"] for r in reports]),
        "val_mean_abs_change": _finite_mean([r["stability"]["mean_abs_change"] for r in reports]),
        "val_mean_consecutive_cosine": _finite_mean([r["stability"]["mean_consecutive_cosine"] for r in reports]),
        "val_no_face_frames": int(sum(r["no_face_frames"] for r in reports)),
        "val_samples": [{"path": r.get("path"), "mean": r["mean_similarity"], "min": r["min_similarity"],
                         "mean_abs_change": r["stability"]["mean_abs_change"]} for r in reports],
    }
    for key in EVAL_METRICS:
        out[f"val_{key}"] = _finite_mean([r.get("metrics", {}).get(key) for r in reports])
    return out


def _frames(t: torch.Tensor, signed: bool) -> torch.Tensor:
    """[3, F, H, W] (in [-1, 1] when ``signed``, else [0, 1]) -> [F, H, W, 3] float in [0, 1]."""
    if signed:
        t = t.float().add(1).div(2)
    return t.float().clamp(0, 1).permute(1, 2, 3, 0).contiguous()


def validation_items(dataset, count: int) -> List[dict]:
    """The first ``count`` video items of a :class:`training.dataset.DreamIDVDataset` (read once, kept;
    still samples are skipped), read without the occlusion augmentation and the latent cache (validation
    swaps the plain samples)."""
    samples = getattr(dataset, "samples", None)
    videos = [i for i in range(len(dataset)) if samples is None or samples[i].kind == "video"]
    n = min(int(count), len(videos))
    if n < 1:
        raise InputError("validation: the validation dataset has no video samples (still samples cannot be "
                         "validated: the sampler swaps clips)")
    saved = {k: getattr(dataset, k) for k in ("occlusion", "latent_cache") if hasattr(dataset, k)}
    try:
        for k in saved:
            setattr(dataset, k, None)
        return [dataset[i] for i in videos[:n]]
    finally:
        for k, v in saved.items():
            setattr(dataset, k, v)


def make_identity_validator(items: Sequence[dict], vae, context: torch.Tensor, embedder, steps: int = 4,
                            seed: int = 0, guidance: float = 4.0, shift: float = 5.0, observer=None) -> Callable:
    """-> ``validator(model) -> metrics`` (see :func:`summarise`).

    items: :class:`training.dataset.DreamIDVDataset` items (video [3, F, H, W] in [-1, 1], mask/pose
    [3, F, H, W] in [0, 1], identity [3, 1, H, W] in [-1, 1]); vae: the frozen training VAE; context:
    [L, text_dim]; embedder: an identity-report embedder (``insightface_embedder``) or a training identity
    encoder (torch, wrapped with :func:`embedder_from_encoder`); steps: sampler steps per swap; observer:
    an optional face observer (:func:`dreamidv_core.eval.face_metrics.mediapipe_observer`) for the pose and
    expression errors.
    """
    from dreamidv_core.eval.benchmark import score_clip
    from dreamidv_core.pipelines.swap import SwapSettings, swap_face

    if not items:
        raise InputError("validation: no validation samples")
    if int(steps) < 1:
        raise InputError(f"validation steps must be >= 1, got {steps}")
    is_report = getattr(embedder, "_report_embedder", False)
    embed = embedder if is_report else embedder_from_encoder(embedder)

    def validate(model) -> Dict:
        dit = getattr(model, "module", model)
        reports = []
        for k, item in enumerate(items):
            video = _frames(item["video"], True)
            mask = _frames(item["mask"], False)
            pose = _frames(item["pose"], False) if "pose" in item else None
            ref = _frames(item["identity"], True)[0]  # [H, W, 3]
            n, h, w = video.shape[:3]
            window = max(81, 4 * ((n + 2) // 4) + 1)
            settings = SwapSettings(width=w, height=h, steps=int(steps), shift=shift, guidance=guidance,
                                    seed=seed + k, window=window, cache_pose_kv=True)
            extra = {}
            if getattr(dit, "id_projection_active", False):  # the ID-token projection takes the embedding too
                if is_report:
                    raise InputError("validation of a model with an ID-token projection needs a torch identity "
                                     "encoder (the training one), not a report embedder")
                extra["id_embedding"] = embedder(ref.permute(2, 0, 1)[None])[0].float()
            out = swap_face(dit, vae, video, mask, ref, context, pose=pose, settings=settings, **extra)
            scored = score_clip(out.frames, video, ref, embed, observer, mask=mask, name=str(item.get("path")))
            report = scored.identity.as_dict()
            report["path"], report["metrics"] = item.get("path"), scored.metrics
            reports.append(report)
        return summarise(reports)

    return validate


def report_embedder(fn):
    """Mark an identity-report embedder (uint8 [n, H, W, 3] -> n embeddings) so
    :func:`make_identity_validator` uses it as is."""
    fn._report_embedder = True
    return fn
