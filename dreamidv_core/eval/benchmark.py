"""Video face-swap evaluation in the spirit of IDBench-V (DreamID-V's benchmark, Guo et al. 2026,
arXiv:2601.01425: identity, attribute preservation, video quality), plus Magic Mirror's face-motion numbers.

For each clip - a (driving video, reference image, swapped video[, face mask video][, ground-truth video])
set - one pass over the frames measures (names as in the tables):

* **identity** (``embedder``: ArcFace in practice; :class:`dreamidv_core.eval.identity_report.IdentityAccumulator`,
  the code of the identity report): cosine to the reference per frame -> ``id_mean``, ``id_min``,
  ``id_decay`` (first quarter minus last quarter: > 0 = the identity fades), ``id_slope`` (per 100 frames),
  ``id_stability`` (mean cosine of consecutive frames' embeddings), ``id_change`` (mean |change| of the
  similarity), ``no_face_frames``;
* **attribute preservation** (``observer``, :mod:`dreamidv_core.eval.face_metrics`; MediaPipe in practice):
  head-pose error against the driving frame in degrees (``pose_error`` geodesic, ``pose_error_max``,
  ``yaw_error``, ``pitch_error``, ``roll_error``), ``expression_error`` (blendshapes), ``landmark_error``;
* **video quality**: background (outside the dilated face mask) against the driving video: ``bg_psnr``,
  ``bg_ssim``; temporal flicker: ``flicker`` (swapped), ``flicker_driving``, ``flicker_excess`` (their
  difference) and ``face_flicker_excess`` (inside the face mask); with a ground-truth video (e.g. procedural
  data): ``gt_psnr``, ``gt_ssim``;
* **face motion** (Magic Mirror): ``fm_ref``, ``fm_inter`` of the swapped video, the same of the driving
  video (``fm_ref_driving``, ``fm_inter_driving``) and the gap ``fm_inter_gap`` = |fm_inter - fm_inter_driving|
  (a swap should move as much as its source; a still pasted face has fm_inter 0).

The face mask comes from the clip's mask video, else from the driving frame's landmarks (convex hull), else
there are no background numbers. Frames of another size than the swapped video (the swap resizes and crops)
are brought to its size with the swap's own area resize + centre crop (:func:`frame_aligner`).

Outputs (:func:`write_results`, atomic writes): ``results.json`` (settings, per-clip numbers and per-frame
series, aggregate), ``per_clip.csv``, ``aggregate.csv``, ``plots/<clip>.png`` (per-frame curves) and
``summary.png`` (the aggregate table). :func:`compare_results` puts two result folders side by side
(``comparison.csv/json/png``), e.g. step cache off vs on. Command: ``python -m dreamidv_core evaluate``
(:func:`evaluate_main`).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from ..errors import DreamIDVError, InputError
from ..preprocess.onnx_session import PROVIDER_CHOICES
from ..progress import Progress, reporter
from . import face_metrics as fm
from .identity_report import Embedder, IdentityAccumulator, IdentityReport

log = logging.getLogger(__name__)

RESULTS_VERSION = 1
VIDEO_EXT = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")
IMAGE_EXT = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
STANDARD_AREAS = ((832, 480), (480, 832), (1280, 720), (720, 1280), (1024, 576), (576, 1024), (624, 624))


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    better: Optional[str]  # "higher", "lower" or None (informative)
    family: str


METRICS: List[Metric] = [
    Metric("id_mean", "identity mean", "higher", "identity"),
    Metric("id_min", "identity min", "higher", "identity"),
    Metric("id_decay", "identity decay", "lower", "identity"),
    Metric("id_slope", "identity slope /100f", None, "identity"),
    Metric("id_stability", "identity stability", "higher", "identity"),
    Metric("id_change", "identity change", "lower", "identity"),
    Metric("no_face_frames", "frames without face", "lower", "identity"),
    Metric("pose_error", "pose error (deg)", "lower", "attributes"),
    Metric("pose_error_max", "pose error max (deg)", "lower", "attributes"),
    Metric("yaw_error", "yaw error (deg)", "lower", "attributes"),
    Metric("pitch_error", "pitch error (deg)", "lower", "attributes"),
    Metric("roll_error", "roll error (deg)", "lower", "attributes"),
    Metric("expression_error", "expression error", "lower", "attributes"),
    Metric("landmark_error", "landmark error", "lower", "attributes"),
    Metric("bg_psnr", "background PSNR (dB)", "higher", "quality"),
    Metric("bg_ssim", "background SSIM", "higher", "quality"),
    Metric("flicker", "flicker", None, "quality"),
    Metric("flicker_driving", "flicker (driving)", None, "quality"),
    Metric("flicker_excess", "flicker excess", "lower", "quality"),
    Metric("face_flicker_excess", "face flicker excess", "lower", "quality"),
    Metric("gt_psnr", "ground-truth PSNR (dB)", "higher", "quality"),
    Metric("gt_ssim", "ground-truth SSIM", "higher", "quality"),
    Metric("fm_ref", "FM_ref", None, "motion"),
    Metric("fm_ref_driving", "FM_ref (driving)", None, "motion"),
    Metric("fm_inter", "FM_inter", None, "motion"),
    Metric("fm_inter_driving", "FM_inter (driving)", None, "motion"),
    Metric("fm_inter_gap", "FM_inter gap", "lower", "motion"),
]
METRIC_KEYS = [m.key for m in METRICS]
SERIES = ("similarity", "pose_error", "expression_error", "landmark_error", "bg_psnr", "bg_ssim", "flicker",
          "flicker_driving")


# ----------------------------------------------------------------------------------------- inputs
@dataclass
class ClipInput:
    """One clip's files. target: an optional ground-truth video (what a perfect swap would be)."""

    name: str
    driving: Path
    reference: Path
    swapped: Path
    mask: Optional[Path] = None
    target: Optional[Path] = None


