"""Several processes under torchrun (CPU, gloo, tiny models): guidance-parallel, Ulysses 2 and 4, their
combination and FSDP give one process's swap (1e-5; here bit-identical), also for a long clip in windows with
the step cache; ``swap-batch`` spreads clips over the ranks, and a run killed midway resumes without redoing
finished clips or leaving partial outputs."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests import torchrun
from tests.parallel_worker import single

pytestmark = pytest.mark.slow


def run_worker(tmp_path: Path, nproc: int, names) -> dict:
    out = tmp_path / f"w{nproc}"
    out.mkdir()
    code, stdout, stderr = torchrun.run(["-m", "tests.parallel_worker", str(out), *names], nproc, 300,
                                        f"{nproc} processes")
    assert code == 0, stdout[-2000:] + stderr[-4000:]
    return {n: (load_file(str(out / f"{n}.safetensors")), json.loads((out / f"{n}.json").read_text())) for n in names}


def check_equal_to_one_process(results: dict) -> None:
    for name, (got, facts) in results.items():
        want = single(name)
        assert facts["identical_on_all_ranks"], name
        assert (facts["evaluations"], facts["skipped"]) == (want.evaluations, want.skipped), name
        for key, ref in (("latent", want.latent), ("frames", want.frames)):
            err = (got[key] - ref).abs().max().item()
            assert err <= 1e-5, f"{name}: {key} differs from one process by {err:.2e}"


def test_two_processes_guidance_parallel_and_ulysses_equal_one_process(tmp_path, one_thread):
    results = run_worker(tmp_path, 2, ["cfg", "u2", "u2_long"])
    assert results["u2_long"][1]["skipped"] > 0  # the step cache skipped some evaluations, on every rank alike
    check_equal_to_one_process(results)


def test_four_processes_ulysses_4_ulysses_x_guidance_and_fsdp_equal_one_process(tmp_path, one_thread):
    results = run_worker(tmp_path, 4, ["u4", "u2_cfg", "u2_cfg_long", "u2_fsdp"])
    assert results["u2_fsdp"][1]["groups"] == 2 and results["u2_cfg"][1]["groups"] == 1
    check_equal_to_one_process(results)


# ------------------------------------------------------------------------------------------------ swap-batch

CLIPS = 6


@pytest.fixture
def batch_inputs(tmp_path):
    """A tiny models folder and a job list of CLIPS clips (each its own frames, mask, pose; one shared face)."""
    from dreamidv_core.io.state_dict import save_safetensors
    from dreamidv_core.io.video import write_video
    from dreamidv_core.models.configs import tiny_config
    from dreamidv_core.models.dit import DreamIDVTransformer, init_random_
    from dreamidv_core.models.vae import TINY_VAE_CONFIG, WanVAE
    from dreamidv_core.weights.checkpoints import save_dit
    from PIL import Image

    root = tmp_path / "models"
    save_dit(init_random_(DreamIDVTransformer(tiny_config("full", text_dim=4096)), seed=2),
             root / "diffusion_models" / "dreamidv.safetensors")
    save_safetensors(WanVAE(TINY_VAE_CONFIG).state_dict(), root / "vae" / "wan_2.1_vae.safetensors")
    clips = tmp_path / "clips"
    clips.mkdir()
    rows = ["video,reference,mask,pose,name"]
    for k in range(CLIPS):
        rng = np.random.default_rng(k)
        frames = 5 + 4 * (k % 2)  # 5 or 9 frames: unequal work to balance
        write_video(clips / f"v{k}.mp4", rng.integers(0, 256, (frames, 32, 48, 3), dtype=np.uint8), fps=10)
        mask = np.zeros((frames, 32, 48, 3), np.uint8)
        mask[:, 6:26, 12:36] = 255
        write_video(clips / f"m{k}.mp4", mask, fps=10)
        write_video(clips / f"p{k}.mp4", np.roll(mask, k, axis=2) // 2, fps=10)
        rows.append(f"v{k}.mp4,face.png,m{k}.mp4,p{k}.mp4,clip{k}")
    Image.fromarray(np.random.default_rng(9).integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(clips / "face.png")
    (clips / "jobs.csv").write_text("\n".join(rows) + "\n")
    torch.save([torch.randn(3, 4096, generator=torch.Generator().manual_seed(0))], tmp_path / "context.pth")
    return ["swap-batch", "--inputs", str(clips / "jobs.csv"), "--context", str(tmp_path / "context.pth"),
            "--models-dir", str(root), "--size", "48*32", "--steps", "3", "--weight-dtype", "fp32", "--device", "cpu"]


def outputs(folder: Path) -> dict:
    return {p.name: p for p in folder.iterdir()} if folder.is_dir() else {}


def test_swap_batch_spreads_clips_and_a_killed_run_resumes(tmp_path, batch_inputs, monkeypatch, one_thread):
    out = tmp_path / "out"
    args = ["-m", "tests.cli_worker", *batch_inputs, "--out-dir", str(out)]
    proc = torchrun.start(args, 2)
    deadline = time.time() + 180
    while not any(n.endswith(".mp4") and not n.startswith(".") for n in outputs(out)) and time.time() < deadline:
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    stdout, stderr = torchrun.kill(proc)  # SIGKILL launcher and workers mid-run
    finished = {n: p.stat().st_mtime_ns for n, p in outputs(out).items() if not n.startswith(".")}
    assert 1 <= len(finished) < CLIPS, (sorted(finished), stdout[-2000:], stderr[-3000:])

    from dreamidv_core.io.video import read_video

    for name in finished:  # whatever is there under an output's name is a whole video
        assert read_video(out / name)[0].shape[0] in (5, 9), name

    code, stdout, stderr = torchrun.run(args, 2, 300, "resumed swap-batch")
    assert code == 0, stdout[-2000:] + stderr[-4000:]
    assert f"{len(finished)} finished before, {CLIPS - len(finished)} to do on 2 groups of 1 rank" in stdout
    assert re.search(rf"{CLIPS} clips: {CLIPS - len(finished)} done, {len(finished)} skipped .*0 failed", stdout)
    assert "[group 0:" in stdout and "[group 1:" in stdout  # both ranks swapped clips
    final = outputs(out)
    assert sorted(final) == sorted(f"clip{k}.mp4" for k in range(CLIPS))  # no leftover temporaries either
    assert all(final[n].stat().st_mtime_ns == t for n, t in finished.items())  # finished clips were not redone

    # every clip is one process's swap of that clip. (The H.264 encoder is not always bit-reproducible on a busy
    # machine: identical frames may encode a few levels apart, so the decoded videos are compared on average;
    # another clip's swap is ~50 levels away.)
    import functools

    from dreamidv_core.cli import main
    from dreamidv_core.models import vae as vae_module

    monkeypatch.setattr(vae_module, "load_wan_vae", functools.partial(vae_module.load_wan_vae,
                                                                      config=vae_module.TINY_VAE_CONFIG))
    alone = tmp_path / "alone"
    assert main([*batch_inputs, "--out-dir", str(alone)]) == 0
    for k in range(CLIPS):
        a, b = read_video(out / f"clip{k}.mp4")[0], read_video(alone / f"clip{k}.mp4")[0]
        other = read_video(alone / f"clip{(k + 2) % CLIPS}.mp4")[0]
        assert np.abs(a.astype(float) - b).mean() < 0.5 < np.abs(a.astype(float) - other).mean(), k


def test_swap_batch_in_groups_of_two_reports_a_bad_clip_and_goes_on(tmp_path, batch_inputs):
    """One group of two ranks (guidance-parallel): the leader cannot read a clip; both ranks report it and go on
    to the next clip together (no rank waits for the other)."""
    jobs = Path(batch_inputs[batch_inputs.index("--inputs") + 1])
    (jobs.parent / "broken.mp4").write_bytes(b"not a video")
    jobs.write_text("video,reference,mask,pose,name\nbroken.mp4,face.png,m0.mp4,p0.mp4,bad\n"
                    "v1.mp4,face.png,m1.mp4,p1.mp4,good\n")
    out = tmp_path / "grouped"
    code, stdout, stderr = torchrun.run(["-m", "tests.cli_worker", *batch_inputs, "--out-dir", str(out),
                                         "--cfg-parallel"], 2, 300, "swap-batch --cfg-parallel")
    assert code != 0, stdout  # a failed clip makes the run's exit status non-zero
    assert "on 1 group of 2 ranks (guidance-parallel)" in stdout
    assert "2 clips: 1 done, 0 skipped (finished before), 1 failed" in stdout
    assert re.search(r"failed: bad: failed .*broken.mp4: not a readable video", stdout)
    assert sorted(p.name for p in out.iterdir()) == ["good.mp4"]
