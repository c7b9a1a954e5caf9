"""Tests of the Wan 2.1 video VAE (dreamidv_core.models.vae)."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dreamidv_core.errors import CheckpointError, InputError
from dreamidv_core.io.state_dict import save_safetensors
from dreamidv_core.models.vae import (TINY_VAE_CONFIG, WAN21_VAE_CONFIG, WanVAE, choose_tile, decode_peak_bytes,
                                      is_wan_vae_state_dict, load_wan_vae)
from dreamidv_core.models.vae_tiling import cache_floats_per_pixel, make_grid, tile_spans

REPO_ROOT = Path(__file__).resolve().parents[1]
ATOL = 2e-5  # fp32, outputs of magnitude ~1


def _random_tiny_vae(seed: int = 0) -> WanVAE:
    """Tiny VAE with weights large enough that every layer visibly shapes the output."""
    torch.manual_seed(seed)
    vae = WanVAE(TINY_VAE_CONFIG).eval().requires_grad_(False)
    for p in vae.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return vae


@pytest.fixture(scope="module")
def tiny_vae() -> WanVAE:
    return _random_tiny_vae()


# ---------------------------------------------------------------- full-size architecture

def test_full_architecture_has_official_tensor_names_and_shapes():
    with torch.device("meta"):
        vae = WanVAE(WAN21_VAE_CONFIG)
    sd = vae.state_dict()
    # Counted from the official wan/modules/vae.py: encoder 84 tensors (conv1 2, downsamples 62,
    # middle 17, head 3), decoder 106 (conv1 2, middle 17, upsamples 84, head 3), conv1 + conv2 4.
    assert len(sd) == 194
    assert sum(t.numel() for t in sd.values()) == 126_892_531
    expected_shapes = {
        "encoder.conv1.weight": (96, 3, 3, 3, 3),
        "encoder.downsamples.2.resample.1.weight": (96, 96, 3, 3),
        "encoder.downsamples.3.shortcut.weight": (192, 96, 1, 1, 1),
        "encoder.downsamples.5.time_conv.weight": (192, 192, 3, 1, 1),
        "encoder.middle.1.norm.gamma": (384, 1, 1),
        "encoder.middle.1.to_qkv.weight": (1152, 384, 1, 1),
        "encoder.head.0.gamma": (384, 1, 1, 1),
        "encoder.head.2.weight": (32, 384, 3, 3, 3),
        "conv1.weight": (32, 32, 1, 1, 1),
        "conv2.weight": (16, 16, 1, 1, 1),
        "decoder.conv1.weight": (384, 16, 3, 3, 3),
        "decoder.upsamples.3.time_conv.weight": (768, 384, 3, 1, 1),
        "decoder.upsamples.3.resample.1.weight": (192, 384, 3, 3),
        "decoder.upsamples.4.residual.0.gamma": (192, 1, 1, 1),
        "decoder.upsamples.4.shortcut.weight": (384, 192, 1, 1, 1),
        "decoder.upsamples.11.resample.1.weight": (96, 192, 3, 3),
        "decoder.upsamples.14.residual.6.weight": (96, 96, 3, 3, 3),
        "decoder.head.2.weight": (3, 96, 3, 3, 3),
    }
    for name, shape in expected_shapes.items():
        assert tuple(sd[name].shape) == shape, name
    assert "decoder.upsamples.15.residual.0.gamma" not in sd
    assert is_wan_vae_state_dict(sd.keys())


def test_detection_rejects_other_layouts():
    with torch.device("meta"):
        names = list(WanVAE(TINY_VAE_CONFIG).state_dict().keys())
    assert is_wan_vae_state_dict(names)
    assert not is_wan_vae_state_dict(n for n in names if not n.startswith("decoder."))
    assert not is_wan_vae_state_dict(names + ["decoder.upsamples.0.upsamples.0.residual.0.gamma"])
    assert not is_wan_vae_state_dict(["decoder.conv_in.weight", "encoder.conv_in.weight"])


# ---------------------------------------------------------------- chunked == one-shot

@pytest.mark.parametrize("latent_frames", [1, 5, 21])
def test_chunked_decode_equals_one_shot(tiny_vae, latent_frames):
    torch.manual_seed(latent_frames)
    latent = torch.randn(1, 16, latent_frames, 2, 3)
    chunked = tiny_vae.decode(latent)
    reference = tiny_vae.decode_oneshot(latent)
    assert chunked.shape == (1, 3, 1 + 4 * (latent_frames - 1), 16, 24)
    assert chunked.dtype == torch.float32
    assert reference.std() > 0.1  # not a degenerate (e.g. all-clamped) output
    torch.testing.assert_close(chunked, reference, atol=ATOL, rtol=0)


def test_decode_iter_yields_one_then_four_frames(tiny_vae):
    latent = torch.randn(2, 16, 4, 2, 2)
    chunks = list(tiny_vae.decode_iter(latent))
    assert [c.shape for c in chunks] == [(2, 3, 1, 16, 16)] + [(2, 3, 4, 16, 16)] * 3
    assert all(c.min() >= -1 and c.max() <= 1 for c in chunks)
    torch.testing.assert_close(torch.cat(chunks, dim=2), tiny_vae.decode_oneshot(latent), atol=ATOL, rtol=0)


@pytest.mark.parametrize("frames", [1, 5, 17, 33])
def test_chunked_encode_equals_one_shot(tiny_vae, frames):
    torch.manual_seed(frames)
    video = torch.rand(1, 3, frames, 16, 24) * 2 - 1
    chunked = tiny_vae.encode(video)
    reference = tiny_vae.encode_oneshot(video)
    assert chunked.shape == (1, 16, 1 + (frames - 1) // 4, 2, 3)
    assert reference.std() > 0.1
    torch.testing.assert_close(chunked, reference, atol=ATOL, rtol=0)


def test_encode_iter_accepts_arbitrary_chunk_sizes(tiny_vae):
    torch.manual_seed(1)
    video = torch.rand(2, 3, 21, 16, 16) * 2 - 1
    sizes = [3, 7, 1, 2, 8]  # 21 frames, boundaries not aligned to the encoder's 1 + 4 + 4 ...
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    chunks = (video[:, :, s:s + n] for s, n in zip(starts, sizes))
    latent_frames = list(tiny_vae.encode_iter(chunks))
    assert [f.shape for f in latent_frames] == [(2, 16, 1, 2, 2)] * 6
    torch.testing.assert_close(torch.cat(latent_frames, dim=2), tiny_vae.encode_oneshot(video),
                               atol=ATOL, rtol=0)


def test_first_frame_does_not_depend_on_later_frames(tiny_vae):
    video = torch.rand(1, 3, 9, 16, 16) * 2 - 1
    altered = video.clone()
    altered[:, :, 1:] = -altered[:, :, 1:]
    torch.testing.assert_close(tiny_vae.encode(video)[:, :, :1], tiny_vae.encode(altered)[:, :, :1])
    assert not torch.allclose(tiny_vae.encode(video)[:, :, 1:], tiny_vae.encode(altered)[:, :, 1:])


def test_invalid_inputs_raise_input_error(tiny_vae):
    with pytest.raises(InputError, match="4n\\+1"):
        tiny_vae.encode(torch.zeros(1, 3, 6, 16, 16))
    with pytest.raises(InputError, match="4n\\+1"):
        list(tiny_vae.encode_iter([torch.zeros(1, 3, 5, 16, 16), torch.zeros(1, 3, 2, 16, 16)]))
    with pytest.raises(InputError, match="multiples of 8"):
        tiny_vae.encode(torch.zeros(1, 3, 5, 16, 20))
    with pytest.raises(InputError, match="does not match"):
        list(tiny_vae.encode_iter([torch.zeros(1, 3, 1, 16, 16), torch.zeros(1, 3, 4, 24, 16)]))
    with pytest.raises(InputError, match="latent"):
        tiny_vae.decode(torch.zeros(1, 4, 2, 2, 2))


# ---------------------------------------------------------------- flat memory

_MEMORY_PROBE = textwrap.dedent("""
    import json, torch
    from dreamidv_core.models.vae import WanVAE, TINY_VAE_CONFIG

    def reset_peak():
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM (peak resident memory) to the current RSS

    def peak_mb():
        with open("/proc/self/status") as fh:
            return next(int(l.split()[1]) for l in fh if l.startswith("VmHWM")) / 1024

    def current_mb():
        with open("/proc/self/status") as fh:
            return next(int(l.split()[1]) for l in fh if l.startswith("VmRSS")) / 1024

    torch.manual_seed(0)
    vae = WanVAE(TINY_VAE_CONFIG).eval()

    def growth(run):
        reset_peak()
        base = current_mb()
        run()
        return peak_mb() - base

    def decode(latent_frames, keep):
        kept = [c for c in vae.decode_iter(torch.randn(1, 16, latent_frames, 8, 8)) if keep]

    def encode(frames):
        chunks = (torch.rand(1, 3, n, 64, 64) * 2 - 1 for n in [1] + [4] * ((frames - 1) // 4))
        for _ in vae.encode_iter(chunks):
            pass

    decode(2, False)  # warm-up: one-time allocations of the first run
    print(json.dumps({
        "decode_short": growth(lambda: decode(2, False)),
        "decode_long": growth(lambda: decode(41, False)),
        "decode_long_held": growth(lambda: decode(41, True)),
        "encode_short": growth(lambda: encode(5)),
        "encode_long": growth(lambda: encode(161)),
    }))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads peak RSS from /proc")
def test_streaming_peak_memory_does_not_grow_with_frames():
    # Every allocation over 64 KiB gets its own mapping and is returned on free, so resident memory
    # tracks live tensors instead of the allocator's caching.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="2",
               PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", _MEMORY_PROBE], env=env, cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    mb = json.loads(result.stdout.strip().splitlines()[-1])
    clip_mb = 161 * 3 * 64 * 64 * 4 / 2**20  # the 161 decoded frames as float32: 7.5 MB
    # The probe is sensitive: holding the decoded clip shows up in full ...
    assert mb["decode_long_held"] - mb["decode_long"] > 0.75 * clip_mb, mb
    # ... while streaming 41 latent frames peaks no higher than streaming 2.
    assert mb["decode_long"] - mb["decode_short"] < 0.4 * clip_mb, mb
    assert mb["encode_long"] - mb["encode_short"] < 0.4 * clip_mb, mb


# ---------------------------------------------------------------- weight files

def test_pth_and_safetensors_load_to_identical_models(tmp_path, tiny_vae):
    sd = tiny_vae.state_dict()
    pth, st = tmp_path / "Wan2.1_VAE.pth", tmp_path / "wan_2.1_vae.safetensors"
    torch.save(sd, pth)
    save_safetensors(sd, st)  # ComfyUI's file uses the official tensor names
    latent = torch.randn(1, 16, 3, 2, 2)
    video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    expected_video, expected_latent = tiny_vae.decode(latent), tiny_vae.encode(video)
    for path in (pth, st):
        vae = load_wan_vae(path, config=TINY_VAE_CONFIG)
        assert not vae.training and not any(p.requires_grad for p in vae.parameters())
        assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in vae.parameters())
        assert torch.equal(vae.decode(latent), expected_video), path.name
        assert torch.equal(vae.encode(video), expected_latent), path.name


def test_load_in_bfloat16(tmp_path, tiny_vae):
    path = tmp_path / "vae.safetensors"
    save_safetensors(tiny_vae.state_dict(), path)
    vae = load_wan_vae(path, dtype=torch.bfloat16, config=TINY_VAE_CONFIG)
    assert all(p.dtype == torch.bfloat16 for p in vae.parameters())
    latent = torch.randn(1, 16, 2, 2, 2)
    out = vae.decode(latent)
    assert out.dtype == torch.float32
    assert (out - tiny_vae.decode(latent)).abs().mean() < 0.05


def test_foreign_layout_names_file_and_keys(tmp_path, tiny_vae):
    sd = dict(tiny_vae.state_dict())
    sd["decoder.conv_in.weight"] = sd.pop("decoder.conv1.weight")
    path = tmp_path / "foreign_vae.safetensors"
    save_safetensors(sd, path)
    with pytest.raises(CheckpointError) as info:
        load_wan_vae(path, config=TINY_VAE_CONFIG)
    message = str(info.value)
    assert str(path) in message
    assert "Missing 1: decoder.conv1.weight" in message
    assert "Unexpected 1: decoder.conv_in.weight" in message
    assert "diffusers" in message


def test_wrong_shapes_raise_checkpoint_error(tmp_path, tiny_vae):
    sd = dict(tiny_vae.state_dict())
    sd["conv2.weight"] = torch.zeros(16, 16, 3, 1, 1)
    path = tmp_path / "bad_shape.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"bad_shape\.pth: tensor shapes differ.*conv2\.weight "
                                              r"\(16, 16, 3, 1, 1\) \(expected \(16, 16, 1, 1, 1\)\)"):
        load_wan_vae(path, config=TINY_VAE_CONFIG)


