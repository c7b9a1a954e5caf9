"""Pose extraction: renderers against hand-computed images, POSE_KEYPOINT parsing, gap filling,
retargeting math, DWPose end-to-end on tiny ONNX models, the node, and (optional) real MediaPipe."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dreamidv_core.errors import CheckpointError, InputError
from dreamidv_core.preprocess.pose import extract_dwpose, extract_keypoints, fill_gaps, render
from dreamidv_core.preprocess.pose import face_geometry as fg
from dreamidv_core.preprocess.pose.dwpose import DWPose, decode_simcc, nms
from dreamidv_core.preprocess.pose.keypoints import parse_pose_keypoints
from dreamidv_core.preprocess.pose.landmark_sets import COLORS, CORE_POINTS, FACE_OVAL

from onnx_pose_models import dwpose_model, yolox_model


def _disc(h, w, cx, cy, r):
    yy, xx = np.mgrid[:h, :w]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


# ----------------------------------------------------------------------------- renderers
def test_face_point_is_radius_2_disc_at_truncated_pixel():
    img = render.draw_face_points(np.array([[5.9, 7.2]]), 16, 12, indices=[0])
    assert img.shape == (16, 12, 3) and img.dtype == np.uint8
    assert np.array_equal(img[..., 0] == 255, _disc(16, 12, 5, 7, 2))
    assert (img[..., 0] == img[..., 2]).all() and set(np.unique(img)) == {0, 255}


def test_core_point_set():
    assert len(FACE_OVAL) == 36 and set(FACE_OVAL) <= set(CORE_POINTS)
    assert 468 in CORE_POINTS and 473 in CORE_POINTS and len(CORE_POINTS) == len(set(CORE_POINTS))
    assert 120 < len(CORE_POINTS) < 170


def test_face_oval_mask_is_filled_square():
    pts = np.array([[10.0, 10.0], [30.0, 10.0], [30.0, 30.0], [10.0, 30.0]])
    mask = render.face_oval_mask(pts, 40, 50, indices=[0, 1, 2, 3])
    want = np.zeros((40, 50), np.uint8)
    want[10:31, 10:31] = 255
    assert np.array_equal(mask, want)


def test_limb_drawn_in_its_colour_dimmed_and_keypoints_undimmed():
    body = np.zeros((18, 3))
    body[1] = (100 / 400, 200 / 300, 1.0)  # neck
    body[2] = (300 / 400, 200 / 300, 1.0)  # right shoulder: limb 0 (neck-shoulder), COLORS[0]
    canvas = render.draw_openpose_canvas([(body, None)], 300, 400)
    dim = tuple(int(c * 0.6) for c in COLORS[0])
    assert tuple(canvas[200, 200]) == dim and tuple(canvas[197, 200]) == dim and tuple(canvas[203, 200]) == dim
    assert not canvas[206, 200].any() and not canvas[194, 200].any()
    assert tuple(canvas[200, 100]) == COLORS[1] and tuple(canvas[200, 300]) == COLORS[2]  # keypoint dots
    assert not canvas[:150].any()


def test_face_dots_white_radius_3_and_low_scores_dropped():
    face = np.full((68, 3), -1.0)
    face[0] = (0.5, 0.5, 0.9)
    face[1] = (0.25, 0.25, 0.2)  # under 0.3: not drawn
    canvas = render.draw_openpose_canvas([(None, face)], 64, 64)
    assert np.array_equal(canvas[..., 1] == 255, _disc(64, 64, 32, 32, 3))


def test_canvas_size_and_resize_back():
    assert render.canvas_size(480, 832) == (1024, 1792)
    assert render.canvas_size(64, 96) == (1024, 1536)
    assert render.draw_openpose([], 48, 80).shape == (48, 80, 3)


def test_dwpose_mask_is_dilated_hull_of_largest_face():
    small = np.full((68, 3), -1.0)
    small[:4] = [(0.05, 0.05, 1), (0.1, 0.05, 1), (0.1, 0.1, 1), (0.05, 0.1, 1)]
    big = np.full((68, 3), -1.0)
    big[:5] = [(0.2, 0.2, 1), (0.6, 0.2, 1), (0.6, 0.6, 1), (0.2, 0.6, 1), (0.4, 0.4, 1)]
    mask = render.dwpose_face_mask([(None, small), (None, big)], 100, 100)
    want = np.zeros((100, 100), np.uint8)
    want[20 - 7:60 + 8, 20 - 7:60 + 8] = 255
    assert np.array_equal(mask, want)


# ----------------------------------------------------------------------------- POSE_KEYPOINT + gaps
def _frame(points, face, w=200, h=100):
    return {"people": [{"pose_keypoints_2d": points, "face_keypoints_2d": face}], "canvas_width": w, "canvas_height": h}


def _square_face(x0, y0, s, n=68):
    pts = [[x0, y0, 1], [x0 + s, y0, 1], [x0 + s, y0 + s, 1], [x0, y0 + s, 1]] + [[0, 0, 0]] * (n - 4)
    return [v for p in pts for v in p]


def test_pose_keypoint_pixel_and_normalised_agree():
    body = [0.0] * 54
    body[0:3] = [50, 25, 1.0]
    pix, norm_flag = parse_pose_keypoints([_frame(body, _square_face(20, 10, 40))], 1, 400, 200)
    assert not norm_flag
    assert pix[0][0][0][0, :2].tolist() == [0.25, 0.25] and pix[0][0][1][2, :2].tolist() == [0.3, 0.5]
    assert pix[0][0][0][1, 2] == 0  # missing point stays missing
    nbody = [0.0] * 54
    nbody[0:3] = [0.25, 0.25, 1.0]
    norm, norm_flag = parse_pose_keypoints([_frame(nbody, _square_face(0.1, 0.1, 0.2, n=70))], 1, 400, 200)
    assert norm_flag and np.allclose(norm[0][0][0][0], pix[0][0][0][0])
    assert norm[0][0][1].shape == (68, 3)


def test_pose_keypoint_bad_input():
    with pytest.raises(InputError, match="keypoints: 1 frames of keypoints for 2"):
        parse_pose_keypoints([_frame([0.0] * 54, [])], 2, 10, 10)
    with pytest.raises(InputError, match="18-point"):
        parse_pose_keypoints([_frame([0.0] * 75, [])], 1, 10, 10)


def test_fill_gaps_nearest_and_count():
    out, filled = fill_gaps([None, "a", None, None, None, "b", None], "frames")
    assert out == ["a", "a", "a", "a", "b", "b", "b"] and filled == [0, 2, 3, 4, 6]
    with pytest.raises(InputError, match="frames: no face found in any of the 3 frames"):
        fill_gaps([None, None, None], "frames")


def test_keypoints_source_fills_and_reports():
    frames = torch.rand(3, 50, 100, 3)
    data = [_frame([0.0] * 54, _square_face(20, 10, 30)), _frame([0.0] * 54, []),
            _frame([0.0] * 54, _square_face(24, 12, 30))]
    res = extract_keypoints(frames, data)
    assert res.filled == [1] and "bridged 1 frames from the target's neighbours: 1" in res.info and "pixel" in res.info
    assert res.pose.shape == (3, 50, 100, 3) and res.mask.shape == (3, 50, 100)
    assert np.array_equal(res.mask[1], res.mask[0]) and res.mask[0].any()
    assert res.keypoints[1] == res.keypoints[0]
    with pytest.raises(InputError, match="keypoints: no face found"):
        extract_keypoints(frames, [_frame([0.0] * 54, [])] * 3)


# ----------------------------------------------------------------------------- geometry + retargeting
def _meta(seed=0):
    rng = np.random.default_rng(seed)
    canonical = rng.normal(size=(468, 3)) * np.array([6.0, 8.0, 3.0])
    weights = np.zeros(468)
    weights[rng.choice(468, 40, replace=False)] = rng.uniform(0.1, 1, 40)
    return fg.GeometryMetadata(canonical, weights)


def test_procrustes_recovers_similarity():
    meta = _meta()
    rot = fg.procrustes(meta.canonical, meta.canonical, meta.weights)
    assert np.allclose(rot, np.eye(4), atol=1e-9)
    a = math.radians(20)
    r = np.array([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])
    target = 1.7 * meta.canonical @ r.T + np.array([1.0, -2.0, -50.0])
    m = fg.procrustes(meta.canonical, target, meta.weights)
    assert np.allclose(m[:3, :3], 1.7 * r, atol=1e-9) and np.allclose(m[:3, 3], [1, -2, -50], atol=1e-9)


def test_metric_mesh_reprojects_and_retarget_math():
    meta = _meta(1)
    w, h = 320, 240
    pose = np.eye(4)
    pose[:3, 3] = [0, 0, -60]
    screen = fg.project(meta.canonical, pose, w, h)
    lmks = np.zeros((478, 3))
    lmks[:468, 0], lmks[:468, 1] = screen[:, 0] / w, screen[:, 1] / h
    lmks[:468, 2] = 0.01 * meta.canonical[:, 2] / 6
    lmks[468:, :2] = lmks[[33, 33, 33, 33, 33, 263, 263, 263, 263, 263], :2]
    mesh, est = fg.metric_mesh(lmks, w, h, meta)
    assert np.allclose(fg.project(mesh, est, w, h), screen, atol=1e-6)
    # no expression change (frame == neutral): the reference face drawn with the driving pose
    ref = meta.canonical * 1.1
    pts = fg.retarget(mesh, mesh, ref, est, lmks, w, h)
    assert pts.shape == (478, 2) and np.allclose(pts[:468], fg.project(ref, est, w, h))
    # the driving frame's offset from neutral is added to the reference
    delta = np.zeros_like(mesh)
    delta[13] = [0, -0.5, 0]
    pts2 = fg.retarget(mesh + delta, mesh, ref, est, lmks, w, h)
    assert np.allclose(pts2[:468], fg.project(ref + delta, est, w, h))


def test_iris_keeps_relative_position_in_eye_box():
    from dreamidv_core.preprocess.pose.landmark_sets import LEFT_EYE_CONTOUR, RIGHT_EYE_CONTOUR
    lmks = np.zeros((478, 3))
    proj = np.zeros((468, 2))
    for eye, x0 in ((RIGHT_EYE_CONTOUR, 0.2), (LEFT_EYE_CONTOUR, 0.6)):
        lmks[list(eye), :2] = [(x0, 0.4), (x0 + 0.2, 0.5)] * (len(eye) // 2)
        proj[list(eye)] = [(x0 * 100, 40), (x0 * 100 + 40, 60)] * (len(eye) // 2)
    lmks[468:473, :2] = (0.25, 0.45)  # a quarter across, half down the right eye box
    lmks[473:, :2] = (0.8, 0.4)
    out = fg.place_irises(lmks, proj)
    assert np.allclose(out[468], (20 + 10, 50)) and np.allclose(out[473], (60 + 40, 40))


# ----------------------------------------------------------------------------- DWPose end to end
def _dwpose_files(tmp_path):
    row = 6400 + 1600 + 6 * 20 + 10  # stride-32 anchor at grid (10, 6)
    anchor = np.zeros(85)
    anchor[:6] = [0.0, 0.5, math.log(8), math.log(8), 0.9, 0.9]
    weaker = anchor.copy()
    weaker[0], weaker[4] = 0.1, 0.5  # same person, lower score: removed by NMS
    other = np.zeros(85)
    other[4], other[5], other[6] = 0.9, 0.05, 0.9  # not a person
    det = tmp_path / "yolox_l.onnx"
    yolox_model(det, {row: anchor, row + 1: weaker, 0: other})
    xl, yl, pk = np.full(133, 300), np.full(133, 300), np.full(133, 0.9)
    for k in range(17):
        xl[k], yl[k] = 100 + 20 * k, 200 + 15 * k
    for j in range(68):
        t = 2 * math.pi * j / 68
        xl[23 + j], yl[23 + j] = 288 + int(100 * math.cos(t)), 384 + int(100 * math.sin(t))
    pk[9] = 0.2  # COCO left wrist (OpenPose 7): dropped
    pose = tmp_path / "dw-ll_ucoco_384.onnx"
    dwpose_model(pose, xl, yl, pk)
    return det, pose, xl, yl


def test_dwpose_end_to_end(tmp_path):
    det, pose, xl, yl = _dwpose_files(tmp_path)
    model = DWPose(str(det), str(pose), "CPU")
    frames = np.random.default_rng(0).integers(0, 255, (2, 64, 96, 3), dtype=np.uint8)
    res = extract_dwpose(frames, model)
    # hand-computed: canvas 1024x1536, letterbox ratio 640/1536, box (192, 80, 448, 336) / ratio,
    # padded 1.25 and widened to 3:4 -> centre (768, 499.2), scale (768, 1024)
    def frame_xy(k):
        cx = xl[k] / 2 / 288 * 768 + 768 - 384
        cy = yl[k] / 2 / 384 * 1024 + 499.2 - 512
        return cx / 1536 * 96, cy / 1024 * 64
    people = res.keypoints[0]["people"]
    assert len(people) == 1 and res.keypoints[0]["canvas_width"] == 96
    body = np.array(people[0]["pose_keypoints_2d"]).reshape(18, 3)
    face = np.array(people[0]["face_keypoints_2d"]).reshape(68, 3)
    assert np.allclose(body[0, :2], frame_xy(0), atol=1e-3) and body[0, 2] == pytest.approx(0.9)
    assert np.allclose(body[2, :2], frame_xy(6), atol=1e-3)  # OpenPose right shoulder = COCO 6
    assert np.allclose(body[1, :2], (np.array(frame_xy(5)) + frame_xy(6)) / 2, atol=1e-3) and body[1, 2] == 1
    assert body[7].tolist() == [0, 0, 0]
    assert np.allclose(face[5, :2], frame_xy(28), atol=1e-3)
    assert res.filled == [] and res.mask[0].any() and res.pose[0].any()
    ys, xs = np.nonzero(res.mask[0])
    fx = [frame_xy(k)[0] for k in range(23, 91)]
    assert xs.min() <= min(fx) - 5 and xs.max() >= max(fx) + 5  # hull dilated by 7 px


def test_dwpose_nms_and_simcc():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], float)
    assert nms(boxes, np.array([0.9, 0.8, 0.7])) == [0, 2]
    sx = np.zeros((2, 8))
    sy = np.zeros((2, 6))
    sx[0, 5], sy[0, 3], sx[1, 2] = 0.8, 0.6, 0.5
    locs, vals = decode_simcc(sx, sy)
    assert locs[0].tolist() == [2.5, 1.5] and vals[0] == pytest.approx(0.6)
    assert locs[1].tolist() == [-0.5, -0.5] and vals[1] == 0


def test_dwpose_bad_model_file(tmp_path):
    bad = tmp_path / "yolox_l.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(CheckpointError, match="yolox_l.onnx"):
        DWPose(str(bad), str(bad))


# ----------------------------------------------------------------------------- node
def test_node_schema_and_execute(pack, tmp_path):
    import folder_paths
    mod = pack.nodes.pose
    schema = mod.DreamIDVPoseExtract.define_schema()
    assert schema.node_id == "DreamIDVPoseExtract" and all(i.tooltip for i in schema.inputs)
    schema.validate()  # ComfyUI's own check (unique ids etc.)
    assert [o.display_name for o in schema.outputs] == ["pose", "mask", "keypoints", "info", "pose_mask"]
    det, pose, _, _ = _dwpose_files(tmp_path)
    folder_paths.add_model_folder_path("dwpose", str(tmp_path))
    frames = torch.rand(2, 32, 48, 3)
    out = mod.DreamIDVPoseExtract.execute(frames, "dwpose", detector_model="yolox_l.onnx",
                                          pose_model="dw-ll_ucoco_384.onnx", provider="CPU")
    img, mask, kps, info, track = out.result
    assert img.shape == (2, 32, 48, 3) and mask.shape == (2, 32, 48) and img.dtype == torch.float32
    assert np.array_equal(track.mask[0:2] > 0, mask.numpy() > 0)  # drawn on demand = the MASK output
    assert np.array_equal(track.pose[0:2], (img * 255).round().byte().numpy())
    assert len(kps) == 2 and "DWPose" in info and mask.max() == 1
    data = [_frame([0.0] * 54, _square_face(0.2, 0.2, 0.4))] * 2
    img2, mask2, _, info2, _ = mod.DreamIDVPoseExtract.execute(frames, "keypoints", keypoints=data).result
    assert mask2[0].any() and "normalised" in info2
    with pytest.raises(CheckpointError, match="'mediapipe' model folder"):
        mod.DreamIDVPoseExtract.execute(frames, "mediapipe", mediapipe_model="missing.task")
    with pytest.raises(InputError, match="no POSE_KEYPOINT"):
        mod.DreamIDVPoseExtract.execute(frames, "keypoints")


# ----------------------------------------------------------------------------- real MediaPipe (optional)
def test_mediapipe_on_real_video(shared_dir):
    pytest.importorskip("mediapipe")
    import cv2
    from dreamidv_core.preprocess.pose import extract_mediapipe
    from dreamidv_core.preprocess.pose.mediapipe_face import FaceLandmarker
    task = shared_dir / "assets" / "face_landmarker_v2_with_blendshapes.task"
    video = shared_dir / "assets" / "a_girl.mp4"
    if not task.is_file() or not video.is_file():
        pytest.skip("a_girl.mp4 / face landmarker .task not in shared assets")
    cap = cv2.VideoCapture(str(video))
    frames = []
    while len(frames) < 5:
        ok, f = cap.read()
        assert ok
        frames.append(cv2.resize(f, (480, 310))[..., ::-1])
    frames = np.stack(frames)
    frames[2] = 0  # a frame with no face: filled from a neighbour
    ref = np.ascontiguousarray(cv2.imread(str(shared_dir / "assets" / "an_1.jpg"))[..., ::-1])
    with FaceLandmarker(str(task)) as lm:
        face = lm(np.ascontiguousarray(frames[0]))
        mp_pose = lm._detector.detect(lm._mp.Image(image_format=lm._mp.ImageFormat.SRGB,
                                                   data=np.ascontiguousarray(frames[0]))).facial_transformation_matrixes[0]
        assert np.allclose(face.pose, mp_pose, atol=1e-3)  # our geometry pipeline == MediaPipe's
        res = extract_mediapipe(frames, lm, reference=ref)
        with pytest.raises(InputError, match="reference: no face"):
            extract_mediapipe(frames, lm, reference=np.zeros((64, 64, 3), np.uint8))
    assert res.filled == [2] and "retargeted onto the reference: yes" in res.info
    assert np.array_equal(res.pose[2], res.pose[1])
    ys, xs = np.nonzero(res.mask[0])
    assert 0.01 < res.mask[0].mean() < 0.2 and 120 < xs.mean() < 360
