"""Issue 11's guards in the library (no ComfyUI): non-finite values stopped where they appear, numbers and
weights checked before any work, values on the wrong scale said instead of clamped, files written with the
user's umask and the partial files of killed runs cleaned, outputs of an odd size made encodable.
Each test fails without its guard (the message or behaviour it checks did not exist)."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dreamidv_core.errors import CheckpointError, InputError, NonFiniteError
from dreamidv_core.io import files
from dreamidv_core.io.state_dict import save_safetensors
from dreamidv_core.io.video import VideoWriter, check_pixels, even_size, read_video, to_uint8_frames, write_video
from dreamidv_core.models.configs import tiny_config
from dreamidv_core.models.dit import DreamIDVTransformer, init_random_
from dreamidv_core.pipelines.swap import SwapSettings, swap_face
from dreamidv_core.sampling.samplers import flow_sigmas, sample_euler, sample_unipc
from dreamidv_core.weights.checkpoints import SWAP_VARIANTS, load_dit, save_dit


def swap_inputs(frames=5, h=32, w=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    video = torch.rand(frames, h, w, 3, generator=g)
    mask = torch.zeros(frames, h, w)
    mask[:, 8:24, 12:36] = 1
    pose = torch.rand(frames, h, w, 3, generator=g)
    ref = (torch.rand(24, 20, 3, generator=g) * 255).to(torch.uint8).numpy()
    return video, mask, pose, ref


# ------------------------------------------------------------------------------------------ sampling
@pytest.mark.parametrize("sampler", [sample_unipc, sample_euler], ids=["unipc", "euler"])
def test_sampler_stops_at_the_first_non_finite_step_naming_it(sampler):
    calls = []

    def model(x, sigma):
        calls.append(float(sigma))
        v = torch.zeros_like(x)
        if len(calls) == 3:
            v[0, 0, 0, 0, 0] = float("nan")
        return v

    with pytest.raises(NonFiniteError) as err:
        sampler(model, torch.randn(1, 4, 2, 3, 3), flow_sigmas(6))
    msg = str(err.value)
    assert "step 3 of 6" in msg and "guidance" in msg and "fp16" in msg and "weights" in msg
    assert len(calls) == 3  # stopped there: no further model calls, nothing decoded


def test_swap_with_a_nan_weight_stops_with_the_step_instead_of_a_black_video(tiny_swap_models):
    dit, vae = tiny_swap_models
    import copy

    broken = copy.deepcopy(dit)
    with torch.no_grad():
        broken.blocks[0].ffn[0].weight[0, 0] = float("nan")
    video, mask, pose, ref = swap_inputs()
    context = torch.randn(3, 48)
    decoded = []
    with pytest.raises(NonFiniteError, match="step 1 of 2"):
        swap_face(broken, vae, video, mask, ref, context, pose=pose, settings=SwapSettings(width=48, height=32, steps=2),
                  sink=lambda frames, start: decoded.append(frames))
    assert decoded == []


def test_a_vae_that_decodes_nan_is_stopped(tiny_swap_models):
    from dreamidv_core.models.vae import WanVAE, TINY_VAE_CONFIG

    dit, _ = tiny_swap_models
    vae = WanVAE(TINY_VAE_CONFIG).eval()
    with torch.no_grad():
        vae.decoder.head["2"].weight.fill_(float("nan"))  # the decoder's last conv
    video, mask, pose, ref = swap_inputs()
    with pytest.raises(NonFiniteError, match="VAE decoded NaN"):
        swap_face(dit, vae, video, mask, ref, torch.randn(3, 48), pose=pose,
                  settings=SwapSettings(width=48, height=32, steps=1, guidance=0))


@pytest.mark.parametrize("change, words", [
    (dict(steps=0), "steps must be >= 1, got 0"),
    (dict(shift=0.0), "shift must be > 0"),
    (dict(guidance=float("nan")), "guidance must be a finite number, got nan"),
    (dict(guidance=float("inf"), steps=-1), "steps must be >= 1, got -1; guidance must be a finite number"),
    (dict(background_strength=2.0), "background_strength must be <= 1"),
    (dict(frame_num=3), "frame_num must be >= 5"),
    (dict(window=8), "window must be 4n+1"),
    (dict(vae_tile=8, vae_tile_overlap=8), "vae_tile_overlap (8) must be smaller than vae_tile (8)"),
    (dict(sampler="ddim"), "sampler must be one of unipc, euler"),
    (dict(steps=2.5), "steps must be a whole number"),
])
def test_swap_settings_are_checked_before_any_work(tiny_swap_models, change, words):
    dit, _ = tiny_swap_models

    class NoVAE:  # any encode would mean work started before the settings were checked
        def encode(self, *a):
            raise AssertionError("encoded before the settings were checked")
        decode = encode

    video, mask, pose, ref = swap_inputs()
    with pytest.raises(InputError) as err:
        swap_face(dit, NoVAE(), video, mask, ref, torch.randn(3, 48), pose=pose,
                  settings=SwapSettings(width=48, height=32, **change))
    assert words in str(err.value)


def test_settings_name_every_bad_value_at_once():
    with pytest.raises(InputError) as err:
        SwapSettings(steps=0, shift=-1.0, guidance=float("inf")).validate(label=lambda n: "--" + n)
    msg = str(err.value)
    assert "--steps" in msg and "--shift" in msg and "--guidance" in msg


# ------------------------------------------------------------------------------------------ weights
def test_an_int_tensor_in_a_dit_file_is_refused_naming_file_and_tensor(tmp_path):
    model = init_random_(DreamIDVTransformer(tiny_config("full")), seed=1)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["blocks.1.ffn.2.weight"] = sd["blocks.1.ffn.2.weight"].mul(100).to(torch.int32)
    path = tmp_path / "dreamidv.safetensors"
    save_safetensors(sd, path)
    with pytest.raises(CheckpointError) as err:
        load_dit(path, config=model.cfg)
    assert str(path) in str(err.value) and "'blocks.1.ffn.2.weight' is int32" in str(err.value)


def test_an_int_tensor_in_a_vae_file_is_refused(tmp_path):
    from dreamidv_core.models.vae import TINY_VAE_CONFIG, WanVAE, load_wan_vae

    sd = WanVAE(TINY_VAE_CONFIG).state_dict()
    name = next(k for k in sd if k.endswith("weight") and sd[k].dim() > 1)
    sd[name] = sd[name].to(torch.int16)
    path = tmp_path / "wan_2.1_vae.safetensors"
    save_safetensors(sd, path)
    with pytest.raises(CheckpointError, match=f"'{name}' is int16"):
        load_wan_vae(path, config=TINY_VAE_CONFIG)


def test_an_int_tensor_in_an_umt5_file_is_refused(tmp_path):
    from dreamidv_core.models.umt5 import LAYOUT_OFFICIAL, UMT5Config, UMT5Encoder, export_state_dict, load_umt5_encoder

    cfg = UMT5Config(vocab_size=64, d_model=32, num_layers=2, num_heads=4, d_kv=8, d_ff=48)
    sd = export_state_dict(UMT5Encoder(cfg), LAYOUT_OFFICIAL)
    name = next(k for k in sd if k.endswith(".weight") and sd[k].dim() == 2 and "token" not in k)
    sd[name] = sd[name].to(torch.int32)
    path = tmp_path / "umt5.safetensors"
    save_safetensors(sd, path)
    with pytest.raises(CheckpointError, match=f"'{name}' is int32"):
        load_umt5_encoder(path, dtype=torch.float32)


def test_a_plain_wan_t2v_file_is_named_before_loading_where_dreamidv_is_expected(tmp_path):
    wan = init_random_(DreamIDVTransformer(tiny_config("wan_t2v")), seed=0)
    path = tmp_path / "wan2.1_t2v_1.3B.safetensors"
    save_dit(wan, path)
    with pytest.raises(CheckpointError) as err:
        load_dit(path, variants=SWAP_VARIANTS)
    msg = str(err.value)
    assert str(path) in msg and "plain Wan2.1-T2V" in msg and "dreamidv.safetensors" in msg and "dreamidv.pth" in msg
    assert load_dit(path).cfg.variant == "wan_t2v"  # still loadable where a T2V file is wanted (IVS init)


@pytest.mark.parametrize("meta, words", [
    ("{not json", "not JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"dim": "wide"}', "field 'dim' = 'wide'"),
    ('{"patch_size": [1, 2]}', "patch_size"),
    ('{"variant": "huge"}', "field 'variant'"),
    ('{"colour": 1}', "unknown fields ['colour']"),
])
def test_bad_dreamidv_config_metadata_is_a_clear_error(tmp_path, meta, words):
    model = init_random_(DreamIDVTransformer(tiny_config("faster")), seed=0)
    path = tmp_path / "edited.safetensors"
    save_safetensors(model.state_dict(), path, metadata={"dreamidv_config": meta, "format": "pt"})
    with pytest.raises(CheckpointError) as err:
        load_dit(path)
    assert str(path) in str(err.value) and "dreamidv_config" in str(err.value) and words in str(err.value)


# ------------------------------------------------------------------------------------------ values
def test_nan_conditioning_is_reported_as_nan_not_as_all_zeros():
    from dreamidv_core.pipelines.adapters import context_from_conditioning

    cond = torch.zeros(1, 512, 4096)
    cond[0, :3] = float("nan")
    with pytest.raises(InputError) as err:
        context_from_conditioning(cond)
    assert "NaN" in str(err.value) and "all zeros" not in str(err.value)


def test_a_text_encoder_that_overflows_is_not_cached(tmp_path, monkeypatch):
    from dreamidv_core.pipelines import text_context as tc

    class Tok:
        source, identity = "t", "t"

        def encode(self, text, max_length=512):
            return [3, 4, 1]

    class Enc:
        config = type("C", (), {"vocab_size": 10, "d_model": 8})

        def __call__(self, ids):
            return torch.full((1, ids.shape[1], 8), float("inf"))

    (tmp_path / "enc.safetensors").write_bytes(b"x")
    monkeypatch.setattr(tc, "_resolve_tokenizer", lambda *a: Tok())
    monkeypatch.setattr(tc, "load_umt5_encoder", lambda *a, **k: Enc())
    (tmp_path / "cache").mkdir()
    with pytest.raises(CheckpointError, match="NaN or infinite text states"):
        tc.get_text_context(tmp_path / "enc.safetensors", cache_dir=tmp_path / "cache", text_dim=8)
    assert list((tmp_path / "cache").iterdir()) == []  # nothing cached


@pytest.mark.parametrize("frames, words", [
    (torch.full((2, 4, 4, 3), 200.0), "0..255"),
    (torch.full((2, 4, 4, 3), -1.0), "-1..1"),
    (torch.zeros(2, 4, 4, 3).index_put_((torch.tensor([1]), torch.tensor([3]), torch.tensor([0])),
                                        torch.tensor(float("inf"))), "frame 1 contains NaN or infinite"),
])
def test_pixels_on_another_scale_or_non_finite_are_said_not_clamped(frames, words):
    with pytest.raises(InputError, match="clip") as err:
        check_pixels(frames, "clip")
    assert words in str(err.value)
    with pytest.raises(InputError):
        to_uint8_frames(frames.numpy(), "clip")
    check_pixels(torch.rand(3, 4, 4, 3) * 1.01, "clip")  # a rounding overshoot is fine (clamped)


def test_garbage_pose_keypoints_are_clear_errors():
    from dreamidv_core.preprocess.pose.keypoints import parse_pose_keypoints

    for data, words in [([{"people": 5}], "'people' must be a list"),
                        ([{"people": [[1, 2]]}], "'people' must be a list"),
                        ([{"people": [{"pose_keypoints_2d": "abc"}]}], "must be a list of numbers"),
                        ([{"people": [{"pose_keypoints_2d": [100, 100, 1] * 18}], "canvas_width": "wide"}],
                         "'canvas_width' must be a number")]:
        with pytest.raises(InputError, match=words):
            parse_pose_keypoints(data, 1, 64, 48)
    frames, _ = parse_pose_keypoints([{"people": [{"pose_keypoints_2d": [float("nan")] * 54}]}], 1, 64, 48)
    assert (frames[0][0][0][:, 2] == 0).all()  # NaN points count as not found


def test_a_clip_too_thin_for_the_area_is_said_before_encoding_the_reference():
    from dreamidv_core.preprocess.identity_bundle import encode_reference

    class NoVAE:
        def encode(self, x):
            raise AssertionError("encoded a 0-pixel reference")

    ref = (np.random.default_rng(0).random((30, 20, 3)) * 255).astype(np.uint8)
    with pytest.raises(InputError, match="400x16 are too small for the 64x32 area"):
        encode_reference(NoVAE(), ref, (400, 16), (64, 32))


# ------------------------------------------------------------------------------------------ odd sizes
def test_odd_sized_frames_are_trimmed_to_an_encodable_size(tmp_path, caplog):
    frames = (np.random.default_rng(0).random((3, 47, 63, 3)) * 255).astype(np.uint8)
    assert even_size(frames).shape == (3, 46, 62, 3) and even_size(frames[:, :46, :62]) is not None
    with caplog.at_level(logging.INFO):
        write_video(tmp_path / "odd.mp4", frames, fps=8)  # libx264/yuv420p refused 63x47 before
    assert read_video(tmp_path / "odd.mp4")[0].shape == (3, 46, 62, 3)
    assert "trimmed from 63x47 to 62x46" in caplog.text


# ------------------------------------------------------------------------------------------ files
@pytest.fixture
def umask():
    def set_mask(mask):
        os.umask(mask)
    old = os.umask(0o022)
    yield set_mask
    os.umask(old)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_get_the_users_umask(tmp_path, umask, mask, mode):
    umask(mask)
    save_safetensors({"a": torch.zeros(2)}, tmp_path / "w.safetensors")
    write_video(tmp_path / "v.mp4", np.zeros((2, 16, 16, 3), np.uint8), fps=8)
    files.atomic_write(tmp_path / "t.json", lambda p: open(p, "w").write("{}"))
    from training.checkpoint import CheckpointWriter

    writer = CheckpointWriter(tmp_path / "ckpt", 1)
    writer.begin()
    writer.write_tensors("model.safetensors", {"a": torch.zeros(2)})
    folder = writer.commit({"format": "x"})
    for path in (tmp_path / "w.safetensors", tmp_path / "v.mp4", tmp_path / "t.json", folder / "model.safetensors"):
        assert oct(path.stat().st_mode & 0o777) == oct(mode), path.name


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_partial_files_of_killed_runs_are_cleaned_and_said(tmp_path, caplog):
    host = files._host()
    old = time.time() - 2 * files.STALE_AFTER_S
    dead = tmp_path / f".out.mp4.{host}-{_dead_pid()}-ab12cd34.partial"  # this host, its process is gone
    legacy = tmp_path / ".out.mp4.k3j2h1g0.partial"  # the naming before this fix, a day old
    fresh_legacy = tmp_path / ".out.mp4.zz99yy88.partial"  # could still be written: kept
    alive = tmp_path / f".out.mp4.{host}-{os.getppid()}-ab12cd34.partial"  # a running process: kept
    other_target = tmp_path / f".other.mp4.{host}-{_dead_pid()}-ab12cd34.partial"  # not this file's: kept
    elsewhere = tmp_path / ".out.mp4.otherhost-12-ab12cd34.partial"  # another machine's, recent: kept
    for p in (dead, legacy, fresh_legacy, alive, other_target, elsewhere):
        p.write_bytes(b"half")
    os.utime(legacy, (old, old))
    with caplog.at_level(logging.WARNING):
        write_video(tmp_path / "out.mp4", np.zeros((2, 16, 16, 3), np.uint8), fps=8)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert dead.name not in left and legacy.name not in left
    assert {fresh_legacy.name, alive.name, other_target.name, elsewhere.name, "out.mp4"} == set(left)
    assert "removed 2 partial file(s) of out.mp4 left by an interrupted run" in caplog.text


def test_partial_names_carry_host_and_pid(tmp_path):
    writer = VideoWriter(tmp_path / "x.mp4", fps=8).__enter__()
    try:
        assert Path(writer._target.tmp).name.startswith(f".x.mp4.{files._host()}-{os.getpid()}-")
    finally:
        writer.__exit__(RuntimeError, None, None)
    assert list(tmp_path.iterdir()) == []


def test_output_folders_blocked_by_a_file_or_not_writable_are_said(tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(InputError, match="a_file' is a file, not a folder"):
        files.check_output_file(tmp_path / "a_file" / "out.mp4", "--out")
    with pytest.raises(InputError, match="cannot be made"):
        files.ensure_folder(tmp_path / "a_file" / "sub" / "dataset", "dataset_folder")
    with pytest.raises(InputError, match="is an existing folder"):
        files.check_output_file(tmp_path, "--out")
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(locked) else real_access(p, mode))
    with pytest.raises(InputError, match="not writable"):
        files.check_output_file(locked / "out.mp4", "--out")


def test_a_dataset_folder_under_a_regular_file_is_said_by_the_writer(tmp_path):
    from dreamidv_core.synthesis.writer import write_quadruplet

    (tmp_path / "notes.txt").write_text("x")
    video = np.zeros((5, 16, 16, 3), np.uint8)
    with pytest.raises(InputError, match="dataset_folder.*notes.txt' is a file"):
        write_quadruplet(tmp_path / "notes.txt" / "dataset", "clip", video, video, video[0], lambda ims: [None] * len(ims))


# ------------------------------------------------------------------------------------------ python 3.10
def test_toml_configs_fall_back_to_tomli_on_python_310(monkeypatch):
    import builtins
    import types

    from training import __main__ as cli

    real_import = builtins.__import__

    def no_tomllib(name, *args, **kwargs):
        if name == "tomllib":
            raise ModuleNotFoundError("No module named 'tomllib'")
        return real_import(name, *args, **kwargs)

    fake = types.ModuleType("tomli")
    fake.loads = lambda text: {"from": "tomli"}
    monkeypatch.setattr(builtins, "__import__", no_tomllib)
    monkeypatch.setitem(sys.modules, "tomli", fake)
    monkeypatch.delitem(sys.modules, "tomllib", raising=False)
    assert cli.toml_module().loads("x = 1") == {"from": "tomli"}
    monkeypatch.setitem(sys.modules, "tomli", None)  # neither: a clear error, not a raw ImportError
    with pytest.raises(InputError, match="pip install tomli"):
        cli.toml_module()


def test_tomli_is_declared_for_python_310_only(repo_root):
    from training.__main__ import toml_module

    deps = toml_module().loads((repo_root / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.replace(" ", "").startswith("tomli") and "python_version<'3.11'" in d.replace(" ", "") for d in deps)
    assert "tomli>=1.1; python_version < '3.11'" in (repo_root / "requirements.txt").read_text()



def test_ivs_settings_are_checked_before_any_work():
    from dreamidv_core.pipelines.ivs import IVSSettings, sample_ivs_latent

    with pytest.raises(InputError, match="steps must be >= 1, got 0; shift must be > 0, got 0.0"):
        sample_ivs_latent(None, None, None, None, None, None, IVSSettings(steps=0, shift=0.0))
    with pytest.raises(InputError, match="guidance must be a finite number, got nan"):
        IVSSettings(guidance=float("nan")).validate()
