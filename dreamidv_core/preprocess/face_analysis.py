"""Face detection (SCRFD), 5-point alignment and the ArcFace embedding with onnxruntime and numpy only.

Reads the model files of insightface's packs as users already have them, ``models/insightface/models/<pack>/``
(``antelopev2``: scrfd_10g_bnkps.onnx + glintr100.onnx; ``buffalo_l``: det_10g.onnx + w600k_r50.onnx), and
gives the same boxes, keypoints and embeddings as insightface's ``FaceAnalysis`` with
``allowed_modules=["detection", "recognition"]`` (tests/test_face_analysis.py checks it on test models);
the insightface package itself is not needed.

* Detector (SCRFD): the image is letterboxed into the detection size (top-left, zero padding, bilinear
  resize), normalised as ``(rgb - 127.5) / 128``; each stride's outputs are decoded against anchor centres
  (cells in row-major order, ``anchors`` per cell): box = centre -/+ distances (left, top, right, bottom),
  keypoints = centre + offsets, all times the stride; scores >= threshold kept, merged over strides (and
  sizes), sorted by score, greedy NMS (IoU with +1 areas, 0.4).
* Alignment: the similarity transform (rotation, uniform scale, translation) that maps the 5 keypoints
  onto ArcFace's template by least squares (Umeyama), computed in the keypoints' float32 as insightface's
  scikit-image call does, then a bilinear warp to 112x112 (zero border).
* Recogniser (ArcFace): the crop normalised as ``(rgb - 127.5) / 127.5`` (or not at all for an MXNet
  export whose graph starts with its own Sub/Mul) -> embedding [D] (not normalised; ``normed_embedding`` is).

Faces come in the detector's order (by score). :class:`FaceAnalyzer` is the interface the identity node,
the identity report, the quadruplet writer and the target tracking use: ``detect(rgb) -> [Face]``
(``bbox``, ``score``, ``kps``, ``embedding``) and ``faces(rgb) -> [FaceBox]`` left to right.
"""
from __future__ import annotations

import logging
import mmap
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import CheckpointError, InputError
from .identity_bundle import FaceBox
from .onnx_session import OnnxSession, make_session

log = logging.getLogger(__name__)

# pack -> (detector, recogniser) as the packs ship them; other files of a pack (68/106-point landmarks,
# gender/age) are never opened.
PACK_FILES = {
    "antelopev2": ("scrfd_10g_bnkps.onnx", "glintr100.onnx"),
    "buffalo_l": ("det_10g.onnx", "w600k_r50.onnx"),
}
PACK_NAMES = tuple(PACK_FILES)
OTHER_TASK_FILES = ("1k3d68.onnx", "2d106det.onnx", "genderage.onnx")
# SCRFD output count -> (strides, anchors per cell, has keypoints)
SCRFD_LAYOUTS = {6: ((8, 16, 32), 2, False), 9: ((8, 16, 32), 2, True),
                 10: ((8, 16, 32, 64, 128), 1, False), 15: ((8, 16, 32, 64, 128), 1, True)}
DET_MEAN, DET_STD = 127.5, 128.0
NMS_THRESHOLD = 0.4
# ArcFace's 5-point template for a 112x112 crop (eye, eye, nose tip, mouth corner, mouth corner)
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], np.float32)

Size = Tuple[int, int]  # (width, height)


# ------------------------------------------------------------------------------------------ model files
def _expected(pack: str) -> str:
    det, rec = PACK_FILES.get(pack, ("<detector>.onnx", "<recognition>.onnx"))
    return f"{det} (face detector) and {rec} (ArcFace recognition)"


def find_pack(roots: Iterable, pack: str) -> Path:
    """The folder of model pack ``pack`` under one of the insightface folders ``roots``.

    Looks in ``<root>/models/<pack>`` (the usual layout), ``<root>/<pack>`` and the doubly nested
    ``.../<pack>/<pack>`` some zip extractions leave. Raises :class:`CheckpointError` naming the
    folder and the expected files when no such folder holds ``.onnx`` files.
    """
    roots = [Path(r) for r in roots]
    if not roots:
        raise CheckpointError("models/insightface", "no insightface model folder is configured")
    for root in roots:
        for cand in (root / "models" / pack, root / pack):
            for folder in (cand, cand / pack):
                if folder.is_dir() and any(folder.glob("*.onnx")):
                    return folder
    expected = roots[0] / "models" / pack
    others = ", ".join(str(r / "models" / pack) for r in roots[1:])
    raise CheckpointError(expected, (f"insightface model pack '{pack}' not found (also looked in {others}); " if others
                                     else f"insightface model pack '{pack}' not found; ")
                          + f"put {_expected(pack)} there (packs: {', '.join(PACK_NAMES)}). "
                          "The pack is never downloaded automatically")


