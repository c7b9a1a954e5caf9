"""Tiny ONNX stand-ins for insightface's model packs (antelopev2, buffalo_l), built by the tests.

insightface routes every ``*.onnx`` of a pack folder by its signature (``model_zoo.ModelRouter``):

* >= 5 outputs -> SCRFD detector. The 9-output form (``det_10g.onnx`` of buffalo_l,
  ``scrfd_10g_bnkps.onnx`` of antelopev2) has one input ``[1, 3, H, W]`` (H, W dynamic) and outputs
  ``score_8, score_16, score_32, bbox_8, bbox_16, bbox_32, kps_8, kps_16, kps_32``, each
  ``[N_s, k]`` (or ``[1, N_s, k]`` for a "batched" export) with ``N_s = (H/s) * (W/s) * 2`` (2 anchors
  per cell, row-major cells) and ``k`` = 1, 4, 10. Boxes and keypoints are distances in units of
  the stride from the anchor centre ``(x*s, y*s)``.
* input ``[N, 3, 192, 192]`` -> landmark (``1k3d68.onnx`` -> ``[N, 3309]``, ``2d106det.onnx`` -> ``[N, 212]``);
* input ``[N, 3, 96, 96]`` -> attribute (``genderage.onnx`` -> ``[N, 3]``);
* square input >= 112, multiple of 16, one output -> ArcFace recognition (``w600k_r50.onnx``,
  ``glintr100.onnx``: ``[N, 3, 112, 112]`` -> ``[N, 512]``).

The detector here is *controlled*: its input is insightface's blob ``(rgb - 127.5) / 128``; on the
stride-8 grid a cell whose mean red value is above ~191 is a face (score ~1, first anchor only;
strides 16 and 32 never fire). The box is a square centred on the cell's top-left corner (the
anchor centre) whose side is about the cell's mean **green** value in pixels, and the five
keypoints sit at fixed fractions of that box (:data:`KPS_FRACTIONS`). :func:`paint_face` draws such
a marker, so a test knows where every face is and how big it is. The recogniser is a random linear
map of the 8x8-pooled aligned crop: the same face content gives the same embedding.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 13
STRIDES = (8, 16, 32)
SCORE_GAIN = 20.0       # logit = SCORE_GAIN * (red - RED_THRESHOLD) on the stride-8 grid
RED_THRESHOLD = 0.5     # in blob units: red ~ 191
SIZE_GAIN = 8.0         # box half-side = (green_blob + 1) * SIZE_GAIN * 8 = (green + 0.5) / 2 pixels
# keypoints (eye, eye, nose, mouth corner, mouth corner) as fractions of the box half-side
KPS_FRACTIONS = np.array([[-0.4, -0.25], [0.4, -0.25], [0.0, 0.1], [-0.3, 0.45], [0.3, 0.45]], np.float32)

PACK_FILES = {
    "buffalo_l": {"detector": "det_10g.onnx", "recognizer": "w600k_r50.onnx", "batched": False},
    "antelopev2": {"detector": "scrfd_10g_bnkps.onnx", "recognizer": "glintr100.onnx", "batched": True},
}
EXTRA_FILES = {"1k3d68.onnx": (192, 3309), "2d106det.onnx": (192, 212), "genderage.onnx": (96, 3)}


def _const(name: str, value) -> onnx.NodeProto:
    arr = np.asarray(value)
    if arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(arr, name))


def _save(nodes, inputs, outputs, path: Path, inits=()) -> Path:
    graph = helper.make_graph(nodes, path.stem, inputs, outputs, initializer=list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="dreamidv-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def build_scrfd(path: Path, batched: bool = False) -> Path:
    """The controlled SCRFD detector: input ``input.1`` [1, 3, ?, ?] -> 9 outputs (see module doc)."""
    nodes = [_const("zero", np.float32(0.0)), _const("one", np.float32(1.0)),
             _const("size_gain", np.float32(SIZE_GAIN)),
             _const("ones4", np.ones((1, 4), np.float32)),
             _const("kps_frac", KPS_FRACTIONS.reshape(1, 10)),
             _const("rows3", np.array([-1, 3], np.int64)),
             _const("s0", np.array([0], np.int64)), _const("s1", np.array([1], np.int64)),
             _const("s2", np.array([2], np.int64))]
    outs = {"score": [], "bbox": [], "kps": []}
    for s in STRIDES:
        gain, bias = (SCORE_GAIN, -SCORE_GAIN * RED_THRESHOLD) if s == 8 else (0.0, -30.0)
        p = f"s{s}_"
        nodes += [
            helper.make_node("AveragePool", ["input.1"], [p + "pool"], kernel_shape=[s, s], strides=[s, s]),
            helper.make_node("Transpose", [p + "pool"], [p + "nhwc"], perm=[0, 2, 3, 1]),
            helper.make_node("Reshape", [p + "nhwc", "rows3"], [p + "cells"]),  # [h*w, 3]
            helper.make_node("Slice", [p + "cells", "s0", "s1", "s1"], [p + "red"]),
            helper.make_node("Slice", [p + "cells", "s1", "s2", "s1"], [p + "green"]),
            _const(p + "gain", np.float32(gain)), _const(p + "bias", np.float32(bias)),
            helper.make_node("Mul", [p + "red", p + "gain"], [p + "lg0"]),
            helper.make_node("Add", [p + "lg0", p + "bias"], [p + "logit"]),
            helper.make_node("Sigmoid", [p + "logit"], [p + "sc_a"]),
            helper.make_node("Mul", [p + "sc_a", "zero"], [p + "sc_b"]),
            helper.make_node("Concat", [p + "sc_a", p + "sc_b"], [p + "sc2"], axis=1),  # [h*w, 2 anchors]
            helper.make_node("Add", [p + "green", "one"], [p + "g1"]),
            helper.make_node("Mul", [p + "g1", "size_gain"], [p + "dist"]),  # [h*w, 1] half-side / stride
            helper.make_node("Mul", [p + "dist", "ones4"], [p + "bb"]),
            helper.make_node("Concat", [p + "bb", p + "bb"], [p + "bb2"], axis=1),
            helper.make_node("Mul", [p + "dist", "kps_frac"], [p + "kp"]),
            helper.make_node("Concat", [p + "kp", p + "kp"], [p + "kp2"], axis=1),
        ]
        for kind, src, k in (("score", "sc2", 1), ("bbox", "bb2", 4), ("kps", "kp2", 10)):
            shape_name = f"{p}{kind}_shape"
            nodes.append(_const(shape_name, np.array([1, -1, k] if batched else [-1, k], np.int64)))
            nodes.append(helper.make_node("Reshape", [p + src, shape_name], [f"{kind}_{s}"]))
            dims = [1, f"n{s}", k] if batched else [f"n{s}", k]
            outs[kind].append(helper.make_tensor_value_info(f"{kind}_{s}", TensorProto.FLOAT, dims))
    inputs = [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "?", "?"])]
    return _save(nodes, inputs, outs["score"] + outs["bbox"] + outs["kps"], Path(path))


def build_arcface(path: Path, seed: int = 0, size: int = 112, dim: int = 512) -> Path:
    """Random-weight recogniser: ``input.1`` [None, 3, 112, 112] -> ``embedding`` [None, 512]
    (8x8 average pool of the aligned crop, flattened, times a random [192, 512] matrix)."""
    rng = np.random.default_rng(seed)
    k = size // 8
    weight = numpy_helper.from_array(rng.standard_normal((3 * 64, dim)).astype(np.float32), "fc_weight")
    nodes = [helper.make_node("AveragePool", ["input.1"], ["pooled"], kernel_shape=[k, k], strides=[k, k]),
             _const("flat_shape", np.array([0, -1], np.int64)),
             helper.make_node("Reshape", ["pooled", "flat_shape"], ["flat"]),
             helper.make_node("MatMul", ["flat", "fc_weight"], ["embedding"])]
    inputs = [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["None", 3, size, size])]
    outputs = [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["None", dim])]
    return _save(nodes, inputs, outputs, Path(path), inits=[weight])


def build_head(path: Path, size: int, out_dim: int, seed: int = 1) -> Path:
    """Landmark / attribute stand-in: [None, 3, size, size] -> [None, out_dim] (global pool x random)."""
    rng = np.random.default_rng(seed)
    weight = numpy_helper.from_array(rng.standard_normal((3, out_dim)).astype(np.float32), "w")
    nodes = [helper.make_node("GlobalAveragePool", ["data"], ["gap"]),
             _const("flat_shape", np.array([0, -1], np.int64)),
             helper.make_node("Reshape", ["gap", "flat_shape"], ["flat"]),
             helper.make_node("MatMul", ["flat", "w"], ["fc1"])]
    inputs = [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["None", 3, size, size])]
    outputs = [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, ["None", out_dim])]
    return _save(nodes, inputs, outputs, Path(path), inits=[weight])


def build_pack(insightface_dir: Path, pack: str = "buffalo_l", extras: bool = True, seed: int = 0) -> Path:
    """Write ``<insightface_dir>/models/<pack>/`` with the pack's real file names; returns that folder."""
    files = PACK_FILES[pack]
    folder = Path(insightface_dir) / "models" / pack
    build_scrfd(folder / files["detector"], batched=files["batched"])
    build_arcface(folder / files["recognizer"], seed=seed)
    if extras:
        for name, (size, dim) in EXTRA_FILES.items():
            build_head(folder / name, size, dim)
    return folder