# ---------------------------------------------------------------- spatial tiles

@pytest.fixture(scope="module")
def tile_case(tiny_vae):
    """A 2-latent-frame 12x20 latent (96x160 video) and its untiled decode."""
    torch.manual_seed(3)
    latent = torch.randn(1, 16, 2, 12, 20)
    return latent, tiny_vae.decode(latent)


@pytest.mark.parametrize("tile,overlap,max_err", [
    ((12, 12), 6, 0.02),   # 3 column tiles, 12 does not divide 20
    ((8, 11), 4, 0.15),    # 2 x 3 tiles, neither size divides
    (7, 3, 0.3),           # small tiles, 3 deep overlaps in width
])
def test_tiled_decode_matches_untiled(tiny_vae, tile_case, tile, overlap, max_err):
    latent, reference = tile_case
    tiled = tiny_vae.decode(latent, tile=tile, overlap=overlap)
    streamed = list(tiny_vae.decode_iter(latent, tile=tile, overlap=overlap))
    assert [c.shape for c in streamed] == [(1, 3, 1, 96, 160), (1, 3, 4, 96, 160)]
    assert torch.equal(torch.cat(streamed, dim=2), tiled)  # tile-major == time-major, bit for bit
    err = (tiled - reference).abs()
    # not exact (tiles see zero padding and per-tile attention), but close, and mostly very close
    assert err.max() < max_err, err.max()
    assert err.mean() < 0.01, err.mean()


