"""Identity report: how well a face-swapped video keeps the reference identity, frame by frame.

Pure numpy/PIL (no ComfyUI); the IRL trainer uses the same code for validation with its own encoder.

* ``embedder``: any callable ``images uint8 [n, H, W, 3] -> n items``, each an embedding ``[D]``
  (L2-normalised; it is normalised again here) or ``None`` when the image has no face. A 2-D array
  ``[n, D]`` is accepted too (a row of NaN = no face). :func:`insightface_embedder` builds one on
  :mod:`dreamidv_core.preprocess.face_analysis` (onnxruntime on an insightface pack folder, largest face,
  ArcFace embedding; the insightface package is not needed).
* ``landmarker``: optional callable ``frame uint8 [H, W, 3] -> [K, 2] landmarks (x, y) or None``;
  :func:`insightface_landmarker` gives insightface's 5 points of the largest face.

Numbers (:class:`IdentityReport`): per-frame cosine similarity to the reference (NaN where no face,
counted), mean, minimum (and its frame), frame-to-frame stability over consecutive frames that both
have a face (mean / max absolute change of the similarity, mean / min cosine between the two frames'
embeddings) and, with driving frames and a landmarker, the pose/expression error: per frame the mean
distance between corresponding landmarks after removing translation (centroid) and scale (RMS
distance to the centroid), so 0 = same pose and expression, ~sqrt(2) = unrelated; rotation is kept
(it is part of the pose). Plot: :func:`plot_similarity` (PIL, uint8 [H, W, 3]).

Command: :func:`identity_report_main` (``python -m dreamidv_core identity-report ...``).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np

from ..errors import DreamIDVError, InputError
from ..io.video import to_uint8_frames
from ..progress import Progress, reporter
from ..preprocess.onnx_session import PROVIDER_CHOICES

log = logging.getLogger(__name__)

Embedder = Callable[[np.ndarray], Sequence[Optional[np.ndarray]]]
Landmarker = Callable[[np.ndarray], Optional[np.ndarray]]


# ----------------------------------------------------------------------------------------- numbers
def _nan_stat(fn, values: np.ndarray) -> float:
    values = values[np.isfinite(values)]
    return float(fn(values)) if values.size else float("nan")


def _json_float(v):
    return None if v is None or not math.isfinite(v) else float(v)


@dataclass
class IdentityReport:
    """similarities: float64 [F], cosine to the reference, NaN where no face was found.
    consecutive_cosines: float64 [F-1], cosine between frames i and i+1 (NaN unless both have a face).
    landmark_errors: float64 [F'] (F' = frames compared with the driving video) or None."""

    similarities: np.ndarray
    consecutive_cosines: np.ndarray
    landmark_errors: Optional[np.ndarray] = None
    driving_frames: Optional[int] = None
    no_face_frames: List[int] = field(default_factory=list)

    @property
    def frame_count(self) -> int:
        return int(self.similarities.size)

    @property
    def face_count(self) -> int:
        return int(np.isfinite(self.similarities).sum())

    @property
    def no_face_count(self) -> int:
        return len(self.no_face_frames)

    @property
    def mean(self) -> float:
        return _nan_stat(np.mean, self.similarities)

    @property
    def min(self) -> float:
        return _nan_stat(np.min, self.similarities)

    @property
    def min_frame(self) -> Optional[int]:
        return None if not self.face_count else int(np.nanargmin(self.similarities))

    @property
    def std(self) -> float:
        return _nan_stat(np.std, self.similarities)

    @property
    def changes(self) -> np.ndarray:
        """|s[i+1] - s[i]|, float64 [F-1] (NaN unless both frames have a face)."""
        return np.abs(np.diff(self.similarities))

    @property
    def pair_count(self) -> int:
        return int(np.isfinite(self.changes).sum())

    @property
    def mean_abs_change(self) -> float:
        return _nan_stat(np.mean, self.changes)

    @property
    def max_abs_change(self) -> float:
        return _nan_stat(np.max, self.changes)

    @property
    def mean_consecutive_cosine(self) -> float:
        return _nan_stat(np.mean, self.consecutive_cosines)

    @property
    def min_consecutive_cosine(self) -> float:
        return _nan_stat(np.min, self.consecutive_cosines)

    @property
    def landmark_error_mean(self) -> Optional[float]:
        return None if self.landmark_errors is None else _nan_stat(np.mean, self.landmark_errors)

    @property
    def landmark_error_max(self) -> Optional[float]:
        return None if self.landmark_errors is None else _nan_stat(np.max, self.landmark_errors)

    @property
    def landmark_frame_count(self) -> int:
        return 0 if self.landmark_errors is None else int(np.isfinite(self.landmark_errors).sum())

    def as_dict(self) -> dict:
        """JSON-ready numbers (NaN -> None)."""
        out = {
            "frames": self.frame_count, "face_frames": self.face_count, "no_face_frames": self.no_face_count,
            "no_face_frame_indices": list(self.no_face_frames),
            "mean_similarity": _json_float(self.mean), "min_similarity": _json_float(self.min),
            "min_similarity_frame": self.min_frame, "similarity_std": _json_float(self.std),
            "stability": {"pairs": self.pair_count, "mean_abs_change": _json_float(self.mean_abs_change),
                          "max_abs_change": _json_float(self.max_abs_change),
                          "mean_consecutive_cosine": _json_float(self.mean_consecutive_cosine),
                          "min_consecutive_cosine": _json_float(self.min_consecutive_cosine)},
            "similarities": [_json_float(v) for v in self.similarities],
            "landmarks": None,
        }
        if self.landmark_errors is not None:
            out["landmarks"] = {"driving_frames": self.driving_frames, "compared_frames": self.landmark_frame_count,
                                "mean_error": _json_float(self.landmark_error_mean),
                                "max_error": _json_float(self.landmark_error_max),
                                "errors": [_json_float(v) for v in self.landmark_errors]}
        return out

    def summary(self) -> str:
        """One paragraph in words."""
        n = self.frame_count
        missing = ""
        if self.no_face_count:
            shown = ", ".join(str(i) for i in self.no_face_frames[:10]) + (", ..." if self.no_face_count > 10 else "")
            missing = f"; no face in {self.no_face_count} (frame{'s' if self.no_face_count > 1 else ''} {shown})"
        text = f"Identity similarity to the reference over {n} frame{'s' if n != 1 else ''} ({self.face_count} with a face{missing}): "
        if not self.face_count:
            text += "no face was found in any frame, so nothing could be measured."
        else:
            text += f"mean {self.mean:.3f}, minimum {self.min:.3f} at frame {self.min_frame}, spread (std) {self.std:.3f}."
            if self.pair_count:
                text += (f" Frame to frame the similarity changes by {self.mean_abs_change:.3f} on average (at most "
                         f"{self.max_abs_change:.3f}) and consecutive face embeddings agree with cosine "
                         f"{self.mean_consecutive_cosine:.3f} on average (lowest {self.min_consecutive_cosine:.3f}).")
        if self.landmark_errors is not None:
            if self.landmark_frame_count:
                text += (f" Pose/expression error against the driving video: mean normalised landmark distance "
                         f"{self.landmark_error_mean:.3f} (worst {self.landmark_error_max:.3f}) over "
                         f"{self.landmark_frame_count} frames (0 = identical, ~1.4 = unrelated).")
            else:
                text += " Pose/expression error: no frame had landmarks in both videos."
        return text


def normalise_landmarks(points) -> Optional[np.ndarray]:
    """[K, 2] -> centred on the centroid and divided by the RMS distance to it (None if degenerate)."""
    p = np.asarray(points, np.float64).reshape(-1, 2)
    p = p - p.mean(axis=0)
    scale = math.sqrt(float((p ** 2).sum(axis=1).mean()))
    return None if scale < 1e-9 or not np.isfinite(p).all() else p / scale


def landmark_error(a, b) -> float:
    """Mean distance between corresponding points of two [K, 2] landmark sets after removing
    translation and scale (see :func:`normalise_landmarks`); NaN if either set is degenerate."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim != 2 or a.shape[1] != 2:
        raise InputError(f"landmark sets must both be [K, 2], got {list(a.shape)} and {list(b.shape)}")
    na, nb = normalise_landmarks(a), normalise_landmarks(b)
    if na is None or nb is None:
        return float("nan")
    return float(np.linalg.norm(na - nb, axis=1).mean())


