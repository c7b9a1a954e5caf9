"""The fine-tune node (DreamIDVIRLFineTune) and the loader's LoRA option, on tiny models in-process:
training returns a changed copy and leaves the input model alone, Cancel saves a checkpoint that resume
continues, a saved LoRA applied by the loader equals the tuned model, bad folders fail clearly, and
``workflows/dreamidv_irl_finetune.json`` matches the node schemas.

Regenerate the workflow (no server needed; schemas come from the classes):
    COMFYUI_DIR=.cache/ComfyUI .venv/bin/python -m tests.test_training_node
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from dreamidv_core.weights.checkpoints import save_dit
from dreamidv_core.models.configs import tiny_config
from dreamidv_core.models.dit import DreamIDVTransformer, init_random_
from dreamidv_core.errors import InputError
from tests.node_helpers import as_comfy_vae, model_folders, progress_updates, tiny_wan_vae
from tests.synthetic_data import write_synthetic_dataset

REPO = Path(__file__).resolve().parent.parent
WORKFLOW = REPO / "workflows" / "dreamidv_irl_finetune.json"
AREA = dict(width=48, height=32, frames=5)


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(autouse=True)
def _training_nodes(pack):
    """``pack.nodes.training`` (imported here too, in case nodes/__init__ does not list it)."""
    import importlib

    importlib.import_module(pack.__name__ + ".nodes.training")
@pytest.fixture(scope="module")
def comfy_vae(comfy):
    """ComfyUI's VAE around a tiny random Wan 2.1 VAE (what VAELoader would give)."""
    return as_comfy_vae(tiny_wan_vae())


@pytest.fixture
def dirs(comfy, tmp_path):
    """diffusion_models / loras / output folders registered in folder_paths, plus a small dataset."""
    import folder_paths

    saved_out = folder_paths.get_output_directory()
    with model_folders(tmp_path, ("diffusion_models", "loras"), (".safetensors",)) as out:
        out["output"] = tmp_path / "output"
        folder_paths.set_output_directory(str(out["output"]))
        out["data"] = tmp_path / "data"
        write_synthetic_dataset(out["data"], 2, frames=5, size=(32, 48), seed=1, direction="mixed")
        model = DreamIDVTransformer(tiny_config("full", text_dim=4096))
        init_random_(model, seed=0)
        save_dit(model, out["diffusion_models"] / "dreamidv.safetensors")
        try:
            yield out
        finally:
            folder_paths.set_output_directory(saved_out)


def load(pack, **kw):
    with torch.inference_mode():  # as ComfyUI runs every node
        return pack.nodes.loaders.DreamIDVModelLoader.execute("dreamidv.safetensors", "fp32", "sdpa", "cpu",
                                                              **kw).result[0]


def positive():
    return [[torch.randn(3, 4096, generator=torch.Generator().manual_seed(5))[None], {"pooled_output": None}]]


def finetune(pack, model, vae, data, **kw):
    args = dict(stage="synthetic", dataset_folder=str(data), steps=2, learning_rate=1e-3, trains="full",
                lora_rank=4, seed=0, checkpoint_folder="ft", resume=False, **AREA)
    args.update(kw)
    with torch.inference_mode():
        return pack.nodes.training.DreamIDVIRLFineTune.execute(model, vae, positive(), **args).result


def snapshot(dit):
    return {k: v.detach().clone() for k, v in dit.state_dict().items()}


