"""Target person choice and tracking (dreamidv_core.preprocess.tracking) on synthetic clips with known ground
truth (tests/synthetic_people.py): two people crossing and swapping sides, one hidden for several frames,
a hard cut after which the target reappears elsewhere; the choice modes, their errors, the pose sources
drawing the target only, the ArcFace adapter and the pose node's target inputs."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import synthetic_people as sp  # noqa: E402

from dreamidv_core.errors import InputError  # noqa: E402
from dreamidv_core.preprocess import tracking as T  # noqa: E402
from dreamidv_core.preprocess.pose import extract_keypoints, extract_mediapipe  # noqa: E402

SCENES = ("crossing", "occlusion", "cut")


def embedder(scene):
    """The colour stand-in for ArcFace on the scene's frames, as track_target calls it."""
    return lambda i, det: sp.colour_embedder(scene.frames[i], det.box)


def cuts_of(scene):
    return T.scene_cuts([T.frame_signature(f) for f in scene.frames])


# ----------------------------------------------------------------------------- tracking on ground truth
@pytest.mark.parametrize("kind", SCENES)
@pytest.mark.parametrize("index, person", [(0, "A"), (1, "B")])
def test_target_stays_on_the_chosen_person_with_arcface(kind, index, person):
    scene = sp.scenario(kind)
    track = T.track_target(scene.detections, T.TargetSpec("index", index), embedder(scene), cuts=cuts_of(scene))
    acc = sp.target_accuracy(scene, track.detections, person)
    assert acc["on_target"] == acc["visible"] > 0, acc  # 100 % of the frames where the person is visible
    assert acc["wrong"] == 0 and acc["switches"] == 0, acc
    assert len(track.people) == 2 and track.reid.startswith("ArcFace")
    visible = {f for f, seen in enumerate(scene.visible) if person in seen}
    assert set(track.absent) == set(range(len(scene.frames))) - visible  # absent exactly where hidden


@pytest.mark.parametrize("kind", ["crossing", "occlusion"])
def test_without_arcface_position_size_and_motion_carry_the_target(kind):
    scene = sp.scenario(kind)
    for index, person in ((0, "A"), (1, "B")):
        track = T.track_target(scene.detections, T.TargetSpec("index", index), None)
        acc = sp.target_accuracy(scene, track.detections, person)
        assert acc["on_target"] == acc["visible"] and acc["wrong"] == acc["switches"] == 0, (index, acc)
        assert track.reid.startswith("position")


def test_crossing_hides_the_back_person_and_never_bridges_onto_the_front_face():
    scene = sp.scenario("crossing")
    hidden = [f for f, seen in enumerate(scene.visible) if "B" not in seen]
    assert 0 < len(hidden) <= 8  # B is behind A while they overlap
    track = T.track_target(scene.detections, T.TargetSpec("index", 1, bridge=10), None)
    assert track.filled == [] and track.absent == hidden  # a bridge would have put B's mask on A's face


def test_hard_cut_is_found_and_splits_the_tracks():
    scene = sp.scenario("cut")
    assert cuts_of(scene) == scene.cuts == [20]
    track = T.track_target(scene.detections, T.TargetSpec("index", 0), embedder(scene), cuts=scene.cuts)
    assert "shot cuts before frames 20" in track.describe()
    people = {p.number: p for p in track.people}
    assert len(people[0].tracklets) == 2  # one tracklet per shot, re-identified by ArcFace
    assert people[0].detections()[25].payload == "A" and people[0].detections()[25].centre[0] > 100


def test_occlusion_longer_than_the_bridge_is_absent_shorter_is_bridged():
    scene = sp.scenario("occlusion")
    hidden = list(range(15, 23))
    long = T.track_target(scene.detections, T.TargetSpec("index", 0, bridge=3), None)
    assert long.absent == hidden and long.filled == []
    assert all(long.detections[f] is None for f in hidden)
    short = T.track_target(scene.detections, T.TargetSpec("index", 0, bridge=8), None)
    assert short.filled == hidden and short.absent == []
    assert short.detections[15] is short.detections[14] and short.detections[22] is short.detections[23]
    assert "bridged 8 frames from the target's neighbours: 15-22" in short.describe()
    assert "target absent in 8 frames (passed through unchanged" in long.describe()


def test_largest_is_over_the_clip_not_per_frame():
    count = 30
    a = sp.Person("A", [(50, 48, 30)] * count, depth=1)
    # B is much larger but only in 4 frames (walks close past the camera)
    b = sp.Person("B", [None] * 10 + [(120, 48, 60)] * 4 + [None] * 16, depth=0)
    scene = sp.render([a, b], count)
    track = T.track_target(scene.detections, T.TargetSpec("largest"), None)
    assert {d.payload for d in track.detections if d is not None} == {"A"}
    assert track.absent == [] and "(largest face over the clip)" in track.describe()