def test_tile_at_least_latent_size_is_untiled(tiny_vae, tile_case):
    latent, reference = tile_case
    for tile in [(12, 20), 20, (50, 64)]:
        assert torch.equal(tiny_vae.decode(latent, tile=tile), reference)
    assert torch.equal(torch.cat(list(tiny_vae.decode_iter(latent, tile=64, overlap=4)), 2), reference)


def _seam_ratio(out, reference, columns):
    """Worst horizontal-gradient error at ``columns`` relative to the mean reference gradient."""
    diff = (out[..., 1:] - out[..., :-1]) - (reference[..., 1:] - reference[..., :-1])
    scale = (reference[..., 1:] - reference[..., :-1]).abs().mean()
    return max(diff[..., c - 1].abs().mean() for c in columns) / scale


def test_no_seam_at_tile_borders(tiny_vae, tile_case):
    latent, reference = tile_case
    blended = make_grid(12, 20, (12, 10), 4)  # columns (0, 10), (5, 15), (10, 20)
    edges = sorted({8 * a for a, _ in blended.cols[1:]} | {8 * b for _, b in blended.cols[:-1]})
    smooth = _seam_ratio(tiny_vae.decode(latent, tile=(12, 10), overlap=4), reference, edges)
    # control: abutting tiles without overlap show the seam the test must catch
    hard = _seam_ratio(tiny_vae.decode(latent, tile=(12, 10), overlap=0), reference, [80])
    assert hard > 0.3, hard
    assert smooth < 0.05 * hard, (smooth, hard)


