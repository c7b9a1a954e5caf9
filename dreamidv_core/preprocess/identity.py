"""The reference face: insightface detection + ArcFace embedding, face choice, identity bundle.

insightface's model packs (``antelopev2``, ``buffalo_l``) are read from a folder the caller names
(in ComfyUI: ``models/insightface/models/<pack>/``); nothing is ever downloaded: the pack folder is
handed to ``FaceAnalysis`` as a directory path, which is the branch of its constructor that does
not call ``ensure_available`` (the downloader), and a missing folder is reported before that.

Faces are listed left to right (by box centre); the one used is picked by index, by size (largest
box) or by cosine similarity of its ArcFace embedding to the largest face of another photo.
"""
from __future__ import annotations

import logging
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import CheckpointError, DreamIDVError, InputError
from .identity_bundle import FaceBox, IdentityBundle, encode_reference
from ..io.video import to_uint8_frames
from .video_ops import letterbox_reference

log = logging.getLogger(__name__)

# pack -> (detector, recogniser) file names as the packs ship them; other files (landmarks,
# gender/age) may sit next to them: insightface opens them and this module ignores them.
PACK_FILES = {
    "antelopev2": ("scrfd_10g_bnkps.onnx", "glintr100.onnx"),
    "buffalo_l": ("det_10g.onnx", "w600k_r50.onnx"),
}
PACK_NAMES = tuple(PACK_FILES)
PROVIDERS = ("CPU", "CUDA")
SELECT_MODES = ("largest", "index", "most similar")
MODULES = ["detection", "recognition"]


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


def onnx_providers(provider: str) -> Tuple[List[str], int]:
    """'CPU' / 'CUDA' -> (onnxruntime providers, insightface ctx_id). CUDA falls back to CPU, with a
    warning, when this onnxruntime has no CUDA provider (the CPU-only ``onnxruntime`` package)."""
    if provider not in PROVIDERS:
        raise InputError(f"provider must be one of {', '.join(PROVIDERS)}, got '{provider}'")
    if provider == "CUDA":
        import onnxruntime

        if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            return ["CUDAExecutionProvider", "CPUExecutionProvider"], 0
        log.warning("DreamID-V: onnxruntime has no CUDA provider (install onnxruntime-gpu); using the CPU")
    return ["CPUExecutionProvider"], -1


class FaceAnalyzer:
    """insightface's FaceAnalysis over one pack folder, detection + recognition only.

    ``faces(image)``: RGB uint8 [H, W, 3] -> list of :class:`FaceBox` left to right, each with an
    L2-normalised float32 [512] embedding and [5, 2] landmarks.
    """

    def __init__(self, pack_dir, provider: str = "CPU", det_size: int = 640, det_thresh: float = 0.5,
                 root=None):
        try:
            from insightface.app import FaceAnalysis
        except ImportError as e:
            raise DreamIDVError("the 'insightface' package is needed by the ID-token encoder: "
                                "pip install -r requirements.txt (insightface>=2.1)") from e
        self.pack_dir = Path(pack_dir).resolve()
        if not self.pack_dir.is_dir():
            raise CheckpointError(self.pack_dir, "insightface model pack folder does not exist")
        if det_size < 32 or det_size % 32:
            raise InputError(f"detection size must be a positive multiple of 32, got {det_size}")
        providers, ctx_id = onnx_providers(provider)
        pack = self.pack_dir.name
        try:
            # a directory path as `name` is used as is (no download); root only matters otherwise
            app = FaceAnalysis(name=str(self.pack_dir), root=str(root or self.pack_dir.parent.parent),
                               allowed_modules=MODULES, providers=providers)
        except AssertionError:  # FaceAnalysis asserts that a detector was found
            app = None
        except Exception as e:  # corrupt/unreadable ONNX
            raise CheckpointError(self.pack_dir, f"could not load the insightface models ({e}); "
                                  f"expected {_expected(pack)}") from e
        found = sorted(p.name for p in self.pack_dir.glob("*.onnx"))
        missing = [m for m in MODULES if app is None or m not in app.models]
        if missing:
            raise CheckpointError(self.pack_dir, f"no {' and no '.join(missing)} model among {found}; "
                                  f"expected {_expected(pack)}")
        app.prepare(ctx_id=ctx_id, det_thresh=float(det_thresh), det_size=(int(det_size), int(det_size)))
        self.app = app
        self.provider, self.det_size, self.det_thresh = provider, int(det_size), float(det_thresh)

    def faces(self, image: np.ndarray) -> List[FaceBox]:
        bgr = np.ascontiguousarray(image[..., ::-1])
        with warnings.catch_warnings():  # scikit-image's deprecation notice inside insightface's alignment
            warnings.simplefilter("ignore", FutureWarning)
            detected = self.app.get(bgr)
        found = []
        for f in detected:
            emb = np.asarray(f.embedding, np.float32).reshape(-1)
            norm = float(np.linalg.norm(emb))
            found.append(FaceBox(bbox=tuple(float(v) for v in f.bbox[:4]), score=float(f.det_score),
                                 landmarks=None if f.kps is None else np.asarray(f.kps, np.float32).reshape(5, 2),
                                 embedding=emb / norm if norm > 0 else emb))
        return sort_left_to_right(found)


