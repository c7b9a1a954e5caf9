"""IVS nodes on tiny models: the loader (IVS file, init from DreamID-V / Wan, cache, errors) and the sampler
(exact length, determinism, progress, interruption, bad input), through ComfyUI's own VAE."""
from __future__ import annotations

import pytest
import torch

from dreamidv_core.weights.checkpoints import save_dit
from dreamidv_core.models.configs import tiny_config
from dreamidv_core.models.dit import DreamIDVTransformer, init_random_
from dreamidv_core.errors import CheckpointError, InputError
from dreamidv_core.models.ivs import init_ivs_state_dict, ivs_config_from
from tests.node_helpers import as_comfy_vae, model_folders, progress_updates, tiny_wan_vae

H, W = 40, 56
AREA = dict(width=64, height=32)  # 40x56 -> 32x48 model frames


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def comfy_vae(comfy):
    return as_comfy_vae(tiny_wan_vae(jitter=0))


@pytest.fixture
def dirs(comfy, tmp_path):
    with model_folders(tmp_path, ("diffusion_models", "dreamidv")) as out:
        yield out


def _dit(variant, seed=0):
    return init_random_(DreamIDVTransformer(tiny_config(variant, text_dim=4096)), seed=seed)


def _write_ivs(folder, name="ivs.safetensors"):
    src = _dit("full", seed=3)
    sd, _ = init_ivs_state_dict(src.state_dict(), ivs_config_from(src.cfg))
    model = DreamIDVTransformer(ivs_config_from(src.cfg))
    model.load_state_dict(sd)
    with torch.no_grad():  # a non-zero y branch, so the frames matter
        model.patch_embedding.weight[:, 16:].normal_(0, 0.1)
    save_dit(model, folder / name)
    return model


@pytest.fixture
def ivs_nodes(pack):
    import importlib

    # pack.nodes.ivs once nodes/__init__.py lists the module; imported by name until then
    return getattr(pack.nodes, "ivs", None) or importlib.import_module(pack.__name__ + ".nodes.ivs")


def cond(tokens=3, seed=5):
    ctx = torch.randn(tokens, 4096, generator=torch.Generator().manual_seed(seed))
    return [[ctx[None], {"pooled_output": None}]]


def images(n, seed=0, h=H, w=W, c=3):
    return torch.rand(n, h, w, c, generator=torch.Generator().manual_seed(seed))


def run(nodes, model, vae, first=None, last=None, pose=None, **kw):
    args = dict(AREA, length=0, steps=2, shift=5.0, guidance=1.0, seed=0, sampler="unipc")
    args.update(kw)
    return nodes.DreamIDVIVSSampler.execute(model, vae, cond(), images(1) if first is None else first,
                                            images(1, seed=1) if last is None else last,
                                            images(7, seed=2) if pose is None else pose, **args).result[0]


def test_loader_loads_ivs_and_initialises_from_dreamidv_and_wan(dirs, ivs_nodes):
    _write_ivs(dirs["diffusion_models"])
    save_dit(_dit("wan_t2v", seed=1), dirs["dreamidv"] / "wan.safetensors")
    save_dit(_dit("full", seed=2), dirs["diffusion_models"] / "dreamidv.safetensors")
    assert {"ivs.safetensors", "wan.safetensors", "dreamidv.safetensors"} <= set(ivs_nodes.ivs_choices())
    model, report = ivs_nodes.DreamIDVIVSLoader.execute("ivs.safetensors", "fp32", "sdpa", "cpu").result
    assert model.variant == "ivs" and "IVS weights loaded" in report
    again = ivs_nodes.DreamIDVIVSLoader.execute("ivs.safetensors", "fp32", "sdpa", "cpu").result[0]
    assert again is model  # cached while held
    wan, report = ivs_nodes.DreamIDVIVSLoader.execute("wan.safetensors", "fp32", "sdpa", "cpu").result
    assert wan.variant == "ivs" and "from a wan_t2v DiT" in report and "pose gates set to 0" in report
    assert all(float(b.self_attn.pose_gate) == 0 for b in wan.dit.blocks)
    full, report = ivs_nodes.DreamIDVIVSLoader.execute("dreamidv.safetensors", "fp32", "sdpa", "cpu").result
    assert full.variant == "ivs" and "from a full DiT" in report and "dropped" in report
    assert full.dit.patch_embedding.weight.dtype == torch.float32


