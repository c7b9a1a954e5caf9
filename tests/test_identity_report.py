"""dreamidv_core.eval.identity_report: numbers, plot, landmark error, insightface path and the command."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dreamidv_core.eval import identity_report as ir  # noqa: E402
from dreamidv_core.errors import InputError  # noqa: E402


def colour_embedder(images):
    """Stand-in encoder: the normalised mean colour of each image; None (no face) for a black image."""
    assert images.dtype == np.uint8 and images.ndim == 4 and images.shape[-1] == 3
    out = []
    for img in images:
        m = img.reshape(-1, 3).mean(axis=0)
        out.append(None if not m.any() else m / np.linalg.norm(m))
    return out


def solid(rgb, size=8):
    return np.tile(np.array(rgb, np.uint8), (size, size, 1))


# similarities to pure red: (40,30,0) -> 0.8, (30,40,0) -> 0.6, black -> no face, (100,100,0) -> 1/sqrt2
COLOURS = [(255, 0, 0), (40, 30, 0), (30, 40, 0), (0, 0, 0), (100, 100, 0), (255, 0, 0)]
R2 = 1 / math.sqrt(2)
SIMS = [1.0, 0.8, 0.6, float("nan"), R2, 1.0]


@pytest.fixture
def frames():
    return np.stack([solid(c) for c in COLOURS])


def test_numbers_match_hand_computed_values(frames):
    rep = ir.identity_report(frames, solid((255, 0, 0)), colour_embedder)
    np.testing.assert_allclose(rep.similarities, SIMS, atol=1e-12)
    assert rep.frame_count == 6 and rep.face_count == 5 and rep.no_face_count == 1 and rep.no_face_frames == [3]
    assert rep.mean == pytest.approx((1 + 0.8 + 0.6 + R2 + 1) / 5)
    assert rep.min == pytest.approx(0.6) and rep.min_frame == 2
    # consecutive pairs with a face on both sides: (0,1), (1,2), (4,5)
    assert rep.pair_count == 3
    assert rep.mean_abs_change == pytest.approx((0.2 + 0.2 + (1 - R2)) / 3)
    assert rep.max_abs_change == pytest.approx(1 - R2)
    # embedding cosines: (1,0)·(.8,.6) = .8; (.8,.6)·(.6,.8) = .96; (r2,r2)·(1,0) = r2
    np.testing.assert_allclose(rep.consecutive_cosines, [0.8, 0.96, np.nan, np.nan, R2], atol=1e-12)
    assert rep.mean_consecutive_cosine == pytest.approx((0.8 + 0.96 + R2) / 3)
    assert rep.min_consecutive_cosine == pytest.approx(R2)
    assert rep.landmark_errors is None and rep.landmark_error_mean is None

    d = rep.as_dict()
    json.dumps(d, allow_nan=False)  # NaN became None
    assert d["similarities"][3] is None and d["no_face_frames"] == 1 and d["min_similarity_frame"] == 2
    assert d["stability"]["max_abs_change"] == pytest.approx(1 - R2) and d["landmarks"] is None
    text = rep.summary()
    assert "\n" not in text and "6 frames" in text and "no face in 1 (frame 3)" in text
    assert f"{rep.mean:.3f}" in text and "minimum 0.600 at frame 2" in text


def test_reference_forms_and_frame_containers_agree(frames):
    ref_img = solid((255, 0, 0), 16)
    base = ir.identity_report(frames, ref_img, colour_embedder).similarities
    variants = [
        (frames, np.array([2.0, 0.0, 0.0])),                         # precomputed (unnormalised) embedding
        (torch.from_numpy(frames).float() / 255, torch.from_numpy(ref_img[None]).float() / 255),  # IMAGE tensors
        (list(frames), ref_img),
    ]
    for video, ref in variants:
        np.testing.assert_allclose(ir.identity_report(video, ref, colour_embedder).similarities, base, atol=1e-6)


def test_frames_are_read_and_embedded_one_at_a_time(frames):
    class Lazy:
        def __init__(self):
            self.reads = []

        def __len__(self):
            return len(frames)

        def __getitem__(self, i):
            self.reads.append(i)
            return frames[i]

    calls, done = [], []

    def embedder(images):
        calls.append(images.shape[0])
        return colour_embedder(images)

    video = Lazy()
    rep = ir.identity_report(video, np.array([1.0, 0, 0]), embedder, progress=lambda stage, i, n: done.append((i, n)))
    assert video.reads == list(range(6)) and calls == [1] * 6 and done == [(i, 6) for i in range(1, 7)]
    assert rep.face_count == 5


def test_array_embedder_output_and_all_frames_without_face():
    def nan_rows(images):
        return np.full((len(images), 4), np.nan)

    rep = ir.identity_report(np.zeros((3, 8, 8, 3), np.uint8), np.ones(4), nan_rows)
    assert rep.no_face_count == 3 and rep.no_face_frames == [0, 1, 2] and math.isnan(rep.mean)
    assert rep.min_frame is None and rep.pair_count == 0
    assert "no face was found in any frame" in rep.summary()
    img = ir.plot_similarity(rep, 200, 100)
    assert img.shape == (100, 200, 3)


def test_bad_inputs_are_named(frames):
    red = solid((255, 0, 0))
    with pytest.raises(InputError, match="no frames"):
        ir.identity_report(frames[:0], red, colour_embedder)
    with pytest.raises(InputError, match="reference image: no face"):
        ir.identity_report(frames, solid((0, 0, 0)), colour_embedder)
    with pytest.raises(InputError, match="one item per image"):
        ir.identity_report(frames, np.ones(3), lambda imgs: [])
    with pytest.raises(InputError, match="video frame 0: embedding has 4 values, the reference has 3"):
        ir.identity_report(frames, np.ones(3), lambda imgs: [np.ones(4)])
    with pytest.raises(InputError, match="without a landmarker"):
        ir.identity_report(frames, red, colour_embedder, driving=frames)
    with pytest.raises(InputError, match=r"video frame 0"):
        ir.identity_report(np.zeros((2, 8, 8, 5), np.uint8), red, colour_embedder)


# ----------------------------------------------------------------------------------------- landmarks
P = np.array([[-1.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
Q = np.array([[-1.0, 0.0], [1.0, 0.0], [0.0, 3.0]])
# P normalised: centroid 0, RMS sqrt(2/3) -> (-1.2247, 0), (1.2247, 0), (0, 0)
# Q normalised: centroid (0, 1), RMS sqrt(8/3) -> (-.6124, -.6124), (.6124, -.6124), (0, 1.2247)
# distances: sqrt(3)/2, sqrt(3)/2, sqrt(1.5)
PQ_ERROR = (math.sqrt(3) + math.sqrt(1.5)) / 3


def test_landmark_error_values():
    assert ir.landmark_error(P, P) == 0.0
    assert ir.landmark_error(Q, Q * 7.5 + [120.0, -40.0]) == pytest.approx(0.0, abs=1e-12)  # shift + scale removed
    assert ir.landmark_error(P, Q) == pytest.approx(PQ_ERROR)
    assert ir.landmark_error(P * 3 + 5, Q * 0.5 - 2) == pytest.approx(PQ_ERROR)
    two = np.array([[-1.0, 0.0], [1.0, 0.0]])
    assert ir.landmark_error(two, two[:, ::-1]) == pytest.approx(math.sqrt(2))  # 90° turn is kept (pose)
    assert math.isnan(ir.landmark_error(np.zeros((3, 2)), P))  # degenerate set
    with pytest.raises(InputError, match=r"\[K, 2\]"):
        ir.landmark_error(P, np.zeros((4, 2)))


def test_landmark_error_in_report():
    """The landmarker reads a code from pixel (0, 0): 1 -> P, 2 -> Q, 3 -> Q scaled and moved, 0 -> none."""
    shapes = {1: P, 2: Q, 3: Q * 4 + 9}

    def landmarker(img):
        assert img.ndim == 3
        return shapes.get(int(img[0, 0, 2]))

    def coded(codes):
        out = np.full((len(codes), 8, 8, 3), 200, np.uint8)
        out[:, 0, 0, 2] = codes
        return out

    video, driving = coded([1, 2, 1, 0]), coded([1, 3, 2, 1, 1])  # the extra driving frame is ignored
    rep = ir.identity_report(video, coded([1])[0], colour_embedder, driving=driving, landmarker=landmarker)
    np.testing.assert_allclose(rep.landmark_errors, [0.0, 0.0, PQ_ERROR, np.nan], atol=1e-12)
    assert rep.landmark_frame_count == 3 and rep.driving_frames == 5
    assert rep.landmark_error_mean == pytest.approx(PQ_ERROR / 3) and rep.landmark_error_max == pytest.approx(PQ_ERROR)
    d = rep.as_dict()["landmarks"]
    assert d["compared_frames"] == 3 and d["errors"][3] is None
    assert f"{PQ_ERROR / 3:.3f}" in rep.summary()


# -------------------------------------------------------------------------------------------- plot
def test_plot_puts_curve_mean_and_minimum_where_the_values_say(frames):
    rep = ir.identity_report(frames, solid((255, 0, 0)), colour_embedder)
    img = ir.plot_similarity(rep, width=400, height=200)
    assert img.shape == (200, 400, 3) and img.dtype == np.uint8
    g = ir.plot_frame(rep.similarities, 400, 200)
    # documented geometry: margins 44/12/22/22, y from 0 to 1, frames spread over the width
    assert (g.left, g.right, g.top, g.bottom, g.lo, g.hi) == (44, 388, 22, 178, 0.0, 1.0)
    assert (g.x(0), g.x(5), g.y(1.0), g.y(0.0), g.y(0.6)) == (44, 388, 22, 178, 84)

    def px(x, y):
        return tuple(int(v) for v in img[y, x])

    for i, s in enumerate(SIMS):
        if i == 2:
            assert px(g.x(i), g.y(s)) == ir.MINIMUM           # the minimum's red dot
        elif not math.isnan(s):
            assert px(g.x(i), g.y(s)) == ir.CURVE
    # in frame 1's column the curve lies at y(0.8) = 53 (within the 2-px line and the 3-px dot)
    ys = [y for y in range(200) if px(g.x(1), y) == ir.CURVE]
    assert ys and min(ys) >= g.y(0.8) - 3 and max(ys) <= g.y(0.8) + 3
    # mean line: y(0.8214) = 50, drawn across the gap around the no-face frame where no curve passes
    y_mean = g.y(rep.mean)
    assert y_mean == 50
    for x in (200, 215, 230):
        assert px(x, y_mean) == ir.MEAN and px(x, y_mean - 5) == ir.BACKGROUND
    assert not any(px(215, y) == ir.CURVE for y in range(200))  # no segment bridges frame 3
    assert px(g.x(3), g.bottom - 3) == ir.NO_FACE               # the no-face tick
    # no curve pixel far from the values: above the top value line there is nothing blue
    assert not (img[: g.y(1.0) - 3] == np.array(ir.CURVE, np.uint8)).all(axis=-1).any()


def test_plot_range_goes_below_zero_for_negative_values():
    g = ir.plot_frame([-0.35, 0.5, float("nan")], 300, 150)
    assert g.lo == pytest.approx(-0.4) and g.hi == 1.0 and g.y(-0.4) == g.bottom
    img = ir.plot_similarity([-0.35, 0.5, float("nan")], 300, 150)
    assert tuple(img[g.y(-0.35), g.x(0)]) == ir.MINIMUM and tuple(img[g.y(0.5), g.x(1)]) == ir.CURVE
    with pytest.raises(InputError, match="plot size"):
        ir.plot_similarity([0.5], 50, 50)


# ------------------------------------------------------------------------------------- insightface
@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    pytest.importorskip("onnxruntime", reason="the face extra (onnxruntime) is not installed")
    om = pytest.importorskip("onnx_models")
    root = tmp_path_factory.mktemp("insightface")
    om.build_pack(root, "buffalo_l", extras=False)
    return root


def face_frame(cell, green=40, seed=1):
    import onnx_models as om

    img = om.blank(160, 160)
    if cell is not None:
        om.paint_face(img, cell[0], cell[1], green=green, seed=seed)
    return img


def test_insightface_embedder_and_landmarker(pack):
    from dreamidv_core.preprocess.identity import FaceAnalyzer, cosine

    folder = ir.resolve_pack(pack, "buffalo_l")
    assert folder == pack / "models" / "buffalo_l" and ir.resolve_pack(folder, "other") == folder
    embed = ir.insightface_embedder(folder, "CPU", det_size=160)
    reference = face_frame((10, 10))
    video = np.stack([face_frame((10, 10)), face_frame((9, 11)), face_frame(None), face_frame((10, 10), seed=2)])
    # driving: the same faces but at another place and size -> landmark shapes agree after normalisation
    driving = np.stack([face_frame((8, 8), green=60), face_frame((9, 11)), face_frame((10, 10)),
                        face_frame((11, 9), green=30, seed=5)])
    marks = ir.insightface_landmarker(folder, "CPU", det_size=160)
    rep = ir.identity_report(video, reference, embed, driving=driving, landmarker=marks)
    s = rep.similarities
    assert s[0] == pytest.approx(1.0, abs=1e-4) and s[1] == pytest.approx(1.0, abs=1e-3)  # same face, moved
    assert math.isnan(s[2]) and rep.no_face_frames == [2]
    analyzer = FaceAnalyzer(folder, "CPU", det_size=160)
    other = cosine(analyzer.faces(video[3])[0].embedding, analyzer.faces(reference)[0].embedding)
    assert s[3] == pytest.approx(other, abs=1e-5) and other < 0.99  # another face scores lower
    assert rep.landmark_errors[0] == pytest.approx(0.0, abs=0.02) and rep.landmark_errors[3] == pytest.approx(0.0, abs=0.02)
    assert math.isnan(rep.landmark_errors[2]) and rep.landmark_frame_count == 3


def test_command_writes_json_and_plot(pack, tmp_path, capsys):
    from PIL import Image

    pytest.importorskip("av")
    from dreamidv_core.io.video import write_video

    video = np.stack([face_frame((10, 10)), face_frame(None), face_frame((10, 10), seed=2)])
    write_video(tmp_path / "v.mp4", video, fps=8)
    Image.fromarray(face_frame((10, 10))).save(tmp_path / "ref.png")
    out_json, out_png = tmp_path / "out" / "r.json", tmp_path / "out" / "r.png"
    rc = ir.identity_report_main(["--video", str(tmp_path / "v.mp4"), "--reference", str(tmp_path / "ref.png"),
                                  "--insightface", str(pack), "--pack", "buffalo_l", "--det-size", "160",
                                  "--driving", str(tmp_path / "v.mp4"),
                                  "--json", str(out_json), "--plot", str(out_png)])
    assert rc == 0, capsys.readouterr().err
    data = json.loads(out_json.read_text())
    assert data["frames"] == 3 and data["no_face_frame_indices"] == [1] and data["landmarks"]["compared_frames"] == 2
    assert data["similarities"][0] > 0.95
    assert np.asarray(Image.open(out_png)).shape == (320, 640, 3)
    assert "Identity similarity" in capsys.readouterr().out
    assert not [p.name for p in out_json.parent.iterdir() if p.name.endswith(".partial")]

    rc = ir.identity_report_main(["--video", str(tmp_path / "v.mp4"), "--reference", str(tmp_path / "ref.png"),
                                  "--insightface", str(tmp_path / "nowhere"), "--pack", "antelopev2"])
    err = capsys.readouterr().err
    assert rc == 2 and "antelopev2" in err and "nowhere" in err