# ------------------------------------------------------------------------------------------ report
def _frame(frames, i: int, what: str) -> np.ndarray:
    """frames[i] ([H, W, C] uint8 / float 0..1, numpy or torch) -> uint8 [1, H, W, 3]."""
    return np.ascontiguousarray(to_uint8_frames(frames[i][None], f"{what} frame {i}"))


def _unit(vec, what: str, dim: Optional[int] = None) -> Optional[np.ndarray]:
    if vec is None:
        return None
    v = np.asarray(vec, np.float64).reshape(-1)
    if v.size == 0 or not np.isfinite(v).all():
        return None
    if dim is not None and v.size != dim:
        raise InputError(f"{what}: embedding has {v.size} values, the reference has {dim}")
    norm = float(np.linalg.norm(v))
    if norm < 1e-12:
        return None
    return v / norm


def _embed_one(embedder: Embedder, image: np.ndarray, what: str, dim: Optional[int]) -> Optional[np.ndarray]:
    out = embedder(image)
    if out is None or len(out) != 1:
        raise InputError(f"{what}: the embedder must return one item per image (got "
                         f"{'None' if out is None else len(out)} for 1 image)")
    return _unit(out[0], what, dim)


def reference_embedding(reference, embedder: Embedder) -> np.ndarray:
    """reference: a 1-D embedding, an object with ``.embedding`` (IdentityBundle, FaceBox), or an
    image ([H, W, C] / [1, H, W, C], uint8 or float) -> unit float64 [D]."""
    emb = getattr(reference, "embedding", None)
    if emb is not None:
        reference = emb
    if np.ndim(reference) == 1:
        unit = _unit(reference, "reference embedding")
        if unit is None:
            raise InputError("reference embedding is empty, zero or not finite")
        return unit
    from ..preprocess.identity import photo

    image = photo(reference, "reference image")[None]
    unit = _embed_one(embedder, image, "reference image", None)
    if unit is None:
        raise InputError(f"reference image: no face found in the {image.shape[2]}x{image.shape[1]} image")
    return unit


