"""The command-line swap end to end on tiny models, the converter, and missing-weights guidance."""
import functools

import numpy as np
import pytest
import torch

from dreamidv_core.models import vae as vae_module
from dreamidv_core.weights.checkpoints import save_dit
from dreamidv_core.cli import main
from dreamidv_core.models.configs import tiny_config
from dreamidv_core.models.dit import DreamIDVTransformer, init_random_
from dreamidv_core.io.state_dict import save_safetensors
from dreamidv_core.models.vae import TINY_VAE_CONFIG, WanVAE
from dreamidv_core.io.video import read_video, write_video


@pytest.fixture
def models_dir(tmp_path, monkeypatch):
    root = tmp_path / "models"
    dit = init_random_(DreamIDVTransformer(tiny_config("full", text_dim=4096)), seed=2)
    save_dit(dit, root / "diffusion_models" / "dreamidv.safetensors")
    save_safetensors(WanVAE(TINY_VAE_CONFIG).state_dict(), root / "vae" / "wan_2.1_vae.safetensors")
    # the CLI loads the real-size VAE; these tests use the tiny one
    monkeypatch.setattr(vae_module, "load_wan_vae", functools.partial(vae_module.load_wan_vae, config=TINY_VAE_CONFIG))
    return root


def write_inputs(tmp_path, frames=13, h=48, w=64):
    rng = np.random.default_rng(0)
    video = rng.integers(0, 256, (frames, h, w, 3), dtype=np.uint8)
    mask = np.zeros_like(video)
    mask[:, 10:40, 20:50] = 255
    pose = np.zeros_like(video)
    pose[:, 20:24, 30:34] = 255
    for name, arr in (("video", video), ("mask", mask), ("pose", pose)):
        write_video(tmp_path / f"{name}.mp4", arr, fps=12.5)
    from PIL import Image
    Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(tmp_path / "face.png")
    torch.save([torch.randn(3, 4096)], tmp_path / "context.pth")  # the official context.pth layout


