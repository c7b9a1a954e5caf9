"""dreamidv_core.preprocess.face_analysis (SCRFD + alignment + ArcFace on onnxruntime) and onnx_session:
the decoding pieces on hand-made numbers, equality with insightface's FaceAnalysis on the test-built packs
(tests/onnx_models.py; skipped where insightface is not installed), provider choice and build detection."""
from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import onnx_models as om  # noqa: E402

from dreamidv_core.preprocess import face_analysis as fa  # noqa: E402
from dreamidv_core.preprocess import onnx_session as ons  # noqa: E402

TOLERANCE = 1e-4


# ------------------------------------------------------------------------------------ decoding pieces
def test_anchor_centres_row_major_repeated_per_anchor():
    c = fa.anchor_centres(2, 3, 8, 2)
    assert c.dtype == np.float32 and c.shape == (12, 2)
    np.testing.assert_array_equal(c[::2], [[0, 0], [8, 0], [16, 0], [0, 8], [8, 8], [16, 8]])
    np.testing.assert_array_equal(c[::2], c[1::2])


def test_distance_decoding():
    centres = np.array([[10.0, 20.0]], np.float32)
    np.testing.assert_array_equal(fa.distance2bbox(centres, np.array([[1, 2, 3, 4]], np.float32)), [[9, 18, 13, 24]])
    kps = fa.distance2kps(centres, np.arange(10, dtype=np.float32)[None])
    assert kps.shape == (1, 5, 2)
    np.testing.assert_array_equal(kps[0, 2], [14, 25])


def test_nms_keeps_the_best_of_overlapping_boxes():
    dets = np.array([[0, 0, 10, 10, 0.8], [1, 1, 11, 11, 0.9], [50, 50, 60, 60, 0.7], [0, 0, 10, 10, 0.9]],
                    np.float32)
    assert fa.nms(dets) == [1, 2]  # ties by score keep the earlier row (stable), overlaps > 0.4 dropped
    assert fa.nms(dets, 0.99) == [1, 3, 2]  # row 0 is the same box as row 3


def test_similarity_transform_recovers_a_known_transform():
    rng = np.random.default_rng(0)
    src = fa.ARCFACE_TEMPLATE.astype(np.float64) + rng.normal(0, 3, (5, 2))
    angle, scale, shift = 0.3, 1.7, np.array([12.0, -4.0])
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    m = fa.similarity_transform(src, src @ rot.T + shift)
    np.testing.assert_allclose(m[:2, :2], rot, atol=1e-9)
    np.testing.assert_allclose(m[:2, 2], shift, atol=1e-9)
    assert np.isnan(fa.similarity_transform(np.zeros((5, 2)), fa.ARCFACE_TEMPLATE)).all()


def test_similarity_transform_equals_scikit_image_bit_for_bit():
    """insightface aligns with skimage's SimilarityTransform on float32 keypoints; ours gives the same matrix."""
    transform = pytest.importorskip("skimage.transform", reason="scikit-image (comes with insightface) is absent")
    rng = np.random.default_rng(1)
    worst = 0.0
    for _ in range(200):
        kps = (fa.ARCFACE_TEMPLATE * rng.uniform(0.5, 4) + rng.uniform(0, 300, 2)
               + rng.normal(0, 3, (5, 2))).astype(np.float32)
        ref = transform.SimilarityTransform()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            ref.estimate(kps, fa.arcface_template(112))
        worst = max(worst, float(np.abs(ref.params - fa.similarity_transform(kps, fa.arcface_template(112))).max()))
    assert worst == 0.0


def test_first_node_names_read_without_the_onnx_package(tmp_path):
    onnx = pytest.importorskip("onnx")
    path = om.build_arcface(tmp_path / "rec.onnx")
    assert fa.first_node_names(path) == [n.name for n in onnx.load(str(path)).graph.node][:8]
    assert fa.recognizer_normalisation(path) == (127.5, 127.5)
    # an MXNet-style export that normalises inside its graph (Sub + Mul first) takes raw pixels
    model = onnx.load(str(path))
    for node, name in zip(model.graph.node, ("_minus0", "_mul0")):
        node.name = name
    onnx.save(model, str(tmp_path / "mx.onnx"))
    assert fa.recognizer_normalisation(tmp_path / "mx.onnx") == (0.0, 1.0)
    (tmp_path / "junk.onnx").write_bytes(b"\xff" * 40)
    assert fa.first_node_names(tmp_path / "junk.onnx") == []