def test_blend_weights_sum_to_one():
    for size, tile, overlap in [(20, 12, 6), (33, 8, 3), (40, 40, 8), (73, 40, 8), (90, 16, 8), (21, 7, 0)]:
        spans = tile_spans(size, tile, overlap)
        assert spans[0][0] == 0 and spans[-1][1] == size
        assert all(b - a == min(tile, size) for a, b in spans)
        assert all(spans[i + 1][0] <= spans[i][1] - overlap for i in range(len(spans) - 1))
    grid = make_grid(33, 20, (8, 7), 3)  # 3-deep overlaps along the width
    total = torch.zeros(1, 1, 1, 33 * 8, 20 * 8, dtype=torch.float64)
    for (rows, cols), w in zip(grid.tiles(), grid.weights("cpu", torch.float64)):
        assert w.min() >= 0
        total[..., rows.start * 8:rows.stop * 8, cols.start * 8:cols.stop * 8] += w
    torch.testing.assert_close(total, torch.ones_like(total))


@pytest.mark.parametrize("kwargs,match", [
    (dict(tile=0), "tile size"), (dict(tile=(8, -1)), "tile size"), (dict(tile="big"), "tile must be"),
    (dict(tile=(8,)), "tile must be"), (dict(tile=2.5), "tile must be"), (dict(tile=8, overlap=-1), "overlap"),
    (dict(tile=8, overlap=8), "smaller than the tile"), (dict(tile=(16, 6), overlap=6), "smaller than the tile"),
    (dict(tile=8, overlap=1.5), "overlap"), (dict(tile="auto"), "max_bytes"),
    (dict(tile="auto", max_bytes=1000), "cannot fit"),
])
def test_bad_tiles_raise_input_error(tiny_vae, kwargs, match):
    latent = torch.zeros(1, 16, 1, 24, 24)
    with pytest.raises(InputError, match=match):
        tiny_vae.decode(latent, **kwargs)
    with pytest.raises(InputError, match=match):
        next(tiny_vae.decode_iter(latent, **kwargs))