def _dims(value_info) -> list:
    return [d if isinstance(d, int) else None for d in value_info.shape]


def is_detector(session: OnnxSession) -> bool:
    """SCRFD: one image input and 6, 9, 10 or 15 outputs (insightface routes any >= 5 outputs here)."""
    return len(session.outputs) >= 5


def is_recognizer(session: OnnxSession) -> bool:
    """ArcFace, in insightface's routing order: not a detector, not a 192x192 landmark model, not the
    two-input 128x128 swapper; one square input of at least 112 pixels (a multiple of 16) and one output."""
    dims = _dims(session.inputs[0]) if session.inputs else []
    if is_detector(session) or len(dims) != 4 or dims[2] is None or dims[2] != dims[3]:
        return False
    return (len(session.inputs) == 1 and len(session.outputs) == 1 and dims[2] != 192 and dims[2] >= 112
            and dims[2] % 16 == 0)


def pack_models(pack_dir: Path, provider: str = "auto") -> Tuple[OnnxSession, OnnxSession]:
    """(detector, recogniser) sessions of a pack folder: the pack's own file names when present, else the
    first ``*.onnx`` (sorted, as insightface) whose signature is a detector / a recogniser."""
    pack_dir = Path(pack_dir)
    found = sorted(p.name for p in pack_dir.glob("*.onnx"))
    det_name, rec_name = PACK_FILES.get(pack_dir.name, (None, None))
    chosen = {"detection": None, "recognition": None}
    what = "face analysis (insightface model pack)"
    for role, name, test in (("detection", det_name, is_detector), ("recognition", rec_name, is_recognizer)):
        candidates = [name] if name in found else [n for n in found if n not in OTHER_TASK_FILES]
        for cand in candidates:
            session = make_session(pack_dir / cand, provider, "face", what)
            if test(session):
                chosen[role] = session
                break
    missing = [role for role, s in chosen.items() if s is None]
    if missing:
        raise CheckpointError(pack_dir, f"no {' and no '.join(missing)} model among {found}; "
                              f"expected {_expected(pack_dir.name)}")
    return chosen["detection"], chosen["recognition"]


