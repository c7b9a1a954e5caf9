"""Trainer, checkpoints and LoRA on a tiny DiT with a toy flow-matching loss (CPU)."""
from __future__ import annotations

import json

import pytest
import torch

from dreamidv_core.errors import Cancelled, CheckpointError, InputError
from training import checkpoint as ckpt
from dreamidv_core.weights.lora import apply_lora_file
from training.lora import lora_state_dict, save_lora
from training.toy import ToyDataset, tiny_model, toy_flow_loss
from training.trainer import TrainConfig, train


def cfg(**kw) -> TrainConfig:
    base = dict(steps=4, lr=1e-3, batch_size=1, grad_accum=1, trainable="full", seed=3)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def uninterrupted():
    return train(tiny_model(), ToyDataset(4), toy_flow_loss, cfg()).losses


def test_interrupted_and_resumed_run_repeats_the_uninterrupted_one(tmp_path, uninterrupted):
    first = train(tiny_model(), ToyDataset(4), toy_flow_loss, cfg(steps=2, checkpoint_dir=str(tmp_path)))
    assert first.last_checkpoint == tmp_path / "step_000002"
    # a different initial model: the resumed weights must come from the checkpoint
    resumed = train(tiny_model(seed=9), ToyDataset(4), toy_flow_loss, cfg(checkpoint_dir=str(tmp_path), resume=True))
    assert first.losses == uninterrupted[:2]
    assert resumed.losses == uninterrupted  # exactly, not approximately
    assert len(set(uninterrupted)) == 4


def test_cancel_saves_a_resumable_checkpoint(tmp_path, uninterrupted):
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) == 3  # checked before each step: stop before step 3

    with pytest.raises(Cancelled):
        train(tiny_model(), ToyDataset(4), toy_flow_loss, cfg(checkpoint_dir=str(tmp_path)), cancel=cancel)
    assert ckpt.find_latest(tmp_path) == tmp_path / "step_000002"
    resumed = train(tiny_model(), ToyDataset(4), toy_flow_loss, cfg(checkpoint_dir=str(tmp_path), resume=True))
    assert resumed.losses == uninterrupted


@pytest.mark.parametrize("stage", ["tensors", "state", "rename"])
def test_crash_during_save_keeps_the_previous_checkpoint(tmp_path, stage):
    def hook(s):
        if s == stage and ckpt.existing_steps(tmp_path):  # crash while writing the second checkpoint
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny_model(), ToyDataset(4), toy_flow_loss, cfg(steps=2, save_every=1, checkpoint_dir=str(tmp_path)),
              _save_hook=hook)
    assert ckpt.find_latest(tmp_path) == tmp_path / "step_000001"
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["step_000001"]  # no partial folder left
    state = ckpt.read_state(tmp_path / "step_000001")
    assert state["step"] == 1 and len(state["losses"]) == 1
    # a half-written folder without state.json is never taken for a checkpoint
    (tmp_path / "step_000005").mkdir()
    (tmp_path / "step_000005" / "model.safetensors").write_bytes(b"garbage")
    assert ckpt.find_latest(tmp_path) == tmp_path / "step_000001"
    resumed = train(tiny_model(), ToyDataset(4), toy_flow_loss, cfg(steps=2, checkpoint_dir=str(tmp_path), resume=True))
    assert resumed.steps == 2 and len(resumed.losses) == 2


def test_checkpoint_of_another_model_is_refused_naming_the_file(tmp_path):
    train(tiny_model(), ToyDataset(2), toy_flow_loss, cfg(steps=1, checkpoint_dir=str(tmp_path)))
    other = tiny_model(num_layers=3)
    with pytest.raises(CheckpointError) as info:
        train(other, ToyDataset(2), toy_flow_loss, cfg(steps=2, checkpoint_dir=str(tmp_path), resume=True))
    msg = str(info.value)
    assert str(tmp_path / "step_000001" / "model.safetensors") in msg and "blocks.2." in msg