def _first(folder: Path, stems: Sequence[str], exts: Sequence[str]) -> Optional[Path]:
    for stem in stems:
        for ext in exts:
            p = folder / f"{stem}{ext}"
            if p.is_file():
                return p
    return None


def _clip_from_folder(folder: Path, swapped_dir: Optional[Path]) -> ClipInput:
    driving = _first(folder, ("driving", "source", "video"), VIDEO_EXT)
    reference = _first(folder, ("reference", "identity", "face"), IMAGE_EXT)
    if swapped_dir is not None:
        swapped = _first(swapped_dir, (folder.name,), VIDEO_EXT) or _first(swapped_dir / folder.name, ("swapped",),
                                                                            VIDEO_EXT)
    else:
        swapped = _first(folder, ("swapped", "output", "result"), VIDEO_EXT)
    missing = [what for what, p in (("driving.mp4", driving), ("reference.png (or identity.png)", reference),
                                    ("the swapped video", swapped)) if p is None]
    if missing:
        where = f"{swapped_dir}/{folder.name}.mp4" if swapped_dir is not None else "swapped.mp4 in the folder"
        raise InputError(f"evaluation clip {folder}: missing {', '.join(missing)} (a clip folder holds driving.mp4, "
                         f"reference.png and mask.mp4 (optional); the swapped video is {where})")
    return ClipInput(folder.name, driving, reference, swapped, _first(folder, ("mask",), VIDEO_EXT),
                     _first(folder, ("target", "ground_truth"), VIDEO_EXT))


def _clips_from_list(path: Path) -> List[ClipInput]:
    """A JSON list of objects, or a CSV with a header: name, driving, reference, swapped[, mask][, target];
    relative paths are relative to the list file."""
    base = path.parent
    try:
        if path.suffix.lower() == ".json":
            rows = json.loads(path.read_text(encoding="utf-8"))
        else:
            rows = list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))))
    except (OSError, ValueError, csv.Error) as exc:
        raise InputError(f"clip list {path}: not readable ({exc})") from None
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise InputError(f"clip list {path}: expected a non-empty list of {{name, driving, reference, swapped, "
                         "mask?, target?}} rows")
    out = []
    for i, row in enumerate(rows):
        missing = [k for k in ("driving", "reference", "swapped") if not row.get(k)]
        if missing:
            raise InputError(f"clip list {path}, row {i + 1}: missing {', '.join(missing)}")
        paths = {}
        for key in ("driving", "reference", "swapped", "mask", "target"):
            if row.get(key):
                p = Path(row[key]).expanduser()
                p = p if p.is_absolute() else base / p
                if not p.is_file():
                    raise InputError(f"clip list {path}, row {i + 1}: {key} file {p} does not exist")
                paths[key] = p
        out.append(ClipInput(str(row.get("name") or f"clip_{i:03d}"), **paths))
    return out


