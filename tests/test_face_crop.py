"""Face-crop mode (dreamidv_core.preprocess.face_crop and the plan, FrameSource and swap that use it): windows
at the model's aspect ratio around the face, smoothed, inside the frame; the paste back is bit-exact outside
the window and on frames without a face; faces at the border; windows (long clips), background strength and
the SAM 2 composite's blend on top."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dreamidv_core.errors import InputError
from dreamidv_core.pipelines.adapters import PoseTokenSet
from dreamidv_core.pipelines.clip_stream import FrameSource
from dreamidv_core.pipelines.plan import ClipPlan, face_crop_plan
from dreamidv_core.pipelines.swap import SwapSettings, swap_face
from dreamidv_core.preprocess import face_crop as fc


def moving_face_masks(count=12, h=90, w=160, size=16, x0=10, step=10, y=30):
    """[F, H, W] float masks of a size x size face moving right by ``step`` px per frame."""
    masks = np.zeros((count, h, w), np.float32)
    for i in range(count):
        masks[i, y:y + size, x0 + step * i:x0 + step * i + size] = 1
    return masks


def outside(region, h, w):
    x0, y0, x1, y1 = region
    m = torch.ones(h, w, dtype=torch.bool)
    m[y0:y1, x0:x1] = False
    return m


# ----------------------------------------------------------------------------- the track
def test_windows_have_the_model_aspect_hold_the_face_with_margin_and_stay_inside():
    masks = moving_face_masks()
    boxes = fc.mask_face_boxes(masks)
    assert np.array_equal(boxes[0], [10, 30, 26, 46])
    track = fc.plan_crop_track(boxes, (160, 90), (48, 64), margin=1.0)
    assert len(track) == 12 and all(track.present) and track.aspect == pytest.approx(64 / 48)
    for (left, top, w, h), face in zip(track.boxes, boxes):
        assert w / h == pytest.approx(64 / 48)
        assert h == pytest.approx(16 * 3)  # the face plus one face size above and below
        assert 0 <= left and left + w <= 160 and 0 <= top and top + h <= 90  # clamped, never padded
        assert left <= face[0] and face[2] <= left + w and top <= face[1] and face[3] <= top + h
    # steady motion is followed without lag where the window is not held by the border
    centres = np.array([b[0] + b[2] / 2 for b in track.boxes])
    face_centres = (boxes[:, 0] + boxes[:, 2]) / 2
    free = [i for i, b in enumerate(track.boxes) if 0 < b[0] and b[0] + b[2] < 160]
    assert len(free) >= 6 and np.abs(centres[free] - face_centres[free]).max() < 1e-6


def test_smoothing_removes_detector_jitter():
    rng = np.random.default_rng(0)
    count = 60
    true = np.stack([np.linspace(300, 420, count), np.full(count, 200.0)], 1)  # a slow pan
    noisy = true + rng.normal(0, 3, (count, 2))
    sizes = 80 + rng.normal(0, 3, count)
    boxes = np.concatenate([noisy - sizes[:, None] / 2, noisy + sizes[:, None] / 2], 1)
    raw = fc.plan_crop_track(boxes, (1280, 720), (480, 832), smoothing=0)
    smooth = fc.plan_crop_track(boxes, (1280, 720), (480, 832))
    j_raw, j_smooth = fc.box_jitter(np.array(raw.boxes)), fc.box_jitter(np.array(smooth.boxes))
    assert j_raw > 10 and j_smooth < j_raw / 8, (j_raw, j_smooth)
    centre = np.array([[b[0] + b[2] / 2, b[1] + b[3] / 2] for b in smooth.boxes])
    assert np.abs(centre - true).max() < 6  # and it still follows the face
    assert "jitter" in smooth.describe()
    assert fc.box_jitter(np.array([[0, 0, 10, 10], [1, 0, 10, 10], [2, 0, 10, 10]])) == 0  # steady motion


def test_frames_without_face_get_interpolated_windows_and_are_not_pasted():
    masks = moving_face_masks()
    masks[5] = 0
    masks[:2] = 0
    track = fc.plan_crop_track(fc.mask_face_boxes(masks), (160, 90), (48, 64))
    assert track.present == (False, False) + (True,) * 3 + (False,) + (True,) * 6
    assert track.boxes[0] == track.boxes[2]  # held at the start
    assert track.boxes[5][0] == pytest.approx((track.boxes[4][0] + track.boxes[6][0]) / 2)
    with pytest.raises(InputError, match="face crop: the mask is empty in all 3 frames"):
        fc.plan_crop_track(np.full((3, 4), np.nan), (160, 90), (48, 64))
    with pytest.raises(InputError, match="crop_margin must be 0 or more"):
        fc.plan_crop_track(fc.mask_face_boxes(masks), (160, 90), (48, 64), margin=-1)


def test_a_cut_is_not_smoothed_across():
    masks = moving_face_masks(count=20, step=0)
    masks[10:] = 0
    masks[10:, 40:60, 120:140] = 1  # the face jumps to the other side
    track = fc.plan_crop_track(fc.mask_face_boxes(masks), (160, 90), (48, 64), margin=0.5)
    assert track.boxes[9] == pytest.approx(track.boxes[0]) and track.boxes[10] == pytest.approx(track.boxes[19])
    assert track.boxes[10][0] > track.boxes[9][0] + 50


def test_face_at_the_border_and_oversized_faces():
    h, w = 90, 160
    masks = np.zeros((6, h, w), np.float32)
    masks[:, 0:20, 140:160] = 1  # top right corner
    track = fc.plan_crop_track(fc.mask_face_boxes(masks), (w, h), (48, 64))
    left, top, bw, bh = track.boxes[0]
    assert top == 0 and left + bw == pytest.approx(160) and bh == pytest.approx(60)
    big = np.zeros((6, h, w), np.float32)
    big[:, 5:85, 40:120] = 1  # the face needs a window larger than the frame: limited to the frame
    track = fc.plan_crop_track(fc.mask_face_boxes(big), (w, h), (48, 64))
    assert track.boxes[0][3] == pytest.approx(90) and track.boxes[0][2] == pytest.approx(120)


# ----------------------------------------------------------------------------- crop and paste
def test_paste_is_bit_exact_outside_the_window_and_on_absent_frames():
    masks = moving_face_masks(count=8)
    masks[3] = 0
    track = fc.plan_crop_track(fc.mask_face_boxes(masks), (160, 90), (48, 64))
    g = torch.Generator().manual_seed(0)
    source = torch.rand(8, 90, 160, 3, generator=g)
    generated = torch.full((8, 48, 64, 3), 0.25)
    out = fc.paste_crops(source, generated, track)
    for i in range(8):
        if i == 3:
            assert torch.equal(out[i], source[i])
            continue
        x0, y0, x1, y1 = track.region(i)
        keep = outside(track.region(i), 90, 160)
        assert torch.equal(out[i][keep], source[i][keep]) and not torch.equal(out[i], source[i])
        left, top, bw, bh = track.boxes[i]
        feather = int(np.ceil(track.feather * bh)) + 2
        inner = out[i, int(top) + feather:int(top + bh) - feather, int(left) + feather:int(left + bw) - feather]
        assert torch.allclose(inner, torch.tensor(0.25), atol=1e-6)  # the window's interior is the model's


def test_border_window_has_no_feather_along_the_frame_edge():
    h, w = 90, 160
    masks = np.zeros((3, h, w), np.float32)
    masks[:, 0:20, 140:160] = 1
    track = fc.plan_crop_track(fc.mask_face_boxes(masks), (w, h), (48, 64))
    source = torch.zeros(3, h, w, 3)
    out = fc.paste_crops(source, torch.ones(3, 48, 64, 3), track)
    assert torch.all(out[:, 0, 150:] == 1) and torch.all(out[:, :5, w - 1] == 1)  # the corner itself is swapped
    left = int(np.floor(track.boxes[0][0]))
    assert torch.all(out[:, 10, left] < 0.05)  # the inner edge is feathered


def test_crop_then_paste_round_trip_is_aligned():
    """Cropping the source with the windows and pasting the crops back gives the source again (up to
    resampling blur): the sub-pixel geometry of crop and paste agree."""
    yy, xx = np.mgrid[0:90, 0:160]
    img = (127 + 60 * np.sin(xx / 9.0) + 60 * np.cos(yy / 7.0)).astype(np.uint8)
    video = np.repeat(np.stack([img] * 3, -1)[None], 4, 0)
    masks = moving_face_masks(count=4, step=7, x0=33)
    track = fc.plan_crop_track(fc.mask_face_boxes(masks), (160, 90), (96, 128), margin=0.8)
    assert any(b[0] % 1 for b in track.boxes)  # sub-pixel windows
    crops = fc.prepare_crops(video, track, 0, 4, (96, 128), "video").permute(1, 2, 3, 0)
    src = torch.from_numpy(video).float() / 255
    out = fc.paste_crops(src, crops, track)
    for i in range(4):
        left, top, bw, bh = track.boxes[i]
        f = int(np.ceil(track.feather * bh)) + 2
        a = out[i, int(top) + f:int(top + bh) - f, int(left) + f:int(left + bw) - f]
        b = src[i, int(top) + f:int(top + bh) - f, int(left) + f:int(left + bw) - f]
        assert (a - b).abs().mean() < 0.01, (a - b).abs().mean()


# ----------------------------------------------------------------------------- plan, frame source, swap
def test_plan_frame_source_and_pose_token_check():
    masks = torch.from_numpy(moving_face_masks(count=13))
    plan = face_crop_plan(masks, 160, 90, 13, None, 64, 48, 9, 4)
    assert plan.size == (48, 64) and plan.reference_size == (64, 48) and plan.tokens_per_latent_frame == 12
    video = torch.rand(13, 90, 160, 3)
    src = FrameSource(video, plan, "video")
    chunk = src(0, 17)  # padded to 4n+1 with the last frame's window
    assert chunk.shape == (3, 17, 48, 64) and torch.equal(chunk[:, 16], chunk[:, 12])
    whole = ClipPlan.build(160, 90, 13, None, 64, 48, 9, 4)
    tokens = PoseTokenSet(torch.zeros(1, 1, 1), whole, "m")
    with pytest.raises(InputError, match="face crop off \\(the sampler's is on\\)"):
        tokens.check(plan, "m")
    other = face_crop_plan(masks, 160, 90, 13, None, 64, 48, 9, 4, margin=0.5)
    with pytest.raises(InputError, match="another face-crop track"):
        PoseTokenSet(torch.zeros(1, 1, 1), other, "m").check(plan, "m")
    PoseTokenSet(torch.zeros(1, 1, 1), face_crop_plan(masks, 160, 90, 13, None, 64, 48, 9, 4), "m").check(plan, "m")
    with pytest.raises(InputError, match="made for 160x90 frames, the video is 100x90"):
        ClipPlan.build(100, 90, 13, None, 64, 48, track=plan.track)
    with pytest.raises(InputError, match="aspect ratio"):
        ClipPlan.build(160, 90, 13, None, 64, 32, track=plan.track)


def test_whole_frame_paste_back_passes_absent_frames_through():
    plan = ClipPlan.build(72, 40, 5, None, 64, 32)
    source = torch.rand(5, 40, 72, 3)
    out = plan.paste_back(source, torch.zeros(5, *plan.size, 3), present=[True, False, True, True, False])
    assert torch.equal(out[1], source[1]) and torch.equal(out[4], source[4]) and not torch.equal(out[0], source[0])


def test_tiny_swap_in_face_crop_mode_over_windows(tiny_swap_models, one_thread):
    """13 frames in windows of 9 (overlap 4) with background strength: the swap runs on the face windows and
    pasting back leaves everything outside them, and the absent frame, exactly the source's."""
    dit, vae = tiny_swap_models
    count, h, w = 13, 72, 120
    rng = np.random.default_rng(1)
    video = rng.integers(0, 256, (count, h, w, 3), dtype=np.uint8)
    masks = moving_face_masks(count=count, h=h, w=w, size=12, x0=8, step=6, y=20)
    masks[6] = 0
    pose = np.zeros((count, h, w, 3), np.uint8)
    ref = rng.integers(0, 256, (30, 20, 3), dtype=np.uint8)
    settings = SwapSettings(width=32, height=32, steps=2, window=9, overlap=4, background_strength=0.5)
    plan = face_crop_plan(masks, w, h, count, None, 32, 32, 9, 4)
    assert plan.layout.count == 2
    ctx = torch.randn(5, dit.cfg.text_dim)
    result = swap_face(dit, vae, video, masks, ref, ctx, pose=pose, settings=settings, plan=plan)
    assert result.frames.shape == (count, 32, 32, 3) and torch.isfinite(result.frames).all()
    source = torch.from_numpy(video).float() / 255
    out = plan.paste_back(source, result.frames)
    assert out.shape == (count, h, w, 3)
    assert torch.equal(out[6], source[6])
    for i in (0, 7, 12):
        keep = outside(plan.track.region(i), h, w)
        assert torch.equal(out[i][keep], source[i][keep]) and not torch.equal(out[i], source[i])
    # the SAM 2 composite's blend on top keeps the source wherever its mask is 0 (it lerps exactly)
    from dreamidv_core.preprocess.composite import composite_video

    blended, _ = composite_video(source, out, torch.from_numpy(masks), None, dilation=2, feather_radius=4)
    keep = outside(plan.track.region(0), h, w)
    assert torch.equal(blended[0][keep], source[0][keep])