def test_cli_swap_end_to_end(tmp_path, models_dir, capsys):
    write_inputs(tmp_path)
    out = tmp_path / "out" / "swapped.mp4"
    rc = main(["swap", "--video", str(tmp_path / "video.mp4"), "--mask", str(tmp_path / "mask.mp4"),
               "--pose", str(tmp_path / "pose.mp4"), "--reference", str(tmp_path / "face.png"),
               "--context", str(tmp_path / "context.pth"), "--models-dir", str(models_dir), "--out", str(out),
               "--size", "64*48", "--steps", "2", "--frame-num", "11", "--weight-dtype", "fp32", "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    frames, fps = read_video(out)
    assert frames.shape == (11, 48, 64, 3)  # the first 11 frames, all kept; 64x48 already multiples of 16
    assert fps == pytest.approx(12.5)


def test_cli_swap_face_crop_pastes_into_the_full_frames(tmp_path, models_dir, capsys):
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:96, 0:160]
    smooth = np.stack([xx * 1.5, yy * 2.5, np.full_like(xx, 120)], -1).astype(np.uint8)  # what a codec keeps
    video = np.repeat(smooth[None], 9, 0)
    mask = np.zeros_like(video)
    mask[:, 20:36, 40:56] = 255  # a 16 px face: a 48x64 window, swapped at 48x64 and pasted back
    for name, arr in (("video", video), ("mask", mask), ("pose", np.zeros_like(video))):
        write_video(tmp_path / f"{name}.mp4", arr, fps=10)
    from PIL import Image
    Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(tmp_path / "face.png")
    torch.save([torch.randn(3, 4096)], tmp_path / "context.pth")
    out = tmp_path / "crop.mp4"
    args = ["swap", "--video", str(tmp_path / "video.mp4"), "--mask", str(tmp_path / "mask.mp4"),
            "--pose", str(tmp_path / "pose.mp4"), "--reference", str(tmp_path / "face.png"),
            "--context", str(tmp_path / "context.pth"), "--models-dir", str(models_dir), "--size", "64*48",
            "--steps", "1", "--weight-dtype", "fp32", "--device", "cpu"]
    rc = main(args + ["--out", str(out), "--face-crop", "--crop-margin", "1"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "face crop: windows 48-48 px high" in captured.out and "wrote" in captured.out
    frames, _ = read_video(out)
    assert frames.shape == (9, 96, 160, 3)  # the source's size, not the model's
    src, _ = read_video(tmp_path / "video.mp4")
    far = np.abs(frames[:, 70:, 100:].astype(int) - src[:, 70:, 100:].astype(int)).mean()
    near = np.abs(frames[:, 22:34, 42:54].astype(int) - src[:, 22:34, 42:54].astype(int)).mean()
    assert far < 3 < near  # outside the window: the source (up to the video codec); the face: swapped
    rc = main(args + ["--out", str(tmp_path / "t.mp4"), "--target", "index", "--target-index", "1"])
    assert rc == 2 and "with --mask the mask already marks the person" in capsys.readouterr().err
    assert not (tmp_path / "t.mp4").exists()


def test_cli_missing_weights_says_what_and_where(tmp_path, capsys):
    write_inputs(tmp_path)
    rc = main(["swap", "--video", str(tmp_path / "video.mp4"), "--mask", str(tmp_path / "mask.mp4"),
               "--reference", str(tmp_path / "face.png"), "--models-dir", str(tmp_path / "empty"),
               "--out", str(tmp_path / "o.mp4")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "diffusion_models" in err and "dreamidv.pth" in err and "wan_2.1_vae.safetensors" in err
    assert not (tmp_path / "o.mp4").exists()


def test_cli_bad_video_is_a_clear_error(tmp_path, models_dir, capsys):
    write_inputs(tmp_path)
    (tmp_path / "broken.mp4").write_bytes(b"nope")
    rc = main(["swap", "--video", str(tmp_path / "broken.mp4"), "--mask", str(tmp_path / "mask.mp4"),
               "--pose", str(tmp_path / "pose.mp4"), "--reference", str(tmp_path / "face.png"),
               "--context", str(tmp_path / "context.pth"), "--models-dir", str(models_dir),
               "--out", str(tmp_path / "o.mp4")])
    assert rc == 2 and "broken.mp4" in capsys.readouterr().err
    assert not (tmp_path / "o.mp4").exists()


def test_cli_convert(tmp_path, capsys):
    model = DreamIDVTransformer(tiny_config("faster"))
    torch.save(model.state_dict(), tmp_path / "dreamidv_faster.pth")
    rc = main(["convert", str(tmp_path / "dreamidv_faster.pth"), str(tmp_path / "f.safetensors"), "--dtype", "bf16"])
    assert rc == 0 and "DreamID-V DiT (faster)" in capsys.readouterr().out
    assert (tmp_path / "f.safetensors").stat().st_size > 0


@pytest.mark.shared_assets
def test_cli_swap_makes_pose_and_mask_with_mediapipe(tmp_path, models_dir, shared_dir, capsys):
    import shutil

    from PIL import Image

    frames, _ = read_video(shared_dir / "assets" / "a_girl.mp4", max_frames=9)
    small = np.stack([np.asarray(Image.fromarray(f).resize((480, 310))) for f in frames])
    write_video(tmp_path / "girl.mp4", small, fps=24)
    (models_dir / "mediapipe").mkdir()
    shutil.copy(shared_dir / "assets" / "face_landmarker_v2_with_blendshapes.task", models_dir / "mediapipe")
    torch.save([torch.randn(3, 4096)], tmp_path / "context.pth")
    out = tmp_path / "swapped.mp4"
    rc = main(["swap", "--video", str(tmp_path / "girl.mp4"), "--reference", str(shared_dir / "assets" / "an_1.jpg"),
               "--context", str(tmp_path / "context.pth"), "--models-dir", str(models_dir), "--out", str(out),
               "--size", "64*48", "--steps", "1", "--weight-dtype", "fp32", "--device", "cpu"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "pose and mask from the video" in captured.out
    assert read_video(out)[0].shape[0] == 9


# ---------------------------------------------------------------------------- streaming video files
def test_video_reader_is_lazy_and_random_access(tmp_path):
    from dreamidv_core.io.video import VideoReader

    frames = np.repeat(np.arange(0, 240, 8, dtype=np.uint8)[:, None, None, None], 3, axis=-1)
    frames = np.broadcast_to(frames, (30, 32, 48, 3)).copy()
    write_video(tmp_path / "ramp.mp4", frames, fps=10)
    reader = VideoReader(tmp_path / "ramp.mp4", cache=4)
    assert len(reader) == 30 and reader.shape == (30, 32, 48, 3) and reader.fps == pytest.approx(10)
    means = [float(reader[i].mean()) for i in range(30)]
    assert np.allclose(means, np.arange(0, 240, 8), atol=2)  # every frame is the right one, in order
    assert len(reader._cache) <= 4  # only the last few decoded frames are held
    assert abs(float(reader[3].mean()) - 24) <= 2  # going back restarts decoding
    assert reader[5:9].shape == (4, 32, 48, 3) and abs(float(reader[-1].mean()) - 232) <= 2
    assert len(VideoReader(tmp_path / "ramp.mp4", max_frames=7)) == 7
    with pytest.raises(IndexError):
        reader[30]


def test_video_writer_leaves_nothing_on_failure(tmp_path):
    from dreamidv_core.io.video import VideoWriter

    good = np.zeros((3, 16, 16, 3), np.uint8)
    write_video(tmp_path / "out.mp4", good, fps=8)
    before = (tmp_path / "out.mp4").read_bytes()
    with pytest.raises(RuntimeError):
        with VideoWriter(tmp_path / "out.mp4", fps=8) as writer:
            writer.write(np.full((2, 16, 16, 3), 200, np.uint8))
            raise RuntimeError("crash mid-write")
    assert (tmp_path / "out.mp4").read_bytes() == before  # the previous file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]  # no temporary left behind
    with pytest.raises(Exception, match="differs"):
        with VideoWriter(tmp_path / "new.mp4", fps=8) as writer:
            writer.write(good)
            writer.write(np.zeros((1, 32, 16, 3), np.uint8))
    assert not (tmp_path / "new.mp4").exists()


def test_swap_from_lazy_reader_equals_in_memory_frames(tmp_path, tiny_swap_models):
    """The CLI's lazy reader gives the swap exactly the frames an in-memory array does."""
    from dreamidv_core.pipelines.swap import SwapSettings, swap_face
    from dreamidv_core.io.video import VideoReader

    write_inputs(tmp_path, frames=13)
    dit, vae = tiny_swap_models
    ref = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(tmp_path / "face.png").convert("RGB"))
    context = torch.randn(3, 48, generator=torch.Generator().manual_seed(0))
    settings = SwapSettings(width=64, height=48, steps=2, window=9, overlap=4)
    lazy = [VideoReader(tmp_path / f"{n}.mp4", cache=6) for n in ("video", "mask", "pose")]
    eager = [read_video(tmp_path / f"{n}.mp4")[0] for n in ("video", "mask", "pose")]
    with torch.no_grad():
        a = swap_face(dit, vae, lazy[0], lazy[1], ref, context, pose=lazy[2], settings=settings).frames
        b = swap_face(dit, vae, eager[0], eager[1], ref, context, pose=eager[2], settings=settings).frames
    assert a.shape == (13, 48, 64, 3)
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------- up-front checks (issue 11)
def swap_args(tmp_path, models_dir, *extra, out=None):
    return ["swap", "--video", str(tmp_path / "video.mp4"), "--mask", str(tmp_path / "mask.mp4"),
            "--pose", str(tmp_path / "pose.mp4"), "--reference", str(tmp_path / "face.png"),
            "--context", str(tmp_path / "context.pth"), "--models-dir", str(models_dir),
            "--out", str(out or tmp_path / "o.mp4"), "--size", "64*48", "--steps", "1", "--frame-num", "5",
            "--weight-dtype", "fp32", "--device", "cpu", *extra]


@pytest.fixture
def no_compute(monkeypatch):
    """Fails the test if the swap loads a model: every check below must come before any work."""
    from dreamidv_core.weights import checkpoints

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the options were checked")
    monkeypatch.setattr(checkpoints, "load_dit", refuse)


@pytest.mark.parametrize("extra, words", [
    (("--steps", "0"), "--steps must be >= 1, got 0"),
    (("--shift", "0"), "--shift must be > 0, got 0.0"),
    (("--guidance", "nan"), "--guidance must be a finite number, got nan"),
    (("--device", "tpu7"), "--device 'tpu7' is not a device; use auto, cpu, cuda, cuda:N or mps"),
    (("--fps", "-5"), "--fps must be > 0, got -5.0 (leave --fps out to keep the source's frame rate)"),
    (("--fps", "0"), "--fps must be > 0, got 0.0"),
    (("--frame-num", "3"), "--frame-num must be >= 5"),
    (("--background-strength", "1.5"), "--background-strength must be <= 1"),
    (("--every-nth", "0"), "--every-nth must be >= 1, got 0"),
    (("--start-frame", "-1"), "--start-frame must be >= 0, got -1"),
])
def test_cli_bad_numbers_are_messages_before_any_work(tmp_path, models_dir, no_compute, capsys, extra, words):
    write_inputs(tmp_path)
    rc = main(swap_args(tmp_path, models_dir, *extra))
    err = capsys.readouterr().err
    assert rc == 2 and words in err and "Traceback" not in err, err
    assert not (tmp_path / "o.mp4").exists()


def test_cli_cuda_without_a_gpu_is_a_message(tmp_path, models_dir, no_compute, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    write_inputs(tmp_path)
    assert main(swap_args(tmp_path, models_dir, "--device", "cuda:1")) == 2
    assert "no CUDA GPU is usable here" in capsys.readouterr().err


def test_cli_output_path_problems_are_found_before_any_work(tmp_path, models_dir, no_compute, capsys):
    write_inputs(tmp_path)
    for out, words in [(tmp_path / "face.png" / "o.mp4", "face.png' is a file, not a folder"),
                       (tmp_path, "is an existing folder; give a file name")]:
        assert main(swap_args(tmp_path, models_dir, out=out)) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, err


@pytest.mark.parametrize("command", ["swap-batch", "syncid-batch", "swap --ulysses 2"])
def test_cli_batch_and_parallel_commands_check_options_and_outputs_first(tmp_path, models_dir, no_compute, capsys,
                                                                         monkeypatch, command):
    """swap-batch, syncid-batch and the parallel swap say a bad number, device or output before any process
    group is made or any model loaded."""
    from dreamidv_core.parallel import mesh

    def refuse(*a, **k):
        raise AssertionError("a process group was made before the options were checked")
    monkeypatch.setattr(mesh, "init_mesh", refuse)
    write_inputs(tmp_path)
    if command.startswith("swap "):
        base = swap_args(tmp_path, models_dir, "--ulysses", "2")
        out = lambda target: [a if a != str(tmp_path / "o.mp4") else str(target) for a in base]  # noqa: E731
        cases = [(base + ["--steps", "0"], "--steps must be >= 1, got 0"),
                 (base + ["--device", "tpu7"], "--device 'tpu7' is not a device"),
                 (out(tmp_path), "is an existing folder; give a file name")]
    else:
        io_opt = "--inputs" if command == "swap-batch" else "--clips"
        base = [command, io_opt, str(tmp_path), "--models-dir", str(models_dir), "--size", "64*48", "--steps", "1"]
        cases = [(base + ["--out-dir", str(tmp_path / "out"), "--steps", "0"], "--steps must be >= 1, got 0"),
                 (base + ["--out-dir", str(tmp_path / "out"), "--shift", "nan"], "--shift must be a finite number"),
                 (base + ["--out-dir", str(tmp_path / "face.png" / "out")], "face.png' is a file, not a folder")]
    for argv, words in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_plain_wan_t2v_file_naming_it_and_the_expected_one(tmp_path, models_dir, capsys):
    write_inputs(tmp_path)
    wan = init_random_(DreamIDVTransformer(tiny_config("wan_t2v", text_dim=4096)), seed=0)
    save_dit(wan, tmp_path / "wan2.1_t2v_1.3B.safetensors")
    rc = main(swap_args(tmp_path, models_dir, "--dit", str(tmp_path / "wan2.1_t2v_1.3B.safetensors")))
    err = capsys.readouterr().err
    assert rc == 2 and "plain Wan2.1-T2V" in err and "dreamidv.safetensors" in err and "wan2.1_t2v_1.3B" in err


def test_cli_bad_config_metadata_is_a_message(tmp_path, models_dir, capsys):
    write_inputs(tmp_path)
    dit = init_random_(DreamIDVTransformer(tiny_config("full", text_dim=4096)), seed=2)
    save_safetensors(dit.state_dict(), tmp_path / "edited.safetensors", metadata={"dreamidv_config": "{oops"})
    rc = main(swap_args(tmp_path, models_dir, "--dit", str(tmp_path / "edited.safetensors")))
    err = capsys.readouterr().err
    assert rc == 2 and "edited.safetensors" in err and "'dreamidv_config' metadata" in err and "Traceback" not in err


def test_cli_output_is_readable_by_others_and_stale_partials_go(tmp_path, models_dir, capsys, caplog):
    import logging
    import os
    import subprocess
    import sys

    from dreamidv_core.io import files

    write_inputs(tmp_path)
    out = tmp_path / "out" / "swapped.mp4"
    out.parent.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = out.parent / f".swapped.mp4.{files._host()}-{dead.pid}-abcd1234.partial"  # left by a killed run
    stale.write_bytes(b"half a video")
    old = os.umask(0o022)
    try:
        with caplog.at_level(logging.WARNING):
            assert main(swap_args(tmp_path, models_dir, out=out)) == 0, capsys.readouterr().err
    finally:
        os.umask(old)
    assert not stale.exists() and "left by an interrupted run" in caplog.text
    assert oct(out.stat().st_mode & 0o777) == oct(0o644)  # not mkstemp's 0600
    assert sorted(p.name for p in out.parent.iterdir()) == ["swapped.mp4"]


class _Face:
    """A FaceFrame stand-in: landmarks of a face box (normalised)."""

    def __init__(self, x0, y0, x1, y1, tag):
        self.landmarks = np.array([[x0, y0, 0], [x1, y1, 0], [(x0 + x1) / 2, (y0 + y1) / 2, 0]], float)
        self.tag = tag


def test_reference_face_choice_largest_or_index_and_said(capsys):
    from dreamidv_core.cli import choose_reference_face
    from dreamidv_core.errors import InputError

    small_right, big_left = _Face(0.6, 0.1, 0.8, 0.3, "small"), _Face(0.05, 0.1, 0.45, 0.7, "big")
    faces = [small_right, big_left]  # MediaPipe's order is not left to right
    assert choose_reference_face(faces, "largest", (100, 200, 3)).tag == "big"
    out = capsys.readouterr().out
    assert "2 faces found, left to right" in out and "using face 0 (the largest" in out
    assert choose_reference_face(faces, 1, (100, 200, 3)).tag == "small"
    assert "using face 1 (--reference-face)" in capsys.readouterr().out
    with pytest.raises(InputError, match="--reference-face 2: the reference photo has 2 faces"):
        choose_reference_face(faces, 2, (100, 200, 3))
    assert choose_reference_face([small_right], "largest", (100, 200, 3)).tag == "small"
    assert capsys.readouterr().out == ""  # one face: nothing to say


def test_cli_reference_with_two_faces_retargets_onto_the_chosen_one(tmp_path, models_dir, capsys, monkeypatch):
    """The CLI with MediaPipe (a stand-in landmarker): the chosen reference face is the one the pose is
    retargeted onto, and the choice is printed."""
    from dreamidv_core.preprocess.pose import extract, mediapipe_face

    faces = [_Face(0.6, 0.1, 0.8, 0.3, "small"), _Face(0.05, 0.1, 0.45, 0.7, "big")]
    seen = {}

    class Landmarker:
        def __init__(self, path, num_faces=1, tile_levels=0):
            self.num_faces = num_faces

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def detect_all(self, image):
            return faces

    def fake_track(video, landmarker, reference=None, **kw):  # a PoseResult has the track's mask/pose/present/info
        seen["reference"] = reference
        n, h, w = len(video), *video[0].shape[:2]
        return extract.PoseResult(np.zeros((n, h, w, 3), np.float32), np.ones((n, h, w), np.float32), [{}] * n)

    monkeypatch.setattr(mediapipe_face, "FaceLandmarker", Landmarker)
    monkeypatch.setattr(extract, "track_mediapipe", fake_track)
    write_inputs(tmp_path)
    (models_dir / "mediapipe").mkdir()
    (models_dir / "mediapipe" / "face_landmarker_v2_with_blendshapes.task").write_bytes(b"stand-in")
    args = [a for a in swap_args(tmp_path, models_dir, "--reference-face", "1")
            if a not in (str(tmp_path / "mask.mp4"), str(tmp_path / "pose.mp4"), "--mask", "--pose")]
    assert main(args) == 0, capsys.readouterr().err
    assert seen["reference"].tag == "small" and "using face 1 (--reference-face)" in capsys.readouterr().out


def test_cli_swap_keeps_the_sound_and_the_exact_rate_and_takes_a_frame_range(tmp_path, models_dir, capsys):
    import av

    from tests.test_video_stream import NTSC, make_clip

    make_clip(tmp_path / "video.mp4", frames=16, size=(64, 48))  # 30000/1001 fps, AAC stereo
    mask = np.zeros((16, 48, 64, 3), np.uint8)
    mask[:, 10:40, 20:50] = 255
    write_video(tmp_path / "mask.mp4", mask, fps=NTSC)
    write_video(tmp_path / "pose.mp4", np.zeros_like(mask), fps=NTSC)
    from PIL import Image
    Image.fromarray(np.full((40, 30, 3), 128, np.uint8)).save(tmp_path / "face.png")
    torch.save([torch.randn(3, 4096)], tmp_path / "context.pth")
    common = ["swap", "--video", str(tmp_path / "video.mp4"), "--mask", str(tmp_path / "mask.mp4"), "--pose",
              str(tmp_path / "pose.mp4"), "--reference", str(tmp_path / "face.png"), "--context",
              str(tmp_path / "context.pth"), "--models-dir", str(models_dir), "--size", "64*48", "--steps", "1",
              "--weight-dtype", "fp32", "--device", "cpu"]

    def streams(path):
        with av.open(str(path)) as c:
            v = c.streams.video[0]
            a = c.streams.audio[0] if c.streams.audio else None
            return v.average_rate, v.frames, None if a is None else float(a.duration * a.time_base)

    assert main(common + ["--out", str(tmp_path / "all.mp4")]) == 0, capsys.readouterr().err
    rate, frames, sound = streams(tmp_path / "all.mp4")
    assert rate == NTSC and frames == 16 and sound == pytest.approx(float(16 / NTSC), abs=0.03)
    assert main(common + ["--out", str(tmp_path / "range.mp4"), "--start-frame", "2", "--every-nth", "2",
                          "--frame-num", "5"]) == 0, capsys.readouterr().err
    rate, frames, sound = streams(tmp_path / "range.mp4")
    assert rate == NTSC / 2 and frames == 5 and sound == pytest.approx(float(10 / NTSC), abs=0.03)
    assert main(common + ["--out", str(tmp_path / "crop.mp4"), "--face-crop", "--start-frame", "2", "--every-nth",
                          "2", "--frame-num", "5"]) == 0, capsys.readouterr().err  # face crop streams the range too
    assert streams(tmp_path / "crop.mp4") == (rate, 5, sound)
    assert main(common + ["--out", str(tmp_path / "mute.mp4"), "--no-audio"]) == 0
    assert streams(tmp_path / "mute.mp4")[2] is None
    assert main(common + ["--out", str(tmp_path / "short.mp4"), "--start-frame", "12"]) == 2
    assert "at least 5" in capsys.readouterr().err and not (tmp_path / "short.mp4").exists()
