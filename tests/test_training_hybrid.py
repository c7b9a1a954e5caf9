"""Image-video hybrid training (still samples as one-frame clips), the temporal TV penalty and
modulation-only fine-tuning, on tiny models and procedural data (CPU)."""
from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from dreamidv_core.errors import InputError
from dreamidv_core.models.vae import TINY_VAE_CONFIG, WanVAE
from tests.synthetic_data import write_still_sample, write_synthetic_dataset
from training import stages
from training.dataset import DataOptions, DreamIDVDataset, scan_dataset
from training.objective import FlowMatchingObjective, TrainingConditioning, temporal_tv
from training.toy import tiny_model
from training.trainer import TrainConfig, is_modulation_parameter, sample_indices, select_trainable

SIZE = (32, 48)  # height, width


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """2 video samples (5 frames) + 2 still samples, forward."""
    root = tmp_path_factory.mktemp("mixed") / "ds"
    write_synthetic_dataset(root, 2, frames=5, size=SIZE, seed=1, stills=2)
    return root


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return WanVAE(TINY_VAE_CONFIG).eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------ stills
def test_still_samples_are_one_frame_clips(mixed):
    samples = scan_dataset(mixed)
    assert [s.kind for s in samples] == ["video", "video", "still", "still"]
    assert [s.frames for s in samples] == [5, 5, 1, 1]
    ds = DreamIDVDataset(mixed, SIZE[1], SIZE[0], frames=5)
    still = ds[2]
    for key in ("video", "mask", "pose", "target"):
        assert still[key].shape == (3, 1, 32, 48), key
    assert still["identity"].shape == (3, 1, 32, 48) and still["kind"] == "still" and still["start"] == 0
    assert ds[0]["video"].shape == (3, 5, 32, 48) and ds[0]["kind"] == "video"
    # the still's pixels are its PNGs
    from dreamidv_core.io.video import read_image
    png = torch.from_numpy(read_image(mixed / "still_000" / "target.png")).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.allclose(still["target"][:, 0], png, atol=1e-5)


def test_still_sample_errors_name_the_folder(tmp_path):
    folder = tmp_path / "ds" / "s"
    write_still_sample(folder, size=SIZE, seed=0)
    rec = json.loads((folder / "record.json").read_text())
    (folder / "record.json").write_text(json.dumps(dict(rec, frames=3)))
    with pytest.raises(InputError, match=r"s: record.json: a still sample .* 'frames' 1"):
        scan_dataset(tmp_path / "ds")
    (folder / "record.json").write_text(json.dumps(rec))
    (folder / "driving.mp4").write_bytes(b"x")
    with pytest.raises(InputError, match="both still images .* and videos"):
        scan_dataset(tmp_path / "ds")
    (folder / "driving.mp4").unlink()
    (folder / "target.png").unlink()
    with pytest.raises(InputError, match="missing target.png"):
        scan_dataset(tmp_path / "ds")


def test_still_ratio_is_checked(mixed, tmp_path):
    with pytest.raises(InputError, match="still_ratio must be a number in"):
        DreamIDVDataset(mixed, 48, 32, 5, still_ratio=1.5)
    write_synthetic_dataset(tmp_path / "videos", 1, frames=5, size=SIZE)
    with pytest.raises(InputError, match="has no still samples"):
        DreamIDVDataset(tmp_path / "videos", 48, 32, 5, still_ratio=0.3)
    assert DreamIDVDataset(mixed, 48, 32, 5).still_ratio == 0.5  # default: the folder's share


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 1.0])
def test_micro_batches_mix_by_the_ratio_and_never_mix_kinds(mixed, ratio):
    ds = DreamIDVDataset(mixed, 48, 32, 5, still_ratio=ratio)
    units = [ds.unit_keys(7, u, 2) for u in range(40)]
    kinds = [{ds.samples[i].kind for i, _ in keys} for keys in units]
    assert all(len(k) == 1 for k in kinds)  # each micro-batch is all-still or all-video (equal F)
    stills = sum(k == {"still"} for k in kinds)
    assert abs(stills - ratio * 40) <= 1
    assert units == [ds.unit_keys(7, u, 2) for u in range(40)]  # deterministic
    # each kind walks whole epochs: every still appears once per two still micro-batches of 2... (2 stills)
    seen = Counter(i for keys in units for i, _ in keys)
    if 0 < ratio:
        assert seen[2] == seen[3]