def discover_clips(source, swapped_dir=None) -> List[ClipInput]:
    """Clips from a folder of clip folders (each: driving.mp4, reference.png or identity.png, swapped.mp4 or
    ``<swapped_dir>/<clip>.mp4``, optional mask.mp4 and target.mp4; a training dataset folder works with
    ``swapped_dir``), or from a list file (.json / .csv). Names must be unique."""
    source = Path(source).expanduser()
    swapped_dir = Path(swapped_dir).expanduser() if swapped_dir else None
    if swapped_dir is not None and not swapped_dir.is_dir():
        raise InputError(f"swapped folder {swapped_dir} does not exist")
    if source.is_file():
        clips = _clips_from_list(source)
    elif source.is_dir():
        folders = sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            raise InputError(f"evaluation folder {source} has no clip folders (each holds driving.mp4, reference.png, "
                             "swapped.mp4 and optionally mask.mp4)")
        clips = [_clip_from_folder(f, swapped_dir) for f in folders]
    else:
        raise InputError(f"clips: {source} is neither a folder of clip folders nor a .json/.csv list")
    names = [c.name for c in clips]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(f"clips: names {dup} appear more than once; give each clip its own name")
    return clips


# ----------------------------------------------------------------------------------------- geometry
def frame_aligner(src_hw, dst_hw, area=None) -> Callable[[np.ndarray], np.ndarray]:
    """frame [h, w, 3] of size ``src_hw`` -> the same view at ``dst_hw`` (the swapped video's size): the
    swap's area resize + centre crop (:func:`dreamidv_core.preprocess.video_ops.resize_and_crop`) for the
    area cap ``area`` (W, H) or the first standard cap that gives exactly ``dst_hw``; else a cover resize
    and centre crop (logged)."""
    from PIL import Image

    from ..preprocess.video_ops import output_size, resize_and_crop

    src_hw, dst_hw = tuple(src_hw), tuple(dst_hw)
    if src_hw == dst_hw:
        return lambda f: f
    caps = ([tuple(area)] if area else []) + [(dst_hw[1], dst_hw[0])] + list(STANDARD_AREAS)
    for w, h in caps:
        if output_size(src_hw[0], src_hw[1], w, h) == dst_hw:
            return lambda f, _w=w, _h=h: resize_and_crop(Image.fromarray(f), _w, _h)
    log.info("evaluation: %dx%d frames brought to %dx%d by a cover resize and centre crop (no swap area cap "
             "gives that size; pass --area W*H)", src_hw[1], src_hw[0], dst_hw[1], dst_hw[0])
    scale = max(dst_hw[0] / src_hw[0], dst_hw[1] / src_hw[1])
    rh, rw = max(dst_hw[0], round(src_hw[0] * scale)), max(dst_hw[1], round(src_hw[1] * scale))
    top, left = (rh - dst_hw[0]) // 2, (rw - dst_hw[1]) // 2

    def cover(f):
        img = Image.fromarray(f).resize((rw, rh), Image.BICUBIC)
        return np.asarray(img.crop((left, top, left + dst_hw[1], top + dst_hw[0])))

    return cover