def test_index_is_left_to_right_at_first_appearance():
    count = 20
    right = sp.Person("B", [(120, 48, 28)] * count, depth=1)
    left = sp.Person("A", [(40, 48, 28)] * count, depth=1)
    late = sp.Person("C", [None] * 12 + [(20, 48, 28)] * 8, depth=1)  # arrives later, leftmost
    scene = sp.render([right, left, late], count)
    track = T.track_target(scene.detections, T.TargetSpec("index", 0), None)
    names = [p.detections()[p.first[0]].payload for p in track.people]
    assert names == ["A", "B", "C"]
    assert "#0: 20 frames from 0, first at x=40 px" in track.describe()


def test_similar_picks_the_person_in_the_photo():
    scene = sp.scenario("crossing")
    for person in ("A", "B"):
        photo = sp.colour_embedder(sp.photo_of(person), np.array([24, 24, 72, 72]))
        track = T.track_target(scene.detections, T.TargetSpec("similar", photo_embedding=photo, min_similarity=0.8),
                               embedder(scene))
        assert track.similarities[track.target] > 0.9
        acc = sp.target_accuracy(scene, track.detections, person)
        assert acc["on_target"] == acc["visible"] and acc["wrong"] == 0


# ----------------------------------------------------------------------------- errors
def test_index_out_of_range_lists_the_people():
    scene = sp.scenario("occlusion")
    with pytest.raises(InputError, match=r"target_index 2 is out of range: 2 people were found in the clip, "
                                         r"numbered 0 to 1 left to right at first appearance \(#0: 32 frames from 0"):
        T.track_target(scene.detections, T.TargetSpec("index", 2), None)


def test_no_face_similar_enough_names_the_scores():
    scene = sp.scenario("crossing")
    photo = sp.colour_embedder(sp.photo_of("C"), np.array([24, 24, 72, 72]))
    with pytest.raises(InputError, match=r"target_photo: no person in the clip is similar enough to the photo "
                                         r"\(best: person \d with ArcFace similarity -?[\d.]+ < min_similarity 0.90"):
        T.track_target(scene.detections, T.TargetSpec("similar", photo_embedding=photo, min_similarity=0.9),
                       embedder(scene))


def test_target_never_found_and_bad_specs():
    with pytest.raises(InputError, match="frames: no face found in any of the 7 frames"):
        T.track_target([[] for _ in range(7)], T.TargetSpec("largest"))
    with pytest.raises(InputError, match="target 'similar' needs a photo"):
        T.track_target([[]], T.TargetSpec("similar"))
    with pytest.raises(InputError, match="target must be one of largest, index, similar"):
        T.track_target([[]], T.TargetSpec("leftmost"))
    scene = sp.scenario("occlusion")
    photo = np.ones(3)
    with pytest.raises(InputError, match="no face of the clip could be compared"):
        T.track_target(scene.detections, T.TargetSpec("similar", photo_embedding=photo), lambda i, d: None)


# ----------------------------------------------------------------------------- pose sources draw the target only
def test_keypoints_source_mask_and_pose_follow_the_target_only():
    scene = sp.scenario("crossing")
    frames = torch.from_numpy(scene.frames)
    res = extract_keypoints(frames, scene.keypoints, target=T.TargetSpec("index", 1),
                            embed_face=sp.colour_embedder)
    acc = sp.mask_accuracy(scene, res.mask, "B")
    assert acc == {"visible": acc["visible"], "on_target": acc["visible"], "wrong": 0, "spurious": 0}, acc
    for f in res.absent:  # B hidden behind A: empty pose and mask, no keypoints
        assert not res.mask[f].any() and not res.pose[f].any() and res.keypoints[f]["people"] == []
    assert res.present == [f not in res.absent for f in range(len(frames))]
    for f in range(len(frames)):  # one person drawn: the mask is one face, never both
        if f not in res.absent:
            assert len(res.keypoints[f]["people"]) == 1
            ys, xs = np.nonzero(res.mask[f])
            assert xs.max() - xs.min() < 45
    assert "target: person 1 (index 1)" in res.info and "people found" in res.info


def _fake_face(meta, cx: float, w: int, h: int, expression: float = 0.5):
    """A MediaPipe-like FaceFrame of the test metadata's canonical face at image x = cx."""
    from dreamidv_core.preprocess.pose import face_geometry as fg
    from dreamidv_core.preprocess.pose.mediapipe_face import FaceFrame

    pose = np.eye(4)
    pose[:3, 3] = [(cx / w - 0.5) * 60 * w / h, 0, -60]
    screen = fg.project(meta.canonical, pose, w, h)
    lmks = np.zeros((478, 3))
    lmks[:468, 0], lmks[:468, 1] = screen[:, 0] / w, screen[:, 1] / h
    lmks[468:, :2] = lmks[[33] * 5 + [263] * 5, :2]
    mesh, est = fg.metric_mesh(lmks, w, h, meta)
    return FaceFrame(lmks, mesh, est, expression, w, h)