# ------------------------------------------------------------------------------------------ tests
def test_finetune_returns_a_trained_copy_and_keeps_the_input(pack, dirs, comfy_vae):

    model = load(pack)
    before = snapshot(model.dit)
    with progress_updates() as seen:
        tuned, curve, ckpt = finetune(pack, model, comfy_vae, dirs["data"])
    assert seen[-2:] == [(1, 2), (2, 2)]
    after = snapshot(model.dit)
    assert all(torch.equal(before[k], after[k]) for k in before)  # input untouched
    trained = tuned.dit.state_dict()
    assert tuned is not model and tuned.dit is not model.dit
    assert any(not torch.equal(before[k], trained[k]) for k in before)
    assert not any(p.requires_grad for p in tuned.dit.parameters())
    assert curve.shape == (1, 320, 640, 3) and 0 <= curve.min() and curve.max() <= 1
    assert Path(ckpt).is_dir() and Path(ckpt).is_relative_to(dirs["output"] / "ft")
    # the tuned model runs in the sampler's way (no grad) and differs from the input's output
    x = torch.randn(1, 16, 2, 4, 6)
    y = torch.randn(32, 2, 4, 6)
    ctx = pack.nodes.sampler.conditioning_context(positive(), 4096)
    outs = []
    for dit in (model.dit, tuned.dit):
        cond = dit.prepare(ctx, y, torch.zeros(1, 16, 1, 4, 6), None)
        with torch.no_grad():
            outs.append(dit(x, torch.tensor([500.0]), cond, None))
    assert not torch.allclose(outs[0], outs[1])


def test_interrupt_saves_and_resume_continues(pack, dirs, comfy_vae):
    import comfy.model_management as mm
    import comfy.utils

    model = load(pack)

    def cancel_after_first(value, total, preview=None, node_id=None):
        if value == 1:
            mm.interrupt_current_processing(True)  # the user presses Cancel during step 2

    comfy.utils.set_progress_bar_global_hook(cancel_after_first)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            finetune(pack, model, comfy_vae, dirs["data"], steps=3, checkpoint_folder=str(dirs["output"] / "run"))
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        mm.interrupt_current_processing(False)
    saved = sorted(p.name for p in (dirs["output"] / "run").rglob("step_*") if p.is_dir())
    assert saved == ["step_000001"]
    tuned, _, ckpt = finetune(pack, model, comfy_vae, dirs["data"], steps=3, resume=True,
                              checkpoint_folder=str(dirs["output"] / "run"))
    assert Path(ckpt).name == "step_000003"
    straight, _, _ = finetune(pack, model, comfy_vae, dirs["data"], steps=3, checkpoint_folder=str(dirs["output"] / "b"))
    a, b = tuned.dit.state_dict(), straight.dit.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)  # resumed run == uninterrupted run


def weights_of(pack, handle) -> dict:
    """The weights ``handle`` computes with: its LoRA patches merged in (they are ComfyUI patches, applied when
    the model is loaded; the clones share one module), whatever clone is patched in now."""
    sd = {k: v.detach().clone() for k, v in handle.dit.state_dict().items()}
    sd.update({k: v.detach().clone() for k, v in pack.nodes.loaders.patched_weights(handle.patcher).items()})
    return sd


def test_loader_applies_a_trained_lora(pack, dirs, comfy_vae):
    base = load(pack)
    tuned, _, ckpt = finetune(pack, base, comfy_vae, dirs["data"], trains="lora", learning_rate=1e-2)
    lora_file = Path(ckpt) / "lora.safetensors"
    assert lora_file.is_file()
    shutil.copy(lora_file, dirs["loras"] / "mine.safetensors")
    import folder_paths
    folder_paths.filename_list_cache.clear()
    with_lora = load(pack, lora="mine.safetensors", lora_strength=1.0)
    assert with_lora is not base and load(pack, lora="mine.safetensors", lora_strength=1.0) is with_lora  # cached
    b, t, l = weights_of(pack, base), weights_of(pack, tuned), weights_of(pack, with_lora)
    changed = [k for k in b if not torch.equal(b[k], l[k])]
    assert changed and all(k.endswith(".weight") for k in changed)
    assert all(torch.allclose(l[k], t[k], atol=1e-6) for k in b)  # loader + LoRA == the tuned model
    half = weights_of(pack, load(pack, lora="mine.safetensors", lora_strength=0.5))
    k = changed[0]
    assert torch.allclose(half[k] - b[k], (l[k] - b[k]) / 2, atol=1e-6)
    from dreamidv_core.errors import CheckpointError
    with pytest.raises(CheckpointError, match="missing.safetensors"):
        load(pack, lora="missing.safetensors")


