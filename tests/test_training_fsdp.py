"""FSDP2 (``fully_shard``) under ``torchrun --nproc_per_node=2`` on CPU/gloo: same losses as one process
with the same global batch, full (unsharded) checkpoints the swap loader reads, exact resume."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dreamidv_core.weights.lora import apply_lora_file
from training.toy import ToyDataset, tiny_model, toy_flow_loss
from training.trainer import TrainConfig, train


def torchrun(tmp_path: Path, name: str, train_cfg: dict, nproc: int = 2) -> dict:
    out, conf = tmp_path / f"{name}.json", tmp_path / f"{name}_cfg.json"
    conf.write_text(json.dumps({"model": "tiny", "dataset": "toy", "dataset_size": 4, "loss": "toy",
                                "losses_out": str(out), "train": train_cfg}))
    return launch(conf, out, name, nproc)


def launch(conf: Path, out: Path, name: str, nproc: int = 2) -> dict:
    """``torchrun --nproc_per_node=nproc -m training --config conf`` (``nproc`` 1: plain ``python -m
    training``) -> the losses_out JSON."""
    from tests.torchrun import run

    code, stdout, stderr = run(["-m", "training", "--config", str(conf)], nproc, 120, f"{name} (training)")
    assert code == 0, stdout[-2000:] + stderr[-4000:]
    return json.loads(out.read_text())


def test_fsdp_matches_one_process_saves_full_weights_and_resumes(tmp_path):
    single = train(tiny_model(0, text_dim=32), ToyDataset(4), toy_flow_loss,
                   TrainConfig(steps=3, lr=1e-3, grad_accum=2, checkpoint_dir=str(tmp_path / "single")))
    fsdp_dir = tmp_path / "fsdp"
    run = dict(steps=3, lr=1e-3, grad_accum=1, parallel="fsdp", save_every=2, max_grad_norm=100.0,
               checkpoint_dir=str(fsdp_dir))
    dist = torchrun(tmp_path, "fsdp", run)
    assert len(set(single.losses)) == 3
    assert dist["losses"] == pytest.approx(single.losses, rel=1e-5, abs=1e-6)
    last = fsdp_dir / "step_000003"
    # the optimizer state stays sharded (one file per rank), the weights are gathered into one file
    assert sorted(p.name for p in last.glob("optimizer*")) == ["optimizer_rank0.safetensors",
                                                               "optimizer_rank1.safetensors"]
    from dreamidv_core.weights.checkpoints import load_dit
    a = load_dit(single.last_checkpoint / "model.safetensors", weight_dtype="fp32")
    b = load_dit(last / "model.safetensors", weight_dtype="fp32")
    names = [n for n, _ in a.named_parameters()]
    assert names == [n for n, _ in b.named_parameters()] and len(names) > 20
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert p.shape == q.shape and torch.allclose(p, q, rtol=1e-4, atol=1e-6), n
    # resume under FSDP from step 2 (its sharded optimizer state) repeats step 3
    shutil.rmtree(last)
    resumed = torchrun(tmp_path, "resumed", dict(run, resume=True))
    assert resumed["losses"] == pytest.approx(dist["losses"], rel=1e-6, abs=1e-7)
    c = load_dit(last / "model.safetensors", weight_dtype="fp32")
    for (n, p), q in zip(b.named_parameters(), c.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-7), n


def test_fsdp_lora_matches_one_process_and_writes_the_adapter_file(tmp_path):
    kw = dict(steps=2, lr=1e-2, trainable="lora", lora_rank=4, lora_alpha=8)
    model = tiny_model(0, text_dim=32)
    single = train(model, ToyDataset(4), toy_flow_loss, TrainConfig(grad_accum=2, **kw))
    dist = torchrun(tmp_path, "lora", dict(kw, parallel="fsdp", checkpoint_dir=str(tmp_path / "lora")))
    assert dist["losses"] == pytest.approx(single.losses, rel=1e-5, abs=1e-6)
    adapter = tmp_path / "lora" / "step_000002" / "lora.safetensors"
    fresh = tiny_model(0, text_dim=32)
    assert len(apply_lora_file(fresh, adapter)) == 2 * 6
    batch = {k: (v[None] if torch.is_tensor(v) else [v]) for k, v in ToyDataset(1)[0].items()}
    with torch.no_grad():
        a = toy_flow_loss(model, batch, torch.Generator().manual_seed(0))
        b = toy_flow_loss(fresh, batch, torch.Generator().manual_seed(0))
        c = toy_flow_loss(tiny_model(0, text_dim=32), batch, torch.Generator().manual_seed(0))
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-6) and not torch.allclose(a, c, rtol=1e-4)


def test_fsdp_curriculum_with_validation_matches_one_process(tmp_path):
    """The real objective (frozen VAE, PoseGuider, flow matching) over two stages (the model is sharded
    once, then trained stage after stage) and the identity-report validation (swap_face on the sharded
    model) under FSDP give the single process's numbers."""
    from tests.test_training_configs import CONFIGS, tiny_copy
    from training.__main__ import main

    conf = tiny_copy(CONFIGS[0].parent / "curriculum_full.toml", tmp_path)
    cfg = json.loads(conf.read_text())
    cfg["train"].update(grad_accum=2, checkpoint_dir=str(tmp_path / "one"))
    single_conf = tmp_path / "single.json"
    single_conf.write_text(json.dumps(dict(cfg, losses_out=str(tmp_path / "single_out.json"))))
    assert main(["--config", str(single_conf)]) == 0
    single = json.loads((tmp_path / "single_out.json").read_text())
    cfg["train"].update(grad_accum=1, parallel="fsdp", checkpoint_dir=str(tmp_path / "two"))
    out = tmp_path / "fsdp_out.json"
    fsdp_conf = tmp_path / "fsdp.json"
    fsdp_conf.write_text(json.dumps(dict(cfg, losses_out=str(out))))
    dist = launch(fsdp_conf, out, "curriculum")
    assert len(single["losses"]) == 2 and dist["losses"] == pytest.approx(single["losses"], rel=1e-5, abs=1e-6)
    assert [v["step"] for v in dist["validation"]] == [v["step"] for v in single["validation"]] == [0, 1, 0, 1]
    for a, b in zip(dist["validation"], single["validation"]):
        assert a["val_mean_similarity"] == pytest.approx(b["val_mean_similarity"], abs=1e-5)
    assert (tmp_path / "two" / "stage2_real" / "step_000001" / "optimizer_rank1.safetensors").is_file()
