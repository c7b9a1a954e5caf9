"""Stages, curriculum and the ``python -m training`` CLI on the real objective (tiny DiT, tiny VAE, CPU)."""
import json
import shutil

import pytest
import torch

from dreamidv_core.errors import Cancelled, InputError
from dreamidv_core.models.vae import TINY_VAE_CONFIG, WanVAE
from tests.synthetic_data import write_synthetic_dataset, write_synthetic_sample
from training.__main__ import main
from training.dataset import collate
from training.objective import FlowMatchingObjective
from training.stages import (STAGES, colour_identity_encoder, make_loss_fn, parse_stages, run_curriculum,
                             stage_dataset)
from training.toy import tiny_model
from training.trainer import TrainConfig, train

W, H, F = 32, 32, 5
CURRICULUM = [{"stage": "synthetic", "steps": 2}, {"stage": "irl", "steps": 2}]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """4 samples, forward and backward alternating (sample_000 forward), 5 frames of 32x32."""
    path = tmp_path_factory.mktemp("stages_data")
    write_synthetic_dataset(path, 4, frames=F, size=(H, W), direction="mixed")
    return path


def make_vae():
    torch.manual_seed(0)
    return WanVAE(TINY_VAE_CONFIG).eval()


def context():
    return torch.randn(8, 32, generator=torch.Generator().manual_seed(0))