def test_detection_sizes():
    assert fa.detection_sizes(640) == [(640, 640)]
    assert fa.detection_sizes((320, 256)) == [(320, 256)]
    assert fa.detection_sizes([(128, 128), (640, 640)]) == [(128, 128), (640, 640)]
    with pytest.raises(Exception, match="multiple of 32"):
        fa.detection_sizes(300)


# -------------------------------------------------------------------------------------- providers
AVAILABLE_GPU = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


@pytest.mark.parametrize("choice, available, chain, noted", [
    ("auto", AVAILABLE_GPU, ["CUDAExecutionProvider", "CPUExecutionProvider"], False),
    ("auto", ["DmlExecutionProvider", "CPUExecutionProvider"], ["DmlExecutionProvider", "CPUExecutionProvider"], False),
    ("auto", ["CoreMLExecutionProvider", "AzureExecutionProvider", "CPUExecutionProvider"],
     ["CoreMLExecutionProvider", "CPUExecutionProvider"], False),
    ("auto", ["OpenVINOExecutionProvider", "CPUExecutionProvider"], ["OpenVINOExecutionProvider", "CPUExecutionProvider"],
     False),
    ("auto", ["AzureExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"], False),
    ("CPU", AVAILABLE_GPU, ["CPUExecutionProvider"], False),
    ("CUDA", AVAILABLE_GPU, ["CUDAExecutionProvider", "CPUExecutionProvider"], False),
    ("CUDA", ["CPUExecutionProvider"], ["CPUExecutionProvider"], True),
    ("DirectML", ["CPUExecutionProvider"], ["CPUExecutionProvider"], True),
])
def test_provider_chain(choice, available, chain, noted):
    got, note = ons.provider_chain(choice, available)
    assert got == chain and bool(note) == noted
    if noted:
        assert f"{choice} asked for" in note and "ran on CPU" in note


def test_provider_choice_is_checked():
    with pytest.raises(Exception, match="provider must be one of auto, CPU, CUDA"):
        ons.provider_chain("TPU", ["CPUExecutionProvider"])


def test_two_builds_over_each_other_are_reported_with_the_repair(monkeypatch, caplog):
    pytest.importorskip("onnxruntime")
    monkeypatch.setattr(ons, "_distributions", lambda: ("onnxruntime 1.32.0", "onnxruntime-gpu 1.31.1"))
    ons.runtime_build.cache_clear()
    try:
        with caplog.at_level(logging.WARNING):
            build = ons.runtime_build("face", "test")
        text = caplog.text
        assert build.name == "onnxruntime 1.32.0 + onnxruntime-gpu 1.31.1"
        assert "2 onnxruntime builds are installed" in text
        assert "-m pip uninstall -y onnxruntime" in text and "--force-reinstall --no-deps onnxruntime-gpu" in text
    finally:
        ons.runtime_build.cache_clear()


def test_a_broken_onnxruntime_is_reported_with_the_repair(monkeypatch):
    import types

    from dreamidv_core.errors import DreamIDVError

    monkeypatch.setitem(sys.modules, "onnxruntime", types.ModuleType("onnxruntime"))  # files removed by pip
    monkeypatch.setattr(ons, "_distributions", lambda: ("onnxruntime-gpu 1.31.1",))
    ons.runtime_build.cache_clear()
    try:
        with pytest.raises(DreamIDVError, match="installed onnxruntime is broken") as e:
            ons.runtime_build("face", "test")
        assert "--force-reinstall --no-deps onnxruntime-gpu" in str(e.value)
    finally:
        ons.runtime_build.cache_clear()


