"""Batches without torchrun: job lists and folders (with clear errors), balancing, a failed clip reported while
the others go on, resume; the SyncID-Pipe over a folder (stand-in landmarker and ArcFace), resumable by markers."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dreamidv_core.errors import InputError
from dreamidv_core.io.video import write_video
from dreamidv_core.parallel.batch import Job, balance, read_job_table
from dreamidv_core.parallel.mesh import Mesh
from dreamidv_core.pipelines.swap_batch import swap_jobs


def small_video(path: Path, frames=5, seed=0, h=32, w=48):
    write_video(path, np.random.default_rng(seed).integers(0, 256, (frames, h, w, 3), dtype=np.uint8), fps=10)


def image(path: Path, seed=0, pixel0=None):
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    if pixel0 is not None:
        arr[0, 0] = pixel0
    Image.fromarray(arr).save(path)


# ------------------------------------------------------------------------------------------------ job lists

def test_folder_pairs_videos_with_same_named_faces_or_one_reference(tmp_path):
    for name in ("b", "a", "c"):
        small_video(tmp_path / f"{name}.mp4")
    image(tmp_path / "a.png")
    with pytest.raises(InputError, match="no reference face for b.mp4, c.mp4.*--reference"):
        swap_jobs(tmp_path)
    image(tmp_path / "all.jpg")
    jobs = swap_jobs(tmp_path, reference=tmp_path / "all.jpg")
    assert [j.name for j in jobs] == ["a", "b", "c"]
    assert jobs[0].files["reference"].endswith("a.png") and jobs[1].files["reference"].endswith("all.jpg")
    assert jobs[0].cost == 5 * 32 * 48


def test_job_lists_csv_and_jsonl_with_clear_errors(tmp_path):
    small_video(tmp_path / "v.mp4")
    image(tmp_path / "f.png")
    (tmp_path / "ok.jsonl").write_text('{"video": "v.mp4", "reference": "f.png", "seed": 7}\n'
                                       '# a comment\n{"video": "v.mp4", "reference": "f.png", "name": "again"}\n')
    jobs = swap_jobs(tmp_path / "ok.jsonl")
    assert [(j.name, j.seed) for j in jobs] == [("v", 7), ("again", None)]
    assert Path(jobs[0].files["video"]).is_absolute()
    (tmp_path / "dup.csv").write_text("video,reference\nv.mp4,f.png\nv.mp4,f.png\n")
    with pytest.raises(InputError, match="jobs 1 and 2 are both named 'v'"):
        swap_jobs(tmp_path / "dup.csv")
    (tmp_path / "missing.csv").write_text("video,reference,name\nnope.mp4,f.png,x\nv.mp4,gone.png,y\n")
    with pytest.raises(InputError, match=r"2 input files missing:\n  x: video .*nope.mp4\n  y: reference .*gone.png"):
        swap_jobs(tmp_path / "missing.csv")
    (tmp_path / "typo.csv").write_text("video,refrence\nv.mp4,f.png\n")
    with pytest.raises(InputError, match="line 2: unknown field refrence"):
        read_job_table(tmp_path / "typo.csv", ("video", "reference"))
    (tmp_path / "bad.jsonl").write_text('{"video": "v.mp4", "reference": "f.png", "seed": "x"}\n')
    with pytest.raises(InputError, match="seed 'x' is not an integer"):
        swap_jobs(tmp_path / "bad.jsonl")
    with pytest.raises(InputError, match="neither a folder"):
        swap_jobs(tmp_path / "nothing.txt")


def test_balance_puts_the_longest_clips_first_on_the_least_loaded_group():
    jobs = [Job(name, {}, cost=c) for name, c in zip("abcdef", (5, 1, 4, 3, 3, 2))]
    shares = balance(jobs, 2)  # a5 -> 0, c4 -> 1, d3 -> 1 (4 < 5), e3 -> 0 (5 < 7), f2 -> 1 (7 < 8), b1 -> 0
    assert [[j.name for j in s] for s in shares] == [["a", "e", "b"], ["c", "d", "f"]]
    assert [sum(j.cost for j in s) for s in shares] == [9, 9]
    assert balance(list(reversed(jobs)), 2) == shares and balance([], 3) == [[], [], []]


# ------------------------------------------------------------------------------------------------ swap-batch

@pytest.fixture
def cli_models(tmp_path, monkeypatch):
    from dreamidv_core.io.state_dict import save_safetensors
    from dreamidv_core.models import vae as vae_module
    from dreamidv_core.models.configs import tiny_config
    from dreamidv_core.models.dit import DreamIDVTransformer, init_random_
    from dreamidv_core.models.vae import TINY_VAE_CONFIG, WanVAE
    from dreamidv_core.weights.checkpoints import save_dit

    root = tmp_path / "models"
    save_dit(init_random_(DreamIDVTransformer(tiny_config("full", text_dim=4096)), seed=2),
             root / "diffusion_models" / "dreamidv.safetensors")
    save_safetensors(WanVAE(TINY_VAE_CONFIG).state_dict(), root / "vae" / "wan_2.1_vae.safetensors")
    monkeypatch.setattr(vae_module, "load_wan_vae", functools.partial(vae_module.load_wan_vae, config=TINY_VAE_CONFIG))
    torch.save([torch.randn(3, 4096)], tmp_path / "context.pth")
    return ["--context", str(tmp_path / "context.pth"), "--models-dir", str(root), "--size", "48*32", "--steps", "2",
            "--weight-dtype", "fp32", "--device", "cpu"]


def test_swap_batch_reports_a_bad_clip_goes_on_and_a_rerun_retries_only_it(tmp_path, cli_models, capsys, one_thread):
    from dreamidv_core.cli import main

    rows = ["video,reference,mask,pose,name"]
    for k in range(3):
        small_video(tmp_path / f"v{k}.mp4", seed=k)
        small_video(tmp_path / f"m{k}.mp4", seed=10 + k)
        rows.append(f"v{k}.mp4,f.png,m{k}.mp4,m{k}.mp4,c{k}")
    image(tmp_path / "f.png")
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    rows[2] = "broken.mp4,f.png,m1.mp4,m1.mp4,c1"
    (tmp_path / "jobs.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    args = ["swap-batch", "--inputs", str(tmp_path / "jobs.csv"), "--out-dir", str(out), *cli_models]
    assert main(args) == 1
    text = capsys.readouterr().out
    assert "3 clips: 2 done, 0 skipped (finished before), 1 failed" in text
    assert "failed: c1: failed" in text and "broken.mp4: not a readable video" in text
    assert sorted(p.name for p in out.iterdir()) == ["c0.mp4", "c2.mp4"]
    done = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    rows[2] = "v1.mp4,f.png,m1.mp4,m1.mp4,c1"
    (tmp_path / "jobs.csv").write_text("\n".join(rows) + "\n")
    assert main(args) == 0
    assert "3 clips: 1 done, 2 skipped (finished before), 0 failed" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["c0.mp4", "c1.mp4", "c2.mp4"]
    assert all((out / n).stat().st_mtime_ns == t for n, t in done.items())
    assert main(args) == 0 and "0 to do" in capsys.readouterr().out  # nothing left: no model is even loaded
    (tmp_path / "same.csv").write_text("video,reference,mask,pose\nv0.mp4,f.png,m0.mp4,m0.mp4\n")
    assert main(["swap-batch", "--inputs", str(tmp_path / "same.csv"), "--out-dir", str(tmp_path), *cli_models]) == 2
    assert "v0.mp4 would be one of its clip's input files" in capsys.readouterr().err  # never written over


def test_swap_batch_keeps_the_sound_and_exact_rate_and_refuses_a_frame_range(tmp_path, cli_models, capsys,
                                                                             one_thread):
    import av

    from dreamidv_core.cli import main
    from tests.test_video_stream import NTSC, make_clip

    make_clip(tmp_path / "v.mp4", frames=9, size=(48, 32))  # 30000/1001 fps, AAC stereo
    small_video(tmp_path / "m.mp4", frames=9, seed=3)
    image(tmp_path / "f.png")
    (tmp_path / "jobs.csv").write_text("video,reference,mask,pose,name\nv.mp4,f.png,m.mp4,m.mp4,c\n")
    args = ["swap-batch", "--inputs", str(tmp_path / "jobs.csv"), "--out-dir", str(tmp_path / "out"), *cli_models]
    assert main(args) == 0, capsys.readouterr().err
    with av.open(str(tmp_path / "out" / "c.mp4")) as c:
        v, a = c.streams.video[0], c.streams.audio[0]
        assert v.average_rate == NTSC and v.frames == 9
        assert float(a.duration * a.time_base) == pytest.approx(float(9 / NTSC), abs=0.03)
    assert main(args[:4] + [str(tmp_path / "out2"), *cli_models, "--every-nth", "2"]) == 2
    assert "--every-nth are not available with several processes or swap-batch" in capsys.readouterr().err


def test_swap_with_a_parallel_layout_outside_torchrun_says_how_to_start_it(tmp_path, cli_models, capsys):
    from dreamidv_core.cli import main

    small_video(tmp_path / "v.mp4")
    image(tmp_path / "f.png")
    base = ["swap", "--video", str(tmp_path / "v.mp4"), "--reference", str(tmp_path / "f.png"), "--mask",
            str(tmp_path / "v.mp4"), "--pose", str(tmp_path / "v.mp4"), "--out", str(tmp_path / "o.mp4"), *cli_models]
    assert main(base + ["--ulysses", "2", "--cfg-parallel"]) == 2
    assert "needs 4 processes per clip: start it under torchrun, e.g. torchrun --nproc_per_node=4" in \
        capsys.readouterr().err
    assert main(base + ["--dit-fsdp"]) == 2
    assert "--dit-fsdp shards the weights over the ranks that work on one clip" in capsys.readouterr().err
    assert not (tmp_path / "o.mp4").exists()


# ------------------------------------------------------------------------------------------------ syncid-batch

def test_syncid_batch_over_a_folder_is_resumable_by_markers(tmp_path, one_thread):
    from dreamidv_core.models.configs import tiny_config
    from dreamidv_core.models.dit import DreamIDVTransformer, init_random_
    from dreamidv_core.models.vae import TINY_VAE_CONFIG, WanVAE
    from dreamidv_core.synthesis.batch import marker_path, run_syncid_batch, syncid_jobs
    from dreamidv_core.synthesis.pipeline import SyncIDModels, SyncIDSettings
    from dreamidv_core.synthesis.writer import QuadrupletSettings
    from tests.test_synthesis import FakeLandmarker

    clips, faces, root = tmp_path / "clips", tmp_path / "faces", tmp_path / "dataset"
    clips.mkdir()
    faces.mkdir()
    for k in range(2):  # the stand-in landmarker sees a face where pixel (0, 0) is red
        frames = np.random.default_rng(k).integers(0, 256, (5, 32, 48, 3), dtype=np.uint8)
        frames[:, :4, :4] = [255, 100, 60]
        write_video(clips / f"real{k}.mp4", frames, fps=10)
    image(faces / "ig.png", seed=3, pixel0=[255, 130, 0])
    image(clips / "real1.png", seed=4, pixel0=[255, 90, 0])  # a photo of real1's person: its backward identity
    jobs = syncid_jobs(clips, faces)
    assert [(j.name, sorted(j.files)) for j in jobs] == [("real0", ["clip", "identity"]),
                                                         ("real1", ["clip", "identity", "real_identity"])]
    dit = init_random_(DreamIDVTransformer(tiny_config("full", text_dim=48)), seed=1).eval()
    ivs = init_random_(DreamIDVTransformer(tiny_config("ivs", text_dim=48)), seed=2).eval()
    models = SyncIDModels(dit=dit, ivs=ivs, vae=WanVAE(TINY_VAE_CONFIG).eval(), context=torch.randn(4, 48),
                          landmarker=FakeLandmarker(), encoder=lambda imgs: [np.ones(4, np.float32)] * len(imgs))
    settings = SyncIDSettings(width=48, height=32, steps=1, window=5, overlap=4,
                              writer=QuadrupletSettings(max_identity_driving=None))
    lines = []
    report = run_syncid_batch(Mesh(), models, jobs, root, settings, log=lines.append)
    assert report.count("done") == 2 and not report.failed, lines
    names = sorted(p.name for p in root.iterdir() if not p.name.startswith("."))
    assert names == ["real0_backward", "real0_forward", "real1_backward", "real1_forward"]
    record = json.loads(marker_path(root, "real1").read_text())
    assert record["samples"]["real1_forward"]["status"] == "written"
    assert json.loads((root / "real1_backward" / "record.json").read_text())["identity_image"] == "real identity image"

    marker_path(root, "real0").unlink()  # as if the run had been killed after real0's samples, before its marker
    report = run_syncid_batch(Mesh(), None, jobs, root, settings, log=lines.append,
                              load=lambda: models)
    assert (report.count("done"), report.count("skipped")) == (1, 1)
    assert "0 written, 2 skipped" in lines[-2]  # the writer found real0's samples complete
    assert marker_path(root, "real0").is_file()
    report = run_syncid_batch(Mesh(), None, jobs, root, settings, log=lines.append,
                              load=lambda: pytest.fail("nothing to do: no model may be loaded"))
    assert report.count("skipped") == 2


def test_syncid_batch_names_every_missing_model(tmp_path):
    from dreamidv_core.errors import DreamIDVError
    from dreamidv_core.synthesis.batch import load_syncid_models

    with pytest.raises(DreamIDVError, match="an IVS \\(not released: train one with training/configs/"
                                            "ivs_from_dreamidv.toml\\).*the VAE.*face landmarker.*umT5.*insightface"):
        load_syncid_models(Mesh(), tmp_path / "models")
