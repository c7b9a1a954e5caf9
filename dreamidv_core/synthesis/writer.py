"""The quadruplet writer: forward and backward training samples in the format of training/DATASET.md.

One SyncID-Pipe run gives, for a real clip V_r (person A) and a generated identity image I_g (person B):
V_g, the clip with B's face (the IVS output), and V_g' (V_g recomposed over V_r's cleaned background;
V_g itself when no recomposed clip is given). The two samples are

===========  =======================  =====================  ==================  ====================
direction    identity.png             driving.mp4            target.mp4          mask.mp4 / pose.mp4
===========  =======================  =====================  ==================  ====================
forward      I_g (person B)           V_r (real)             V_g (generated)     of V_r (``forward_*``)
backward     an image of A            V_g' (generated)       V_r (real)          of V_g' (``backward_*``)
===========  =======================  =====================  ==================  ====================

mask and pose are always those of the driving clip, extracted as the swap workflow extracts them for the
video it swaps (pose node: the face mask, and the pose drawing retargeted onto the identity image; the
forward pose is therefore the expression-adaptation output, V_r retargeted onto I_g). They are inputs:
this module computes nothing but similarities. The image of A for the backward sample should come from
another shot or time than the clip (so the model cannot copy the target frame); without one, frame 0 of
V_r is used and the record says so (``identity_image``).

Samples are named ``<prefix>_forward`` / ``<prefix>_backward`` (deterministic: a rerun finds them). A
sample folder that exists is skipped (resume). A sample is written into a hidden temporary folder
``.syncid-tmp-<name>-<pid>-<random>`` in the dataset root and renamed into place when complete, so a
crash leaves only a hidden folder (ignored by ``scan_dataset``, removed by the next run for that name).
Each sample's ArcFace similarities (:mod:`.similarity`) go into ``record.json``; a sample whose target
does not show the identity well enough (``identity_target < min_identity_target``, or no target frame with
a face) or whose driving clip already shows it (``identity_driving > max_identity_driving``) is rejected:
reported, not written. Per-frame values (``null`` for frames without a face) are in the record's
``identity_per_frame`` (``identity_similarity`` keeps the means, which the dataset validator requires to be
numbers or null).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from ..errors import InputError
from ..models.frame_grid import MIN_FRAMES
from ..io.files import ensure_folder
from ..io.video import write_video
from ..io.video import to_uint8_frames
from ..progress import Cancel, Progress, check_cancel, reporter
from .similarity import Encoder, identity_similarity

DIRECTIONS = ("forward", "backward")
FILES = ("identity.png", "driving.mp4", "mask.mp4", "target.mp4", "record.json")
TMP_PREFIX = ".syncid-tmp-"
PIPELINE = "SyncID-Pipe (DreamID-V ComfyUI pack)"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")


@dataclass
class QuadrupletSettings:
    fps: float = 24.0
    directions: Tuple[str, ...] = DIRECTIONS
    min_identity_target: Optional[float] = 0.3  # None: not checked (a target with no face is still rejected)
    max_identity_driving: Optional[float] = 0.5  # None: not checked
    similarity_stride: int = 1  # measure every k-th frame (the others are null in the per-frame lists)
    crf: int = 18
    source: object = None  # provenance for record.json ("source")


@dataclass
class SampleReport:
    name: str
    direction: str
    status: str  # "written" | "skipped" | "rejected"
    reason: str = ""
    path: Optional[Path] = None
    similarity: dict = field(default_factory=dict)

    def line(self) -> str:
        sims = self.similarity
        vals = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in sims.items())
        return f"{self.name}: {self.status}" + (f" ({self.reason})" if self.reason else "") + (f" [{vals}]" if vals else "")


def sample_names(prefix: str) -> dict:
    if not isinstance(prefix, str) or not _NAME.match(prefix):
        raise InputError(f"sample name prefix {prefix!r}: use 1-100 letters, digits, '_', '-' or '.', not starting "
                         "with '.' or '-' (it becomes a folder name)")
    return {d: f"{prefix}_{d}" for d in DIRECTIONS}


def is_complete(folder: Path) -> bool:
    return all((folder / f).is_file() for f in FILES)


def clean_temporaries(root: Path, name: str) -> int:
    """Remove hidden temporary folders a crashed run left for sample ``name``; returns how many."""
    removed = 0
    for p in root.glob(f"{TMP_PREFIX}{name}-*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            removed += 1
    return removed


@dataclass
class _Clip:
    frames: object  # [F, H, W, C] tensor/array, 0..1 or uint8
    what: str


def _check_videos(clips: List[_Clip], count: int, size: Tuple[int, int]) -> None:
    for c in clips:
        shape = tuple(getattr(c.frames, "shape", ()))
        if len(shape) not in (3, 4) or shape[0] < 1:
            raise InputError(f"{c.what}: expected frames [F, H, W, C] (or a mask [F, H, W]), got shape {list(shape)}")
        if shape[0] < count:
            raise InputError(f"{c.what} has {shape[0]} frames but the generated clip has {count}; every clip must "
                             "cover the generated clip's frames (the first ones are used)")
        if tuple(shape[1:3]) != size:
            raise InputError(f"{c.what} is {shape[2]}x{shape[1]} but the generated clip is {size[1]}x{size[0]}; "
                             "every clip must have the same frame size")


def _identity_png(image, what: str) -> np.ndarray:
    shape = tuple(getattr(image, "shape", ()))
    if len(shape) == 3:
        image = image[None]
    elif len(shape) != 4 or shape[0] < 1:
        raise InputError(f"{what}: expected an image [H, W, C] or [1, H, W, C], got shape {list(shape)}")
    return to_uint8_frames(image[:1], what)[0]


def _judge(sims: dict, s: QuadrupletSettings) -> str:
    tgt, drv = sims["identity_target"], sims["identity_driving"]
    if tgt is None:
        return "no face found in any measured target frame"
    if s.min_identity_target is not None and tgt < s.min_identity_target:
        return f"identity_target {tgt:.3f} < min {s.min_identity_target:.3f}: the target does not show the identity"
    if s.max_identity_driving is not None and drv is not None and drv > s.max_identity_driving:
        return (f"identity_driving {drv:.3f} > max {s.max_identity_driving:.3f}: the driving clip already shows "
                "the identity")
    return ""


def _write_sample(root: Path, name: str, identity: np.ndarray, videos: dict, record: dict, crf: int,
                  fps: float) -> Path:
    """Write every file into a hidden temporary folder, then rename it to ``root/name``."""
    final = root / name
    tmp = root / f"{TMP_PREFIX}{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        from PIL import Image

        Image.fromarray(identity).save(tmp / "identity.png")
        for fname, frames in videos.items():
            write_video(tmp / fname, frames, fps, crf=crf)
        (tmp / "record.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
        os.rename(tmp, final)  # atomic; fails if another writer made `final` meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def write_quadruplet(root, prefix: str, real_video, generated, generated_identity, encoder: Encoder,
                     forward_mask=None, forward_pose=None, backward_mask=None, backward_pose=None,
                     generated_recomposed=None, real_identity=None,
                     settings: QuadrupletSettings = QuadrupletSettings(),
                     progress: Progress = None, cancel: Cancel = None) -> List[SampleReport]:
    """Write the samples of one SyncID-Pipe run (see the module docstring) -> one report per direction.

    real_video V_r [F, H, W, C]; generated V_g [G, H, W, C] (G >= 5 frames; G <= F: the first G frames of
    every clip are used); generated_identity I_g [H, W, C] / [1, H, W, C]; generated_recomposed V_g'
    [>= G, H, W, C] (default: V_g); real_identity: an image of the person in V_r (default: V_r's frame 0);
    forward_mask / backward_mask [>= G, H, W] (face masks of V_r / V_g'); forward_pose / backward_pose
    [>= G, H, W, 3] or None (no pose: samples for the faster model; both directions must agree).
    ``encoder``: images uint8 [N, H, W, 3] -> embeddings or None (:mod:`.similarity`).
    InputError for bad inputs (sizes, too few frames, an identity image without a face).
    """
    s = settings
    root = ensure_folder(root, "dataset_folder", create=False)  # a file in the way is said before any work
    names = sample_names(prefix)
    dirs = tuple(s.directions)
    if not dirs or any(d not in DIRECTIONS for d in dirs):
        raise InputError(f"directions must be a non-empty subset of {DIRECTIONS}, got {dirs}")
    if not (isinstance(s.fps, (int, float)) and s.fps > 0):
        raise InputError(f"fps must be a positive number, got {s.fps!r}")
    shape = tuple(getattr(generated, "shape", ()))
    if len(shape) != 4:
        raise InputError(f"generated clip: expected frames [F, H, W, C], got shape {list(shape)}")
    count, size = int(shape[0]), (int(shape[1]), int(shape[2]))
    if count < MIN_FRAMES:
        raise InputError(f"generated clip has {count} frames; at least {MIN_FRAMES} are needed")
    if size[0] % 2 or size[1] % 2:
        raise InputError(f"the clips are {size[1]}x{size[0]}: H.264 needs an even width and height; crop or resize "
                         "the clip by one pixel")
    recomposed = generated if generated_recomposed is None else generated_recomposed
    clips = [_Clip(real_video, "real clip"), _Clip(recomposed, "recomposed generated clip")]
    poses = {"forward": forward_pose, "backward": backward_pose}
    masks = {"forward": forward_mask, "backward": backward_mask}
    for d in dirs:
        if masks[d] is None:
            raise InputError(f"{d}_mask: the {d} sample needs the face mask of its driving clip "
                             f"({'the real clip' if d == 'forward' else 'the generated clip'})")
        clips.append(_Clip(masks[d], f"{d}_mask"))
        if poses[d] is not None:
            clips.append(_Clip(poses[d], f"{d}_pose"))
    if len({poses[d] is None for d in dirs}) > 1:
        raise InputError("forward_pose and backward_pose: connect both or neither (a dataset has a pose for every "
                         "sample, for the full model, or for none, for the faster model)")
    _check_videos(clips, count, size)

    reports: List[SampleReport] = []
    todo = []
    for d in dirs:
        name = names[d]
        final = root / name
        if root.is_dir():
            clean_temporaries(root, name)
        if final.exists():
            if not is_complete(final):
                raise InputError(f"dataset sample {final} exists but is not a complete sample (missing "
                                 f"{', '.join(f for f in FILES if not (final / f).is_file())}); it was not written "
                                 "by this writer: delete or rename it")
            reports.append(SampleReport(name, d, "skipped", "already exists", final))
            continue
        todo.append(d)
    if not todo:
        return reports
    ensure_folder(root, "dataset_folder")

    def frames_of(x, what):
        return to_uint8_frames(x[:count], what)

    real_u8 = frames_of(real_video, "real clip")
    for step, d in enumerate(todo):
        check_cancel(cancel, "the quadruplet writer")
        name = names[d]
        if d == "forward":
            ident = _identity_png(generated_identity, "generated identity image I_g")
            id_note, driving, target = "generated identity I_g", real_u8, frames_of(generated, "generated clip")
        else:
            if real_identity is not None:
                ident, id_note = _identity_png(real_identity, "real identity image"), "real identity image"
            else:
                ident, id_note = real_u8[0].copy(), "real clip frame 0 (no separate image of the real person given)"
            driving, target = frames_of(recomposed, "recomposed generated clip"), real_u8
        sims, per_frame = identity_similarity(encoder, ident, driving, target, s.similarity_stride,
                                              f"{d} identity image ({id_note})")
        tgt, drv = per_frame["target"], per_frame["driving"]
        reason = _judge(sims, s)
        if reason:
            reports.append(SampleReport(name, d, "rejected", reason, None, sims))
        else:
            record = {"version": 1, "direction": d, "fps": float(s.fps), "frames": count,
                      "identity_similarity": sims,
                      "identity_per_frame": {"target": tgt, "driving": drv, "stride": max(1, int(s.similarity_stride))},
                      "identity_image": id_note,
                      "thresholds": {"min_identity_target": s.min_identity_target,
                                     "max_identity_driving": s.max_identity_driving},
                      "source": s.source if s.source is not None else {"pipeline": PIPELINE},
                      "pipeline": PIPELINE}
            videos = {"driving.mp4": driving, "mask.mp4": frames_of(masks[d], f"{d}_mask"), "target.mp4": target}
            if poses[d] is not None:
                videos["pose.mp4"] = frames_of(poses[d], f"{d}_pose")
            try:
                path = _write_sample(root, name, ident, videos, record, s.crf, s.fps)
                reports.append(SampleReport(name, d, "written", "", path, sims))
            except FileExistsError:
                reports.append(SampleReport(name, d, "skipped", "written meanwhile by another run", root / name, sims))
            except OSError as exc:
                if (root / name).exists() and exc.errno in (39, 66):  # ENOTEMPTY (Linux / macOS)
                    reports.append(SampleReport(name, d, "skipped", "written meanwhile by another run", root / name,
                                                sims))
                else:
                    raise
        reporter(progress)("write", step + 1, len(todo))
    return reports


def summary(reports: List[SampleReport]) -> str:
    counts = {k: sum(r.status == k for r in reports) for k in ("written", "skipped", "rejected")}
    head = ", ".join(f"{v} {k}" for k, v in counts.items())
    return head + "\n" + "\n".join(r.line() for r in reports)