# ----------------------------------------------------------------------------------------- scoring
@dataclass
class ClipResult:
    """metrics: {key of :data:`METRICS`: float or None}; series: per-frame lists (None where not
    measured); identity: the identity report (None without an embedder); notes: what could not be measured."""

    name: str
    metrics: Dict[str, Optional[float]]
    series: Dict[str, list]
    identity: Optional[IdentityReport] = None
    notes: List[str] = field(default_factory=list)
    frames: int = 0
    mask_source: Optional[str] = None
    inputs: Dict[str, Optional[str]] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"name": self.name, "frames": self.frames, "mask_source": self.mask_source, "inputs": self.inputs,
                "metrics": {k: _num(v) for k, v in self.metrics.items()},
                "series": {k: [_num(v) for v in vals] for k, vals in self.series.items()}, "notes": self.notes}


def _num(v):
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _frame(frames, i: int, what: str) -> np.ndarray:
    from ..preprocess.pose.extract import frame_at

    return frame_at(frames, i, what)


def score_clip(swapped, driving, reference, embedder: Optional[Embedder] = None,
               observer: Optional[fm.Observer] = None, mask=None, target=None, area=None, name: str = "clip",
               progress: Progress = None) -> ClipResult:
    """Score one clip (see the module docstring). swapped, driving, mask, target: indexable frames with
    len ([F, H, W, C] uint8 / float 0..1 numpy or torch, a list, a :class:`dreamidv_core.io.video.VideoReader`;
    read one frame at a time); reference: an image [H, W, C] (or an embedding for the identity numbers).
    The first min(len) frames are compared. ``progress("frames", done, total)``."""
    n = min(len(swapped), len(driving), *(len(x) for x in (mask, target) if x is not None))
    if n == 0:
        raise InputError(f"evaluation {name}: a video has no frames")
    notes = []
    if n < len(swapped) or n < len(driving):
        notes.append(f"compared the first {n} frames (swapped {len(swapped)}, driving {len(driving)})")
    first = _frame(swapped, 0, f"{name}: swapped")
    size = first.shape[:2]
    align = frame_aligner(_frame(driving, 0, f"{name}: driving").shape[:2], size, area)
    align_mask = frame_aligner(_frame(mask, 0, f"{name}: mask").shape[:2], size, area) if mask is not None else None
    align_gt = frame_aligner(_frame(target, 0, f"{name}: target").shape[:2], size, area) if target is not None else None
    ident = IdentityAccumulator(reference, embedder, n) if embedder is not None else None
    ref_obs = None
    if observer is not None and np.ndim(reference) >= 3:
        from ..preprocess.identity import photo

        ref_obs = observer(photo(reference, "reference image"))
        if ref_obs is None:
            notes.append("no face found in the reference image: no FM_ref")
    nan = lambda: np.full(n, np.nan)  # noqa: E731
    s = {k: nan() for k in ("pose", "yaw", "pitch", "roll", "expression", "landmarks", "bg_psnr", "bg_ssim",
                            "fm_ref", "fm_ref_driving", "gt_psnr", "gt_ssim")}
    pairs = {k: np.full(max(n - 1, 0), np.nan) for k in ("flicker", "flicker_driving", "face_flicker",
                                                          "face_flicker_driving", "fm_inter", "fm_inter_driving")}
    mask_source = "mask" if mask is not None else ("landmarks" if observer is not None else None)
    prev = None  # (swapped frame, driving frame, swapped obs, driving obs)
    report = reporter(progress)
    for i in range(n):
        sw = first if i == 0 else _frame(swapped, i, f"{name}: swapped")
        dr = align(_frame(driving, i, f"{name}: driving"))
        if ident is not None:
            ident.add(i, sw[None])
        so = do = None
        if observer is not None:
            so, do = observer(sw), observer(dr)
            err = fm.pose_errors(so, do)
            for k in ("pose", "yaw", "pitch", "roll", "expression", "landmarks"):
                s[k][i] = err[k]
            s["fm_ref"][i], s["fm_ref_driving"][i] = fm.motion_distance(so, ref_obs), fm.motion_distance(do, ref_obs)
        face = None
        if align_mask is not None:
            face = fm.luma(align_mask(_frame(mask, i, f"{name}: mask"))) > 127.5
        elif do is not None:
            face = fm.hull_mask(do.landmarks, *size)
        if face is not None and face.any():
            keep = ~fm.dilate(face, fm.face_margin(face))
            s["bg_psnr"][i], s["bg_ssim"][i] = fm.masked_psnr(sw, dr, keep), fm.masked_ssim(sw, dr, keep)
        if align_gt is not None:
            gt = align_gt(_frame(target, i, f"{name}: target"))
            everywhere = np.ones(size, bool)
            s["gt_psnr"][i], s["gt_ssim"][i] = fm.masked_psnr(sw, gt, everywhere), fm.masked_ssim(sw, gt, everywhere)
        if prev is not None:
            psw, pdr, pso, pdo = prev
            pairs["flicker"][i - 1], pairs["flicker_driving"][i - 1] = fm.frame_change(sw, psw), fm.frame_change(dr, pdr)
            if face is not None and face.any():
                pairs["face_flicker"][i - 1] = fm.frame_change(sw, psw, face)
                pairs["face_flicker_driving"][i - 1] = fm.frame_change(dr, pdr, face)
            pairs["fm_inter"][i - 1] = fm.motion_distance(so, pso)
            pairs["fm_inter_driving"][i - 1] = fm.motion_distance(do, pdo)
        prev = (sw, dr, so, do)
        report("frames", i + 1, n)
    if mask_source == "landmarks" and not np.isfinite(s["bg_psnr"]).any():
        notes.append("no face mask (no mask video and no landmarks in the driving video): no background numbers")
    if observer is None:
        notes.append("no landmarker: no pose, expression, landmark or face-motion numbers")
    if embedder is None:
        notes.append("no identity embedder: no identity numbers")
    rep = ident.report() if ident is not None else None
    metrics = _clip_metrics(rep, s, pairs)
    series = {"similarity": list(rep.similarities) if rep is not None else [None] * n,
              "pose_error": list(s["pose"]), "expression_error": list(s["expression"]),
              "landmark_error": list(s["landmarks"]), "bg_psnr": list(s["bg_psnr"]), "bg_ssim": list(s["bg_ssim"]),
              "flicker": list(pairs["flicker"]), "flicker_driving": list(pairs["flicker_driving"])}
    return ClipResult(name, metrics, series, rep, notes, n, mask_source)