def first_node_names(path, count: int = 8) -> List[str]:
    """Names of the first ``count`` nodes of an ONNX graph, read straight from the protobuf (the
    ``onnx`` package is not needed): ModelProto.graph (field 7) -> GraphProto.node (1) -> NodeProto.name (3).
    Returns [] when the file cannot be read that way."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            graph = _field(buf, 0, len(buf), 7)
            if graph is None:
                return []
            names, pos, end = [], graph[0], graph[1]
            while pos < end and len(names) < count:
                num, kind, start, stop, pos = _next_field(buf, pos)
                if num == 1 and kind == 2:
                    name = _field(buf, start, stop, 3)
                    names.append(bytes(buf[name[0]:name[1]]).decode("utf-8", "replace") if name else "")
            return names
    except (OSError, ValueError, IndexError):
        return []


def _varint(buf, pos: int) -> Tuple[int, int]:
    value, shift = 0, 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("bad varint")


def _next_field(buf, pos: int) -> Tuple[int, int, int, int, int]:
    """-> (field number, wire type, payload start, payload end, next position)."""
    key, pos = _varint(buf, pos)
    num, kind = key >> 3, key & 7
    if kind == 0:
        _, end = _varint(buf, pos)
        return num, kind, pos, end, end
    if kind == 1:
        return num, kind, pos, pos + 8, pos + 8
    if kind == 2:
        length, start = _varint(buf, pos)
        return num, kind, start, start + length, start + length
    if kind == 5:
        return num, kind, pos, pos + 4, pos + 4
    raise ValueError(f"unsupported protobuf wire type {kind}")


def _field(buf, pos: int, end: int, number: int) -> Optional[Tuple[int, int]]:
    """(start, end) of the first length-delimited field ``number`` in buf[pos:end], or None."""
    while pos < end:
        num, kind, start, stop, pos = _next_field(buf, pos)
        if num == number and kind == 2:
            return start, stop
    return None


def recognizer_normalisation(path) -> Tuple[float, float]:
    """(mean, std) of the recogniser's input: (0, 1) for an MXNet export that normalises inside its graph
    (a Sub/_minus and a Mul/_mul among its first 8 nodes, insightface's rule), else (127.5, 127.5)."""
    names = first_node_names(path)
    subtracts = any(n.startswith(("Sub", "_minus")) for n in names)
    multiplies = any(n.startswith(("Mul", "_mul")) for n in names)
    return (0.0, 1.0) if subtracts and multiplies else (127.5, 127.5)


# ---------------------------------------------------------------------------------------------- SCRFD
def distance2bbox(centres: np.ndarray, distance: np.ndarray) -> np.ndarray:
    """centres [n, 2] (x, y), distance [n, 4] (left, top, right, bottom) -> boxes [n, 4] (x0, y0, x1, y1)."""
    return np.stack([centres[:, 0] - distance[:, 0], centres[:, 1] - distance[:, 1],
                     centres[:, 0] + distance[:, 2], centres[:, 1] + distance[:, 3]], axis=-1)


def distance2kps(centres: np.ndarray, distance: np.ndarray) -> np.ndarray:
    """centres [n, 2], distance [n, 2k] (dx, dy per point) -> points [n, k, 2]."""
    return (distance.reshape(len(distance), -1, 2) + centres[:, None, :]).astype(np.result_type(centres, distance))


def anchor_centres(height: int, width: int, stride: int, anchors: int) -> np.ndarray:
    """Anchor centres of a [height, width] feature map: float32 [height * width * anchors, 2] (x, y) in
    input pixels, cells in row-major order, each repeated ``anchors`` times."""
    ys, xs = np.mgrid[:height, :width]
    centres = (np.stack([xs, ys], axis=-1).astype(np.float32) * stride).reshape(-1, 2)
    return np.repeat(centres, anchors, axis=0) if anchors > 1 else centres


def nms(dets: np.ndarray, threshold: float = NMS_THRESHOLD) -> List[int]:
    """Greedy non-maximum suppression. dets [n, 5] (x0, y0, x1, y1, score) -> kept row indices, best first.
    Areas count the end pixels (+1), as SCRFD's reference code does."""
    x0, y0, x1, y1, scores = dets[:, 0], dets[:, 1], dets[:, 2], dets[:, 3], dets[:, 4]
    areas = (x1 - x0 + 1) * (y1 - y0 + 1)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(int(i))
        w = np.maximum(0.0, np.minimum(x1[i], x1[rest]) - np.maximum(x0[i], x0[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y1[i], y1[rest]) - np.maximum(y0[i], y0[rest]) + 1)
        inter = w * h
        order = rest[inter / (areas[i] + areas[rest] - inter) <= threshold]
    return keep


def letterbox(image: np.ndarray, size: Size) -> Tuple[np.ndarray, float]:
    """uint8 [H, W, 3] -> (uint8 [size_h, size_w, 3] with the image resized into its top-left corner, scale)."""
    import cv2

    w, h = size
    ih, iw = image.shape[:2]
    if ih / iw > h / w:
        new_h, new_w = h, int(h / (ih / iw))
    else:
        new_w, new_h = w, int(w * (ih / iw))
    out = np.zeros((h, w, 3), np.uint8)
    out[:new_h, :new_w] = cv2.resize(image, (new_w, new_h))
    return out, new_h / ih


class ScrfdDetector:
    """SCRFD face detector on an onnxruntime session (6/9/10/15 outputs, plain ``[N, k]`` or batched ``[1, N, k]``)."""

    def __init__(self, session: OnnxSession):
        if len(session.outputs) not in SCRFD_LAYOUTS:
            raise CheckpointError(session.path, f"has {len(session.outputs)} outputs; an SCRFD face detector has "
                                  "6, 9, 10 or 15")
        self.session = session
        self.strides, self.anchors, self.has_kps = SCRFD_LAYOUTS[len(session.outputs)]
        self.batched = len(session.outputs[0].shape) == 3
        dims = _dims(session.inputs[0])
        self.fixed_size: Optional[Size] = (dims[3], dims[2]) if len(dims) == 4 and dims[2] and dims[3] else None
        self._centres: dict = {}

    def _centres_for(self, height: int, width: int, stride: int) -> np.ndarray:
        key = (height, width, stride)
        if key not in self._centres:
            self._centres[key] = anchor_centres(height, width, stride, self.anchors)
        return self._centres[key]

    def _candidates(self, image: np.ndarray, size: Size, threshold: float):
        """One detection size -> (dets [n, 5] float32 by score, kps [n, 5, 2] or None) in image pixels."""
        canvas, scale = letterbox(image, size)
        blob = ((canvas.astype(np.float32) - DET_MEAN) * np.float32(1.0 / DET_STD)).transpose(2, 0, 1)[None]
        outs = self.session.run({self.session.inputs[0].name: np.ascontiguousarray(blob)})
        if self.batched:
            outs = [o[0] for o in outs]
        n = len(self.strides)
        scores, boxes, points = [], [], []
        for i, stride in enumerate(self.strides):
            centres = self._centres_for(size[1] // stride, size[0] // stride, stride)
            score = outs[i]
            keep = np.where(score >= threshold)[0]
            scores.append(score[keep])
            boxes.append(distance2bbox(centres, outs[i + n] * stride)[keep])
            if self.has_kps:
                points.append(distance2kps(centres, outs[i + 2 * n] * stride)[keep])
        score = np.vstack(scores)
        if score.size == 0:
            return np.empty((0, 5), np.float32), (np.empty((0, 5, 2), np.float32) if self.has_kps else None)
        order = np.argsort(-score.ravel(), kind="stable")
        dets = np.hstack((np.vstack(boxes) / scale, score)).astype(np.float32, copy=False)[order]
        kps = (np.vstack(points) / scale)[order] if self.has_kps else None
        return dets, kps

    def detect(self, image: np.ndarray, sizes: Sequence[Size], threshold: float = 0.5,
               nms_threshold: float = NMS_THRESHOLD) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """RGB uint8 [H, W, 3] -> (dets float32 [n, 5] (x0, y0, x1, y1, score), kps float32 [n, 5, 2] or None),
        best first; candidates of every detection size are merged before NMS."""
        sizes = [self.fixed_size] if self.fixed_size else list(sizes)
        found = [self._candidates(image, size, threshold) for size in sizes]
        found = [(d, k) for d, k in found if len(d)]
        if not found:
            return np.empty((0, 5), np.float32), (np.empty((0, 5, 2), np.float32) if self.has_kps else None)
        dets = np.vstack([d for d, _ in found]).astype(np.float32, copy=False)
        order = np.argsort(-dets[:, 4], kind="stable")
        dets = dets[order]
        kps = np.vstack([k for _, k in found])[order] if self.has_kps else None
        keep = nms(dets, nms_threshold)
        return dets[keep], (kps[keep] if kps is not None else None)


# ------------------------------------------------------------------------------------ alignment, ArcFace
def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity transform (Umeyama 1991, with scale) mapping points ``src`` [n, 2] onto
    ``dst`` [n, 2]: float64 [3, 3]. The sums are computed in the points' own dtype (float32 keypoints give
    exactly the matrix insightface's scikit-image call gives); NaN when the points are degenerate."""
    src, dst = np.asarray(src), np.asarray(dst)
    n, dim = src.shape
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    cov = dst_c.T @ src_c / n
    d = np.ones((dim,), np.float64)
    if np.linalg.det(cov) < 0:
        d[dim - 1] = -1
    out = np.eye(dim + 1, dtype=np.float64)
    u, s, vt = np.linalg.svd(cov)
    rank = int(np.count_nonzero(s > s.max() * max(cov.shape) * np.finfo(float).eps))
    if rank == 0:
        return np.full_like(out, np.nan)
    if rank == dim - 1 and np.linalg.det(u) * np.linalg.det(vt) > 0:
        out[:dim, :dim] = u @ vt
    elif rank == dim - 1:
        flip = d.copy()
        flip[dim - 1] = -1
        out[:dim, :dim] = u @ np.diag(flip) @ vt
    else:
        out[:dim, :dim] = u @ np.diag(d) @ vt
    scale = 1.0 / src_c.var(axis=0).sum() * (s @ d)
    out[:dim, dim] = dst_mean - scale * (out[:dim, :dim] @ src_mean.T)
    out[:dim, :dim] *= scale
    return out


def arcface_template(size: int = 112) -> np.ndarray:
    """The 5-point template for a ``size`` crop (multiple of 112, or of 128 with an 8/128 x margin)."""
    if size % 112 == 0:
        ratio, shift = size / 112.0, 0.0
    elif size % 128 == 0:
        ratio, shift = size / 128.0, 8.0 * size / 128.0
    else:
        raise InputError(f"ArcFace crop size must be a multiple of 112 or 128, got {size}")
    dst = ARCFACE_TEMPLATE * ratio
    dst[:, 0] += shift
    return dst


def align_face(image: np.ndarray, kps: np.ndarray, size: int = 112) -> np.ndarray:
    """The ArcFace crop: uint8 [size, size, C] from image [H, W, C] and the face's 5 keypoints [5, 2]."""
    import cv2

    matrix = similarity_transform(np.asarray(kps, np.float32).reshape(5, 2), arcface_template(size))[:2]
    if not np.isfinite(matrix).all():
        raise InputError("face keypoints are degenerate (all in one point): cannot align the face")
    return cv2.warpAffine(image, matrix, (size, size), borderValue=0.0)


class ArcFaceEncoder:
    """ArcFace recogniser on an onnxruntime session: aligned crops -> embeddings [n, D] (not normalised)."""

    def __init__(self, session: OnnxSession):
        self.session = session
        dims = _dims(session.inputs[0])
        self.size = int(dims[2])
        self.batch = dims[0] is None
        self.mean, self.std = recognizer_normalisation(session.path)

    def embed_crops(self, crops: np.ndarray) -> np.ndarray:
        """uint8 RGB [n, S, S, 3] -> float32 [n, D]."""
        if len(crops) == 0:
            return np.empty((0, 0), np.float32)
        blob = ((crops.astype(np.float32) - np.float32(self.mean)) * np.float32(1.0 / self.std)).transpose(0, 3, 1, 2)
        name = self.session.inputs[0].name
        if self.batch:
            return self.session.run({name: np.ascontiguousarray(blob)})[0].reshape(len(crops), -1)
        return np.concatenate([self.session.run({name: np.ascontiguousarray(b[None])})[0].reshape(1, -1)
                               for b in blob])

    def embed(self, image: np.ndarray, kps_list: Sequence[np.ndarray]) -> np.ndarray:
        """RGB uint8 [H, W, 3] and each face's keypoints [5, 2] -> float32 [n, D]."""
        crops = np.stack([align_face(image, k, self.size) for k in kps_list]) if len(kps_list) else np.empty((0,))
        return self.embed_crops(crops)


# -------------------------------------------------------------------------------------------- analyzer
@dataclass
class Face:
    """One detected face, in the pixels of the image given: bbox float32 [4] (x0, y0, x1, y1), detector score,
    kps float32 [5, 2] (image-left eye, image-right eye, nose tip, left and right mouth corner) and the
    ArcFace embedding float32 [D] as the model gives it (None when not computed)."""

    bbox: np.ndarray
    score: float
    kps: Optional[np.ndarray]
    embedding: Optional[np.ndarray] = None

    @property
    def normed_embedding(self) -> Optional[np.ndarray]:
        if self.embedding is None:
            return None
        norm = float(np.linalg.norm(self.embedding))
        return self.embedding / norm if norm > 0 else self.embedding

    @property
    def area(self) -> float:
        x0, y0, x1, y1 = (float(v) for v in self.bbox)
        return max(0.0, x1 - x0) * max(0.0, y1 - y0)

    def as_box(self) -> FaceBox:
        """The identity node's view: plain floats and the L2-normalised embedding."""
        return FaceBox(bbox=tuple(float(v) for v in self.bbox), score=float(self.score),
                       landmarks=None if self.kps is None else np.asarray(self.kps, np.float32).reshape(-1, 2),
                       embedding=self.normed_embedding)


def detection_sizes(det_size: Union[int, Size, Sequence[Size]]) -> List[Size]:
    """640 -> [(640, 640)]; (w, h) -> [(w, h)]; [(w, h), ...] -> as given. Each side a positive multiple of 32."""
    if isinstance(det_size, (int, np.integer)):
        sizes = [(int(det_size), int(det_size))]
    elif len(det_size) == 2 and all(isinstance(v, (int, np.integer)) for v in det_size):
        sizes = [(int(det_size[0]), int(det_size[1]))]
    else:
        sizes = [(int(w), int(h)) for w, h in det_size]
    for w, h in sizes:
        if w < 32 or h < 32 or w % 32 or h % 32:
            raise InputError(f"detection size must be a positive multiple of 32, got {w}x{h}")
    return sizes


class FaceAnalyzer:
    """Detector + ArcFace of one insightface pack folder, on onnxruntime.

    ``detect(rgb)`` -> [:class:`Face`] by detector score (embeddings included unless ``embed=False``);
    ``faces(rgb)`` -> [:class:`FaceBox`] left to right with L2-normalised embeddings; ``info`` says which
    files run on which onnxruntime build and provider.
    """

    def __init__(self, pack_dir, provider: str = "auto", det_size: Union[int, Size, Sequence[Size]] = 640,
                 det_thresh: float = 0.5, nms_thresh: float = NMS_THRESHOLD):
        self.pack_dir = Path(pack_dir).resolve()
        if not self.pack_dir.is_dir():
            raise CheckpointError(self.pack_dir, "insightface model pack folder does not exist")
        self.sizes = detection_sizes(det_size)
        self.det_size = self.sizes[0][0] if len(self.sizes) == 1 and self.sizes[0][0] == self.sizes[0][1] else self.sizes
        self.provider, self.det_thresh, self.nms_thresh = provider, float(det_thresh), float(nms_thresh)
        det, rec = pack_models(self.pack_dir, provider)
        self.detector, self.recognizer = ScrfdDetector(det), ArcFaceEncoder(rec)
        if not self.detector.has_kps:
            raise CheckpointError(det.path, "this SCRFD detector gives no keypoints; ArcFace needs a detector "
                                  "with keypoints (e.g. det_10g.onnx, scrfd_10g_bnkps.onnx)")
        self.info = (f"{self.pack_dir.name}: {Path(det.path).name} + {Path(rec.path).name} on "
                     + (det.info if det.info == rec.info else f"{det.info} / {rec.info}"))
        log.info("DreamID-V face analysis: %s", self.info)

    def detect(self, image: np.ndarray, embed: bool = True) -> List[Face]:
        """RGB uint8 [H, W, 3] -> faces by detector score, each with its embedding when ``embed``."""
        image = np.ascontiguousarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise InputError(f"face detection expects an RGB uint8 image [H, W, 3], got {image.dtype} {list(image.shape)}")
        dets, kps = self.detector.detect(image, self.sizes, self.det_thresh, self.nms_thresh)
        faces = [Face(d[:4].copy(), float(d[4]), kps[i].astype(np.float32)) for i, d in enumerate(dets)]
        if embed and faces:
            for face, emb in zip(faces, self.recognizer.embed(image, [f.kps for f in faces])):
                face.embedding = emb.astype(np.float32, copy=False)
        return faces

    def faces(self, image: np.ndarray) -> List[FaceBox]:
        """RGB uint8 [H, W, 3] -> :class:`FaceBox` list left to right (L2-normalised embeddings)."""
        return sort_left_to_right([f.as_box() for f in self.detect(image)])


def sort_left_to_right(faces: Sequence[FaceBox]) -> List[FaceBox]:
    return sorted(faces, key=lambda f: ((f.bbox[0] + f.bbox[2]) / 2, (f.bbox[1] + f.bbox[3]) / 2))


_CACHE: "OrderedDict[tuple, FaceAnalyzer]" = OrderedDict()
_CACHE_LOCK = threading.Lock()


def load_analyzer(pack_dir, provider: str = "auto", det_size=640, det_thresh: float = 0.5,
                  keep: int = 2) -> FaceAnalyzer:
    """A cached :class:`FaceAnalyzer` (reloaded when a file of the pack changes)."""
    pack_dir = Path(pack_dir).resolve()
    stamp = tuple(sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in pack_dir.glob("*.onnx")))
    key = (str(pack_dir), stamp, provider, repr(det_size), float(det_thresh))
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
        analyzer = FaceAnalyzer(pack_dir, provider, det_size, det_thresh)
        _CACHE[key] = analyzer
        while len(_CACHE) > keep:
            _CACHE.popitem(last=False)
        return analyzer


def clear_cache() -> None:
    with _CACHE_LOCK:
        _CACHE.clear()