def cfg(**kw):
    base = dict(steps=2, lr=2e-3, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def curriculum(root, config, cancel=None):
    return run_curriculum(tiny_model(0, text_dim=32), root, CURRICULUM, config, make_vae(), context(),
                          colour_identity_encoder, width=W, height=H, frames=F, cancel=cancel)


def test_stage_dataset_filters_by_direction(root):
    names = {s: [x.name for x in stage_dataset(root, s, W, H, F).samples] for s in STAGES}
    assert names["synthetic"] == ["sample_000", "sample_002"]
    assert names["real"] == ["sample_001", "sample_003"]
    assert names["irl"] == ["sample_000", "sample_001", "sample_002", "sample_003"]
    assert all(d["direction"] == "backward" for d in stage_dataset(root, "real", W, H, F))


def test_stage_without_matching_samples_names_stage_and_folder(tmp_path):
    write_synthetic_dataset(tmp_path, 1, frames=F, size=(H, W), direction="forward")
    with pytest.raises(InputError, match=r"no backward samples for stage 'real'") as err:
        stage_dataset(tmp_path, "real", W, H, F)
    assert str(tmp_path) in str(err.value)


def test_real_loss_decreases_on_synthetic_data(root):
    data = stage_dataset(root, "synthetic", W, H, F)
    batch = collate([data[0], data[1]])
    vae, model = make_vae(), tiny_model(0, text_dim=32)
    loss_fn = make_loss_fn("synthetic", vae, context(), FlowMatchingObjective(identity_dropout=0.0))

    def held_out():
        with torch.no_grad():
            return sum(float(loss_fn(model, batch, torch.Generator().manual_seed(s))) for s in range(3)) / 3

    before = held_out()
    res = train(model, data, loss_fn, cfg(steps=8, lr=3e-3))
    after = held_out()
    assert len(res.losses) == 8 and all(torch.isfinite(torch.tensor(res.losses)))
    assert after < 0.8 * before, (before, after)
    assert not any(p.requires_grad for p in vae.parameters())  # the VAE stays frozen


def test_irl_loss_weights_chunks_and_reaches_the_model(root):
    data = stage_dataset(root, "irl", W, H, F)
    batch = collate([data[0]])
    model, vae = tiny_model(0, text_dim=32), make_vae()
    seen = []

    def encoder(images):
        seen.append(images.shape)
        return colour_identity_encoder(images)

    irl = make_loss_fn("irl", vae, context(), FlowMatchingObjective(identity_dropout=0.0), encoder)
    plain = make_loss_fn("synthetic", vae, context(), FlowMatchingObjective(identity_dropout=0.0))
    loss = irl(model, batch, torch.Generator().manual_seed(1))
    loss.backward()
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert model.blocks[0].self_attn.q.weight.grad is not None
    assert seen[0] == (1, 3, H, W)  # the identity image, then one frame per chunk (2 latent frames)
    assert len(seen) == 3
    with torch.no_grad():
        p = plain(model, batch, torch.Generator().manual_seed(1))
    assert float(loss.detach()) != pytest.approx(float(p), rel=1e-6)  # same noise, different chunk weights
    with pytest.raises(InputError, match="identity encoder"):
        make_loss_fn("irl", vae, context())


def test_curriculum_runs_stages_in_order_and_resumes_identically(root, tmp_path):
    full = curriculum(root, cfg(checkpoint_dir=str(tmp_path / "a")))
    assert [(n, r.steps) for n, r in full.stages] == [("synthetic", 2), ("irl", 2)]
    assert len(full.losses) == 4 and full.steps == 4
    assert (tmp_path / "a" / "stage1_synthetic" / "step_000002" / "state.json").is_file()
    assert (tmp_path / "a" / "stage2_irl" / "step_000002" / "state.json").is_file()

    calls = []

    def cancel():  # stop after the first step of the irl stage
        calls.append(1)
        return len(calls) == 4
    with pytest.raises(Cancelled):
        curriculum(root, cfg(checkpoint_dir=str(tmp_path / "b")), cancel=cancel)
    resumed = curriculum(root, cfg(checkpoint_dir=str(tmp_path / "b"), resume=True))
    assert resumed.losses == pytest.approx(full.losses, rel=1e-5, abs=1e-7)

    # a crash between stages: stage 1 finished, stage 2 never saved -> starts from stage 1's weights
    shutil.rmtree(tmp_path / "b" / "stage2_irl")
    again = curriculum(root, cfg(checkpoint_dir=str(tmp_path / "b"), resume=True))
    assert again.losses == pytest.approx(full.losses, rel=1e-5, abs=1e-7)


def test_cli_trains_a_curriculum_from_a_json_config(root, tmp_path, capsys):
    out = tmp_path / "losses.json"
    conf = tmp_path / "cfg.json"
    conf.write_text(json.dumps({
        "model": "tiny", "vae": "tiny", "context": "random:32", "identity_encoder": "colour",
        "dataset": {"root": str(root), "width": W, "height": H, "frames": F},
        "stages": [{"stage": "synthetic", "steps": 2}, {"stage": "irl", "steps": 1}],
        "objective": {"identity_dropout": 0.1}, "irl": {"delta": 0.1},
        "train": {"lr": 1e-3, "checkpoint_dir": str(tmp_path / "ck")}, "losses_out": str(out)}))
    assert main(["--config", str(conf)]) == 0
    record = json.loads(out.read_text())
    assert record["steps"] == 3 and len(record["losses"]) == 3
    assert "stage2_irl" in record["last_checkpoint"]
    assert "step 3/3" in capsys.readouterr().out
    assert main(["--config", str(conf), "--resume"]) == 0  # everything finished: same record
    assert json.loads(out.read_text())["losses"] == pytest.approx(record["losses"])


def test_cli_bad_settings_name_the_setting(root, tmp_path, capsys):
    conf = tmp_path / "cfg.json"
    base = {"model": "tiny", "vae": "tiny", "context": "random:32", "dataset": {"root": str(root), "width": W,
                                                                             "height": H, "frames": F}}
    for extra, expected in [({"stages": [{"stage": "warmup", "steps": 1}]}, "stages[0].stage: unknown stage 'warmup'"),
                            ({"stage": "irl"}, "identity_encoder"),
                            ({"context": "random:16"}, "text_dim is 32"),
                            ({"identity_encoder": "arcface"}, "identity_encoder: expected")]:
        conf.write_text(json.dumps({**base, **extra}))
        assert main(["--config", str(conf)]) == 2
        assert expected in capsys.readouterr().err


def test_bad_input_errors(root, tmp_path):
    with pytest.raises(InputError, match="has no sample folders"):
        stage_dataset(tmp_path, "synthetic", W, H, F)
    with pytest.raises(InputError, match=r"stages\[1\].stage: unknown stage 'rl'"):
        parse_stages([{"stage": "synthetic", "steps": 1}, {"stage": "rl", "steps": 1}])
    with pytest.raises(InputError, match=r"stages\[0\].steps must be a positive integer"):
        parse_stages([{"stage": "real", "steps": 0}])
    with pytest.raises(InputError, match="unknown stage"):
        make_loss_fn("pretrain", make_vae(), context())
    bad = tmp_path / "bad"
    write_synthetic_sample(bad / "sample_a", frames=5, size=(H, W), seed=1)
    write_synthetic_sample(tmp_path / "long", frames=9, size=(H, W), seed=1)
    shutil.copy(tmp_path / "long" / "mask.mp4", bad / "sample_a" / "mask.mp4")
    with pytest.raises(InputError, match="frame counts differ") as err:
        run_curriculum(tiny_model(0), bad, [{"stage": "synthetic", "steps": 1}], cfg(), make_vae(), context(),
                       width=W, height=H, frames=F)
    assert "sample_a" in str(err.value)


def test_id_projection_needs_an_identity_encoder_of_its_width(root):
    model = tiny_model(0, text_dim=32, id_tokens=2, id_embed_dim=5)  # gates train: the ID path is used
    with pytest.raises(InputError, match="trainable='id_projection'.*identity encoder"):
        run_curriculum(model, root, [{"stage": "synthetic", "steps": 1}], cfg(trainable="id_projection"),
                       make_vae(), context(), None, width=W, height=H, frames=F)
    batch = collate([stage_dataset(root, "synthetic", W, H, F)[0]])
    with pytest.raises(InputError, match="identity encoder"):
        make_loss_fn("synthetic", make_vae(), context())(model, batch, torch.Generator().manual_seed(0))
    wrong = make_loss_fn("synthetic", make_vae(), context(), identity_encoder=colour_identity_encoder)  # 3-d
    with pytest.raises(InputError, match=r"gave \[1, 3\].*\[1, 5\]"):
        wrong(model, batch, torch.Generator().manual_seed(0))


def test_irl_leaves_reference_dropped_samples_unweighted(root):
    """With the reference dropped the model cannot know the identity: IRL then equals the plain loss."""
    data = stage_dataset(root, "irl", W, H, F)
    batch = collate([data[0]])
    model, vae = tiny_model(0, text_dim=32), make_vae()
    dropped = FlowMatchingObjective(identity_dropout=1.0)
    irl = make_loss_fn("irl", vae, context(), dropped, colour_identity_encoder)
    plain = make_loss_fn("synthetic", vae, context(), dropped)
    with torch.no_grad():
        a = irl(model, batch, torch.Generator().manual_seed(1))
        b = plain(model, batch, torch.Generator().manual_seed(1))
    assert float(a) == pytest.approx(float(b), rel=1e-5)
