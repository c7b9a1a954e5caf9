"""The evaluation (dreamidv_core/eval/benchmark.py, face_metrics.py, charts.py, ``python -m dreamidv_core
evaluate``), proved on procedural faces whose truth is known (tests/synthetic_data.py) with deterministic
face models (tests/eval_fakes.py):

* the ground truth scores high identity and low pose error; a copy of the driving video low identity and low
  pose error; the reference photo pasted on every frame high identity and high pose error (and no motion);
* each metric moves the expected way under a known distortion: noise in the background, a frame shuffled,
  a head rotation.
"""
from __future__ import annotations

import csv
import json
import math
import os
import stat

import numpy as np
import pytest
from PIL import Image

from dreamidv_core.errors import InputError
from dreamidv_core.eval import benchmark as bench
from dreamidv_core.eval import face_metrics as fm
from tests.eval_fakes import ellipse_observer, face_landmarks, palette_embedder, rotation_z
from tests.synthetic_data import render_synthetic_sample

SIZE, FRAMES = (96, 128), 17
SAMPLE = dict(identity=0, driving_identity=9, face_scale=(0.3, 0.4), roll=(-30, 30))  # target and driving colours differ


def clip(seed=3, **extra):
    arrays, _ = render_synthetic_sample(FRAMES, SIZE, seed=seed, **SAMPLE, **extra)
    return arrays


@pytest.fixture(scope="module")
def truth():
    return clip()


def score(swapped, arrays, **kw):
    kw.setdefault("mask", arrays["mask"])
    return bench.score_clip(swapped, arrays["driving"], arrays["identity"], palette_embedder(), ellipse_observer(),
                            **kw).metrics


@pytest.fixture(scope="module")
def gt(truth):
    return score(truth["target"], truth)


# ------------------------------------------------------------------------------------ numbers
def test_pose_and_pixel_numbers():
    assert fm.rotation_angle_deg(rotation_z(10), rotation_z(-15)) == pytest.approx(25)
    a = np.diag([1.0, -1.0, -1.0])  # a half turn about x
    assert fm.rotation_angle_deg(a, np.eye(3)) == pytest.approx(180)
    ypr = fm.yaw_pitch_roll(rotation_z(30) @ _ry(20) @ _rx(-10))
    np.testing.assert_allclose(ypr, [20, -10, 30], atol=1e-9)
    assert fm.angle_difference(np.array([170.0]), np.array([-170.0]))[0] == pytest.approx(20)
    x = np.zeros((4, 4, 3), np.uint8)
    y = x.copy()
    y[0, 0] = 10  # one pixel differs by 10 in each channel
    keep = np.ones((4, 4), bool)
    assert fm.masked_psnr(x, y, keep) == pytest.approx(10 * math.log10(255 ** 2 / (100 / 16)))
    keep[0, 0] = False
    assert fm.masked_psnr(x, y, keep) == fm.PSNR_CAP
    assert math.isnan(fm.masked_psnr(x, y, np.zeros((4, 4), bool)))
    img = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    assert fm.masked_ssim(img, img, np.ones((32, 32), bool)) == pytest.approx(1.0)
    assert fm.masked_ssim(img, 255 - img, np.ones((32, 32), bool)) < 0
    assert fm.decay([1.0, 1.0, 0.5, 0.5, 0.4, 0.4, 0.2, 0.2]) == pytest.approx(0.8)
    assert fm.slope_per_100([0.0, 0.01, 0.02, float("nan"), 0.04]) == pytest.approx(1.0)
    assert fm.expression_error([0.1, 0.5], [0.2, 0.1]) == pytest.approx(0.25)


def _rx(d):
    a = math.radians(d)
    return np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])


def _ry(d):
    a = math.radians(d)
    return np.array([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])


def test_fakes_see_the_procedural_truth(truth):
    obs = ellipse_observer()(truth["target"][0])
    _, syn = render_synthetic_sample(FRAMES, SIZE, seed=3, **SAMPLE)
    roll = math.degrees(math.atan2(obs.rotation[1, 0], obs.rotation[0, 0]))
    assert roll == pytest.approx(syn["rolls"][0], abs=2.0)
    want = face_landmarks(*syn["poses"][0], syn["rolls"][0])
    assert np.abs(obs.landmarks - want).max() < 3  # every landmark within 3 px of the drawn face's
    emb = palette_embedder()
    same = emb(np.stack([truth["identity"], truth["target"][0], truth["driving"][0]]))
    assert float(same[0] @ same[1]) > 0.99 and float(same[0] @ same[2]) < 0.1