def _gap(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None else abs(a - b)


def _diff(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None else a - b


def _clip_metrics(rep: Optional[IdentityReport], s: Dict[str, np.ndarray], pairs: Dict[str, np.ndarray]) -> Dict:
    mean = fm.finite_mean
    m: Dict[str, Optional[float]] = dict.fromkeys(METRIC_KEYS)
    if rep is not None:
        m.update(id_mean=_num(rep.mean), id_min=_num(rep.min), id_decay=fm.decay(rep.similarities),
                 id_slope=fm.slope_per_100(rep.similarities), id_stability=_num(rep.mean_consecutive_cosine),
                 id_change=_num(rep.mean_abs_change), no_face_frames=float(rep.no_face_count))
    m.update(pose_error=mean(s["pose"]), pose_error_max=fm.finite_max(s["pose"]), yaw_error=mean(s["yaw"]),
             pitch_error=mean(s["pitch"]), roll_error=mean(s["roll"]), expression_error=mean(s["expression"]),
             landmark_error=mean(s["landmarks"]), bg_psnr=mean(s["bg_psnr"]), bg_ssim=mean(s["bg_ssim"]),
             gt_psnr=mean(s["gt_psnr"]), gt_ssim=mean(s["gt_ssim"]),
             flicker=mean(pairs["flicker"]), flicker_driving=mean(pairs["flicker_driving"]),
             fm_ref=mean(s["fm_ref"]), fm_ref_driving=mean(s["fm_ref_driving"]),
             fm_inter=mean(pairs["fm_inter"]), fm_inter_driving=mean(pairs["fm_inter_driving"]))
    m["flicker_excess"] = _diff(m["flicker"], m["flicker_driving"])
    m["face_flicker_excess"] = _diff(mean(pairs["face_flicker"]), mean(pairs["face_flicker_driving"]))
    m["fm_inter_gap"] = _gap(m["fm_inter"], m["fm_inter_driving"])
    return m


def aggregate(results: Sequence[ClipResult]) -> Dict[str, Dict[str, Optional[float]]]:
    """{metric: {"mean", "min", "max", "clips"}} over the clips where it was measured."""
    out = {}
    for key in METRIC_KEYS:
        vals = [r.metrics.get(key) for r in results]
        vals = [float(v) for v in vals if v is not None and math.isfinite(float(v))]
        out[key] = {"mean": float(np.mean(vals)) if vals else None, "min": min(vals) if vals else None,
                    "max": max(vals) if vals else None, "clips": len(vals)}
    return out


def evaluate_clips(clips: Sequence[ClipInput], embedder: Optional[Embedder] = None,
                   observer: Optional[fm.Observer] = None, area=None, max_frames: Optional[int] = None,
                   progress: Progress = None) -> List[ClipResult]:
    """Score every clip (videos streamed with :class:`dreamidv_core.io.video.VideoReader`).
    ``progress("clips", done, total)`` after each clip."""
    from ..io.video import VideoReader, read_image

    results, report = [], reporter(progress)
    for k, clip in enumerate(clips):
        videos = {key: VideoReader(p, max_frames=max_frames) if p is not None else None
                  for key, p in (("swapped", clip.swapped), ("driving", clip.driving), ("mask", clip.mask),
                                 ("target", clip.target))}
        try:
            res = score_clip(videos["swapped"], videos["driving"], read_image(clip.reference), embedder, observer,
                             mask=videos["mask"], target=videos["target"], area=area, name=clip.name)
        finally:
            for v in videos.values():
                if v is not None:
                    v.close()
        res.inputs = {k: (str(getattr(clip, k)) if getattr(clip, k) is not None else None)
                      for k in ("driving", "reference", "swapped", "mask", "target")}
        results.append(res)
        report("clips", k + 1, len(clips))
    return results


# ----------------------------------------------------------------------------------------- writing
def _fmt(v) -> str:
    if v is None:
        return ""
    return f"{v:.6g}"


def _csv(rows: List[List]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def _write_text(path: Path, text: str) -> None:
    from ..io.state_dict import atomic_write

    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _write_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    from ..io.state_dict import atomic_write

    atomic_write(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))


def results_document(results: Sequence[ClipResult], settings: Optional[dict] = None) -> dict:
    return {"version": RESULTS_VERSION, "settings": dict(settings or {}),
            "metrics": [{"key": m.key, "label": m.label, "better": m.better, "family": m.family} for m in METRICS],
            "clips": [r.as_dict() for r in results], "aggregate": aggregate(results)}


def write_results(folder, results: Sequence[ClipResult], settings: Optional[dict] = None) -> dict:
    """Write results.json, per_clip.csv, aggregate.csv, plots/<clip>.png and summary.png under ``folder``
    (each file atomically) -> the results document."""
    from . import charts

    folder = Path(folder)
    doc = results_document(results, settings)
    per_clip = [["clip", "frames", "mask_source"] + METRIC_KEYS]
    per_clip += [[r.name, r.frames, r.mask_source or ""] + [_fmt(r.metrics.get(k)) for k in METRIC_KEYS]
                 for r in results]
    agg = [["metric", "label", "better", "mean", "min", "max", "clips"]]
    agg += [[m.key, m.label, m.better or "", _fmt(doc["aggregate"][m.key]["mean"]), _fmt(doc["aggregate"][m.key]["min"]),
             _fmt(doc["aggregate"][m.key]["max"]), doc["aggregate"][m.key]["clips"]] for m in METRICS]
    for r in results:
        _write_png(folder / "plots" / f"{_safe(r.name)}.png", charts.clip_panel(r.as_dict()))
    _write_png(folder / "summary.png", charts.summary_table(doc))
    _write_text(folder / "per_clip.csv", _csv(per_clip))
    _write_text(folder / "aggregate.csv", _csv(agg))
    _write_text(folder / "results.json", json.dumps(doc, indent=1, allow_nan=False))  # last: marks completion
    return doc


def _safe(name: str) -> str:
    out = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip(".")
    return out or "clip"


def load_results(folder) -> dict:
    path = Path(folder) / "results.json"
    if not path.is_file():
        raise InputError(f"{folder}: no results.json (run `python -m dreamidv_core evaluate` into it first)")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not readable ({exc})") from None
    if not isinstance(doc, dict) or doc.get("version") != RESULTS_VERSION or "clips" not in doc:
        raise InputError(f"{path}: not an evaluation results file of version {RESULTS_VERSION}")
    return doc


def compare_results(a: dict, b: dict, labels=("A", "B")) -> dict:
    """Two results documents side by side over the clips both have: per metric the mean of each over those
    clips, the difference (B - A) and which is better; and per clip the same."""
    if len(labels) != 2 or labels[0] == labels[1]:
        raise InputError(f"comparison labels must be two different names, got {list(labels)}")
    names_a = {c["name"]: c for c in a["clips"]}
    names_b = {c["name"]: c for c in b["clips"]}
    common = [n for n in names_a if n in names_b]
    if not common:
        raise InputError(f"the two result sets share no clip name ({sorted(names_a)[:5]} vs {sorted(names_b)[:5]})")
    rows = []
    for m in METRICS:
        va = [names_a[n]["metrics"].get(m.key) for n in common]
        vb = [names_b[n]["metrics"].get(m.key) for n in common]
        both = [(x, y) for x, y in zip(va, vb) if x is not None and y is not None]
        ma = float(np.mean([x for x, _ in both])) if both else None
        mb = float(np.mean([y for _, y in both])) if both else None
        rows.append({"key": m.key, "label": m.label, "better": m.better, labels[0]: ma, labels[1]: mb,
                     "delta": None if ma is None else mb - ma, "clips": len(both), "winner": _winner(m, ma, mb, labels)})
    per_clip = [{"clip": n, **{f"{m.key}:{labels[0]}": names_a[n]["metrics"].get(m.key) for m in METRICS},
                 **{f"{m.key}:{labels[1]}": names_b[n]["metrics"].get(m.key) for m in METRICS}} for n in common]
    only = sorted(set(names_a) ^ set(names_b))
    return {"version": RESULTS_VERSION, "labels": list(labels), "clips": common, "unmatched_clips": only,
            "metrics": rows, "per_clip": per_clip}


def _winner(m: Metric, a: Optional[float], b: Optional[float], labels) -> Optional[str]:
    if m.better is None or a is None or b is None:
        return None
    if abs(a - b) <= 1e-12 * max(1.0, abs(a), abs(b)):
        return "tie"
    return labels[0] if (a > b) == (m.better == "higher") else labels[1]


def write_comparison(folder, comparison: dict) -> None:
    from . import charts

    folder = Path(folder)
    la, lb = comparison["labels"]
    rows = [["metric", "label", "better", la, lb, "delta", "winner", "clips"]]
    rows += [[r["key"], r["label"], r["better"] or "", _fmt(r[la]), _fmt(r[lb]), _fmt(r["delta"]), r["winner"] or "",
              r["clips"]] for r in comparison["metrics"]]
    _write_png(folder / "comparison.png", charts.comparison_chart(comparison))
    _write_text(folder / "comparison.csv", _csv(rows))
    _write_text(folder / "comparison.json", json.dumps(comparison, indent=1, allow_nan=False))


def summary_text(doc: dict) -> str:
    """A few lines: clips and the main aggregate numbers."""
    agg = doc["aggregate"]
    parts = []
    for key in ("id_mean", "id_min", "pose_error", "expression_error", "bg_psnr", "bg_ssim", "flicker_excess",
                "fm_inter_gap"):
        v = agg[key]["mean"]
        if v is not None:
            parts.append(f"{key} {v:.4g}")
    return f"{len(doc['clips'])} clip(s): " + (", ".join(parts) if parts else "nothing could be measured")


# ----------------------------------------------------------------------------------------- command
def _area(text: str):
    try:
        w, h = (int(v) for v in text.lower().replace("x", "*").split("*"))
        return w, h
    except ValueError:
        raise argparse.ArgumentTypeError(f"area must look like 832*480, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m dreamidv_core evaluate",
        description="Score face-swapped videos (identity, pose/expression, background, flicker, face motion) "
                    "and write tables and plots; or compare two result folders.")
    ap.add_argument("--clips", help="a folder of clip folders (driving.mp4, reference.png, swapped.mp4, mask.mp4?, "
                                    "target.mp4?) or a .json/.csv list (name, driving, reference, swapped, mask, target)")
    ap.add_argument("--swapped-dir", help="take each clip's swapped video from <dir>/<clip name>.mp4")
    ap.add_argument("--out", required=True, help="results folder (written atomically, file by file)")
    ap.add_argument("--insightface", help="insightface folder (models/<pack>/) or pack folder: the ArcFace identity")
    ap.add_argument("--pack", default="antelopev2")
    ap.add_argument("--provider", default="auto", choices=list(PROVIDER_CHOICES))
    ap.add_argument("--landmarker", help="MediaPipe face_landmarker .task (pose, expression, landmarks, FM)")
    ap.add_argument("--models-dir", help="a folder laid out like ComfyUI/models (finds the landmarker)")
    ap.add_argument("--area", type=_area, help="the swap's area cap W*H, to align other-sized videos exactly")
    ap.add_argument("--max-frames", type=int, help="read at most this many frames of each video")
    ap.add_argument("--compare", nargs=2, metavar=("RESULTS_A", "RESULTS_B"),
                    help="instead of scoring: compare two result folders into --out")
    ap.add_argument("--labels", default="A,B", help="names of the two result sets in the comparison")
    return ap


def evaluate_main(argv: Optional[Sequence[str]] = None) -> int:
    """The command; returns the exit status (2 on a DreamIDVError, printed to stderr)."""
    args = build_parser().parse_args(argv)
    try:
        return _compare(args) if args.compare else _evaluate(args)
    except DreamIDVError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _compare(args) -> int:
    labels = [s.strip() for s in args.labels.split(",")]
    if len(labels) != 2 or not all(labels) or labels[0] == labels[1]:
        raise InputError(f"--labels: two different names separated by a comma, got {args.labels!r}")
    cmp = compare_results(load_results(args.compare[0]), load_results(args.compare[1]), tuple(labels))
    write_comparison(args.out, cmp)
    la, lb = labels
    for r in cmp["metrics"]:
        if r[la] is not None:
            print(f"{r['label']:>24}: {la} {r[la]:.4g}  {lb} {r[lb]:.4g}  ({r['winner'] or '-'})")
    print(f"comparison of {len(cmp['clips'])} clips: {args.out}")
    return 0


def _evaluate(args) -> int:
    if not args.clips:
        raise InputError("give --clips (a folder or list of clips) or --compare A B")
    clips = discover_clips(args.clips, args.swapped_dir)
    embedder = observer = None
    closers = []
    if args.insightface:
        from .identity_report import insightface_embedder, resolve_pack

        embedder = insightface_embedder(resolve_pack(args.insightface, args.pack), args.provider)
    task = args.landmarker
    if task is None and args.models_dir:
        from ..weights.model_files import find_model_files

        task = find_model_files(args.models_dir).path("face_landmarker")
    if task:
        from ..preprocess.pose.mediapipe_face import FaceLandmarker

        landmarker = FaceLandmarker(str(task))
        closers.append(landmarker.close)
        observer = fm.mediapipe_observer(landmarker)
    if embedder is None:
        print("note: no --insightface: no identity numbers", file=sys.stderr)
    if observer is None:
        print("note: no --landmarker: no pose, expression or face-motion numbers", file=sys.stderr)

    def progress(stage, i, n):
        print(f"{stage} {i}/{n}", flush=True)

    try:
        results = evaluate_clips(clips, embedder, observer, area=args.area, max_frames=args.max_frames,
                                 progress=progress)
    finally:
        for close in closers:
            close()
    settings = {"clips": str(args.clips), "swapped_dir": args.swapped_dir, "insightface": args.insightface,
                "pack": args.pack, "landmarker": str(task) if task else None, "area": args.area,
                "max_frames": args.max_frames}
    doc = write_results(args.out, results, settings)
    print(summary_text(doc))
    print(f"results: {args.out}")
    return 0
