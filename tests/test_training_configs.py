"""The shipped ``training/configs/*.toml``: every key known, typos rejected naming key and file, and a
config run end to end (2 steps, tiny models) through ``python -m training --config``."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from dreamidv_core.errors import InputError
from tests.synthetic_data import write_synthetic_dataset
from training.__main__ import check_config, load_config, main
from training.stages import STAGES
from training.trainer import TRAINABLE, TrainConfig

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "training" / "configs").glob("*.toml"))


def test_the_example_configs_are_shipped():
    assert {p.name for p in CONFIGS} >= {"synthetic_lora.toml", "curriculum_full.toml", "irl_id_projection.toml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_parses_with_known_keys(path):
    cfg = check_config(load_config(path), path)
    tc = TrainConfig.from_dict(cfg["train"]).validate()
    assert tc.trainable in TRAINABLE
    plan = cfg.get("stages") or [{"stage": cfg["stage"], "steps": tc.steps}]
    assert all(s["stage"] in STAGES + ("ivs",) for s in plan)
    assert "/path/to/" in cfg["model"]  # real-model paths are documented placeholders


def test_trainable_modes_of_the_examples():
    modes = {p.name: load_config(p)["train"]["trainable"] for p in CONFIGS}
    assert modes["synthetic_lora.toml"] == "lora" and modes["curriculum_full.toml"] == "full"
    assert modes["irl_id_projection.toml"] == "id_projection"
    assert [s["stage"] for s in load_config(CONFIGS[0].parent / "curriculum_full.toml")["stages"]] == list(STAGES)


@pytest.mark.parametrize("section, key, near", [("", "learning_rate", None), ("train.", "lrr", "lr"),
                                                ("objective.", "shfit", "shift"), ("dataset.", "widht", "width")])
def test_a_misspelt_key_is_rejected_naming_key_and_file(tmp_path, section, key, near):
    text = (CONFIGS[0].parent / "synthetic_lora.toml").read_text()
    table = section.rstrip(".")
    if table:
        text = text.replace(f"[{table}]\n", f"[{table}]\n{key} = 1\n")
    else:
        text = f"{key} = 1\n" + text
    bad = tmp_path / "typo.toml"
    bad.write_text(text)
    with pytest.raises(InputError) as info:
        check_config(load_config(bad), bad)
    msg = str(info.value)
    assert str(bad) in msg and f"'{section}{key}'" in msg
    if near:
        assert f"did you mean '{near}'" in msg
    # the command line says the same and exits 2
    assert main(["--config", str(bad)]) == 2


def test_ivs_config_trains_an_ivs_two_steps_on_tiny_models(tmp_path):
    """stage = "ivs": first/last-frame reconstruction of an IVS on a clip folder, from the shipped config."""
    from tests.test_ivs import _write_clips

    cfg = load_config(CONFIGS[0].parent / "ivs_from_dreamidv.toml")
    _write_clips(tmp_path / "clips", count=2, n=5, size=32)
    cfg.update(model="tiny", vae="tiny", context="random:32", weight_dtype="fp32",
               losses_out=str(tmp_path / "out.json"))
    cfg["dataset"] = dict(cfg["dataset"], root=str(tmp_path / "clips"), width=32, height=32, frames=5)
    cfg["train"].update(steps=2, checkpoint_dir=str(tmp_path / "ck"), save_every=0, autocast="none", warmup=0)
    conf = tmp_path / "ivs.json"
    conf.write_text(json.dumps(cfg))
    assert main(["--config", str(conf)]) == 0
    out = json.loads((tmp_path / "out.json").read_text())
    assert len(out["losses"]) == 2 and all(v > 0 for v in out["losses"])
    from dreamidv_core.weights.checkpoints import load_dit
    model = load_dit(Path(out["last_checkpoint"]) / "model.safetensors", weight_dtype="fp32")
    assert model.cfg.variant == "ivs" and model.cfg.in_dim == 36  # loads back as an IVS
    cfg["stages"] = [{"stage": "ivs", "steps": 1}]
    conf.write_text(json.dumps(cfg))
    assert main(["--config", str(conf)]) == 2  # an IVS is not part of a curriculum


def test_an_unknown_stage_is_an_error_naming_stage_and_file(tmp_path, capsys):
    bad = tmp_path / "stage.toml"
    bad.write_text((CONFIGS[0].parent / "synthetic_lora.toml").read_text().replace('stage = "synthetic"',
                                                                                   'stage = "synthetc"'))
    assert main(["--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "synthetc" in err and "synthetic" in err


def tiny_copy(path: Path, tmp_path: Path, steps: int = 2) -> Path:
    """The config with its model/VAE/context/dataset/encoder paths pointed at tiny test stand-ins."""
    cfg = load_config(path)
    data = tmp_path / "data"
    if not data.is_dir():
        write_synthetic_dataset(data, 2, frames=5, size=(32, 32), direction="mixed")
    cfg.update(model="tiny", vae="tiny", context="random:32", losses_out=str(tmp_path / "out.json"))
    cfg["weight_dtype"] = "fp32"
    if "identity_encoder" in cfg or cfg["train"].get("trainable") == "id_projection":
        cfg["identity_encoder"] = "colour"
    if cfg.get("id_tokens"):
        cfg["id_embed_dim"] = 3  # the colour stand-in encoder's embedding size
    cfg["dataset"] = dict(cfg["dataset"], root=str(data), width=32, height=32, frames=5)
    if "stages" in cfg:
        cfg["stages"] = [dict(s, steps=1) for s in cfg["stages"]][:2]
    t = cfg["train"]
    t.update(steps=steps, checkpoint_dir=str(tmp_path / "ck"), save_every=0, autocast="none",
             gradient_checkpointing=True, warmup=0)
    if t.get("trainable") == "lora":
        t.update(lora_rank=2, lora_alpha=2.0)
    if t.get("validate_every"):
        t.update(validate_every=1, validation_samples=1, validation_steps=1)
    out = tmp_path / f"tiny_{path.stem}.json"
    out.write_text(json.dumps(cfg))
    return out


def test_synthetic_lora_config_runs_two_steps_on_tiny_models(tmp_path):
    conf = tiny_copy(CONFIGS[0].parent / "synthetic_lora.toml", tmp_path)
    assert main(["--config", str(conf)]) == 0
    out = json.loads((tmp_path / "out.json").read_text())
    assert len(out["losses"]) == 2 and all(v > 0 for v in out["losses"])
    last = Path(out["last_checkpoint"])
    assert last.name == "step_000002" and (last / "lora.safetensors").is_file()


def test_id_projection_config_runs_with_validation_on_tiny_models(tmp_path):
    conf = tiny_copy(CONFIGS[0].parent / "irl_id_projection.toml", tmp_path)
    assert main(["--config", str(conf)]) == 0
    out = json.loads((tmp_path / "out.json").read_text())
    assert len(out["losses"]) == 2
    assert [v["step"] for v in out["validation"]] == [0, 1, 2]
    assert all(0 < v["val_min_similarity"] <= v["val_mean_similarity"] <= 1 for v in out["validation"])
    from training import checkpoint as ckpt
    tensors = ckpt.load_tensor_file(Path(out["last_checkpoint"]) / "model.safetensors")
    assert tensors and all(k.startswith("id_projection.") for k in tensors)