# ------------------------------------------------------------------------------------ the proof
def test_ground_truth_copy_and_pasted_still_score_as_known(truth, gt):
    copy = score(truth["driving"], truth)
    still = np.asarray(Image.fromarray(truth["identity"]).resize((SIZE[1], SIZE[0])))
    pasted = score(np.stack([still] * FRAMES), truth)
    assert gt["id_mean"] > 0.95 and gt["pose_error"] < 1.0 and gt["landmark_error"] < 0.01
    assert copy["id_mean"] < 0.2 and copy["pose_error"] < 1.0  # the driving face: wrong identity, right pose
    assert pasted["id_mean"] > 0.95 and pasted["pose_error"] > 8.0  # right identity, frozen frontal pose
    assert pasted["landmark_error"] > 10 * max(gt["landmark_error"], 0.01)
    # Magic Mirror's face motion: the pasted face does not move, the swap moves like its source
    assert pasted["fm_inter"] < 0.1 * gt["fm_inter"] and pasted["fm_inter_gap"] > 5 * max(gt["fm_inter_gap"], 1e-3)
    assert gt["fm_inter"] == pytest.approx(gt["fm_inter_driving"], rel=0.05) and pasted["fm_ref"] < 0.02
    # the background: the ground truth keeps the driving video's, the pasted photo does not
    assert gt["bg_psnr"] > 60 and pasted["bg_psnr"] < 20 and gt["bg_ssim"] > 0.99 > pasted["bg_ssim"]
    assert gt["gt_psnr"] is None  # no ground-truth video was given


def test_background_noise_lowers_background_quality_only(truth, gt):
    noisy = truth["target"].astype(np.float64)
    bg = truth["mask"][..., 0] < 128
    noisy[bg] += np.random.default_rng(0).normal(0, 20, size=noisy[bg].shape)
    m = score(np.clip(noisy, 0, 255).astype(np.uint8), truth)
    assert m["bg_psnr"] < gt["bg_psnr"] - 20 and m["bg_ssim"] < gt["bg_ssim"] - 0.2
    assert m["flicker_excess"] > gt["flicker_excess"] + 0.02
    assert m["id_mean"] == pytest.approx(gt["id_mean"], abs=0.02) and m["pose_error"] < 1.0


def test_a_shuffled_frame_shows_in_pose_flicker_and_motion(truth, gt):
    shuffled = truth["target"].copy()
    shuffled[[3, 13]] = shuffled[[13, 3]]
    m = score(shuffled, truth)
    assert m["pose_error"] > gt["pose_error"] + 1.0 and m["pose_error_max"] > 10
    assert m["landmark_error"] > gt["landmark_error"] + 0.01
    assert m["flicker_excess"] > gt["flicker_excess"] + 0.005
    assert m["fm_inter"] > gt["fm_inter"] * 1.3 and m["fm_inter_gap"] > gt["fm_inter_gap"] + 0.005
    assert m["id_mean"] == pytest.approx(gt["id_mean"], abs=0.01)


def test_a_head_rotation_shows_in_the_pose_error(truth, gt):
    rotated = clip(target_roll_offset=15.0)["target"]
    m = score(rotated, truth)
    assert m["pose_error"] == pytest.approx(15.0, abs=2.5) and m["roll_error"] == pytest.approx(15.0, abs=2.5)
    assert m["yaw_error"] < 1e-6 and m["pitch_error"] < 1e-6
    assert m["landmark_error"] > gt["landmark_error"] + 0.1
    assert m["id_mean"] == pytest.approx(gt["id_mean"], abs=0.02)


