"""SyncID-Pipe nodes (nodes/synthesis.py) in-process on tiny models: schemas, first/last frames, image face
swap (pass-through and DreamID-V on a tiny random model), expression adaptation (fake landmarker), background
recomposition (with and without a tiny random SAM2), and the quadruplet writer with a tiny ONNX ArcFace pack."""
from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dreamidv_core.errors import CheckpointError, InputError  # noqa: E402

H, W = 32, 48


@pytest.fixture(scope="module")
def mod(pack):
    return importlib.import_module(f"{pack.__name__}.nodes.synthesis")


def test_schemas(mod):
    ids = []
    for node in mod.NODES:
        schema = node.define_schema()
        schema.validate()
        assert schema.category == "DreamID-V" and schema.node_id.startswith("DreamIDV")
        assert all(i.tooltip for i in schema.inputs), schema.node_id
        ids.append(schema.node_id)
    assert ids == ["DreamIDVFirstLastFrames", "DreamIDVImageFaceSwap", "DreamIDVExpressionAdaptation",
                   "DreamIDVBackgroundRecompose", "DreamIDVQuadrupletWriter"]
    assert mod.DreamIDVQuadrupletWriter.define_schema().is_output_node


def test_first_last_frames(mod):
    frames, mask, pose = torch.rand(6, H, W, 3), torch.rand(6, H, W), torch.rand(6, H, W, 3)
    first, last, n, m0, m1, p0, p1 = mod.DreamIDVFirstLastFrames.execute(frames, mask, pose).result
    assert n == 6 and torch.equal(first[0], frames[0]) and torch.equal(last[0], frames[5])
    assert torch.equal(m1[0], mask[5]) and torch.equal(p0[0], pose[0])
    first, last, n, m0, m1, p0, p1 = mod.DreamIDVFirstLastFrames.execute(frames).result
    assert m0.shape == (1, H, W) and not m0.any() and p1.shape == (1, H, W, 3)
    with pytest.raises(InputError, match="4 frames; at least 5"):
        mod.DreamIDVFirstLastFrames.execute(frames[:4])
    with pytest.raises(InputError, match="mask is"):
        mod.DreamIDVFirstLastFrames.execute(frames, mask[:5])


def test_image_swap_pass_through_and_errors(mod):
    img, other = torch.rand(1, H, W, 3), torch.rand(1, H, W, 3)
    (out,) = mod.DreamIDVImageFaceSwap.execute(img, swapped=other).result
    assert torch.equal(out, other)
    with pytest.raises(InputError, match="swapped is .* frame's size"):
        mod.DreamIDVImageFaceSwap.execute(img, swapped=other[:, :, :40])
    with pytest.raises(InputError, match="model, vae, positive, identity, mask: connect them"):
        mod.DreamIDVImageFaceSwap.execute(img)


class ComfyLikeVAE:
    """dreamidv_core's WanVAE behind ComfyUI's VAE convention (pixels 0..1 [F,H,W,3], raw latents)."""

    def __init__(self, vae):
        self.vae = vae

    def encode(self, pixels):
        from dreamidv_core.pipelines.adapters import denormalise_latent

        return denormalise_latent(self.vae.encode(pixels.permute(3, 0, 1, 2)[None] * 2 - 1))

    def decode(self, raw):
        from dreamidv_core.pipelines.adapters import normalise_latent

        return self.vae.decode(normalise_latent(raw)).add(1).div(2).permute(0, 2, 3, 4, 1)