def test_video_only_dataset_keeps_the_trainer_order(tmp_path):
    write_synthetic_dataset(tmp_path, 3, frames=5, size=SIZE)
    ds = DreamIDVDataset(tmp_path, 48, 32, 5)
    for u in range(7):
        keys = ds.unit_keys(3, u, 2)
        assert [i for i, _ in keys] == sample_indices(3, 3, 2 * u, 2)
        assert [e for _, e in keys] == [(2 * u + k) // 3 for k in range(2)]


def test_one_frame_clip_runs_through_vae_posequider_and_dit(vae):
    """F = 1: the VAE gives one latent frame, the PoseGuider's stride-2 convs keep 1 frame, the DiT takes one
    latent frame of tokens; the loss and its gradient are finite."""
    model = tiny_model(text_dim=32)
    pixels = torch.rand(1, 3, 1, 32, 48) * 2 - 1
    z = vae.encode(pixels)
    assert z.shape == (1, 16, 1, 4, 6)
    pose = model.project_pose(torch.rand(1, 3, 1, 32, 48))
    assert pose.shape[1] == 1 * 2 * 3  # one latent frame of 2x3 tokens
    cond = TrainingConditioning(torch.randn(8, 32), torch.cat([z, vae.encode(torch.rand(1, 3, 1, 32, 48))], 1),
                                vae.encode(pixels), pose=torch.rand(1, 3, 1, 32, 48))
    chunks = FlowMatchingObjective(temporal_tv=1.0).per_chunk_loss(model, z, cond, torch.Generator().manual_seed(0))
    assert chunks.per_chunk.shape == (1, 1) and torch.isfinite(chunks.per_chunk).all()
    loss = chunks.per_chunk.mean() + FlowMatchingObjective(temporal_tv=1.0).regulariser(chunks, z)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ------------------------------------------------------------------------------------------ TV
def test_temporal_tv_values():
    x = torch.zeros(2, 1, 3, 1, 2)
    x[0, 0, 1] = 1.0  # frames 0, 1, 0: |1 - 0| + |0 - 1| over 2 pairs -> 1 per pixel
    x[1, 0] = torch.tensor([0.0, 2.0, 4.0]).view(3, 1, 1)  # a steady ramp: |2| each pair
    assert torch.allclose(temporal_tv(x), torch.tensor([1.0, 2.0]))
    assert torch.allclose(temporal_tv(x, x, "residual"), torch.zeros(2))  # the target's own motion is free
    one = torch.randn(2, 4, 1, 2, 2, requires_grad=True)
    tv = temporal_tv(one)
    assert torch.equal(tv, torch.zeros(2)) and tv.requires_grad  # a still has no pair
    with pytest.raises(InputError, match="temporal_tv_mode"):
        temporal_tv(x, mode="spatial")
    with pytest.raises(InputError, match="temporal_tv must be a weight"):
        FlowMatchingObjective(temporal_tv=-1)


def test_tv_weight_adds_the_penalty_to_the_loss(vae):
    model = tiny_model(text_dim=32)
    z = vae.encode(torch.rand(1, 3, 9, 32, 48) * 2 - 1)
    cond = TrainingConditioning(torch.randn(8, 32), torch.randn(1, 32, 3, 4, 6), torch.randn(1, 16, 1, 4, 6),
                                pose=torch.rand(1, 3, 9, 32, 48))
    g = lambda: torch.Generator().manual_seed(4)  # noqa: E731
    plain = FlowMatchingObjective(identity_dropout=0.0)
    chunks = plain.per_chunk_loss(model, z, cond, g())
    tv = temporal_tv(chunks.x0).mean()
    assert tv > 0 and torch.allclose(chunks.x0.detach(), chunks.x0_hat)
    for weight in (0.5, 2.0):
        loss = FlowMatchingObjective(identity_dropout=0.0, temporal_tv=weight).loss(model, z, cond, g())
        assert torch.allclose(loss, chunks.per_chunk.mean() + weight * tv, atol=1e-6)
    assert torch.equal(plain.loss(model, z, cond, g()), chunks.per_chunk.mean())  # 0 = off: the plain loss


# ------------------------------------------------------------------------------------------ modulation
def test_modulation_mode_selects_only_the_adaptive_norm_parameters():
    model = tiny_model(text_dim=32)
    chosen = select_trainable(model, TrainConfig(trainable="modulation"))
    assert set(chosen) == {"time_projection.1.weight", "time_projection.1.bias", "blocks.0.modulation",
                           "blocks.1.modulation", "head.modulation"}
    assert all(p.requires_grad == (n in chosen) for n, p in model.named_parameters())
    assert not is_modulation_parameter("blocks.0.self_attn.q.weight")
    assert not is_modulation_parameter("time_embedding.0.weight")


@pytest.mark.slow
def test_hybrid_tv_occlusion_and_modulation_only_end_to_end(mixed, vae, tmp_path, monkeypatch):
    """The curriculum on the mixed folder with still_ratio 0.5, the occlusion augmentation, the TV penalty and
    trainable='modulation' (2 worker processes): still and video micro-batches both train, the losses are
    finite, and only the modulation parameters change."""
    seen = []
    real = stages.batch_latents

    def spy(batch, vae_, cache=None):
        out = real(batch, vae_, cache)
        seen.append(out["target"].shape[2])  # latent frames: 1 for a still, 2 for a 5-frame clip
        return out

    monkeypatch.setattr(stages, "batch_latents", spy)
    model = tiny_model(text_dim=32)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(steps=4, lr=1e-2, trainable="modulation", seed=0, num_workers=2,
                      checkpoint_dir=str(tmp_path / "ck"))
    res = stages.run_curriculum(model, mixed, [{"stage": "synthetic", "steps": 4}], cfg, vae, torch.randn(8, 32),
                                width=48, height=32, frames=5,
                                objective=FlowMatchingObjective(temporal_tv=0.5, temporal_tv_mode="residual"),
                                data_options=DataOptions(still_ratio=0.5, occlusion=0.5,
                                                         latent_cache=str(tmp_path / "cache")))
    assert len(res.losses) == 4 and all(torch.isfinite(torch.tensor(res.losses)))
    assert sorted(set(seen)) == [1, 2] and seen.count(1) == 2  # exactly half the steps on stills
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"time_projection.1.weight", "time_projection.1.bias", "blocks.0.modulation",
                       "blocks.1.modulation", "head.modulation"}
    from safetensors.torch import load_file
    saved = load_file(str(res.last_checkpoint / "model.safetensors"))
    assert set(saved) == changed  # the checkpoint holds what trained