def face_box(cx: float, cy: float, green: int) -> Tuple[float, float, float, float]:
    """The box the detector reports for a marker (image at detection scale 1)."""
    half = (green + 0.5) / 2.0
    return cx - half, cy - half, cx + half, cy + half


def paint_face(image: np.ndarray, cell_x: int, cell_y: int, green: int = 96,
               texture: Optional[np.ndarray] = None, seed: Optional[int] = None) -> Tuple[float, float]:
    """Draw a face marker in an RGB uint8 image [H, W, 3] (detection scale 1: H, W <= det size):
    the stride-8 cell (cell_x, cell_y) gets red 255 and ``green`` (box side ~green px); the box
    around it gets a blue ``texture`` (or random from ``seed``) that makes the face's embedding.
    Returns the face centre (x, y) in pixels."""
    cx, cy = cell_x * 8, cell_y * 8
    x0, y0, x1, y1 = (int(round(v)) for v in face_box(cx, cy, green))
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, image.shape[1]), min(y1, image.shape[0])
    if texture is None and seed is not None:
        texture = np.random.default_rng(seed).integers(0, 256, size=(8, 8), dtype=np.uint8)
    if texture is not None:
        h, w = y1 - y0, x1 - x0
        ys = (np.arange(h) * texture.shape[0] // max(h, 1)).clip(0, texture.shape[0] - 1)
        xs = (np.arange(w) * texture.shape[1] // max(w, 1)).clip(0, texture.shape[1] - 1)
        image[y0:y1, x0:x1, 2] = texture[ys][:, xs]
    image[cy:cy + 8, cx:cx + 8, 0] = 255
    image[cy:cy + 8, cx:cx + 8, 1] = green
    return float(cx), float(cy)


def blank(height: int, width: int) -> np.ndarray:
    return np.zeros((height, width, 3), np.uint8)


def paint_faces(image: np.ndarray, faces: Sequence[Tuple[int, int, int, int]]) -> list:
    """Several markers ``(cell_x, cell_y, green, texture_seed)``; returns their centres."""
    return [paint_face(image, cx, cy, green=g, seed=s) for cx, cy, g, s in faces]
