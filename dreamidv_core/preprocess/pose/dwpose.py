"""DWPose with onnxruntime: YOLOX-L person detector + DWPose-L whole-body estimator (RTMPose SimCC).

The two files are the ones ComfyUI controlnet_aux users already have:
- ``yolox_l.onnx``: input ``images`` [1, 3, 640, 640] float (0..255 RGB, letterboxed to the top-left
  corner, padding 114) -> [1, 8400, 85] (cx, cy, w, h grid offsets for strides 8/16/32, objectness,
  80 class scores).
- ``dw-ll_ucoco_384.onnx``: input [1, 3, 384, 288] (RGB normalised with the ImageNet mean/std) ->
  ``simcc_x`` [1, 133, 576], ``simcc_y`` [1, 133, 768] (split ratio 2).

As in the reference pipeline the image given here is the frame already resized to the 1024 canvas;
people are the person boxes scoring above 0.3 after NMS (IoU 0.45), or the whole image when none is
found. Each person comes back as (body [18, 3] in OpenPose order with the neck, face [68, 3]),
coordinates normalised to the image, third column the score.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import cv2
import numpy as np

from ...errors import CheckpointError
from .. import onnx_session
from .landmark_sets import COCO_TO_OPENPOSE, SCORE_THRESHOLD, WHOLEBODY_FACE

DET_SIZE = 640
STRIDES = (8, 16, 32)
NMS_IOU = 0.45
DET_SCORE_MIN = 0.1
PERSON_SCORE = 0.3
BOX_PADDING = 1.25
SIMCC_SPLIT = 2.0
MEAN = np.array([123.675, 116.28, 103.53], np.float32)
STD = np.array([58.395, 57.12, 57.375], np.float32)


def make_session(path: str, provider: str = "auto"):
    """onnxruntime session on the chosen provider (``auto``, ``CPU``, ``CUDA``, ... see
    :mod:`dreamidv_core.preprocess.onnx_session`); returns (session, note), the note saying which
    onnxruntime build ran it where (and why not where asked, if so)."""
    opened = onnx_session.make_session(path, provider, "dwpose", "DWPose (pose source 'dwpose')")
    return opened.session, opened.info


# ----------------------------------------------------------------------------- detector
def letterbox(image: np.ndarray, size: int = DET_SIZE) -> Tuple[np.ndarray, float]:
    """uint8 [H, W, 3] -> (float32 [1, 3, size, size] 0..255, ratio): resized into the top-left corner."""
    h, w = image.shape[:2]
    r = min(size / h, size / w)
    nw, nh = int(w * r), int(h * r)
    out = np.full((size, size, 3), 114, np.uint8)
    out[:nh, :nw] = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(out.transpose(2, 0, 1)[None], np.float32), r


def decode_yolox(raw: np.ndarray, size: int = DET_SIZE) -> np.ndarray:
    """[N, 85] raw head output -> [N, 85] with boxes (cx, cy, w, h) in input pixels."""
    grids, strides = [], []
    for s in STRIDES:
        n = size // s
        yv, xv = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        grids.append(np.stack([xv, yv], -1).reshape(-1, 2))
        strides.append(np.full((n * n, 1), s))
    grid, stride = np.concatenate(grids), np.concatenate(strides)
    out = raw.astype(np.float64).copy()
    out[:, :2] = (out[:, :2] + grid) * stride
    out[:, 2:4] = np.exp(out[:, 2:4]) * stride
    return out


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float = NMS_IOU) -> List[int]:
    """Greedy NMS (boxes x1, y1, x2, y2 with the +1 pixel area convention) -> kept indices."""
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = scores.argsort()[::-1]
    keep = []
    while order.size:
        i = order[0]
        keep.append(int(i))
        rest = order[1:]
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = w * h
        order = rest[inter / (areas[i] + areas[rest] - inter) <= iou]
    return keep


def detect_people(session, image: np.ndarray) -> np.ndarray:
    """uint8 RGB [H, W, 3] -> person boxes [K, 4] (x1, y1, x2, y2) in image pixels."""
    blob, ratio = letterbox(image)
    raw = session.run(None, {session.get_inputs()[0].name: blob})[0]
    if raw.ndim != 3 or raw.shape[-1] < 6:
        raise ValueError(f"the person detector returned {list(raw.shape)}, expected [1, 8400, 85]")
    pred = decode_yolox(raw[0])
    cx, cy, bw, bh = pred[:, 0], pred[:, 1], pred[:, 2], pred[:, 3]
    boxes = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1) / ratio
    scores = pred[:, 4] * pred[:, 5]  # objectness x person class; other classes never reach the output
    ok = scores > DET_SCORE_MIN
    boxes, scores = boxes[ok], scores[ok]
    if not len(boxes):
        return np.zeros((0, 4))
    keep = nms(boxes, scores)
    keep = [k for k in keep if scores[k] > PERSON_SCORE]
    return boxes[keep]


# ----------------------------------------------------------------------------- pose estimator
def crop_transform(box: Sequence[float], out_w: int, out_h: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Box (x1, y1, x2, y2) -> (2x3 affine image->crop, centre [2], scale [2]) with 1.25 padding and
    the crop's aspect ratio."""
    x1, y1, x2, y2 = [float(v) for v in box]
    center = np.array([(x1 + x2) / 2, (y1 + y2) / 2])
    w, h = (x2 - x1) * BOX_PADDING, (y2 - y1) * BOX_PADDING
    aspect = out_w / out_h
    scale = np.array([w, w / aspect]) if w > h * aspect else np.array([h * aspect, h])
    s = out_w / scale[0]  # the crop keeps the aspect, so one factor
    mat = np.array([[s, 0, out_w / 2 - s * center[0]], [0, s, out_h / 2 - s * center[1]]])
    return mat, center, scale


