"""Training that diverges does not go unnoticed (issue 11): a NaN/inf loss or gradient skips the step with a
warning up to ``max_nonfinite_skips`` in a row, then stops with an error naming the step; a checkpoint with
NaN/inf weights is never written; ``keep_last`` keeps the newest checkpoints, the final and the best one."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from dreamidv_core.errors import NonFiniteError
from dreamidv_core.io.state_dict import read_state_dict
from training import checkpoint as ckpt
from training.toy import ToyDataset, tiny_model, toy_flow_loss
from training.trainer import TrainConfig, train


def cfg(**kw) -> TrainConfig:
    base = dict(steps=4, lr=1e-3, batch_size=1, grad_accum=1, trainable="full", seed=3)
    base.update(kw)
    return TrainConfig(**base)


def nan_at(steps):
    """toy_flow_loss, NaN at the given (1-based) steps."""
    calls = []

    def loss_fn(model, batch, gen):
        calls.append(1)
        loss = toy_flow_loss(model, batch, gen)
        return loss * float("nan") if len(calls) in steps else loss
    return loss_fn


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_a_non_finite_step_is_skipped_with_a_warning_and_changes_nothing(tmp_path, caplog, one_thread):
    model = tiny_model()
    with caplog.at_level(logging.WARNING):
        result = train(model, ToyDataset(4), nan_at({2}), cfg(checkpoint_dir=str(tmp_path), max_nonfinite_skips=2))
    assert result.steps == 4 and result.skipped_steps == [2]
    assert np.isnan(result.losses[1]) and np.isfinite([result.losses[i] for i in (0, 2, 3)]).all()
    assert "step 2: non-finite loss" in caplog.text and "step skipped" in caplog.text
    metrics = (tmp_path / "metrics.jsonl").read_text()
    assert '"skipped": "non-finite loss"' in metrics
    # the skipped step moved no weight: steps 1, 3, 4 of this run equal a run of three steps on the same batches
    same = tiny_model()
    before = weights(same)
    train(same, ToyDataset(4), nan_at({1, 2, 3, 4}), cfg(steps=1, max_nonfinite_skips=1))
    assert all(torch.equal(before[k], v) for k, v in weights(same).items())


def test_divergence_stops_the_run_naming_the_step_and_the_last_good_checkpoint(tmp_path, one_thread):
    with pytest.raises(NonFiniteError) as err:
        train(tiny_model(), ToyDataset(4), nan_at({3, 4, 5, 6}),
              cfg(steps=8, checkpoint_dir=str(tmp_path), save_every=2, max_nonfinite_skips=2))
    msg = str(err.value)
    assert "training stopped at step 5" in msg and "3 steps in a row" in msg and "max_nonfinite_skips = 2" in msg
    assert str(tmp_path / "step_000004") in msg  # saved at step 4: weights finite (steps 3-4 changed nothing)
    assert ckpt.existing_steps(tmp_path) == [2, 4]


def test_no_checkpoint_is_written_with_non_finite_weights(tmp_path, one_thread, monkeypatch):
    """Weights that an optimizer step overflowed to inf while loss and gradient were finite (here: the second
    AdamW step writes an inf) are caught when the checkpoint of step 2 would be written."""
    step, calls = torch.optim.AdamW.step, []

    def overflowing_step(self, *a, **k):
        out = step(self, *a, **k)
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", overflowing_step)
    with pytest.raises(NonFiniteError) as err:
        train(tiny_model(), ToyDataset(4), toy_flow_loss, cfg(steps=3, checkpoint_dir=str(tmp_path), save_every=1))
    msg = str(err.value)
    assert "training stopped at step 2: the weights hold NaN/inf" in msg
    assert "no checkpoint was written" in msg and str(tmp_path / "step_000001") in msg
    assert ckpt.existing_steps(tmp_path) == [1] and not any(p.name.startswith(".partial") for p in tmp_path.iterdir())


def test_a_learning_rate_that_blows_up_never_exits_quietly(tmp_path, one_thread):
    """The issue's case: losses become NaN with a huge learning rate; the run must not end normally, and every
    checkpoint it left holds finite weights."""
    with pytest.raises(NonFiniteError, match="training stopped at step"):
        train(tiny_model(), ToyDataset(4), toy_flow_loss, cfg(steps=12, lr=1e25, checkpoint_dir=str(tmp_path),
                                                              save_every=1, max_nonfinite_skips=1))
    for step in ckpt.existing_steps(tmp_path):
        reader = read_state_dict(tmp_path / ckpt.step_dir_name(step) / "model.safetensors")
        assert all(torch.isfinite(reader[k]).all() for k in reader)


def test_keep_last_keeps_the_newest_the_final_and_the_best(tmp_path, one_thread):
    result = train(tiny_model(), ToyDataset(4), toy_flow_loss,
                   cfg(steps=6, checkpoint_dir=str(tmp_path), save_every=1, keep_last=2))
    best = 1 + int(np.argmin(result.losses))  # save_every 1: each checkpoint's score is its step's loss
    assert set(ckpt.existing_steps(tmp_path)) == {5, 6, best}
    assert ckpt.best_step(tmp_path) == best
    state = ckpt.read_state(tmp_path / "step_000006")
    assert state["score"] == {"name": "interval_loss", "value": pytest.approx(result.losses[-1]),
                              "higher_is_better": False}


def test_keep_last_prefers_validation_similarity_and_spares_the_final_step(tmp_path):
    for step, value in ((1, 0.2), (2, 0.9), (3, 0.4), (4, 0.5), (5, 0.1)):
        writer = ckpt.CheckpointWriter(tmp_path, step)
        writer.begin()
        writer.commit({"format": ckpt.FORMAT, "step": step,
                       "score": {"name": "val_mean_similarity", "value": value, "higher_is_better": True}})
    assert ckpt.prune_checkpoints(tmp_path, keep_last=1, final_step=4) == [1, 3]
    assert ckpt.existing_steps(tmp_path) == [2, 4, 5]  # best 0.9, the run's final step, the newest


def test_training_settings_are_checked():
    from dreamidv_core.errors import InputError

    for bad in (dict(max_nonfinite_skips=-1), dict(keep_last=-2)):
        with pytest.raises(InputError, match=next(iter(bad))):
            cfg(**bad).validate()


def test_a_checkpoint_folder_under_a_regular_file_is_said_before_training(tmp_path):
    from dreamidv_core.errors import InputError

    (tmp_path / "runs").write_text("not a folder")
    calls = []
    with pytest.raises(InputError, match="checkpoint_dir.*runs' is a file"):
        train(tiny_model(), ToyDataset(2), lambda *a: calls.append(1) or toy_flow_loss(*a),
              cfg(steps=1, checkpoint_dir=str(tmp_path / "runs" / "a")))
    assert calls == []
