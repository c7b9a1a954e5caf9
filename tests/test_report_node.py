"""DreamIDVIdentityReport node (ComfyUI in-process, test-built insightface pack)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image
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


@pytest.mark.slow
def test_evaluate_node_graph_clip_folder_and_comparison(pack, tmp_path, monkeypatch):
    """DreamIDVEvaluate: the graph's own clip (IMAGE inputs), then a clip folder compared with the first
    results; tables and plots land in the results folders (relative: under ComfyUI's output folder)."""
    import folder_paths

    from dreamidv_core.errors import InputError
    from dreamidv_core.io.video import write_video
    from synthetic_data import render_synthetic_sample

    d = tmp_path / "insightface"
    om.build_pack(d, "buffalo_l")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "insightface", ([str(d)], {".onnx"}))
    saved = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(tmp_path / "output"))
    try:
        node = pack.nodes.report.DreamIDVEvaluate
        arrays, _ = render_synthetic_sample(9, (64, 96), seed=1)
        img = lambda a: torch.from_numpy(np.ascontiguousarray(a)).float().div(255)  # noqa: E731
        summary, table, folder = node.execute("", "graph_eval", "buffalo_l", "CPU", "none",
                                              swapped=img(arrays["target"]), driving=img(arrays["driving"]),
                                              reference=img(arrays["identity"][None]), mask=img(arrays["mask"])).result
        agg = json.loads(summary)
        assert Path(folder) == tmp_path / "output" / "graph_eval" and (Path(folder) / "results.json").is_file()
        assert agg["bg_psnr"]["clips"] == 1 and agg["bg_psnr"]["mean"] > 60  # the exact background
        assert agg["pose_error"]["clips"] == 0  # landmarker none
        assert table.shape[0] == 1 and table.shape[-1] == 3
        clips = tmp_path / "clips" / "graph"
        clips.mkdir(parents=True)
        for name in ("driving", "mask"):
            write_video(clips / f"{name}.mp4", arrays[name], 24)
        noisy = arrays["target"] + np.random.default_rng(0).integers(-30, 30, arrays["target"].shape)
        write_video(clips / "swapped.mp4", np.clip(noisy, 0, 255).astype(np.uint8), 24)  # a noisy swap
        Image.fromarray(arrays["identity"]).save(clips / "reference.png")
        summary, table, folder = node.execute(str(tmp_path / "clips"), "folder_eval", "buffalo_l", "CPU", "none",
                                              compare_with="graph_eval").result
        rows = {r["key"]: r for r in json.loads(summary)}
        assert rows["bg_psnr"]["graph_eval"] > rows["bg_psnr"]["folder_eval"] + 10
        assert rows["bg_psnr"]["winner"] == "graph_eval"
        assert (Path(folder) / "comparison" / "comparison.csv").is_file()
        with pytest.raises(InputError, match="give 'clips'"):
            node.execute("", "x", "buffalo_l", "CPU", "none")
    finally:
        folder_paths.set_output_directory(saved)