def test_loader_errors_name_the_folders(dirs, ivs_nodes):
    msg = ivs_nodes.DreamIDVIVSLoader.validate_inputs("missing.safetensors")
    assert isinstance(msg, str) and "diffusion_models" in msg and "dreamidv" in msg
    (dirs["dreamidv"] / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        ivs_nodes.DreamIDVIVSLoader.execute("junk.safetensors", "fp32", "sdpa", "cpu")


@pytest.fixture
def ivs_model(dirs, ivs_nodes):
    _write_ivs(dirs["diffusion_models"])
    return ivs_nodes.DreamIDVIVSLoader.execute("ivs.safetensors", "fp32", "sdpa", "cpu").result[0]


@pytest.mark.parametrize("length", [0, 5, 6])
def test_sampler_gives_exactly_length_frames(ivs_nodes, ivs_model, comfy_vae, length):
    out = run(ivs_nodes, ivs_model, comfy_vae, length=length)
    assert out.shape == ((length or 7), 32, 48, 3) and 0 <= float(out.min()) and float(out.max()) <= 1


def test_sampler_is_deterministic_and_uses_the_frames(ivs_nodes, ivs_model, comfy_vae):
    a = run(ivs_nodes, ivs_model, comfy_vae)
    assert torch.equal(a, run(ivs_nodes, ivs_model, comfy_vae))
    assert not torch.equal(a, run(ivs_nodes, ivs_model, comfy_vae, seed=1))
    assert not torch.equal(a, run(ivs_nodes, ivs_model, comfy_vae, last=images(1, seed=9)))
    # several images: first of first_frame, last of last_frame; alpha is dropped
    many = torch.cat([images(1), images(1, seed=9)])
    lasts = torch.cat([images(1, seed=9), images(1, seed=1)])
    assert torch.equal(a, run(ivs_nodes, ivs_model, comfy_vae, first=many, last=lasts))
    rgba = torch.cat([images(1), torch.ones(1, H, W, 1)], dim=-1)
    assert torch.equal(a, run(ivs_nodes, ivs_model, comfy_vae, first=rgba))
    guided = run(ivs_nodes, ivs_model, comfy_vae, guidance=3.0, negative=cond(seed=8))
    assert guided.shape == a.shape and not torch.equal(guided, a)


def test_sampler_progress_and_interrupt(ivs_nodes, ivs_model, comfy_vae):
    import comfy.model_management as mm

    with progress_updates() as seen:
        run(ivs_nodes, ivs_model, comfy_vae, steps=3, sampler="euler")
    assert seen[-3:] == [(1, 3), (2, 3), (3, 3)]
    calls = []
    original = ivs_model.dit.forward

    def forward(*a, **k):
        calls.append(1)
        mm.interrupt_current_processing(True)
        return original(*a, **k)

    ivs_model.dit.forward = forward
    try:
        with pytest.raises(mm.InterruptProcessingException):
            run(ivs_nodes, ivs_model, comfy_vae, steps=4)
    finally:
        del ivs_model.dit.forward
        mm.interrupt_current_processing(False)
    assert len(calls) == 1


def test_sampler_bad_inputs(dirs, ivs_nodes, ivs_model, comfy_vae, pack):
    with pytest.raises(InputError, match="first frame is 56x40, last frame is 48x40"):
        run(ivs_nodes, ivs_model, comfy_vae, last=images(1, w=48))
    with pytest.raises(InputError, match="at least 5 frames"):
        run(ivs_nodes, ivs_model, comfy_vae, pose=images(4))
    with pytest.raises(InputError, match="pose video has 7 frames, fewer than the 9"):
        run(ivs_nodes, ivs_model, comfy_vae, length=9)
    with pytest.raises(InputError, match="pose video frames are 48x40"):
        run(ivs_nodes, ivs_model, comfy_vae, pose=images(7, w=48))
    save_dit(_dit("full"), dirs["diffusion_models"] / "dreamidv.safetensors")
    swap = pack.nodes.loaders.DreamIDVModelLoader.execute("dreamidv.safetensors", "fp32", "sdpa", "cpu").result[0]
    with pytest.raises(InputError, match="needs an IVS DiT"):
        run(ivs_nodes, swap, comfy_vae)
    with pytest.raises(InputError, match="DreamIDVIVSLoader"):
        run(ivs_nodes, object(), comfy_vae)


def test_sampler_window_inputs_have_tooltips(ivs_nodes):
    inputs = {i.id: i for i in ivs_nodes.DreamIDVIVSSampler.define_schema().inputs}
    assert inputs["window"].default == 81 and inputs["overlap"].default == 16
    assert "4n+1" in inputs["window"].tooltip and "multiple of 4" in inputs["overlap"].tooltip
    assert all(i.tooltip for i in inputs.values())


def test_sampler_windows_give_exactly_length_frames(ivs_nodes, ivs_model, comfy_vae):
    # ComfyUI's VAE (no streaming methods): encode and decode go window piece by window piece
    out = run(ivs_nodes, ivs_model, comfy_vae, pose=images(14, seed=2), length=14, window=9, overlap=4)
    assert out.shape == (14, 32, 48, 3) and torch.isfinite(out).all()
    assert 0 <= float(out.min()) and float(out.max()) <= 1
    # a clip of one window is the single pass, whatever the window size
    assert torch.equal(run(ivs_nodes, ivs_model, comfy_vae, window=9, overlap=4), run(ivs_nodes, ivs_model, comfy_vae))


def test_sampler_bad_window_and_overlap(ivs_nodes, ivs_model, comfy_vae):
    with pytest.raises(InputError, match="window must be 4n\\+1"):
        run(ivs_nodes, ivs_model, comfy_vae, window=10)
    with pytest.raises(InputError, match="overlap must be a multiple of 4"):
        run(ivs_nodes, ivs_model, comfy_vae, window=9, overlap=2)
    with pytest.raises(InputError, match="smaller than the window"):
        run(ivs_nodes, ivs_model, comfy_vae, window=9, overlap=12)