def test_peak_estimate_and_auto_tiles(tiny_vae, tile_case):
    # the cache size is exact: 24.63 x dim values per video pixel for the released decoder
    assert cache_floats_per_pixel(WAN21_VAE_CONFIG) == pytest.approx(2364.5)
    shape = (1, 16, 21, 90, 160)  # 81 frames at 1280x720
    full = decode_peak_bytes(shape, None, dtype=torch.bfloat16)
    tiled = decode_peak_bytes(shape, 40, 8, dtype=torch.bfloat16)
    offloaded = decode_peak_bytes(shape, 40, 8, dtype=torch.bfloat16, offload_caches=True)
    assert offloaded < 0.3 * full and offloaded < tiled < full, (full, tiled, offloaded)
    assert decode_peak_bytes(shape, 40, 8, streaming=False) < decode_peak_bytes(shape, None, streaming=False)
    assert choose_tile(shape, full, dtype=torch.bfloat16) is None
    tile = choose_tile(shape, (full + tiled) // 2, dtype=torch.bfloat16)
    assert tile is not None and decode_peak_bytes(shape, tile, 8, dtype=torch.bfloat16) <= (full + tiled) // 2
    # 'auto' decodes with the tile choose_tile picks for the VAE's own config and dtype
    latent, reference = tile_case
    small = decode_peak_bytes(latent.shape, (8, 12), 4, config=TINY_VAE_CONFIG, streaming=False)
    auto = choose_tile(latent.shape, small, 4, config=TINY_VAE_CONFIG, streaming=False)
    assert auto is not None and auto[0] < 12
    torch.testing.assert_close(tiny_vae.decode(latent, tile="auto", overlap=4, max_bytes=small),
                               tiny_vae.decode(latent, tile=auto, overlap=4), atol=0, rtol=0)


_TILED_MEMORY_PROBE = textwrap.dedent("""
    import json, torch
    from dreamidv_core.models.vae import WanVAE, TINY_VAE_CONFIG, decode_peak_bytes

    def reset_peak():
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")

    def status_mb(field):
        with open("/proc/self/status") as fh:
            return next(int(l.split()[1]) for l in fh if l.startswith(field)) / 1024

    torch.manual_seed(0)
    vae = WanVAE(TINY_VAE_CONFIG).eval()
    latent = torch.randn(1, 16, 2, 24, 24)  # 192x192 video

    def growth(run):
        reset_peak()
        base = status_mb("VmRSS")
        run()
        return status_mb("VmHWM") - base

    def stream(tile):
        for _ in vae.decode_iter(latent, tile=tile, overlap=4):
            pass

    stream(8)  # warm-up
    mb = {"stream_untiled": growth(lambda: stream(None)), "stream_tiled": growth(lambda: stream(12)),
          "whole_untiled": growth(lambda: vae.decode(latent)),
          "whole_tiled": growth(lambda: vae.decode(latent, tile=12, overlap=4))}
    for name, tile, streaming in [("stream_untiled", None, True), ("stream_tiled", 12, True),
                                  ("whole_untiled", None, False), ("whole_tiled", 12, False)]:
        mb["estimate_" + name] = decode_peak_bytes(latent.shape, tile, 4, config=TINY_VAE_CONFIG,
                                                   streaming=streaming) / 2**20
    print(json.dumps(mb))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads peak RSS from /proc")
def test_tiled_decode_lowers_peak_memory():
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="2",
               PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", _TILED_MEMORY_PROBE], env=env, cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    mb = json.loads(result.stdout.strip().splitlines()[-1])
    # 3x3 tiles of 12x12: one tile's activations instead of the frame's; streaming keeps all caches
    assert mb["stream_tiled"] < 0.75 * mb["stream_untiled"], mb
    assert mb["whole_tiled"] < 0.75 * mb["whole_untiled"], mb
    for name in ("stream_untiled", "stream_tiled", "whole_untiled", "whole_tiled"):
        assert 0.7 < mb["estimate_" + name] / mb[name] < 1.6, (name, mb)