def test_lora_trains_alone_and_round_trips_through_its_file(tmp_path):
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = ToyDataset(1)[0]
    res = train(model, ToyDataset(2), toy_flow_loss,
                cfg(steps=3, lr=1e-2, trainable="lora", lora_rank=4, lora_alpha=8, checkpoint_dir=str(tmp_path)))
    lora = lora_state_dict(model)
    assert "blocks.0.self_attn.q.lora_A.weight" in lora and "blocks.1.ffn.2.lora_B.weight" in lora
    assert all(lora[k].abs().sum() > 0 for k in lora if k.endswith("lora_B.weight"))  # B moved off zero
    for n, p in model.named_parameters():
        if ".lora_" not in n:
            assert torch.equal(p, before[n]), n  # base weights frozen
    path = save_lora(model, tmp_path / "adapter.safetensors")
    assert (res.last_checkpoint / "lora.safetensors").is_file()
    fresh = tiny_model()
    patched = apply_lora_file(fresh, path)
    assert len(patched) == 2 * 6
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    batch = {k: (v[None] if torch.is_tensor(v) else [v]) for k, v in x.items()}
    with torch.no_grad():
        a, b = toy_flow_loss(model, batch, gen()), toy_flow_loss(fresh, batch, gen())
        c = toy_flow_loss(tiny_model(), batch, gen())
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6) and not torch.allclose(a, c, rtol=1e-4)
    with pytest.raises(CheckpointError, match="adapter.safetensors"):
        apply_lora_file(tiny_model(dim=32, num_heads=2), path)


def test_pose_only_trains_only_the_pose_branch():
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, ToyDataset(2), toy_flow_loss, cfg(steps=2, lr=1e-2, trainable="pose", gradient_checkpointing=True))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    pose = lambda n: n.startswith("project_pose.") or (".self_attn." in n and any(  # noqa: E731
        f".self_attn.{k}" in n for k in ("k_pose", "v_pose", "norm_k_pose", "pose_gate")))
    assert changed and all(pose(n) for n in changed)
    assert any(n.startswith("project_pose.") for n in changed) and any("k_pose" in n for n in changed)
    assert not any("cross_attn" in n for n in changed)
    assert not hasattr(model.blocks[0], "__dict__") or "forward" not in model.blocks[0].__dict__  # undone


def test_id_projection_mode_needs_the_projection():
    with pytest.raises(InputError, match="id_projection"):
        train(tiny_model(), ToyDataset(2), toy_flow_loss, cfg(steps=1, trainable="id_projection"))


def test_torchrun_two_processes_match_one_process(tmp_path):
    from tests.test_training_fsdp import launch

    def run(nproc, accum, name):
        out = tmp_path / f"{name}.json"
        conf = tmp_path / f"{name}_cfg.json"
        conf.write_text(json.dumps({"model": "tiny", "dataset": "toy", "dataset_size": 4, "loss": "toy",
                                    "losses_out": str(out), "train": {"steps": 3, "lr": 1e-3, "grad_accum": accum, "parallel": "ddp",
                                                                      "checkpoint_dir": str(tmp_path / name)}}))
        return launch(conf, out, name, nproc)["losses"]

    one, two = run(1, 2, "single"), run(2, 1, "dist")
    assert len(one) == 3
    assert one == pytest.approx(two, rel=1e-5, abs=1e-6)
    # both saved the same full model, loadable by the swap workflow's loader
    from dreamidv_core.weights.checkpoints import load_dit
    a = load_dit(tmp_path / "single" / "step_000003" / "model.safetensors", weight_dtype="fp32")
    b = load_dit(tmp_path / "dist" / "step_000003" / "model.safetensors", weight_dtype="fp32")
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-6), n


# ---------------------------------------------------------------------------- identity-report validation
def _validation_setup(tmp_path):
    from dreamidv_core.models.vae import TINY_VAE_CONFIG, WanVAE
    from tests.synthetic_data import write_synthetic_dataset
    from training.dataset import DreamIDVDataset

    write_synthetic_dataset(tmp_path / "val", 2, frames=5, size=(32, 32), direction="forward", seed=7)
    torch.manual_seed(0)
    vae = WanVAE(TINY_VAE_CONFIG).eval()
    items = [DreamIDVDataset(tmp_path / "val", 32, 32, 5)[i] for i in range(2)]
    context = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    return vae, items, context


