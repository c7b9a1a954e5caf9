"""DreamIDVIdentityEncoder node (ComfyUI in-process, test-built insightface packs)."""
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


@pytest.fixture(scope="module")
def insightface_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("models") / "insightface"
    om.build_pack(d, "antelopev2")
    return d


@pytest.fixture
def node(pack, insightface_dir, monkeypatch):
    import folder_paths

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "insightface", ([str(insightface_dir)], {".onnx"}))

    def refuse(*a, **k):
        raise AssertionError(f"network access attempted: {a}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    return pack.nodes.identity.DreamIDVIdentityEncoder


class ComfyLikeVAE:
    """ComfyUI's VAE convention: encode(pixels [F, H, W, 3] 0..1) -> raw latent [1, 16, F', H/8, W/8]."""

    def __init__(self):
        self.pixels = None

    def encode(self, pixels):
        self.pixels = pixels
        x = pixels.permute(3, 0, 1, 2)[None]
        return torch.nn.functional.avg_pool3d(x, (1, 8, 8)).repeat(1, 6, 1, 1, 1)[:, :16]

    def decode(self, latent):
        raise AssertionError("not used")


def run(node, reference, **kw):
    args = dict(insightface_pack="antelopev2", provider="auto", detection_size=320, detection_threshold=0.5,
                face_selection="largest", face_index=0)
    args.update(kw)
    return node.execute(reference, **args).result


def faces_image():
    img = om.blank(320, 320)
    om.paint_faces(img, [(30, 12, 100, 2), (10, 10, 60, 1), (20, 30, 40, 3)])
    return torch.from_numpy(img).float().div(255)[None]


def test_schema(pack):
    from comfy_api.latest import io

    cls = pack.nodes.identity.DreamIDVIdentityEncoder
    assert cls in pack.nodes.identity.NODES
    schema = cls.define_schema()
    assert schema.node_id == "DreamIDVIdentityEncoder" and schema.category == "DreamID-V"
    assert all(i.tooltip for i in schema.inputs)
    names = [i.id for i in schema.inputs]
    assert names == ["reference", "insightface_pack", "provider", "detection_size", "detection_threshold",
                     "face_selection", "face_index", "similar_to", "video", "vae", "width", "height"]
    assert [o.io_type for o in schema.outputs] == ["DREAMIDV_IDENTITY", "IMAGE", "IMAGE", "DREAMIDV_FACE_EMBEDDING",
                                                   "STRING"]
    assert isinstance(schema.inputs[9], io.Vae.Input)
    cls.VALIDATE_CLASS()
    info = cls.GET_NODE_INFO_V1()  # what /object_info serves
    assert info["output"] == ["DREAMIDV_IDENTITY", "IMAGE", "IMAGE", "DREAMIDV_FACE_EMBEDDING", "STRING"]
    assert set(info["input"]["optional"]) == {"similar_to", "video", "vae"}


def test_execute_with_video_and_vae(node, pack):
    from dreamidv_core.preprocess.identity_bundle import IdentityBundle

    video = torch.rand(3, 360, 640, 3)
    vae = ComfyLikeVAE()
    bundle, preview, faces, emb, info = run(node, faces_image(), face_selection="index", face_index=0, video=video,
                                            vae=vae, width=320, height=192)
    assert info.startswith("antelopev2: scrfd_10g_bnkps.onnx + glintr100.onnx on onnxruntime") and " on CPU" in info
    assert info.endswith("3 faces found, #0 chosen (index, numbered left to right)")
    assert type(bundle).__name__ == IdentityBundle.__name__
    assert bundle.face.bbox == pytest.approx(om.face_box(80, 80, 60), abs=1e-3)  # leftmost face
    assert preview.shape == (1, 360, 640, 3) and preview.dtype == torch.float32
    assert faces.shape == (1, 320, 320, 3)
    assert emb.shape == (1, 512) and abs(float(emb.norm()) - 1) < 1e-5
    np.testing.assert_allclose(emb[0].numpy(), bundle.embedding)
    assert vae.pixels.shape[0] == 1 and float(vae.pixels.min()) >= 0  # 0..1 pixels, one frame
    assert bundle.latent.shape[:3] == (1, 16, 1) and bundle.latent_key == ((640, 360), (320, 192))
    assert torch.equal(preview[0], torch.from_numpy(bundle.letterboxed).float().div(255))


def test_execute_without_video_largest(node):
    bundle, preview, _, _, _ = run(node, faces_image())
    assert bundle.face.bbox == pytest.approx(om.face_box(240, 96, 100), abs=1e-3)
    assert bundle.latent is None and bundle.letterboxed is None
    assert preview.shape == (1, 320, 320, 3)


def test_alpha_and_greyscale(node):
    rgba = torch.cat([faces_image(), torch.ones(1, 320, 320, 1)], -1)
    assert run(node, rgba)[0].image.shape == (320, 320, 3)
    grey = torch.zeros(1, 320, 320, 1)
    grey[:, 80:88, 80:88] = 1.0
    bundle = run(node, grey)[0]
    assert bundle.image.shape == (320, 320, 3) and bundle.face is not None


def test_similar_to(node):
    other = om.blank(240, 320)
    om.paint_face(other, 25, 15, green=40, seed=3)
    bundle = run(node, faces_image(), face_selection="most similar",
                 similar_to=torch.from_numpy(other).float().div(255)[None])[0]
    assert bundle.face.bbox == pytest.approx(om.face_box(160, 240, 40), abs=1e-3)


def test_no_face_error(node):
    from dreamidv_core.errors import InputError

    with pytest.raises(InputError, match="reference image: no face found"):
        run(node, torch.zeros(1, 64, 96, 3))


def test_missing_pack_error(node, insightface_dir):
    from dreamidv_core.errors import CheckpointError

    with pytest.raises(CheckpointError) as e:
        run(node, faces_image(), insightface_pack="buffalo_l")
    msg = str(e.value)
    assert str(insightface_dir / "models" / "buffalo_l") in msg
    assert "det_10g.onnx" in msg and "w600k_r50.onnx" in msg