def identity_report(frames, reference, embedder: Embedder, driving=None, landmarker: Optional[Landmarker] = None,
                    progress: Progress = None) -> IdentityReport:
    """Score ``frames`` (anything indexable with len: [F, H, W, C] numpy/torch, a list of frames;
    read one at a time) against ``reference`` (image or embedding, see :func:`reference_embedding`).

    With ``driving`` (indexable frames) and ``landmarker``, the landmark error of frame i against
    driving frame i is computed for the first min(len(frames), len(driving)) frames.
    ``progress("frames", done, total)`` is called after each frame (raise from it to cancel).
    """
    n = len(frames)
    if n == 0:
        raise InputError("identity report: the video has no frames")
    if driving is not None and landmarker is None:
        raise InputError("identity report: driving frames were given without a landmarker")
    acc = IdentityAccumulator(reference, embedder, n)
    errors = None
    compared = 0
    if driving is not None and landmarker is not None:
        compared = min(n, len(driving))
        if compared < n or compared < len(driving):
            log.info("identity report: %d frames against %d driving frames; comparing the first %d",
                     n, len(driving), compared)
        errors = np.full(compared, np.nan)
    report = reporter(progress)
    for i in range(n):
        image = _frame(frames, i, "video")
        acc.add(i, image)
        if i < compared:
            got = landmarker(image[0])
            want = landmarker(_frame(driving, i, "driving")[0])
            if got is not None and want is not None:
                errors[i] = landmark_error(got, want)
        report("frames", i + 1, n)
    return acc.report(errors, None if driving is None else len(driving))


class IdentityAccumulator:
    """The identity numbers of a video built one frame at a time (what :func:`identity_report` and the
    evaluation, :mod:`dreamidv_core.eval.benchmark`, share): ``add(i, image uint8 [1, H, W, 3])`` for
    i = 0 .. frames-1 in order, then :meth:`report`."""

    def __init__(self, reference, embedder: Embedder, frames: int):
        self.embedder = embedder
        self.ref = reference_embedding(reference, embedder)
        self.sims = np.full(frames, np.nan)
        self.cons = np.full(max(frames - 1, 0), np.nan)
        self.prev: Optional[np.ndarray] = None

    def add(self, i: int, image: np.ndarray) -> Optional[np.ndarray]:
        """Embed frame ``i`` -> its unit embedding (None: no face)."""
        emb = _embed_one(self.embedder, image, f"video frame {i}", self.ref.size)
        if emb is not None:
            self.sims[i] = float(emb @ self.ref)
            if self.prev is not None:
                self.cons[i - 1] = float(emb @ self.prev)
        self.prev = emb
        return emb

    def report(self, landmark_errors: Optional[np.ndarray] = None,
               driving_frames: Optional[int] = None) -> "IdentityReport":
        return IdentityReport(similarities=self.sims, consecutive_cosines=self.cons, landmark_errors=landmark_errors,
                              driving_frames=driving_frames,
                              no_face_frames=[int(i) for i in np.flatnonzero(~np.isfinite(self.sims))])


