"""SyncID-Pipe stages (dreamidv_core.synthesis): frames, image swap, expression adaptation, background
recomposition, ArcFace similarities and the quadruplet writer. Pure library, tiny synthetic data, no ComfyUI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dreamidv_core import synthesis as syn
from dreamidv_core.errors import InputError
from dreamidv_core.synthesis import background as bgm
from dreamidv_core.synthesis import writer as wr

H, W = 32, 48

# --------------------------------------------------------------------------- a controllable "ArcFace"
# A face is a square whose red channel is 255 (the marker) and whose green level is the identity
# (PALETTE[k]); the stand-in encoder returns a one-hot embedding of the nearest palette entry, or None
# when no marker pixel is present. Same identity: cosine 1; different identities: 0.
PALETTE = [40, 120, 200]


def encoder(images):
    out = []
    for img in images:
        face = img[..., 0] == 255
        if not face.any():
            out.append(None)
            continue
        g = img[..., 1][face].mean()
        k = int(np.argmin([abs(g - p) for p in PALETTE]))
        e = np.zeros(len(PALETTE), np.float32)
        e[k] = 1
        out.append(e)
    return out


def background(h=H, w=W):
    yy, xx = np.mgrid[0:h, 0:w]
    bg = np.stack([0.3 + 0.4 * xx / w, 0.2 + 0.5 * yy / h, 0.5 + 0.2 * np.sin(xx / 5.0)], -1)
    return torch.from_numpy(bg.astype(np.float32) * 0.9)  # red < 1: never a face marker


def clip(identity=0, frames=9, h=H, w=W, no_face=(), size=10):
    """A static background with a face square moving left to right -> (frames [F,H,W,3], mask [F,H,W], bg)."""
    bg = background(h, w)
    video = bg.expand(frames, -1, -1, -1).clone()
    mask = torch.zeros(frames, h, w)
    for i in range(frames):
        if i in no_face:
            continue
        x = 2 + round(i * (w - size - 4) / max(frames - 1, 1))
        y = h // 2 - size // 2
        video[i, y:y + size, x:x + size] = torch.tensor([1.0, PALETTE[identity] / 255.0, 0.5])
        mask[i, y:y + size, x:x + size] = 1
    return video, mask, bg


def face_image(identity=0, h=24, w=24):
    img = torch.full((1, h, w, 3), 0.5)
    img[0, 6:18, 6:18] = torch.tensor([1.0, PALETTE[identity] / 255.0, 0.5])
    return img


# --------------------------------------------------------------------------- frames
def test_first_last_frames_and_errors():
    video, _, _ = clip(frames=7)
    first, last, n = syn.first_last_frames(video)
    assert n == 7 and first.shape == (1, H, W, 3) and torch.equal(first[0], video[0]) and torch.equal(last[0], video[6])
    with pytest.raises(InputError, match="4 frames; at least 5"):
        syn.first_last_frames(video[:4])
    from dreamidv_core.synthesis.frames import check_pair

    assert check_pair(first, last) == (H, W)
    with pytest.raises(InputError, match="first frame is 48x32 but the last is 40x32"):
        check_pair(first, last[:, :, :40])


# --------------------------------------------------------------------------- recomposition
def test_recompose_formula_exact_on_binary_and_linear_on_soft_masks():
    torch.manual_seed(0)
    gen, bg = torch.rand(5, H, W, 3), torch.rand(6, H, W, 3)
    m = (torch.rand(5, H, W) > 0.5).float()
    out = syn.recompose(gen, m, bg)
    assert out.shape == (5, H, W, 3)
    assert torch.equal(out[m.bool()], gen[m.bool()]) and torch.equal(out[~m.bool()], bg[:5][~m.bool()])
    soft = torch.rand(5, H, W)
    out = syn.recompose(gen, soft, bg)
    assert torch.allclose(out, soft[..., None] * gen + (1 - soft[..., None]) * bg[:5], atol=1e-6)
    # dilation / feathering only grow the generated region: inside the binary mask still exact
    out = syn.recompose(gen, m, bg, dilation=2, feather_radius=4)
    assert torch.equal(out[m.bool()], gen[m.bool()])
    with pytest.raises(InputError, match="background clip has 3 frames"):
        syn.recompose(gen, m, bg[:3])
    with pytest.raises(InputError, match="same size"):
        syn.recompose(gen, m, bg[:, :, :40])
    with pytest.raises(InputError, match="person mask"):
        syn.recompose(gen, m[:, :, :40], bg)


def test_clean_background_removes_the_person_and_is_stable():
    video, mask, bg = clip(frames=9)
    out = syn.clean_background(video, mask, dilation=2)
    assert out.shape == video.shape and out.dtype == torch.float32
    region = bgm.person_holes(mask, 2)
    outside = ~region
    assert torch.equal(out[outside], video[outside])  # untouched outside the dilated person
    err = (out - bg).abs()[region].mean().item()
    before = (video - bg).abs()[region].mean().item()
    print(f"plate mode: person-region error {err:.4f} (before {before:.4f})")
    assert err < 0.01 and before > 0.1
    # frame-to-frame change inside the filled region
    both = region[1:] & region[:-1]
    flicker = (out[1:] - out[:-1]).abs()[both].mean().item()
    assert flicker < 0.01


def test_inpaint_mode_fills_plausibly_and_smoothing_reduces_flicker():
    video, mask, bg = clip(frames=9)
    noisy = video + 0.03 * torch.randn(video.shape, generator=torch.Generator().manual_seed(0))
    noisy = noisy.clamp(0, 0.95)
    raw = syn.clean_background(noisy, mask, dilation=1, mode="inpaint", smoothing=0.0)
    smooth = syn.clean_background(noisy, mask, dilation=1, mode="inpaint", smoothing=0.7)
    region = bgm.person_holes(mask, 1)
    err = (smooth - bg).abs()[region].mean().item()
    before = (video - bg).abs()[region].mean().item()
    both = region[1:] & region[:-1]
    f_raw = (raw[1:] - raw[:-1]).abs()[both].mean().item()
    f_smooth = (smooth[1:] - smooth[:-1]).abs()[both].mean().item()
    print(f"inpaint mode: error {err:.4f} (before {before:.4f}); flicker raw {f_raw:.4f} smoothed {f_smooth:.4f}")
    assert err < 0.1 and f_smooth < f_raw
    with pytest.raises(InputError, match="mode must be"):
        syn.clean_background(video, mask, mode="magic")
    with pytest.raises(InputError, match="person mask has 3 frames"):
        syn.clean_background(video, mask[:3])


def test_background_then_recompose_pipeline():
    real, mask_r, bg = clip(identity=0, frames=9)
    gen, mask_g, _ = clip(identity=1, frames=9)
    gen = gen * 0.5  # a generated clip with a wrong background
    vbg = syn.clean_background(real, mask_r, dilation=2)
    out = syn.recompose(gen, mask_g, vbg)
    face = mask_g.bool()
    assert torch.equal(out[face], gen[face])
    rest = ~bgm.person_holes(mask_r, 2) & ~face
    assert torch.allclose(out[rest], bg.expand_as(real)[rest], atol=1e-6)


# --------------------------------------------------------------------------- similarities
def test_identity_similarity_with_frames_lacking_faces():
    video, _, _ = clip(identity=1, frames=6, no_face=(2, 4))
    means, per = syn.identity_similarity(encoder, face_image(1), video, video)
    assert per["target"] == [1.0, 1.0, None, 1.0, None, 1.0] and means["identity_target"] == 1.0
    means, per = syn.identity_similarity(encoder, face_image(1), video, video, stride=2)
    assert per["target"] == [1.0, None, None, None, None, None]
    with pytest.raises(InputError, match="no face found by the identity encoder"):
        syn.identity_similarity(encoder, torch.full((1, 24, 24, 3), 0.5), video, video)


def test_similarity_with_tiny_onnx_arcface(tmp_path):
    pytest.importorskip("onnxruntime", reason="the face extra (onnxruntime) is not installed")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import onnx_models as om
    from dreamidv_core.preprocess.identity import FaceAnalyzer

    om.build_pack(tmp_path, "buffalo_l", extras=False)
    enc = syn.analyzer_encoder(FaceAnalyzer(tmp_path / "models" / "buffalo_l", "CPU", det_size=160))
    a, b, none = om.blank(160, 160), om.blank(160, 160), om.blank(160, 160)
    om.paint_face(a, 10, 10, green=60, seed=1)
    om.paint_face(b, 10, 10, green=60, seed=2)
    means, per = syn.identity_similarity(enc, a, np.stack([b, none]), np.stack([a, a, none]))
    assert per["target"][:2] == [1.0, 1.0] and per["target"][2] is None and per["driving"][1] is None
    assert means["identity_driving"] < 0.99


# --------------------------------------------------------------------------- expression adaptation
class FakeLandmarker:
    """A face when pixel (0, 0) is red; its shape scale is green/100, its expression blue/255."""

    def __init__(self):
        from dreamidv_core.preprocess.pose import face_geometry as fg

        rng = np.random.default_rng(0)
        self.fg, self.canonical = fg, rng.normal(size=(468, 3)) * np.array([6.0, 8.0, 3.0])

    def __call__(self, img):
        from dreamidv_core.preprocess.pose.mediapipe_face import FaceFrame

        r, g, b = (int(v) for v in img[0, 0])
        if r < 128:
            return None
        h, w = img.shape[:2]
        mesh = self.canonical * (g / 100.0)
        mesh[13, 1] -= b / 255.0
        pose = np.eye(4)
        pose[:3, 3] = [0, 0, -60]
        pts = self.fg.project(mesh, pose, w, h)
        lm = np.zeros((478, 3))
        lm[:468, 0], lm[:468, 1] = pts[:, 0] / w, pts[:, 1] / h
        lm[468:, :2] = lm[[33] * 5 + [263] * 5, :2]
        return FaceFrame(lm, mesh, pose, b / 255.0, w, h)


def test_adapt_expression_is_the_pose_retargeting_onto_ig():
    from dreamidv_core.preprocess.pose import extract_mediapipe

    frames = np.zeros((5, 64, 64, 3), np.uint8)
    frames[:, 0, 0] = [255, 100, 0]
    frames[:, 0, 0, 2] = [0, 40, 80, 120, 160]
    frames[3, 0, 0, 0] = 0  # a frame without a face: filled from a neighbour
    ig = np.zeros((1, 48, 48, 3), np.uint8)
    ig[0, 0, 0] = [255, 130, 0]  # another face shape
    lm = FakeLandmarker()
    res = syn.adapt_expression(frames, lm, ig)
    ref = extract_mediapipe(frames, lm, reference=ig[0])
    own = extract_mediapipe(frames, lm)
    assert res.pose.shape == (5, 64, 64, 3) and res.filled == [3] and "onto I_g" in res.info
    assert np.array_equal(res.pose, ref.pose) and not np.array_equal(res.pose, own.pose)
    with pytest.raises(InputError, match="identity image I_g: no face"):
        syn.adapt_expression(frames, lm, np.zeros((48, 48, 3), np.uint8))


# --------------------------------------------------------------------------- image swap
def test_swap_image_keeps_size_and_matches_frame_zero_of_the_still_clip(tiny_swap_models):
    from dreamidv_core.pipelines.swap import SwapSettings, swap_face

    dit, vae = tiny_swap_models
    torch.manual_seed(0)
    image, mask = torch.rand(1, 36, 52, 3), (torch.rand(1, 36, 52) > 0.5).float()
    pose, ref = torch.rand(1, 36, 52, 3), torch.rand(24, 24, 3)
    ctx = torch.randn(6, 48)
    s = SwapSettings(width=48, height=32, steps=2, window=5, overlap=4)
    out = syn.swap_image(dit, vae, image, mask, ref, ctx, pose=pose, settings=s)
    assert out.shape == (1, 36, 52, 3) and 0 <= out.min() and out.max() <= 1
    still = swap_face(dit, vae, image.expand(5, -1, -1, -1), mask.expand(5, -1, -1), ref, ctx,
                      pose=pose.expand(5, -1, -1, -1), settings=s).frames
    from dreamidv_core.preprocess.geometry import paste_back, source_crop_box

    assert torch.allclose(out, paste_back(image, still[:1], source_crop_box(36, 52, 48, 32)), atol=1e-5)
    with pytest.raises(InputError, match="mask is 40x36 but the image is 52x36"):
        syn.swap_image(dit, vae, image, mask[:, :, :40], ref, ctx, pose=pose, settings=s)


# --------------------------------------------------------------------------- writer
def pipeline_outputs(frames=9, no_face=()):
    real, mask_r, _ = clip(identity=0, frames=frames, no_face=no_face)
    gen, mask_g, _ = clip(identity=1, frames=frames, no_face=no_face)
    pose_r = torch.zeros(frames, H, W, 3)
    pose_r[:, ::4, ::4] = 1
    return dict(real_video=real, generated=gen, generated_identity=face_image(1), encoder=encoder,
                forward_mask=mask_r, forward_pose=pose_r, backward_mask=mask_g, backward_pose=pose_r * 0.5,
                real_identity=face_image(0))


def test_writer_layout_semantics_and_loading(tmp_path):
    from training.dataset import DreamIDVDataset, scan_dataset
    from dreamidv_core.io.video import read_image, read_video

    kw = pipeline_outputs()
    reports = syn.write_quadruplet(tmp_path, "clip_0001", **kw)
    assert [(r.name, r.status) for r in reports] == [("clip_0001_forward", "written"), ("clip_0001_backward", "written")]
    infos = scan_dataset(tmp_path)
    assert [(i.name, i.direction, i.frames, i.width, i.height, i.pose_source) for i in infos] == [
        ("clip_0001_backward", "backward", 9, W, H, "video"), ("clip_0001_forward", "forward", 9, W, H, "video")]
    fwd, bwd = tmp_path / "clip_0001_forward", tmp_path / "clip_0001_backward"
    # forward: identity I_g, driving V_r (real), target V_g; backward: identity of A, driving V_g, target V_r
    assert np.abs(read_video(fwd / "driving.mp4")[0] / 255.0 - kw["real_video"].numpy()).mean() < 0.03
    assert np.abs(read_video(fwd / "target.mp4")[0] / 255.0 - kw["generated"].numpy()).mean() < 0.03
    assert np.abs(read_video(bwd / "driving.mp4")[0] / 255.0 - kw["generated"].numpy()).mean() < 0.03
    assert np.abs(read_video(bwd / "target.mp4")[0] / 255.0 - kw["real_video"].numpy()).mean() < 0.03
    assert np.abs(read_video(fwd / "mask.mp4")[0][..., 0] / 255.0 - kw["forward_mask"].numpy()).mean() < 0.03
    assert np.abs(read_video(bwd / "mask.mp4")[0][..., 0] / 255.0 - kw["backward_mask"].numpy()).mean() < 0.03
    assert np.array_equal(read_image(fwd / "identity.png"), (kw["generated_identity"][0].numpy() * 255).round())
    assert np.array_equal(read_image(bwd / "identity.png"), (kw["real_identity"][0].numpy() * 255).round())
    rec = json.loads((fwd / "record.json").read_text())
    assert rec["direction"] == "forward" and rec["frames"] == 9 and rec["identity_similarity"] == {
        "identity_target": 1.0, "identity_driving": 0.0}
    assert len(rec["identity_per_frame"]["target"]) == 9
    ds = DreamIDVDataset(tmp_path, width=W, height=H, frames=5)
    item = ds[1]
    assert item["direction"] == "forward" and item["video"].shape == (3, 5, H, W) and "pose" in item
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_writer_rejection_thresholds(tmp_path):
    kw = pipeline_outputs()
    # the "generated" clip shows identity 0 (= the real person): forward target does not show I_g
    kw["generated"] = kw["real_video"]
    reports = syn.write_quadruplet(tmp_path, "bad", **kw)
    status = {r.direction: (r.status, r.reason) for r in reports}
    assert status["forward"][0] == "rejected" and "identity_target 0.000 < min 0.300" in status["forward"][1]
    assert status["backward"][0] == "rejected" and "identity_driving 1.000 > max 0.500" in status["backward"][1]
    assert not tmp_path.exists() or not any(tmp_path.iterdir())
    # thresholds off: written (the target of each still shows the identity)
    s = syn.QuadrupletSettings(min_identity_target=None, max_identity_driving=None)
    reports = syn.write_quadruplet(tmp_path, "bad", **kw, settings=s)
    assert [r.status for r in reports] == ["written", "written"]
    rec = json.loads((tmp_path / "bad_forward" / "record.json").read_text())
    assert rec["identity_similarity"]["identity_target"] == 0.0 and rec["thresholds"]["min_identity_target"] is None


def test_writer_resume_skips_existing_samples(tmp_path, monkeypatch):
    kw = pipeline_outputs()
    syn.write_quadruplet(tmp_path, "c1", **kw, settings=syn.QuadrupletSettings(directions=("forward",)))
    stamp = (tmp_path / "c1_forward" / "record.json").stat().st_mtime_ns
    calls = []
    real_write = wr._write_sample
    monkeypatch.setattr(wr, "_write_sample", lambda *a, **k: calls.append(a[1]) or real_write(*a, **k))
    reports = syn.write_quadruplet(tmp_path, "c1", **kw)
    assert [(r.name, r.status) for r in reports] == [("c1_forward", "skipped"), ("c1_backward", "written")]
    assert calls == ["c1_backward"] and (tmp_path / "c1_forward" / "record.json").stat().st_mtime_ns == stamp
    reports = syn.write_quadruplet(tmp_path, "c1", **kw)
    assert [r.status for r in reports] == ["skipped", "skipped"] and len(calls) == 1
    # a visible folder that is not a complete sample is not silently overwritten
    (tmp_path / "c2_forward").mkdir()
    with pytest.raises(InputError, match="c2_forward exists but is not a complete sample"):
        syn.write_quadruplet(tmp_path, "c2", **kw)


def test_writer_crash_leaves_no_visible_sample(tmp_path, monkeypatch):
    from training.dataset import scan_dataset

    kw = pipeline_outputs()
    real = wr.write_video

    def crash(path, frames, fps, crf=18):
        if path.name == "target.mp4":
            raise RuntimeError("simulated crash")
        real(path, frames, fps, crf=crf)

    monkeypatch.setattr(wr, "write_video", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        syn.write_quadruplet(tmp_path, "c1", **kw)
    assert list(tmp_path.iterdir()) == []  # the temporary folder was removed
    # a hard crash (no cleanup): a hidden partial folder, ignored by scan_dataset, cleaned by the next run
    monkeypatch.setattr(wr, "write_video", real)
    partial = tmp_path / f"{wr.TMP_PREFIX}c1_forward-1234-abcd"
    partial.mkdir()
    (partial / "driving.mp4").write_bytes(b"half")
    syn.write_quadruplet(tmp_path, "c0", **kw, settings=syn.QuadrupletSettings(directions=("forward",)))
    assert [i.name for i in scan_dataset(tmp_path)] == ["c0_forward"] and partial.exists()
    syn.write_quadruplet(tmp_path, "c1", **kw)
    assert not partial.exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        "c0_forward", "c1_backward", "c1_forward"]


def test_writer_clip_with_frames_lacking_faces(tmp_path):
    from training.dataset import scan_dataset

    kw = pipeline_outputs(no_face=(1, 5))
    reports = syn.write_quadruplet(tmp_path, "gaps", **kw)
    assert [r.status for r in reports] == ["written", "written"]
    rec = json.loads((tmp_path / "gaps_forward" / "record.json").read_text())
    per = rec["identity_per_frame"]["target"]
    assert per[1] is None and per[5] is None and per[0] == 1.0 and rec["identity_similarity"]["identity_target"] == 1.0
    assert len(scan_dataset(tmp_path)) == 2
    # no face in any target frame: rejected, not written
    kw = pipeline_outputs(no_face=tuple(range(9)))
    reports = syn.write_quadruplet(tmp_path / "none", "x", **kw)
    assert all(r.status == "rejected" and "no face found in any measured target frame" in r.reason for r in reports)


def test_writer_bad_inputs(tmp_path):
    kw = pipeline_outputs()
    with pytest.raises(InputError, match="generated clip has 4 frames; at least 5"):
        syn.write_quadruplet(tmp_path, "a", **{**kw, "generated": kw["generated"][:4]})
    with pytest.raises(InputError, match="real clip is 40x32 but the generated clip is 48x32"):
        syn.write_quadruplet(tmp_path, "a", **{**kw, "real_video": kw["real_video"][:, :, :40]})
    with pytest.raises(InputError, match="real clip has 6 frames"):
        syn.write_quadruplet(tmp_path, "a", **{**kw, "real_video": kw["real_video"][:6]})
    with pytest.raises(InputError, match="identity I_g.*no face"):
        syn.write_quadruplet(tmp_path, "a", **{**kw, "generated_identity": torch.full((1, 24, 24, 3), 0.5)})
    with pytest.raises(InputError, match="connect both or neither"):
        syn.write_quadruplet(tmp_path, "a", **{**kw, "backward_pose": None})
    with pytest.raises(InputError, match="backward_mask"):
        syn.write_quadruplet(tmp_path, "a", **{**kw, "backward_mask": None})
    with pytest.raises(InputError, match="prefix"):
        syn.write_quadruplet(tmp_path, "../evil", **kw)
    with pytest.raises(InputError, match="even width and height"):
        syn.write_quadruplet(tmp_path, "a", **{k: (v[:, :, :47] if k in ("real_video", "generated", "forward_mask",
                                                                        "backward_mask", "forward_pose", "backward_pose")
                                                   else v) for k, v in kw.items()})
    assert not any(tmp_path.iterdir())