def test_image_swap_with_dreamidv(mod, tiny_swap_models):
    from dreamidv_core.preprocess.identity_bundle import IdentityBundle

    dit, vae = tiny_swap_models
    model = SimpleNamespace(dit=dit, load=lambda *a: None, release=lambda: None, key="tiny", name="tiny")
    torch.manual_seed(0)
    img, mask, pose = torch.rand(2, H, W, 3), (torch.rand(2, H, W) > 0.5).float(), torch.rand(2, H, W, 3)
    ident = IdentityBundle(image=(np.random.default_rng(0).random((24, 24, 3)) * 255).astype(np.uint8))
    positive = [[torch.randn(1, 6, 48), {}]]
    (out,) = mod.DreamIDVImageFaceSwap.execute(img, model=model, vae=ComfyLikeVAE(vae), positive=positive,
                                               identity=ident, mask=mask, pose=pose, width=48, height=32,
                                               steps=2).result
    assert out.shape == (2, H, W, 3) and 0 <= out.min() and out.max() <= 1 and not torch.allclose(out, img)
    with pytest.raises(InputError, match="full DreamID-V model needs the frame's pose"):
        mod.DreamIDVImageFaceSwap.execute(img, model=model, vae=ComfyLikeVAE(vae), positive=positive,
                                          identity=ident, mask=mask)


def test_expression_adaptation_node(mod, monkeypatch, tmp_path):
    import folder_paths
    import dreamidv_core.preprocess.pose.mediapipe_face as mpf
    from test_synthesis import FakeLandmarker

    class Fake(FakeLandmarker):
        def __init__(self, path):
            super().__init__()

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(mpf, "FaceLandmarker", Fake)
    (tmp_path / "face_landmarker_v2_with_blendshapes.task").write_bytes(b"fake")
    folder_paths.add_model_folder_path("mediapipe", str(tmp_path))
    frames = torch.zeros(5, 64, 64, 3)
    frames[:, 0, 0] = torch.tensor([1.0, 100 / 255, 0.0])
    ig = torch.zeros(1, 48, 48, 3)
    ig[0, 0, 0] = torch.tensor([1.0, 130 / 255, 0.0])
    pose, mask, kps, info = mod.DreamIDVExpressionAdaptation.execute(frames, ig).result
    assert pose.shape == (5, 64, 64, 3) and mask.shape == (5, 64, 64) and len(kps) == 5 and "onto I_g" in info
    with pytest.raises(InputError, match="identity image I_g: no face"):
        mod.DreamIDVExpressionAdaptation.execute(frames, torch.zeros(1, 48, 48, 3))
    with pytest.raises(CheckpointError, match="mediapipe"):
        mod.DreamIDVExpressionAdaptation.execute(frames, ig, mediapipe_model="missing.task")


def _moving_square(frames=6, colour=(0.9, 0.1, 0.1)):
    from test_synthesis import background

    bg = background(40, 56)
    video = bg.expand(frames, -1, -1, -1).clone()
    mask = torch.zeros(frames, 40, 56)
    for i in range(frames):
        x = 4 + 6 * i
        video[i, 12:26, x:x + 12] = torch.tensor(colour)
        mask[i, 12:26, x:x + 12] = 1
    return video, mask, bg


def test_background_recompose_node(mod):
    real, m_r, bg = _moving_square()
    gen, m_g, _ = _moving_square(colour=(0.1, 0.9, 0.1))
    out, vbg, m_used = mod.DreamIDVBackgroundRecompose.execute(real, m_r, gen, m_g, removal_dilation=2).result
    assert out.shape == real.shape and torch.equal(m_used, m_g)
    assert torch.equal(out[m_g.bool()], gen[m_g.bool()])
    assert (vbg - bg).abs()[m_r.bool()].mean() < 0.01
    with pytest.raises(InputError, match="generated_mask is"):
        mod.DreamIDVBackgroundRecompose.execute(real, m_r, gen, m_g[:3])