_CACHE: "OrderedDict[tuple, FaceAnalyzer]" = OrderedDict()
_CACHE_LOCK = threading.Lock()


def load_analyzer(pack_dir, provider: str = "CPU", det_size: int = 640, det_thresh: float = 0.5,
                  keep: int = 2) -> FaceAnalyzer:
    """A cached :class:`FaceAnalyzer` (reloaded when a file of the pack changes)."""
    pack_dir = Path(pack_dir).resolve()
    stamp = tuple(sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in pack_dir.glob("*.onnx")))
    key = (str(pack_dir), stamp, provider, int(det_size), float(det_thresh))
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


def sort_left_to_right(faces: Sequence[FaceBox]) -> List[FaceBox]:
    return sorted(faces, key=lambda f: ((f.bbox[0] + f.bbox[2]) / 2, (f.bbox[1] + f.bbox[3]) / 2))


def photo(image, what: str) -> np.ndarray:
    """One photo ([H, W, C], [1, H, W, C] or a batch whose first image is used; C in 1/3/4, uint8
    or float 0..1, numpy or torch) -> RGB uint8 [H, W, 3]. Alpha is dropped, greyscale expanded."""
    shape = tuple(image.shape)
    if len(shape) == 2 or (len(shape) == 3 and shape[-1] in (1, 3, 4) and shape[0] > 4):
        image = image[None]
    elif len(shape) == 4 and shape[0] > 1:
        log.info("DreamID-V: %s has %d images; the first one is used", what, shape[0])
        image = image[:1]
    elif len(shape) == 4 and shape[0] == 0:
        raise InputError(f"{what}: the image batch is empty")
    return np.ascontiguousarray(to_uint8_frames(image, what)[0])


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


def largest(faces: Sequence[FaceBox]) -> int:
    return int(np.argmax([f.area for f in faces]))


@dataclass
class Choice:
    index: int                       # position in the left-to-right list
    similarities: Optional[List[float]] = None


def choose_face(faces: Sequence[FaceBox], mode: str = "largest", index: int = 0,
                target: Optional[np.ndarray] = None, what: str = "reference image") -> Choice:
    """Pick one of ``faces`` (left to right): 'largest' box, 'index' (0 = leftmost; negative counts
    from the right) or 'most similar' to the embedding ``target`` (cosine similarity)."""
    if not faces:
        raise InputError(f"{what}: no face found")
    if mode == "largest":
        return Choice(largest(faces))
    if mode == "index":
        n = len(faces)
        if not -n <= index < n:
            raise InputError(f"{what}: face_index {index} is out of range: {n} face{'s' if n > 1 else ''} found "
                             f"(0 = leftmost, up to {n - 1})")
        return Choice(index % n)
    if mode == "most similar":
        if target is None:
            raise InputError("face selection 'most similar' needs the 'similar_to' image (a photo of the person to pick)")
        sims = [cosine(f.embedding, target) for f in faces]
        return Choice(int(np.argmax(sims)), sims)
    raise InputError(f"face selection must be one of {', '.join(SELECT_MODES)}, got '{mode}'")


