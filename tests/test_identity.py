"""dreamidv_core.preprocess.identity (face analysis on onnxruntime) with test-built ONNX packs
(tests/onnx_models.py); no ComfyUI, no insightface."""
from __future__ import annotations

import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import onnx_models as om  # noqa: E402

pytest.importorskip("onnxruntime", reason="the face extra (onnxruntime) is not installed")

from dreamidv_core.preprocess import identity as core  # noqa: E402
from dreamidv_core.errors import CheckpointError, InputError  # noqa: E402
from dreamidv_core.preprocess.video_ops import prepare_reference  # noqa: E402

# three faces: (cell_x, cell_y, green ~ box side, texture seed); image 320x320 = detection size
FACES = [(30, 12, 100, 2), (10, 10, 60, 1), (20, 30, 40, 3)]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    d = tmp_path_factory.mktemp("insightface")
    om.build_pack(d, "buffalo_l")
    om.build_pack(d, "antelopev2")
    return d


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any socket connection fails the test (nothing is ever downloaded)."""
    def refuse(*a, **k):
        raise AssertionError(f"network access attempted: {a}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    yield


@pytest.fixture(scope="module")
def analyzer(root):
    return core.FaceAnalyzer(root / "models" / "buffalo_l", "CPU", det_size=320)


def three_faces():
    img = om.blank(320, 320)
    centres = om.paint_faces(img, FACES)
    return img, centres


def test_onnx_signatures_route_like_the_real_packs(root):
    import onnx

    from dreamidv_core.preprocess import face_analysis as fa
    from dreamidv_core.preprocess.onnx_session import make_session

    for pack, (det, rec) in core.PACK_FILES.items():
        folder = root / "models" / pack
        m = onnx.load(str(folder / det))
        assert [d.dim_value or d.dim_param for d in m.graph.input[0].type.tensor_type.shape.dim] == [1, 3, "?", "?"]
        assert [o.name for o in m.graph.output] == [f"{k}_{s}" for k in ("score", "bbox", "kps") for s in (8, 16, 32)]
        r = onnx.load(str(folder / rec))
        assert [d.dim_value or d.dim_param for d in r.graph.input[0].type.tensor_type.shape.dim] == ["None", 3, 112, 112]
        assert [d.dim_value or d.dim_param for d in r.graph.output[0].type.tensor_type.shape.dim] == ["None", 512]
        roles = {p.name: (fa.is_detector(s), fa.is_recognizer(s))
                 for p in folder.glob("*.onnx") for s in [make_session(p, "CPU")]}
        assert roles == {det: (True, False), rec: (False, True), "1k3d68.onnx": (False, False),
                         "2d106det.onnx": (False, False), "genderage.onnx": (False, False)}


@pytest.mark.parametrize("pack", ["buffalo_l", "antelopev2"])
def test_detection_boxes_landmarks_embeddings(root, pack):
    analyzer = core.FaceAnalyzer(root / "models" / pack, "CPU", det_size=320)
    det, rec = core.PACK_FILES[pack]  # landmark / attribute files are never opened
    assert Path(analyzer.detector.session.path).name == det and Path(analyzer.recognizer.session.path).name == rec
    assert analyzer.info.startswith(f"{pack}: {det} + {rec} on onnxruntime") and analyzer.info.endswith("on CPU")
    img, centres = three_faces()
    faces = analyzer.faces(img)
    assert len(faces) == 3
    expected = sorted(zip(centres, FACES), key=lambda c: c[0][0])  # left to right
    for f, ((cx, cy), (_, _, green, _)) in zip(faces, expected):
        np.testing.assert_allclose(f.bbox, om.face_box(cx, cy, green), atol=1e-3)
        half = (green + 0.5) / 2
        np.testing.assert_allclose(f.landmarks, np.array([cx, cy]) + om.KPS_FRACTIONS * half, atol=1e-3)
        assert f.score > 0.99
        assert f.embedding.shape == (512,) and f.embedding.dtype == np.float32
        assert abs(np.linalg.norm(f.embedding) - 1) < 1e-5


def test_selection_index_largest_similar(analyzer):
    img, _ = three_faces()
    faces = analyzer.faces(img)
    assert [f.bbox[2] - f.bbox[0] for f in faces] == pytest.approx([60.5, 40.5, 100.5])  # left to right
    assert core.choose_face(faces, "largest").index == 2
    assert core.choose_face(faces, "index", 1).index == 1
    assert core.choose_face(faces, "index", -1).index == 2
    with pytest.raises(InputError, match=r"face_index 3 is out of range: 3 faces"):
        core.choose_face(faces, "index", 3)
    with pytest.raises(InputError, match="similar_to"):
        core.choose_face(faces, "most similar")
    # a second photo with the middle face (seed 3, size 40) alone, elsewhere and larger canvas
    other = om.blank(240, 320)
    om.paint_face(other, 25, 15, green=40, seed=3)
    bundle, _, chosen = core.encode_identity(analyzer, img, "most similar", similar_to=other)
    assert chosen == 1 and bundle.face.bbox == faces[1].bbox
    sims = core.choose_face(faces, "most similar", target=analyzer.faces(other)[0].embedding).similarities
    assert sims[1] > 0.999 and max(sims[0], sims[2]) < 0.99


def test_no_face_is_a_clear_error(analyzer):
    with pytest.raises(InputError, match=r"reference image: no face found in the 200x100 image"):
        core.encode_identity(analyzer, om.blank(100, 200))
    other = om.blank(64, 64)
    with pytest.raises(InputError, match="similar_to image: no face"):
        core.encode_identity(analyzer, three_faces()[0], "most similar", similar_to=other)


def test_missing_pack_names_folder_and_files(tmp_path):
    with pytest.raises(CheckpointError) as e:
        core.find_pack([tmp_path], "antelopev2")
    msg = str(e.value)
    assert str(tmp_path / "models" / "antelopev2") in msg
    assert "scrfd_10g_bnkps.onnx" in msg and "glintr100.onnx" in msg and "never downloaded" in msg
    # a pack with a detector but no recogniser
    om.build_scrfd(tmp_path / "models" / "buffalo_l" / "det_10g.onnx")
    folder = core.find_pack([tmp_path], "buffalo_l")
    with pytest.raises(CheckpointError, match=r"no recognition model among \['det_10g.onnx'\].*w600k_r50.onnx"):
        core.FaceAnalyzer(folder)
    # an empty / corrupt pack
    (tmp_path / "models" / "x").mkdir()
    (tmp_path / "models" / "x" / "bad.onnx").write_bytes(b"not onnx")
    with pytest.raises(CheckpointError, match="onnxruntime cannot load it"):
        core.FaceAnalyzer(tmp_path / "models" / "x")
    with pytest.raises(CheckpointError, match="does not exist"):
        core.FaceAnalyzer(tmp_path / "models" / "nothing")


def test_pack_with_other_file_names_is_routed_by_signature(tmp_path):
    """A pack folder with unknown file names (e.g. a renamed or other pack) is routed like insightface does."""
    folder = tmp_path / "models" / "mypack"
    om.build_scrfd(folder / "b_detector.onnx")
    om.build_arcface(folder / "a_recognizer.onnx")
    om.build_head(folder / "c_landmarks.onnx", 192, 212)
    analyzer = core.FaceAnalyzer(folder, "CPU", det_size=320)
    assert Path(analyzer.detector.session.path).name == "b_detector.onnx"
    assert Path(analyzer.recognizer.session.path).name == "a_recognizer.onnx"
    assert len(analyzer.faces(three_faces()[0])) == 3


def test_nested_pack_folder_is_found(tmp_path):
    om.build_pack(tmp_path / "models" / "antelopev2", "antelopev2", extras=False)  # .../antelopev2/models/antelopev2
    (tmp_path / "models" / "antelopev2" / "models").rename(tmp_path / "tmp")
    (tmp_path / "tmp" / "antelopev2").rename(tmp_path / "models" / "antelopev2" / "antelopev2")
    assert core.find_pack([tmp_path / "none", tmp_path], "antelopev2") == tmp_path / "models" / "antelopev2" / "antelopev2"


def test_alpha_greyscale_and_float_inputs(analyzer):
    img, _ = three_faces()
    ref = [f.bbox for f in analyzer.faces(img)]
    rgba = np.concatenate([img, np.full(img.shape[:2] + (1,), 128, np.uint8)], -1)
    as_float = torch.from_numpy(rgba).float().div(255)[None]  # ComfyUI IMAGE [1, H, W, 4]
    bundle, faces, _ = core.encode_identity(analyzer, as_float)
    assert bundle.image.shape == (320, 320, 3) and bundle.image.dtype == np.uint8
    assert [f.bbox for f in faces] == ref
    # greyscale: red marker on black -> grey; the detector sees red = green = blue
    grey = om.blank(320, 320)
    grey[80:88, 80:88] = 255
    g = torch.from_numpy(grey[..., :1]).float().div(255)[None]  # [1, H, W, 1]
    bundle, faces, _ = core.encode_identity(analyzer, g)
    assert bundle.image.shape == (320, 320, 3) and len(faces) == 1
    np.testing.assert_allclose(faces[0].bbox, om.face_box(80, 80, 255), atol=1e-3)
    assert core.photo(grey[..., 0], "x").shape == (320, 320, 3)  # [H, W]


class FakeVAE:
    """The swap's protocol: [B, 3, F, H, W] in [-1, 1] -> [B, 16, F, H/8, W/8]."""

    def __init__(self):
        self.seen = None

    def encode(self, video):
        self.seen = video
        pooled = torch.nn.functional.avg_pool3d(video, (1, 8, 8))
        return pooled.repeat(1, 6, 1, 1, 1)[:, :16]


