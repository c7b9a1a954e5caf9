"""Tiny ONNX stand-ins for the DWPose files, with the real input/output names and shapes and
outputs the test chooses (the input only enters through ``0 * ReduceSum``)."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DET_ROWS = 8400  # 80*80 + 40*40 + 20*20 anchors of a 640x640 YOLOX
SIMCC_X, SIMCC_Y = 576, 768  # 288 * 2, 384 * 2


def _constant_model(input_name: str, input_shape, outputs: dict) -> bytes:
    nodes = [helper.make_node("ReduceSum", [input_name], ["s"], keepdims=0),
             helper.make_node("Mul", ["s", "zero"], ["z"])]
    inits = [numpy_helper.from_array(np.zeros((), np.float32), "zero")]
    outs = []
    for name, value in outputs.items():
        value = np.asarray(value, np.float32)
        inits.append(numpy_helper.from_array(value, name + "_c"))
        nodes.append(helper.make_node("Add", ["z", name + "_c"], [name]))
        outs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(value.shape)))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, input_shape)],
                              outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def yolox_model(path, anchors: dict) -> None:
    """anchors: {row index: 85 values (raw head output)}; every other row is zero (score 0)."""
    out = np.zeros((1, DET_ROWS, 85), np.float32)
    for row, values in anchors.items():
        out[0, row] = values
    with open(path, "wb") as f:
        f.write(_constant_model("images", [1, 3, 640, 640], {"output": out}))


def dwpose_model(path, x_locs, y_locs, peaks) -> None:
    """133 keypoints: SimCC one-hot peaks at x_locs / y_locs (bins, split ratio 2) of height peaks."""
    sx = np.zeros((1, 133, SIMCC_X), np.float32)
    sy = np.zeros((1, 133, SIMCC_Y), np.float32)
    for k in range(133):
        sx[0, k, int(x_locs[k])] = peaks[k]
        sy[0, k, int(y_locs[k])] = peaks[k]
    with open(path, "wb") as f:
        f.write(_constant_model("input", [1, 3, 384, 288], {"simcc_x": sx, "simcc_y": sy}))
