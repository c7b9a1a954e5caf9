"""Data loading: DataLoader workers give the same run as the in-loop reads, and the on-disk latent cache
(keyed by file contents and the VAE) is written once, read afterwards, never stale, atomic."""
from __future__ import annotations

import os
import stat

import pytest
import torch

from dreamidv_core.errors import InputError
from dreamidv_core.models.vae import TINY_VAE_CONFIG, WanVAE
from tests.synthetic_data import write_synthetic_dataset
from training import latent_cache as lc
from training.dataset import DreamIDVDataset
from training.stages import make_loss_fn
from training.toy import ToyDataset, tiny_model, toy_flow_loss
from training.trainer import TrainConfig, train

SIZE = (32, 48)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dl") / "ds"
    write_synthetic_dataset(root, 2, frames=5, size=SIZE, seed=3)
    return root


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return WanVAE(TINY_VAE_CONFIG).eval().requires_grad_(False)


def run(dataset, vae, steps=4, workers=0, cache=None):
    context = torch.randn(8, 32, generator=torch.Generator().manual_seed(1))
    cfg = TrainConfig(steps=steps, lr=1e-3, seed=2, num_workers=workers)
    return train(tiny_model(text_dim=32), dataset, make_loss_fn("synthetic", vae, context, latent_cache=cache), cfg).losses


@pytest.mark.slow
def test_workers_give_the_same_losses_as_the_loop():
    base = train(tiny_model(), ToyDataset(4), toy_flow_loss, TrainConfig(steps=3, lr=1e-3, seed=1)).losses
    with_workers = train(tiny_model(), ToyDataset(4), toy_flow_loss,
                         TrainConfig(steps=3, lr=1e-3, seed=1, num_workers=2, prefetch_factor=1)).losses
    assert with_workers == base


@pytest.mark.slow
def test_latent_cache_is_written_once_then_read(data, vae, tmp_path):
    plain = run(DreamIDVDataset(data, 48, 32, 5), vae)
    cache = lc.LatentCache.for_vae(tmp_path / "cache", vae)
    first = run(DreamIDVDataset(data, 48, 32, 5, latent_cache=cache), vae, cache=cache)
    files = sorted((tmp_path / "cache").rglob("*.safetensors"))
    assert first == plain  # caching changes nothing in the run
    assert len(files) == 2 and cache.writes == 2  # 4 steps over 2 samples with one window each: 2 entries
    mode = stat.S_IMODE(os.stat(files[0]).st_mode)
    assert mode == 0o666 & ~_umask()  # a normal file, not mkstemp's 0600
    assert not list((tmp_path / "cache").rglob("*.partial"))
    # a second run reads the latents only: only the pose video (the PoseGuider's input) is decoded and the
    # VAE does not encode
    reader = lc.LatentCache.for_vae(tmp_path / "cache", vae)
    ds = DreamIDVDataset(data, 48, 32, 5, latent_cache=reader)
    decoded = []
    real_video = ds._video
    ds._video = lambda s, name, *a: (decoded.append(name), real_video(s, name, *a))[1]
    encodes = []
    real_encode = vae.encode
    vae.encode = lambda x, *a, **k: (encodes.append(1), real_encode(x, *a, **k))[1]
    try:
        again = run(ds, vae, cache=reader)
    finally:
        del vae.encode
    assert again == plain and reader.hits == 4 and reader.writes == 0 and not encodes
    assert set(decoded) == {"pose.mp4"}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_cache_key_follows_file_content_window_and_vae(data, vae, tmp_path):
    cache = lc.LatentCache.for_vae(tmp_path / "c", vae)
    ds = DreamIDVDataset(data, 48, 32, 5, latent_cache=cache)
    item = ds[0]
    key = item["cache_key"]
    assert key and "latents" not in item and "video" in item
    # another VAE (one weight changed) -> another key
    other = WanVAE(TINY_VAE_CONFIG).eval()
    other.load_state_dict(vae.state_dict())
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    assert lc.vae_fingerprint(other) != cache.fingerprint
    # a rewritten file (same name) -> another key, never the stale latents
    target = data / "sample_000" / "target.mp4"
    original = target.read_bytes()
    try:
        target.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        assert ds[0]["cache_key"] != key
    finally:
        target.write_bytes(original)
    assert ds[0]["cache_key"] == key
    # another area cap -> another key
    assert DreamIDVDataset(data, 32, 32, 5, latent_cache=cache)[0]["cache_key"] != key


def test_file_changing_during_the_read_is_not_cached(data, vae, tmp_path, monkeypatch):
    cache = lc.LatentCache.for_vae(tmp_path / "c", vae)
    ds = DreamIDVDataset(data, 48, 32, 5, latent_cache=cache)
    real = ds._video

    def touch_while_reading(s, name, start, length):
        out = real(s, name, start, length)
        if name == "mask.mp4":
            os.utime(s.path / name, ns=(1, 1))  # the file changes under the reader
        return out

    monkeypatch.setattr(ds, "_video", touch_while_reading)
    assert ds[1]["cache_key"] is None


def test_unreadable_cache_entry_is_a_miss_and_is_rewritten(data, vae, tmp_path):
    cache = lc.LatentCache.for_vae(tmp_path / "c", vae)
    ds = DreamIDVDataset(data, 48, 32, 5, latent_cache=cache)
    key = ds[0]["cache_key"]
    cache.path(key).parent.mkdir(parents=True, exist_ok=True)
    cache.path(key).write_bytes(b"not safetensors")
    item = ds[0]
    assert "latents" not in item and item["cache_key"] == key and cache.misses == 2
    run(DreamIDVDataset(data, 48, 32, 5, latent_cache=cache), vae, steps=2, cache=cache)  # one epoch: both samples
    assert set(lc.LatentCache(tmp_path / "c", cache.fingerprint).load(key) or {}) == set(lc.LATENT_NAMES)


def test_non_finite_latents_are_not_cached(tmp_path):
    cache = lc.LatentCache(tmp_path / "c", "fp")
    bad = {n: torch.zeros(16, 1, 2, 2) for n in lc.LATENT_NAMES}
    bad["target"][0, 0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="non-finite"):
        cache.save("k" * 40, bad)
    assert not list(tmp_path.rglob("*.safetensors"))


def test_occluded_items_are_not_cached(data, vae, tmp_path):
    from training.augment import OcclusionAugmentation

    cache = lc.LatentCache.for_vae(tmp_path / "c", vae)
    ds = DreamIDVDataset(data, 48, 32, 5, occlusion=OcclusionAugmentation(1.0), latent_cache=cache)
    item = ds[0]
    assert "occluder" in item and item.get("cache_key") is None and cache.misses == 0