def test_identity_report_validation_uses_the_report_code_and_logs_metrics(tmp_path, uninterrupted):
    from dreamidv_core.eval.identity_report import identity_report
    from dreamidv_core.pipelines.swap import SwapSettings, swap_face
    from training.stages import colour_identity_encoder
    from training.validation import embedder_from_encoder, make_identity_validator

    vae, items, context = _validation_setup(tmp_path)
    validator = make_identity_validator(items, vae, context, colour_identity_encoder, steps=2, seed=5)
    calls = []

    def spy(model):
        calls.append(model.training)
        return validator(model)

    model = tiny_model()
    conf = cfg(steps=4, validate_every=2, checkpoint_dir=str(tmp_path / "ck"))
    res = train(model, ToyDataset(4), toy_flow_loss, conf, validator=spy)
    assert [v["step"] for v in res.validation] == [0, 2, 4] and calls == [False] * 3 and model.training
    # validation draws no randomness the training uses: the losses are those of a run without it
    assert res.losses == uninterrupted
    # the numbers are the identity report of swap_face with the trained weights, recomputed here
    embed = embedder_from_encoder(colour_identity_encoder)
    reports = []
    for k, it in enumerate(items):
        f01 = lambda t, signed: (t.float().add(1).div(2) if signed else t.float()).permute(1, 2, 3, 0)  # noqa: E731
        ref = f01(it["identity"], True)[0]
        out = swap_face(model.eval(), vae, f01(it["video"], True), f01(it["mask"], False), ref, context,
                        pose=f01(it["pose"], False), settings=SwapSettings(width=32, height=32, steps=2, seed=5 + k,
                                                                          cache_pose_kv=True))
        reports.append(identity_report(out.frames, ref, embed))
    last = res.validation[-1]
    assert last["val_mean_similarity"] == pytest.approx(sum(r.mean for r in reports) / 2, abs=1e-6)
    assert last["val_min_similarity"] == pytest.approx(min(r.min for r in reports), abs=1e-6)
    assert last["val_mean_abs_change"] == pytest.approx(sum(r.mean_abs_change for r in reports) / 2, abs=1e-6)
    assert 0 < last["val_min_similarity"] <= last["val_mean_similarity"] <= 1
    assert res.validation[0]["val_mean_similarity"] != last["val_mean_similarity"]  # training changed the swap
    log = [json.loads(x) for x in (tmp_path / "ck" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in log if "val_mean_similarity" in r] == [0, 2, 4]
    assert [r["loss"] for r in log if "loss" in r] == res.losses
    # resumed runs keep the earlier validations (state.json) and rewrite the log from there
    state = ckpt.read_state(res.last_checkpoint)
    assert [v["step"] for v in state["validation"]] == [0, 2, 4]


def test_validation_with_a_controllable_encoder_gives_known_numbers(tmp_path):
    from training.validation import make_identity_validator

    vae, items, context = _validation_setup(tmp_path)
    same = lambda x: torch.ones(x.shape[0], 4)  # noqa: E731  every face is the reference: cosine 1, no change
    metrics = make_identity_validator(items[:1], vae, context, same, steps=1)(tiny_model())
    assert metrics["val_mean_similarity"] == pytest.approx(1.0) and metrics["val_min_similarity"] == pytest.approx(1.0)
    assert metrics["val_mean_abs_change"] == pytest.approx(0.0) and metrics["val_no_face_frames"] == 0
    # an encoder that sees no face in the swapped frames (its embedding is all zeros) -> nothing measured
    calls = []

    def blind(x):
        calls.append(1)
        return torch.ones(x.shape[0], 4) if len(calls) == 1 else torch.zeros(x.shape[0], 4)  # reference first
    metrics = make_identity_validator(items[:1], vae, context, blind, steps=1)(tiny_model())
    assert metrics["val_mean_similarity"] is None and metrics["val_no_face_frames"] == 5
    with pytest.raises(InputError, match="validator"):
        train(tiny_model(), ToyDataset(2), toy_flow_loss, cfg(steps=1, validate_every=1))