# ------------------------------------------------------------------------------ against insightface
def _scenes():
    """(name, RGB image, detection size): faces at scale 1, upscaled into the detector (merged by NMS),
    a non-square canvas, a face cut by the border, and no face."""
    one = om.blank(320, 320)
    om.paint_faces(one, [(30, 12, 100, 2), (10, 10, 60, 1), (20, 30, 40, 3)])
    wide = om.blank(240, 320)
    om.paint_faces(wide, [(8, 6, 50, 4), (30, 20, 80, 5)])
    small = om.blank(160, 200)  # upscaled x1.6 into 320: markers cover several cells
    om.paint_faces(small, [(5, 5, 30, 4), (15, 10, 50, 5)])
    tall = om.blank(320, 200)
    om.paint_faces(tall, [(12, 20, 70, 6)])
    edge = om.blank(320, 320)
    om.paint_faces(edge, [(1, 1, 90, 7), (38, 37, 60, 8)])
    return [("three faces", one, 320), ("wide", wide, 320), ("upscaled", small, 320), ("tall", tall, 320),
            ("at the border", edge, 320), ("no face", om.blank(96, 128), 320), ("det size 640", one, 640)]


@pytest.fixture(scope="module")
def packs(tmp_path_factory):
    pytest.importorskip("onnxruntime", reason="the face extra (onnxruntime) is not installed")
    root = tmp_path_factory.mktemp("insightface")
    om.build_pack(root, "buffalo_l", seed=3)
    om.build_pack(root, "antelopev2", seed=4)
    return root


def insightface_faces(folder: Path, image: np.ndarray, det_size: int):
    from insightface.app import FaceAnalysis

    app = FaceAnalysis(name=str(folder), root=str(folder.parent.parent), allowed_modules=["detection", "recognition"],
                       providers=["CPUExecutionProvider"])
    app.prepare(ctx_id=-1, det_thresh=0.5, det_size=(det_size, det_size))
    with warnings.catch_warnings():  # scikit-image's deprecation notice inside insightface's alignment
        warnings.simplefilter("ignore", FutureWarning)
        return app.get(np.ascontiguousarray(image[..., ::-1]))  # insightface takes BGR


@pytest.mark.parametrize("pack", ["buffalo_l", "antelopev2"])
def test_same_boxes_landmarks_embeddings_as_insightface(packs, pack):
    pytest.importorskip("insightface", reason="insightface is not installed: nothing to compare with "
                                              "(requirements-test.txt installs it)")
    folder = packs / "models" / pack
    worst = {"bbox": 0.0, "kps": 0.0, "score": 0.0, "embedding": 0.0}
    counted = 0
    for name, image, size in _scenes():
        theirs = insightface_faces(folder, image, size)
        ours = fa.FaceAnalyzer(folder, "CPU", det_size=size).detect(image)
        assert len(ours) == len(theirs), name
        for a, b in zip(theirs, ours):  # both by detector score
            worst["bbox"] = max(worst["bbox"], float(np.abs(a.bbox - b.bbox).max()))
            worst["kps"] = max(worst["kps"], float(np.abs(a.kps - b.kps).max()))
            worst["score"] = max(worst["score"], abs(float(a.det_score) - b.score))
            worst["embedding"] = max(worst["embedding"], float(np.abs(a.embedding - b.embedding).max()))
            counted += 1
    assert counted >= 10
    assert all(v <= TOLERANCE for v in worst.values()), worst


def test_detector_without_keypoints_is_refused_and_faces_are_left_to_right(packs, tmp_path):
    analyzer = fa.FaceAnalyzer(packs / "models" / "buffalo_l", "auto", det_size=320)
    image = _scenes()[0][1]
    boxes = analyzer.faces(image)
    assert [round(b.bbox[0]) for b in boxes] == sorted(round(b.bbox[0]) for b in boxes)
    assert all(abs(np.linalg.norm(b.embedding) - 1) < 1e-5 for b in boxes)
    raw = analyzer.detect(image)
    assert [f.score for f in raw] == sorted((f.score for f in raw), reverse=True)
    assert raw[0].normed_embedding is not None and raw[0].embedding.shape == (512,)
    assert analyzer.detect(image, embed=False)[0].embedding is None