class FakeLandmarker:
    """detect_all: two faces per frame, the left one moving right; frames 3-8 lose the right one."""

    def __init__(self, meta, w, h):
        self.meta, self.w, self.h, self.i = meta, w, h, 0

    def __call__(self, image):
        return _fake_face(self.meta, self.w / 2, self.w, self.h)

    def detect_all(self, image):
        i, self.i = self.i, self.i + 1
        faces = [_fake_face(self.meta, 60 + 2 * i, self.w, self.h)]
        if not 3 <= i <= 8:
            faces.append(_fake_face(self.meta, 200, self.w, self.h, expression=0.1 * i))
        return faces[::-1] if i % 2 else faces


def test_mediapipe_source_tracks_every_face_and_draws_the_target():
    from test_pose import _meta

    w, h = 256, 160
    frames = np.zeros((12, h, w, 3), np.uint8)
    res = extract_mediapipe(frames, FakeLandmarker(_meta(2), w, h), target=T.TargetSpec("index", 1))
    assert res.absent == list(range(3, 9)) and res.filled == []
    for f in range(12):
        ys, xs = np.nonzero(res.mask[f])
        if f in res.absent:
            assert not len(xs) and not res.pose[f].any()
        else:
            assert 170 < xs.mean() < 230  # the right person only
    assert "most neutral frame of the target: 0" in res.info
    left = extract_mediapipe(frames, FakeLandmarker(_meta(2), w, h), target=T.TargetSpec("index", 0))
    assert left.absent == [] and all(40 < np.nonzero(left.mask[f])[1].mean() < 110 for f in range(12))


# ----------------------------------------------------------------------------- ArcFace adapter
class _Face:
    def __init__(self, bbox, embedding):
        self.bbox, self.embedding = bbox, embedding


class _Analyzer:
    """faces(image): one face per red square found, embedding = its blue level (a deterministic stand-in)."""

    def __init__(self):
        self.calls = []

    def faces(self, image):
        self.calls.append(image.shape)
        red = image[..., 0] > 200
        out = []
        if red.any():
            ys, xs = np.nonzero(red)
            out.append(_Face((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1),
                             np.array([1.0, image[ys, xs, 2].mean() / 255.0])))
        return out


def test_analyzer_embedder_runs_on_a_crop_around_the_box():
    img = np.zeros((200, 300, 3), np.uint8)
    img[50:90, 100:140, 0] = 255
    img[50:90, 100:140, 2] = 128
    analyzer = _Analyzer()
    embed = T.analyzer_embedder(analyzer)
    v = embed(img, np.array([100, 50, 140, 90]))
    assert analyzer.calls == [(80, 80, 3)]  # the box grown by half its size on each side
    assert np.allclose(v, np.array([1.0, 128 / 255]) / np.linalg.norm([1.0, 128 / 255]))
    assert embed(img, np.array([200, 100, 240, 140])) is None  # nothing there
    photo = T.analyzer_photo_embedding(analyzer, img)
    assert np.allclose(photo, v)
    with pytest.raises(InputError, match="target_photo: no face found in the 300x200 photo"):
        T.analyzer_photo_embedding(analyzer, np.zeros((200, 300, 3), np.uint8))


def test_analyzer_embedder_with_insightface_test_pack(tmp_path):
    pytest.importorskip("insightface")
    import onnx_models as om
    from dreamidv_core.preprocess import identity

    folder = om.build_pack(tmp_path, "buffalo_l", extras=False)
    analyzer = identity.FaceAnalyzer(folder, "CPU", det_size=320)
    img = om.blank(320, 320)
    om.paint_faces(img, [(10, 10, 60, 1), (30, 25, 60, 2)])
    faces = analyzer.faces(img)
    embed = T.analyzer_embedder(analyzer, context=10.0)  # the crop is the whole 320x320 image (scale 1)
    for f in faces:
        v = embed(img, np.array(f.bbox))
        assert v is not None and T.cosine(v, f.embedding) > 0.9999
    assert T.cosine(T.analyzer_photo_embedding(analyzer, img), faces[0].embedding) > 0.9999