def test_identity_decay_and_stability(truth):
    fading = truth["target"].copy()
    fading[FRAMES // 2:] = truth["driving"][FRAMES // 2:]  # the identity is lost half-way
    m = score(fading, truth)
    assert m["id_decay"] > 0.8 and m["id_slope"] < -3 and m["id_min"] < 0.2
    assert m["id_stability"] < 0.99 and m["id_change"] > 0.03


def test_without_mask_the_landmarks_give_the_face_region(truth, gt):
    m = score(truth["target"], truth, mask=None)
    assert m["bg_psnr"] > 60 and m["bg_ssim"] > 0.99
    res = bench.score_clip(truth["target"], truth["driving"], truth["identity"], palette_embedder(), None)
    assert res.mask_source is None and res.metrics["bg_psnr"] is None and res.metrics["id_mean"] > 0.95
    assert any("no landmarker" in n for n in res.notes)


def test_other_sized_driving_video_is_aligned_like_the_swap(truth):
    """A swap made at an area cap gives a smaller, cropped video: the driving frames are brought to it with
    the swap's own resize + crop, so an exact swap still scores a clean background."""
    from dreamidv_core.preprocess.video_ops import prepare_frames

    small = (prepare_frames(truth["target"], FRAMES, 100, 60, "t").permute(1, 2, 3, 0).numpy() * 255).round()
    small = small.astype(np.uint8)
    assert small.shape[1:3] != SIZE
    res = bench.score_clip(small, truth["driving"], truth["identity"], palette_embedder(), ellipse_observer(),
                           mask=truth["mask"], area=(100, 60))
    assert res.metrics["pose_error"] < 2.0 and res.metrics["bg_psnr"] > 35


# ------------------------------------------------------------------------------------ files and command
def _write_clip_folder(root, name, swapped, arrays):
    from dreamidv_core.io.video import write_video

    folder = root / name
    folder.mkdir(parents=True)
    write_video(folder / "driving.mp4", arrays["driving"], 24)
    write_video(folder / "mask.mp4", arrays["mask"], 24)
    write_video(folder / "swapped.mp4", swapped, 24)
    Image.fromarray(arrays["identity"]).save(folder / "reference.png")
    return folder


def test_results_files_and_comparison(truth, tmp_path):
    results = [bench.score_clip(truth["target"], truth["driving"], truth["identity"], palette_embedder(),
                                ellipse_observer(), mask=truth["mask"], name="a"),
               bench.score_clip(truth["driving"], truth["driving"], truth["identity"], palette_embedder(),
                                ellipse_observer(), mask=truth["mask"], name="b/odd name")]
    doc = bench.write_results(tmp_path / "r1", results, {"note": "test"})
    files = {p.relative_to(tmp_path / "r1").as_posix() for p in (tmp_path / "r1").rglob("*") if p.is_file()}
    assert files == {"results.json", "per_clip.csv", "aggregate.csv", "summary.png", "plots/a.png",
                     "plots/b_odd_name.png"}
    for p in (tmp_path / "r1").rglob("*.*"):
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o666 & ~_umask(), p  # normal permissions
    loaded = json.loads((tmp_path / "r1" / "results.json").read_text())  # strict JSON: no NaN
    assert loaded == json.loads(json.dumps(doc)) and len(loaded["clips"]) == 2
    rows = list(csv.DictReader((tmp_path / "r1" / "per_clip.csv").open()))
    assert [r["clip"] for r in rows] == ["a", "b/odd name"] and float(rows[0]["id_mean"]) > 0.95
    agg = {r["metric"]: r for r in csv.DictReader((tmp_path / "r1" / "aggregate.csv").open())}
    assert float(agg["id_mean"]["mean"]) == pytest.approx(np.mean([r.metrics["id_mean"] for r in results]))
    assert agg["id_mean"]["clips"] == "2" and agg["gt_psnr"]["clips"] == "0"
    assert np.asarray(Image.open(tmp_path / "r1" / "summary.png")).shape[2] == 3
    # the same clips with a worse swap (a rotated head), side by side
    worse = [bench.score_clip(clip(target_roll_offset=15.0)["target"], truth["driving"], truth["identity"],
                              palette_embedder(), ellipse_observer(), mask=truth["mask"], name="a")]
    bench.write_results(tmp_path / "r2", worse)
    cmp = bench.compare_results(bench.load_results(tmp_path / "r1"), bench.load_results(tmp_path / "r2"),
                                ("exact", "rotated"))
    rows = {r["key"]: r for r in cmp["metrics"]}
    assert cmp["clips"] == ["a"] and cmp["unmatched_clips"] == ["b/odd name"]
    assert rows["pose_error"]["winner"] == "exact" and rows["pose_error"]["delta"] > 10
    assert rows["id_mean"]["winner"] in ("tie", "exact", "rotated") and rows["fm_ref"]["winner"] is None
    bench.write_comparison(tmp_path / "cmp", cmp)
    assert {p.name for p in (tmp_path / "cmp").iterdir()} == {"comparison.csv", "comparison.json", "comparison.png"}
    with pytest.raises(InputError, match="two different names"):
        bench.compare_results(loaded, loaded, ("x", "x"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_clip_discovery_and_errors(truth, tmp_path):
    root = tmp_path / "clips"
    _write_clip_folder(root, "c1", truth["target"], truth)
    clips = bench.discover_clips(root)
    assert len(clips) == 1 and clips[0].mask is not None and clips[0].target is None
    (root / "c2").mkdir()
    with pytest.raises(InputError, match=r"c2: missing driving.mp4, reference.png .*swapped"):
        bench.discover_clips(root)
    (root / "c2").rmdir()
    lst = tmp_path / "list.json"
    lst.write_text(json.dumps([{"name": "x", "driving": "clips/c1/driving.mp4", "reference": "clips/c1/reference.png",
                                "swapped": "clips/c1/swapped.mp4"}]))
    assert bench.discover_clips(lst)[0].swapped == root / "c1" / "swapped.mp4"
    lst.write_text(json.dumps([{"name": "x", "driving": "nope.mp4", "reference": "r.png", "swapped": "s.mp4"}]))
    with pytest.raises(InputError, match="row 1: driving file .*nope.mp4 does not exist"):
        bench.discover_clips(lst)


@pytest.mark.slow
def test_command_scores_a_folder_and_compares(truth, tmp_path, monkeypatch, capsys):
    """``python -m dreamidv_core evaluate`` end to end on real mp4 files (H.264), the identity from the
    random-weight ONNX insightface pack of tests/onnx_models.py, then ``--compare``."""
    pytest.importorskip("insightface")
    from dreamidv_core.cli import main
    from tests import onnx_models as om

    pack = om.build_pack(tmp_path / "insightface", "buffalo_l")
    root = tmp_path / "clips"
    _write_clip_folder(root, "c1", truth["target"], truth)
    swaps = tmp_path / "other"
    swaps.mkdir()
    from dreamidv_core.io.video import write_video
    write_video(swaps / "c1.mp4", truth["driving"], 24)
    assert main(["evaluate", "--clips", str(root), "--out", str(tmp_path / "A"), "--insightface", str(pack)]) == 0
    assert main(["evaluate", "--clips", str(root), "--swapped-dir", str(swaps), "--out", str(tmp_path / "B"),
                 "--insightface", str(pack)]) == 0
    a = bench.load_results(tmp_path / "A")
    clip_a = a["clips"][0]
    assert clip_a["frames"] == FRAMES and clip_a["mask_source"] == "mask"
    assert clip_a["metrics"]["bg_psnr"] > 30  # H.264 round trip of the same background
    assert clip_a["metrics"]["pose_error"] is None  # no landmarker given
    assert main(["evaluate", "--compare", str(tmp_path / "A"), str(tmp_path / "B"), "--labels", "gt,copy",
                 "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert "comparison of 1 clips" in out and (tmp_path / "cmp" / "comparison.png").is_file()
    assert main(["evaluate", "--clips", str(tmp_path / "missing"), "--out", str(tmp_path / "X")]) == 2
    assert "neither a folder" in capsys.readouterr().err


@pytest.mark.shared_assets
def test_mediapipe_observer_on_the_real_photo(shared_dir):
    """Optional (../shared): the real MediaPipe landmarker gives a rotation, blendshapes and 478 landmarks,
    and a rotated photo a head-pose error of about the rotation (in-plane)."""
    task = shared_dir / "assets" / "face_landmarker_v2_with_blendshapes.task"
    photo = shared_dir / "assets" / "an_1.jpg"
    if not task.is_file() or not photo.is_file():
        pytest.skip(f"{shared_dir}/assets lacks the MediaPipe task or an_1.jpg")
    pytest.importorskip("mediapipe")
    from dreamidv_core.preprocess.pose.mediapipe_face import FaceLandmarker

    img = Image.open(photo).convert("RGB")
    img.thumbnail((512, 512))
    with FaceLandmarker(str(task)) as lm:
        observe = fm.mediapipe_observer(lm)
        a = observe(np.asarray(img))
        b = observe(np.asarray(img.rotate(-20, resample=Image.BICUBIC, expand=False)))
        assert lm.blendshape_names and len(lm.blendshape_names) == a.expression.size == 51
    assert a.landmarks.shape == (478, 2) and b is not None
    err = fm.pose_errors(b, a)
    assert err["pose"] == pytest.approx(20, abs=2) and err["roll"] == pytest.approx(20, abs=2)
    assert err["yaw"] < 2 and err["pitch"] < 2 and err["expression"] < 0.05