def test_letterbox_and_latent(analyzer):
    img, _ = three_faces()
    bundle, _, _ = core.encode_identity(analyzer, img, video_size=(640, 360))
    assert bundle.letterboxed.shape == (360, 640, 3) and bundle.latent is None
    assert (bundle.letterboxed[:, :100] == 255).all()  # white bars left and right of the square photo
    vae = FakeVAE()
    bundle, _, _ = core.encode_identity(analyzer, img, video_size=(640, 360), vae=vae, area=(320, 192))
    expected = prepare_reference(img, 640, 360, 320, 192)
    torch.testing.assert_close(vae.seen[0], expected.mul(2).sub(1))
    assert bundle.latent.shape == (1, 16, 1, expected.shape[2] // 8, expected.shape[3] // 8)
    assert bundle.latent_key == ((640, 360), (320, 192))
    assert bundle.latent_for((640, 360), (320, 192)) is bundle.latent
    assert bundle.latent_for((640, 360), (832, 480)) is None
    with pytest.raises(InputError, match="VAE was given without the driving video"):
        core.encode_identity(analyzer, img, vae=vae)


def test_analyzer_cache_and_options(root):
    core.clear_cache()
    a = core.load_analyzer(root / "models" / "buffalo_l", "CPU", 320)
    assert core.load_analyzer(root / "models" / "buffalo_l", "CPU", 320) is a
    assert core.load_analyzer(root / "models" / "buffalo_l", "CPU", 640) is not a
    with pytest.raises(InputError, match="multiple of 32"):
        core.FaceAnalyzer(root / "models" / "buffalo_l", det_size=300)
    with pytest.raises(InputError, match="provider"):
        core.FaceAnalyzer(root / "models" / "buffalo_l", "TPU")
    core.clear_cache()


def test_draw_faces(analyzer):
    img, _ = three_faces()
    faces = analyzer.faces(img)
    out = core.draw_faces(img, faces, 2)
    x0, y0, x1, y1 = (int(round(v)) for v in faces[2].bbox)
    assert tuple(out[y0 + 20, x0]) == (0, 220, 0) and out.shape == img.shape
    assert tuple(out[int(faces[0].bbox[1]) + 10, int(round(faces[0].bbox[0]))]) == (230, 40, 40)