# -------------------------------------------------------------------------------------------- plot
CURVE = (31, 119, 180)
MEAN = (44, 160, 44)
MINIMUM = (214, 39, 40)
NO_FACE = (150, 150, 150)
GRID = (225, 225, 225)
AXIS = (60, 60, 60)
BACKGROUND = (255, 255, 255)


@dataclass
class PlotFrame:
    """Pixel geometry of the plot area: frame i -> x, similarity v -> y (v = hi at the top)."""

    left: int
    top: int
    right: int
    bottom: int
    lo: float
    hi: float
    n: int

    def x(self, i: float) -> int:
        if self.n <= 1:
            return (self.left + self.right) // 2
        return int(round(self.left + i * (self.right - self.left) / (self.n - 1)))

    def y(self, v: float) -> int:
        v = min(max(v, self.lo), self.hi)
        return int(round(self.bottom - (v - self.lo) * (self.bottom - self.top) / (self.hi - self.lo)))


def plot_frame(similarities, width: int = 640, height: int = 320) -> PlotFrame:
    """The plot area: margins 44 px left, 12 right, 22 top, 22 bottom; y from ``lo`` to 1, where lo
    is 0 unless a similarity is negative (then the tenth below the minimum, at least -1)."""
    s = np.asarray(similarities, np.float64)
    low = _nan_stat(np.min, s)
    lo = 0.0 if not math.isfinite(low) or low >= 0 else max(-1.0, math.floor(low * 10) / 10)
    return PlotFrame(left=44, top=22, right=width - 12, bottom=height - 22, lo=lo, hi=1.0, n=int(s.size))


def plot_similarity(report, width: int = 640, height: int = 320) -> np.ndarray:
    """Similarity per frame (blue), the mean (green line), the minimum (red dot), no-face frames
    (grey ticks at the bottom) -> uint8 [height, width, 3]. ``report``: IdentityReport or [F] values."""
    from PIL import Image, ImageDraw, ImageFont

    if width < 120 or height < 80:
        raise InputError(f"plot size must be at least 120x80, got {width}x{height}")
    rep = report if isinstance(report, IdentityReport) else None
    sims = np.asarray(rep.similarities if rep else report, np.float64).reshape(-1)
    g = plot_frame(sims, width, height)
    img = Image.new("RGB", (width, height), BACKGROUND)
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    step = 0.25 if g.hi - g.lo <= 1.0 else 0.5
    v = g.lo
    while v <= g.hi + 1e-9:
        d.line([(g.left, g.y(v)), (g.right, g.y(v))], fill=GRID)
        d.text((4, g.y(v) - 6), f"{v:.2f}", fill=AXIS, font=font)
        v += step
    d.rectangle([g.left, g.top, g.right, g.bottom], outline=AXIS)
    d.text((g.left, g.bottom + 6), "0", fill=AXIS, font=font)
    d.text((g.right - 30, g.bottom + 6), str(max(g.n - 1, 0)), fill=AXIS, font=font)
    finite = np.isfinite(sims)
    if finite.any():
        mean, low = float(sims[finite].mean()), float(sims[finite].min())
        d.line([(g.left + 1, g.y(mean)), (g.right - 1, g.y(mean))], fill=MEAN, width=1)
        d.text((g.right - 28, g.y(mean) - 12 if g.y(mean) > g.top + 14 else g.y(mean) + 3), "mean", fill=MEAN, font=font)
        for i in range(sims.size - 1):  # segments between consecutive frames with a face
            if finite[i] and finite[i + 1]:
                d.line([(g.x(i), g.y(sims[i])), (g.x(i + 1), g.y(sims[i + 1]))], fill=CURVE, width=2)
        for i in np.flatnonzero(finite):
            x, y = g.x(i), g.y(sims[i])
            d.rectangle([x - 1, y - 1, x + 1, y + 1], fill=CURVE)
        i_min = int(np.nanargmin(sims))
        x, y = g.x(i_min), g.y(low)
        d.ellipse([x - 4, y - 4, x + 4, y + 4], outline=MINIMUM, fill=MINIMUM)
        title = f"identity similarity  mean {mean:.3f}  min {low:.3f} (frame {i_min})"
    else:
        title = "identity similarity: no face found in any frame"
    for i in np.flatnonzero(~finite):
        d.line([(g.x(i), g.bottom - 6), (g.x(i), g.bottom - 1)], fill=NO_FACE, width=1)
    if (~finite).any():
        title += f"  no face: {int((~finite).sum())}/{sims.size}"
    d.text((g.left, 5), title, fill=AXIS, font=font)
    return np.asarray(img, np.uint8).copy()