def detect(analyzer: FaceAnalyzer, image: np.ndarray, what: str) -> List[FaceBox]:
    """Faces of ``image`` (RGB uint8); a clear :class:`InputError` naming ``what`` when there is none."""
    faces = analyzer.faces(image)
    if not faces:
        h, w = image.shape[:2]
        raise InputError(f"{what}: no face found in the {w}x{h} image (insightface pack "
                         f"'{analyzer.pack_dir.name}', detection size {analyzer.det_size}, threshold "
                         f"{analyzer.det_thresh}). Use a photo with a clearly visible face, or lower the "
                         "detection threshold")
    return faces


def draw_faces(image: np.ndarray, faces: Sequence[FaceBox], chosen: Optional[int]) -> np.ndarray:
    """The photo with every face box and its index drawn (chosen: green, others: red), uint8 [H, W, 3]."""
    import cv2

    out = np.ascontiguousarray(image.copy())
    thick = max(1, round(max(image.shape[:2]) / 400))
    for i, f in enumerate(faces):
        color = (0, 220, 0) if i == chosen else (230, 40, 40)
        x0, y0, x1, y1 = (int(round(v)) for v in f.bbox)
        cv2.rectangle(out, (x0, y0), (x1, y1), color, thick + (1 if i == chosen else 0))
        if f.landmarks is not None:
            for x, y in f.landmarks:
                cv2.circle(out, (int(round(x)), int(round(y))), thick + 1, color, -1)
        cv2.putText(out, str(i), (x0 + 2, max(y0 - 4, 12)), cv2.FONT_HERSHEY_SIMPLEX, 0.4 * thick + 0.2, color,
                    thick)
    return out


def encode_identity(analyzer: FaceAnalyzer, reference, mode: str = "largest", index: int = 0,
                    similar_to=None, video_size: Optional[Tuple[int, int]] = None, vae=None,
                    area: Tuple[int, int] = (832, 480)) -> Tuple[IdentityBundle, List[FaceBox], int]:
    """Reference photo -> (:class:`IdentityBundle`, all faces left to right, chosen index).

    reference / similar_to: one image ([H, W, C] or [1, H, W, C]); video_size: (width, height) of the
    driving video frames: with it the bundle gets ``letterboxed`` (uint8 [Hv, Wv, 3]) and, with a
    ``vae`` (the swap's protocol: ``encode([B, 3, F, H, W] in [-1, 1]) -> normalised latent``), the
    ``latent`` [1, 16, 1, h, w] for ``area`` = (width, height), keyed by ``((video_w, video_h), area)``.
    """
    image = photo(reference, "reference image")
    target = None
    if mode == "most similar" and similar_to is not None:
        other = detect(analyzer, photo(similar_to, "similar_to image"), "similar_to image")
        target = other[largest(other)].embedding
    faces = detect(analyzer, image, "reference image")
    choice = choose_face(faces, mode, index, target)
    bundle = IdentityBundle(image=image, face=faces[choice.index])
    if vae is not None and video_size is None:
        raise InputError("a VAE was given without the driving video frames: connect the video frames too "
                         "(the identity latent depends on their frame size), or disconnect the VAE")
    if video_size is not None:
        vw, vh = (int(v) for v in video_size)
        bundle.letterboxed = np.array(letterbox_reference(image, vw, vh))
        if vae is not None:
            area = tuple(int(v) for v in area)
            with torch.no_grad():
                bundle.latent = encode_reference(vae, image, (vw, vh), area).detach().cpu()
            bundle.latent_key = ((vw, vh), area)
    return bundle, faces, choice.index