def decode_simcc(simcc_x: np.ndarray, simcc_y: np.ndarray, split: float = SIMCC_SPLIT) -> Tuple[np.ndarray, np.ndarray]:
    """[K, Wx], [K, Wy] -> (locations [K, 2] in crop pixels, scores [K]); score = min of both maxima,
    location -1 where the score is not positive."""
    locs = np.stack([simcc_x.argmax(1), simcc_y.argmax(1)], -1).astype(np.float32)
    vals = np.minimum(simcc_x.max(1), simcc_y.max(1))
    locs[vals <= 0] = -1
    return locs / split, vals


def estimate_person(session, image: np.ndarray, box: Sequence[float]) -> np.ndarray:
    """One person box -> whole-body keypoints [133, 3] (x, y image pixels, score)."""
    inp = session.get_inputs()[0]
    out_h, out_w = (inp.shape[2], inp.shape[3]) if all(isinstance(d, int) for d in inp.shape[2:]) else (384, 288)
    mat, center, scale = crop_transform(box, out_w, out_h)
    crop = cv2.warpAffine(image, mat, (out_w, out_h), flags=cv2.INTER_LINEAR)
    blob = ((crop.astype(np.float32) - MEAN) / STD).transpose(2, 0, 1)[None]
    outs = session.run(None, {inp.name: np.ascontiguousarray(blob, np.float32)})
    names = [o.name for o in session.get_outputs()]
    sx = outs[names.index("simcc_x")] if "simcc_x" in names else outs[0]
    sy = outs[names.index("simcc_y")] if "simcc_y" in names else outs[1]
    locs, vals = decode_simcc(sx[0], sy[0])
    xy = locs / np.array([out_w, out_h]) * scale + center - scale / 2
    return np.concatenate([xy, vals[:, None]], 1)


def to_openpose(kpts: np.ndarray, width: int, height: int) -> Tuple[np.ndarray, np.ndarray]:
    """Whole-body [133, 3] in pixels -> (body [18, 3], face [68, 3]) normalised; neck = mean of the
    shoulders with score 1 when both shoulders score above 0.3, else 0."""
    norm = kpts.astype(np.float64).copy()
    norm[:, 0] /= float(width)
    norm[:, 1] /= float(height)
    body = np.zeros((18, 3))
    for op, coco in enumerate(COCO_TO_OPENPOSE):
        if coco is None:
            body[op, :2] = norm[[5, 6], :2].mean(0)
            body[op, 2] = float(norm[5, 2] > SCORE_THRESHOLD and norm[6, 2] > SCORE_THRESHOLD)
        else:
            body[op] = norm[coco]
    return body, norm[WHOLEBODY_FACE].copy()


class DWPose:
    """Callable: uint8 RGB [H, W, 3] -> list of people (body [18, 3], face [68, 3]), normalised.
    ``note``: which onnxruntime build runs the two models where."""

    def __init__(self, det_path: str, pose_path: str, provider: str = "auto"):
        self.det, note_a = make_session(det_path, provider)
        self.pose, note_b = make_session(pose_path, provider)
        self.note = note_a if note_a == note_b else f"detector: {note_a}; pose: {note_b}"
        self._check(det_path, self.det, 4, "a YOLOX person detector like yolox_l.onnx (input [1, 3, 640, 640])")
        self._check(pose_path, self.pose, 4, "a DWPose estimator like dw-ll_ucoco_384.onnx (input [1, 3, 384, 288])")

    @staticmethod
    def _check(path, session, rank, what):
        shape = session.get_inputs()[0].shape
        if len(shape) != rank:
            raise CheckpointError(path, f"input shaped {shape}; expected {what}")

    def __call__(self, image: np.ndarray) -> list:
        h, w = image.shape[:2]
        boxes = detect_people(self.det, image)
        if not len(boxes):
            boxes = np.array([[0, 0, w, h]], np.float64)
        return [to_openpose(estimate_person(self.pose, image, b), w, h) for b in boxes]