# -------------------------------------------------------------------------------- insightface parts
def _largest_face(analyzer, image: np.ndarray):
    faces = analyzer.faces(np.ascontiguousarray(image))
    return max(faces, key=lambda f: f.area) if faces else None


def insightface_embedder(pack_dir, provider: str = "CPU", det_size: int = 640, det_thresh: float = 0.5) -> Embedder:
    """An embedder on an insightface pack folder (e.g. ``models/insightface/models/antelopev2``):
    the ArcFace embedding of the largest face of each image, None when there is none."""
    from ..preprocess.identity import load_analyzer

    analyzer = load_analyzer(pack_dir, provider, det_size, det_thresh)

    def embed(images: np.ndarray) -> List[Optional[np.ndarray]]:
        out = []
        for image in images:
            face = _largest_face(analyzer, image)
            out.append(None if face is None else face.embedding)
        return out

    return embed


def insightface_landmarker(pack_dir, provider: str = "CPU", det_size: int = 640, det_thresh: float = 0.5) -> Landmarker:
    """frame -> the 5 insightface keypoints [5, 2] (eyes, nose, mouth corners) of the largest face, or None."""
    from ..preprocess.identity import load_analyzer

    analyzer = load_analyzer(pack_dir, provider, det_size, det_thresh)

    def landmarks(image: np.ndarray) -> Optional[np.ndarray]:
        face = _largest_face(analyzer, image)
        return None if face is None or face.landmarks is None else np.asarray(face.landmarks, np.float64)

    return landmarks


def resolve_pack(folder, pack: str) -> Path:
    """The pack folder from an insightface folder (``<dir>/models/<pack>``, ``<dir>/<pack>``) or the pack folder itself."""
    from ..preprocess.identity import find_pack

    folder = Path(folder)
    if folder.is_dir() and any(folder.glob("*.onnx")):
        return folder
    return find_pack([folder], pack)


# ----------------------------------------------------------------------------------------- command
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m dreamidv_core identity-report",
                                 description="Per-frame ArcFace similarity of a video to a reference face, "
                                             "its stability and (with --driving) the landmark pose error.")
    ap.add_argument("--video", required=True, help="the swapped video")
    ap.add_argument("--reference", required=True, help="the reference face photo")
    ap.add_argument("--insightface", required=True,
                    help="insightface folder (holding models/<pack>/) or the pack folder itself")
    ap.add_argument("--pack", default="antelopev2", help="insightface model pack (default antelopev2)")
    ap.add_argument("--provider", default="auto", choices=list(PROVIDER_CHOICES),
                    help="onnxruntime device (auto: the best the installed onnxruntime build offers)")
    ap.add_argument("--det-size", type=int, default=640, help="face detection size (multiple of 32)")
    ap.add_argument("--driving", help="the driving video: adds the landmark pose/expression error")
    ap.add_argument("--max-frames", type=int, help="read at most this many frames")
    ap.add_argument("--json", help="write the numbers here (JSON)")
    ap.add_argument("--plot", help="write the similarity plot here (PNG)")
    return ap


def identity_report_main(argv: Optional[Sequence[str]] = None) -> int:
    """The command; returns the exit status (2 on a DreamIDVError, printed to stderr)."""
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except DreamIDVError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _run(args) -> int:
    from ..io.state_dict import atomic_write
    from ..io.video import read_image, read_video

    pack_dir = resolve_pack(args.insightface, args.pack)
    video, _ = read_video(args.video, max_frames=args.max_frames)
    reference = read_image(args.reference)
    driving = read_video(args.driving, max_frames=args.max_frames)[0] if args.driving else None
    embedder = insightface_embedder(pack_dir, args.provider, args.det_size)
    landmarker = insightface_landmarker(pack_dir, args.provider, args.det_size) if driving is not None else None
    report = identity_report(video, reference, embedder, driving=driving, landmarker=landmarker)
    print(report.summary())
    if args.json:
        text = json.dumps(report.as_dict(), indent=2)
        atomic_write(args.json, lambda tmp: Path(tmp).write_text(text))
        print(f"numbers: {args.json}")
    if args.plot:
        from PIL import Image

        image = Image.fromarray(plot_similarity(report))
        atomic_write(args.plot, lambda tmp: image.save(tmp, format="PNG"))
        print(f"plot: {args.plot}")
    return 0