def test_validation_draws_identity_similarity_on_the_curve(pack, dirs, comfy_vae, monkeypatch):
    from training.stages import colour_identity_encoder

    node = pack.nodes.training.DreamIDVIRLFineTune
    monkeypatch.setattr(node, "identity_encoder", classmethod(lambda cls, pack_name, provider: colour_identity_encoder))
    model = load(pack)
    _, curve, ckpt = finetune(pack, model, comfy_vae, dirs["data"], steps=1, validate_every=1,
                              checkpoint_folder=str(dirs["output"] / "val"))
    log = [json.loads(x) for x in (Path(ckpt).parent / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in log if "val_mean_similarity" in r]
    assert [r["step"] for r in val] == [0, 1] and len(val[0]["val_samples"]) == 2
    assert all(0 < r["val_min_similarity"] <= r["val_mean_similarity"] <= 1 for r in val)
    green = torch.tensor(pack.nodes.training.VALIDATION_COLOUR).float() / 255
    assert ((curve[0] - green).abs().sum(-1) < 0.02).sum() > 20  # the validation line is drawn
    plain = torch.from_numpy(pack.nodes.training.plot_losses([1.0, 0.5])).float() / 255
    assert ((plain - green).abs().sum(-1) < 0.02).sum() == 0


def test_bad_dataset_folders_are_named(pack, dirs, comfy_vae, tmp_path):
    model = load(pack)
    missing = tmp_path / "no_such_folder"
    with pytest.raises(InputError, match="no_such_folder"):
        finetune(pack, model, comfy_vae, missing)
    empty = tmp_path / "empty_dataset"
    empty.mkdir()
    with pytest.raises(InputError, match="empty_dataset"):
        finetune(pack, model, comfy_vae, empty)
    with pytest.raises(InputError, match="dataset_folder"):
        finetune(pack, model, comfy_vae, "")
    before = snapshot(model.dit)
    assert all(torch.equal(v, model.dit.state_dict()[k]) for k, v in before.items())


def test_relative_dataset_folder_is_read_under_the_output_folder(pack, dirs, comfy_vae):
    """The fine-tune workflow's dataset_folder 'dreamidv_dataset' is where the Quadruplet Writer writes: under
    ComfyUI's output folder (it was read relative to ComfyUI's working folder)."""
    shutil.copytree(dirs["data"], dirs["output"] / "my_dataset")
    tuned, _, ckpt = finetune(pack, load(pack), comfy_vae, "my_dataset", steps=1)
    assert Path(ckpt).is_dir()
    with pytest.raises(InputError, match="under ComfyUI's output folder"):
        finetune(pack, load(pack), comfy_vae, "no_such_dataset", steps=1)


def test_diverging_training_stops_with_a_message_on_the_node(pack, dirs, comfy_vae, monkeypatch):
    """NaN losses: the node fails with the trainer's message (which step, what to do) instead of returning a
    NaN model and a checkpoint of NaN weights."""
    from dreamidv_core.errors import NonFiniteError

    import importlib

    stages = importlib.import_module(pack.__name__ + ".training.stages")  # the module the node runs
    make = stages.make_loss_fn

    def nan_loss(*a, **k):
        real = make(*a, **k)
        return lambda model, batch, gen: real(model, batch, gen) * float("nan")

    monkeypatch.setattr(stages, "make_loss_fn", nan_loss)
    with pytest.raises(NonFiniteError, match="training stopped at step 4: the loss was NaN/inf in 4 steps in a row"):
        finetune(pack, load(pack), comfy_vae, dirs["data"], steps=6, checkpoint_folder="diverged")
    assert not (dirs["output"] / "diverged").exists() or not list((dirs["output"] / "diverged").rglob("step_*"))


def test_schema_tooltips_and_workflow_matches(pack):
    schema = pack.nodes.training.DreamIDVIRLFineTune.define_schema()
    assert schema.node_id == "DreamIDVIRLFineTune" and schema.category == "DreamID-V"
    assert all(inp.tooltip for inp in schema.inputs) and all(out.tooltip for out in schema.outputs)
    assert "output folder" in next(i for i in schema.inputs if i.id == "dataset_folder").tooltip
    info = object_info(pack)
    wf = json.loads(WORKFLOW.read_text())
    assert wf == build_workflow(info), "workflow out of date: python -m tests.test_training_node"
    from tests.comfy_harness import ui_to_api
    api = ui_to_api(wf, info)
    assert {n["class_type"] for n in api.values()} == {t for t, *_ in WF_NODES.values()}
    ft = next(n for n in api.values() if n["class_type"] == "DreamIDVIRLFineTune")["inputs"]
    assert ft["stage"] == "curriculum" and ft["trains"] == "lora"


# ------------------------------------------------------------------------------------------ workflow
# id: (type, [x, y], [w, h], title, {widget: value})
WF_NODES = {
    1: ("DreamIDVModelLoader", [0, 0], [330, 200], None, {"model_name": "dreamidv.safetensors"}),
    2: ("VAELoader", [0, 250], [330, 60], None, {"vae_name": "wan_2.1_vae.safetensors"}),
    3: ("DreamIDVTextContext", [0, 350], [330, 110], None, {"text_encoder": "auto", "precomputed_context": "none"}),
    4: ("DreamIDVIRLFineTune", [380, 0], [360, 700], None,
        {"stage": "curriculum", "dataset_folder": "dreamidv_dataset", "trains": "lora"}),
    5: ("PreviewImage", [790, 0], [500, 340], "Loss curve", {}),
}
WF_LINKS = [(1, "model", 4, "model"), (2, "VAE", 4, "vae"), (3, "positive", 4, "positive"), (4, "loss_curve", 5, "images")]
WF_GROUPS = [("Models", [-20, -90, 370, 570], "#88A"), ("Fine-tune", [360, -90, 950, 810], "#b06634")]


def object_info(pack) -> dict:
    """/object_info entries for the workflow's node types, built in-process like ComfyUI's server does."""
    import importlib

    core = sys.modules.get("nodes")
    if core is None or not hasattr(core, "NODE_CLASS_MAPPINGS"):
        core = importlib.import_module("nodes")
    info = {}
    pack_nodes = {c.define_schema().node_id: c for c in
                  [*pack.nodes.loaders.NODES, *pack.nodes.training.NODES]}
    for type_, *_ in WF_NODES.values():
        if type_ in pack_nodes:
            info[type_] = pack_nodes[type_].GET_NODE_INFO_V1()
            continue
        cls = core.NODE_CLASS_MAPPINGS[type_]
        inputs = cls.INPUT_TYPES()
        info[type_] = {"input": inputs, "input_order": {k: list(v) for k, v in inputs.items()},
                       "output": list(cls.RETURN_TYPES),
                       "output_name": list(getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES)}
    return json.loads(json.dumps(info))


def build_workflow(info: dict) -> dict:
    """The UI-format workflow, through tests/build_workflow.py's builder with this layout."""
    from tests import build_workflow as bw

    wf = bw.build(info, nodes_layout=WF_NODES, links_layout=WF_LINKS, groups_layout=WF_GROUPS, control={4: "fixed"},
                  workflow_id="8c1f3b52-2e4a-4d0b-9a7e-3f1e6c5b9d20")
    return json.loads(json.dumps(wf))


def main() -> int:
    """Regenerate workflows/dreamidv_irl_finetune.json."""
    import importlib.util
    import os

    comfy_dir = Path(os.environ.get("COMFYUI_DIR", REPO / ".cache" / "ComfyUI")).resolve()
    sys.path.insert(0, str(comfy_dir))
    sys.modules.pop("nodes", None)
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    spec = importlib.util.spec_from_file_location("comfyui_dreamidv_wf", REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    import comfyui_dreamidv_wf.nodes.training  # noqa: F401  (not in nodes/__init__ until the lead adds it)
    wf = build_workflow(object_info(mod))
    WORKFLOW.write_text(json.dumps(wf, indent=2) + "\n")
    print(f"wrote {WORKFLOW}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())


def test_trains_a_fresh_id_projection_only(pack, dirs, comfy_vae, monkeypatch):
    """trains=id_projection attaches a zero-gated ID-token projection to the copy and trains only it."""
    from training.stages import colour_identity_encoder

    mod = pack.nodes.training
    monkeypatch.setattr(mod.DreamIDVIRLFineTune, "identity_encoder",
                        classmethod(lambda cls, pack_name, provider: colour_identity_encoder))
    monkeypatch.setattr(mod, "ARCFACE_DIM", 3)  # the colour stand-in's embedding width
    model = load(pack)
    before = snapshot(model.dit)
    tuned, _, ckpt = finetune(pack, model, comfy_vae, dirs["data"], trains="id_projection", steps=2,
                              learning_rate=1e-2)
    assert getattr(model.dit, "id_projection", None) is None  # the input model is untouched
    after = tuned.dit.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # released weights frozen
    gates = [v for k, v in after.items() if k.startswith("id_projection.") and k.endswith("gate")]
    assert gates and any(g.abs().max() > 0 for g in gates)  # the gates left zero: it now acts
    assert tuned.dit.id_projection_active


def test_ivs_stage_trains_an_ivs_model_only(pack, dirs, comfy_vae):
    from tests.test_ivs import _write_clips

    ivs = init_random_(DreamIDVTransformer(tiny_config("ivs", text_dim=4096)), seed=3)
    save_dit(ivs, dirs["diffusion_models"] / "tiny_ivs.safetensors")
    import folder_paths
    folder_paths.filename_list_cache.clear()
    with torch.inference_mode():
        model = pack.nodes.ivs.DreamIDVIVSLoader.execute("tiny_ivs.safetensors", "fp32", "sdpa", "cpu").result[0]
    _write_clips(dirs["output"] / "clips", count=2, n=5, size=32)
    before = snapshot(model.dit)
    tuned, curve, ckpt = finetune(pack, model, comfy_vae, dirs["output"] / "clips", stage="ivs", steps=2,
                                  width=32, height=32)
    assert tuned.dit.cfg.variant == "ivs" and Path(ckpt).is_dir()
    assert any(not torch.equal(before[k], v) for k, v in tuned.dit.state_dict().items())
    with pytest.raises(InputError, match="stage 'ivs'"):
        finetune(pack, load(pack), comfy_vae, dirs["data"], stage="ivs")
    with pytest.raises(InputError, match="stage 'ivs'"):
        finetune(pack, model, comfy_vae, dirs["data"], stage="synthetic")


@pytest.mark.slow
def test_recipe_widgets_hybrid_occlusion_tv_cache_and_modulation(pack, dirs, comfy_vae, tmp_path):
    """The appended widgets: a folder with still samples (one-frame clips through ComfyUI's Wan VAE), the
    occlusion augmentation, the TV penalty, the latent cache under the checkpoint folder and
    trains=modulation: only the modulation parameters of the copy change."""
    data = tmp_path / "mixed"
    write_synthetic_dataset(data, 1, frames=5, size=(32, 48), seed=2, stills=1)
    model = load(pack)
    before = snapshot(model.dit)
    tuned, _, ckpt = finetune(pack, model, comfy_vae, data, trains="modulation", steps=2, learning_rate=1e-2,
                              still_ratio=0.5, occlusion=0.5, temporal_tv=0.1, latent_cache=True, num_workers=0)
    after = tuned.dit.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith("modulation") or k.startswith("time_projection.") for k in changed)
    assert list((dirs["output"] / "ft" / "latent_cache").rglob("*.safetensors"))  # something was cached
    with pytest.raises(InputError, match="still_ratio is 0.5 but it has no still samples"):
        finetune(pack, model, comfy_vae, dirs["data"], still_ratio=0.5, checkpoint_folder="ft2")
