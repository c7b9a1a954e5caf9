"""DreamIDVIdentityReport node (ComfyUI in-process, test-built insightface pack)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import onnx_models as om  # noqa: E402

pytest.importorskip("onnxruntime", reason="the face extra (onnxruntime) is not installed")


@pytest.fixture
def node(pack, tmp_path, monkeypatch):
    import folder_paths

    d = tmp_path / "insightface"
    om.build_pack(d, "buffalo_l")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "insightface", ([str(d)], {".onnx"}))
    return pack.nodes.report.DreamIDVIdentityReport


def test_identity_report_node(node):
    from dreamidv_core.errors import InputError

    frames = np.full((3, 160, 160, 3), 90, np.uint8)
    om.paint_face(frames[0], 8, 8, green=40, seed=1)
    om.paint_face(frames[1], 9, 7, green=40, seed=1)  # the same face, moved
    om.paint_face(frames[2], 8, 8, green=40, seed=7)  # another face
    reference = frames[0].copy()
    images = torch.from_numpy(frames).float().div(255)
    text, plot = node.execute(images, reference=torch.from_numpy(reference).float().div(255)[None],
                              insightface_pack="buffalo_l", provider="CPU").result
    data = json.loads(text)
    sims = data["similarities"]
    assert sims[0] == pytest.approx(1.0, abs=1e-4) and sims[1] > 0.99 and sims[2] < sims[1]
    assert plot.shape[0] == 1 and plot.shape[-1] == 3 and 0 <= float(plot.min()) <= float(plot.max()) <= 1
    with pytest.raises(InputError, match="identity or a reference"):
        node.execute(images, insightface_pack="buffalo_l", provider="CPU")