def test_background_recompose_with_tiny_sam2(mod, tmp_path):
    pytest.importorskip("sam2.sam2_video_predictor", reason="the sam2 package is not installed")
    import folder_paths
    from omegaconf import OmegaConf
    from dreamidv_core.preprocess import segmentation as S

    tiny = "configs/sam2.1/sam2.1_hiera_t.yaml"
    predictor = S.build_video_predictor(S.resolve_config(tiny), None, "cpu", image_size=128)
    torch.save({"model": predictor.state_dict()}, tmp_path / "sam2.1_hiera_tiny.pt")
    cfg = OmegaConf.load(str(S.resolve_config(tiny)))
    cfg.model.image_size = 128
    OmegaConf.save(cfg, str(tmp_path / "tiny128.yaml"))
    saved = folder_paths.folder_names_and_paths["sam2"]
    folder_paths.folder_names_and_paths["sam2"] = ([str(tmp_path)], set(saved[1]))
    try:
        real, m_r, _ = _moving_square(frames=2)
        gen, m_g, _ = _moving_square(frames=2, colour=(0.1, 0.9, 0.1))
        out, vbg, m_used = mod.DreamIDVBackgroundRecompose.execute(
            real, m_r, gen, m_g, "sam2.1_hiera_tiny.pt", "tiny128.yaml", prompt_frames=1, removal_dilation=2,
            device="cpu").result
    finally:
        folder_paths.folder_names_and_paths["sam2"] = saved
    assert out.shape == real.shape and torch.all(m_used >= m_g)  # SAM2 grows the masks, never shrinks them
    assert torch.equal(out[m_g.bool()], gen[m_g.bool()])


# ------------------------------------------------------------------------------------------- writer
@pytest.fixture(scope="module")
def insightface_root(tmp_path_factory):
    pytest.importorskip("onnxruntime", reason="the face extra (onnxruntime) is not installed")
    import onnx_models as om

    d = tmp_path_factory.mktemp("insightface")
    om.build_pack(d, "buffalo_l", extras=False)
    return d


def _face_clip(seed, frames=5, size=128, no_face=()):
    import onnx_models as om

    out = []
    for i in range(frames):
        img = om.blank(size, size) + 40
        if i not in no_face:
            om.paint_face(img, 8, 8, green=60, seed=seed)
        out.append(img)
    return torch.from_numpy(np.stack(out)).float() / 255


def test_quadruplet_writer_node(mod, insightface_root, tmp_path):
    import folder_paths
    from training.dataset import scan_dataset

    folder_paths.add_model_folder_path("insightface", str(insightface_root))
    real, gen = _face_clip(1, no_face=(3,)), _face_clip(2)
    ig, ir = _face_clip(2, frames=1), _face_clip(1, frames=1)
    mask = torch.zeros(5, 128, 128)
    mask[:, 40:90, 40:90] = 1
    args = dict(dataset_folder=str(tmp_path / "ds"), sample_prefix="clip_0001", real_frames=real, generated=gen,
                identity_image=ig, forward_mask=mask, backward_mask=mask, real_identity=ir,
                max_identity_driving=1.0, insightface_pack="buffalo_l", detection_size=128)
    text, written = mod.DreamIDVQuadrupletWriter.execute(**args).result
    print(text)
    assert written == 2 and "2 written" in text
    infos = scan_dataset(tmp_path / "ds")
    assert [i.direction for i in infos] == ["backward", "forward"] and all(i.pose_source is None for i in infos)
    rec = json.loads((tmp_path / "ds" / "clip_0001_backward" / "record.json").read_text())
    assert rec["identity_per_frame"]["target"][3] is None and rec["identity_similarity"]["identity_target"] > 0.99
    text, written = mod.DreamIDVQuadrupletWriter.execute(**args).result
    assert written == 0 and "2 skipped" in text
    # thresholds: I_g is the real person -> the forward target (V_g) does not show it -> rejected
    text, written = mod.DreamIDVQuadrupletWriter.execute(**{**args, "sample_prefix": "bad", "identity_image": ir,
                                                            "directions": "forward", "min_identity_target": 0.9}).result
    assert written == 0 and "rejected" in text and "identity_target" in text
    assert not (tmp_path / "ds" / "bad_forward").exists()
    with pytest.raises(InputError, match="I_g.*no face"):
        mod.DreamIDVQuadrupletWriter.execute(**{**args, "sample_prefix": "noface",
                                                "identity_image": torch.full((1, 128, 128, 3), 0.2)})
    with pytest.raises(InputError, match="at least 5"):
        mod.DreamIDVQuadrupletWriter.execute(**{**args, "sample_prefix": "short", "generated": gen[:4]})
    assert mod.dataset_root("rel").parent == Path(folder_paths.get_output_directory())