# ----------------------------------------------------------------------------- the pose node
def test_pose_node_target_inputs(pack):
    mod = pack.nodes.pose
    schema = mod.DreamIDVPoseExtract.define_schema()
    names = [i.id for i in schema.inputs]
    assert names[-10:-3] == ["target", "target_index", "target_photo", "min_similarity", "bridge_frames",
                             "insightface_pack", "small_faces"]
    assert names[-3:] == ["start_frame", "frame_num", "select_every_nth"]  # the frame range, appended after
    scene = sp.scenario("occlusion", count=24)  # short: DWPose-style drawing is on a 1024-pixel canvas
    frames = torch.from_numpy(scene.frames).float() / 255
    node = mod.DreamIDVPoseExtract.execute
    pose, mask, kps, info, track = node(frames, "keypoints", keypoints=scene.keypoints,
                                        insightface_pack="none").result
    acc = sp.mask_accuracy(scene, mask.numpy(), "B")
    assert acc["on_target"] == acc["visible"] == 24 and acc["wrong"] == 0
    assert torch.equal(torch.from_numpy(track.mask[0:24] > 0), mask > 0)  # drawn on demand: the same target mask
    # B, seen in every frame, is the largest face over the clip (A's face is larger, but hidden for 8 frames)
    assert "target: person 1 (largest face over the clip)" in info and "ArcFace: off" in info
    _, mask0, _, info0, _ = node(frames, "keypoints", keypoints=scene.keypoints, target="index", target_index=0,
                                 insightface_pack="none").result
    assert "target: person 0 (index 0)" in info0 and "target absent in 8 frames" in info0
    assert not mask0[15:23].any() and mask0[14].any() and mask0[23].any()
    with pytest.raises(InputError, match="target_index 5 is out of range"):
        node(frames, "keypoints", keypoints=scene.keypoints, target="index", target_index=5, insightface_pack="none")
    with pytest.raises(InputError, match="target_photo: target is 'similar' but no photo"):
        node(frames, "keypoints", keypoints=scene.keypoints, target="similar")
    with pytest.raises(InputError, match="target 'similar' compares faces with ArcFace"):
        node(frames, "keypoints", keypoints=scene.keypoints, target="similar", target_photo=frames[:1],
             insightface_pack="none")


# ----------------------------------------------------------------------------- MediaPipe tiles for small faces
def _square_finder(view):
    """A stand-in for MediaPipe on one view: every white square seen, as 478 landmarks on its visible box
    (normalised to the view), found only when at least 1/6 of the view's long side (like the real detector)."""
    white = view[..., 0] == 255
    if not white.any():
        return []
    ys, xs = np.nonzero(white)
    h, w = view.shape[:2]
    if max(xs.max() - xs.min(), ys.max() - ys.min()) + 1 < max(h, w) / 6:
        return []
    t = np.linspace(0, 1, 478)
    lmks = np.stack([(xs.min() + t * (xs.max() + 1 - xs.min())) / w,
                     (ys.min() + (1 - t) * (ys.max() + 1 - ys.min())) / h, np.zeros(478)], 1)
    return [(lmks, np.full(51, 0.01), None)]


def test_mediapipe_tiles_find_small_faces_and_map_them_back():
    from test_pose import _meta
    from dreamidv_core.preprocess.pose import mediapipe_face as mpf

    tiles = mpf.tile_grid(1920, 621, 1)
    assert len(tiles) == 6 and {s for _, _, s in tiles} == {621} and (1299, 0, 621) in tiles
    assert tiles[1][0] - tiles[0][0] == 310  # half a tile of overlap
    assert len(mpf.tile_grid(3840, 2160, 3)) > len(mpf.tile_grid(3840, 2160, 2)) > 0
    lm = object.__new__(mpf.FaceLandmarker)
    lm.meta, lm.num_faces, lm._landmarks = _meta(2), 6, _square_finder
    image = np.zeros((621, 1920, 3), np.uint8)
    image[200:320, 1500:1620] = 255  # a 120 px face: under 1/6 of 1920, over 1/6 of 621
    lm.tile_levels = 0
    assert lm.detect_all(image) == []
    lm.tile_levels = 1
    faces = lm.detect_all(image)
    assert len(faces) == 1  # seen whole in two overlapping tiles, cut in others: one face
    box = faces[0].landmarks[:, :2].min(0) * (1920, 621), faces[0].landmarks[:, :2].max(0) * (1920, 621)
    assert np.allclose(box, ([1500, 200], [1620, 320]), atol=1e-6)
    assert faces[0].width == 1920 and faces[0].mesh.shape == (468, 3)
    assert lm.detect_all(image, search=False) == []
    hinted = lm.detect_all(image, hints=[(1500, 200, 1620, 320)], search=False)  # one 480 px view
    assert len(hinted) == 1 and np.allclose(hinted[0].landmarks, faces[0].landmarks)


def test_a_single_odd_frame_is_no_cut():
    sig = [np.full((16, 16), v, np.float32) for v in (90, 91, 90, 0, 91, 90, 91, 90, 91, 30, 31, 30)]
    assert T.scene_cuts(sig) == [9]  # frame 3 (black, a flash) is no cut; frame 9 starts a new shot
