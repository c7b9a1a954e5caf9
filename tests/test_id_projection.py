"""The ArcFace ID-token projection: an exact no-op at gate 0, used when trained, saved/loaded, trained alone."""
import json
from pathlib import Path

import pytest
import torch

from dreamidv_core.weights.checkpoints import detect_dit_config, load_dit, save_dit
from dreamidv_core.models.configs import RELEASED_CONFIGS, tiny_config
from dreamidv_core.models.dit import DreamIDVTransformer, init_random_
from dreamidv_core.errors import CheckpointError, InputError
from dreamidv_core.weights.id_projection import apply_id_projection_file, is_id_projection_file
from dreamidv_core.sampling.offload import disable_block_offload, enable_block_offload
from dreamidv_core.sampling.step_cache import StepCache, attach_step_cache
from dreamidv_core.io.state_dict import read_state_dict, save_safetensors

from test_dit import make_inputs

E = 8  # embedding width of the tiny projection (ArcFace: 512)


def make_pair(seed=3, layers=2, variant="full"):
    """(model without the projection, the same weights + a projection of 4 tokens)."""
    base = init_random_(DreamIDVTransformer(tiny_config(variant, num_layers=layers)), seed=seed).eval()
    withp = init_random_(DreamIDVTransformer(tiny_config(variant, num_layers=layers, id_tokens=4, id_embed_dim=E)),
                         seed=seed).eval()
    return base.requires_grad_(False), withp.requires_grad_(False)  # frozen, as load_dit returns models


def set_gates(model, value):
    with torch.no_grad():
        for blk in model.id_projection.blocks:
            blk.gate.fill_(value)


def cond_and_x(model, inp, emb=None, refs=None, pose=True):
    refs = inp["ref"] if refs is None else refs
    with torch.no_grad():
        tokens = model.pose_tokens(inp["pose"]) if pose else None
        return model.prepare(inp["context"], inp["y"], refs, tokens, id_embedding=emb), inp["x"]


def embedding(seed=0, rows=1):
    return torch.randn(rows, E, generator=torch.Generator().manual_seed(seed))


def test_projection_registered_last_and_named_for_the_trainer():
    base, withp = make_pair()
    names = [n for n, _ in withp.named_parameters()]
    plain = [n for n, _ in base.named_parameters()]
    assert names[:len(plain)] == plain
    extra = names[len(plain):]
    assert extra and all(n.startswith("id_projection.") for n in extra)
    assert "id_projection.blocks.1.gate" in extra and "id_projection.blocks.0.norm_k.weight" in extra
    for n, p in base.named_parameters():  # init_random_ draws the same noise for the shared parameters
        assert torch.equal(p, withp.get_parameter(n)), n
    assert all(float(b.gate) == 0 for b in withp.id_projection.blocks) and withp.id_projection.is_noop()


@pytest.mark.parametrize("variant", ["full", "faster"])
def test_gate_zero_is_bit_identical_to_the_model_without_it(variant):
    base, withp = make_pair(variant=variant)
    inp = make_inputs(base.cfg)
    pose = variant == "full"
    refs = torch.cat([inp["ref"], torch.zeros_like(inp["ref"])])
    emb = torch.cat([embedding(), torch.zeros(1, E)])
    cb, x = cond_and_x(base, inp, refs=refs, pose=pose)
    t = torch.tensor([700.0])
    with torch.no_grad():
        want = base(x.expand(2, -1, -1, -1, -1), t, cb, refs=[0, 1])
        cp, _ = cond_and_x(withp, inp, emb, refs=refs, pose=pose)
        assert cp.id_kv is None  # frozen gates at 0: the ID attention is skipped outright
        assert torch.equal(withp(x.expand(2, -1, -1, -1, -1), t, cp, refs=[0, 1]), want)
    # gates that train (still 0): the ID attention runs and adds exactly nothing
    withp.id_projection.requires_grad_(True)
    cp, _ = cond_and_x(withp, inp, emb, refs=refs, pose=pose)
    assert cp.id_kv is not None and len(cp.id_kv) == len(withp.blocks)
    with torch.no_grad():
        assert torch.equal(withp(x.expand(2, -1, -1, -1, -1), t, cp, refs=[0, 1]), want)


def test_trained_gate_changes_output_and_zero_embedding_row_differs():
    base, withp = make_pair()
    set_gates(withp, 0.5)
    inp = make_inputs(base.cfg)
    t = torch.tensor([700.0])
    same_refs = torch.cat([inp["ref"], inp["ref"]])  # only the ID embedding differs between the rows
    emb = torch.cat([embedding(), torch.zeros(1, E)])
    cb, x = cond_and_x(base, inp)
    cp, _ = cond_and_x(withp, inp, emb, refs=same_refs)
    with torch.no_grad():
        plain = base(x, t, cb)
        cond_row, uncond_row = withp(x, t, cp, refs=[0]), withp(x, t, cp, refs=[1])
        both = withp(x.expand(2, -1, -1, -1, -1), t, cp, refs=[0, 1])
    assert (cond_row - plain).abs().max() > 1e-3
    assert (cond_row - uncond_row).abs().max() > 1e-3
    assert torch.allclose(both[0], cond_row[0], atol=1e-5) and torch.allclose(both[1], uncond_row[0], atol=1e-5)


def test_prepare_computes_id_kv_once_and_forward_reuses_it(monkeypatch):
    _, withp = make_pair()
    set_gates(withp, 0.5)
    calls = []
    original = withp.id_projection.block_kv
    monkeypatch.setattr(withp.id_projection, "block_kv", lambda i, tok: calls.append(i) or original(i, tok))
    inp = make_inputs(withp.cfg)
    cond, x = cond_and_x(withp, inp, torch.cat([embedding(), torch.zeros(1, E)]),
                         refs=torch.cat([inp["ref"], torch.zeros_like(inp["ref"])]))
    assert calls == [0, 1]
    with torch.no_grad():
        for t in (900.0, 500.0, 100.0):
            withp(x, torch.tensor([t]), cond, refs=[0])
            withp(x, torch.tensor([t]), cond, refs=[1])
    assert calls == [0, 1]


def test_active_projection_needs_a_matching_embedding():
    _, withp = make_pair()
    set_gates(withp, 0.5)
    inp = make_inputs(withp.cfg)
    with pytest.raises(InputError, match="ArcFace"):
        cond_and_x(withp, inp, None)
    with pytest.raises(InputError, match=rf"\[rows, {E}\]"):
        cond_and_x(withp, inp, torch.zeros(1, E + 1))
    with pytest.raises(InputError, match="reference rows"):
        cond_and_x(withp, inp, torch.zeros(2, E))


def test_block_offload_and_step_cache_keep_the_id_path():
    _, withp = make_pair(layers=4)
    set_gates(withp, 0.5)
    inp = make_inputs(withp.cfg)
    cond, x = cond_and_x(withp, inp, embedding())
    t = torch.tensor([700.0])
    with torch.no_grad():
        want = withp(x, t, cond)
        enable_block_offload(withp, 3, "cpu", "cpu")
        try:
            assert torch.equal(withp(x, t, cond), want)
        finally:
            disable_block_offload(withp, "cpu")
        cache = StepCache(0.0, steps=2)  # threshold 0: every evaluation computed through the cache path
        attach_step_cache(cond, cache)
        assert torch.allclose(withp(x, t, cond), want, atol=1e-6)


def test_meta_release_configs_unchanged_and_1_3b_projection_names():
    for cfg in RELEASED_CONFIGS.values():
        assert cfg.id_tokens == 0
    manifest = json.loads((Path(__file__).parent / "data" / "dreamidv_param_manifest.json").read_text())
    with torch.device("meta"):
        model = DreamIDVTransformer(RELEASED_CONFIGS["dreamidv"].with_(id_tokens=4))
    names = {n: list(p.shape) for n, p in model.state_dict().items()}
    assert {n: s for n, s in names.items() if not n.startswith("id_projection.")} == manifest["params"]
    assert names["id_projection.mlp.2.weight"] == [4 * 1536, 1536]
    assert names["id_projection.blocks.29.k.weight"] == [1536, 1536]


def test_save_load_round_trip_with_and_without_metadata(tmp_path):
    _, withp = make_pair()
    set_gates(withp, 0.25)
    inp = make_inputs(withp.cfg)
    emb = embedding()
    cond, x = cond_and_x(withp, inp, emb)
    t = torch.tensor([600.0])
    with torch.no_grad():
        want = withp(x, t, cond)
    save_dit(withp, tmp_path / "m.safetensors")
    pth = tmp_path / "m.pth"
    torch.save(withp.state_dict(), pth)
    assert detect_dit_config(read_state_dict(pth)).id_tokens == 4  # from the shapes alone
    assert detect_dit_config(read_state_dict(pth)).id_embed_dim == E
    for path, config in ((tmp_path / "m.safetensors", None), (pth, withp.cfg)):  # .pth: heads are not in shapes
        loaded = load_dit(path, weight_dtype="fp32", config=config)
        assert loaded.cfg == withp.cfg and loaded.id_projection_active
        assert all(torch.equal(v, withp.state_dict()[k]) for k, v in loaded.state_dict().items())
        c2, _ = cond_and_x(loaded, inp, emb)
        with torch.no_grad():  # same tensors; memory-mapped weights may take another BLAS path (last bits)
            assert torch.allclose(loaded(x, t, c2), want, atol=1e-5)


def test_id_only_file_applies_on_a_released_checkpoint(tmp_path):
    base, withp = make_pair()
    set_gates(withp, 0.25)
    save_dit(base, tmp_path / "released.safetensors")
    id_file = tmp_path / "id.safetensors"  # what trainable="id_projection" writes: model.safetensors
    save_safetensors({n: p.detach() for n, p in withp.named_parameters() if n.startswith("id_projection.")}, id_file)
    assert is_id_projection_file(id_file) and not is_id_projection_file(tmp_path / "released.safetensors")
    model = load_dit(tmp_path / "released.safetensors", weight_dtype="fp32")
    assert getattr(model, "id_projection", None) is None
    apply_id_projection_file(model, id_file)
    assert model.cfg == withp.cfg and not any(p.requires_grad for p in model.parameters())
    inp = make_inputs(base.cfg)
    emb = embedding(1)
    t = torch.tensor([400.0])
    c1, x = cond_and_x(model, inp, emb)
    c2, _ = cond_and_x(withp, inp, emb)
    assert all(torch.equal(v, withp.state_dict()[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.allclose(model(x, t, c1), withp(x, t, c2), atol=1e-5)
    # bf16 storage: matrices in bf16, gates and norms float32
    bf = load_dit(tmp_path / "released.safetensors", weight_dtype="bf16")
    apply_id_projection_file(bf, id_file)
    assert bf.id_projection.blocks[0].k.weight.dtype == torch.bfloat16
    assert bf.id_projection.blocks[0].gate.dtype == torch.float32


def test_id_file_errors_name_the_file(tmp_path):
    base, withp = make_pair()
    model = load_dit_from(base, tmp_path)
    not_id = tmp_path / "lora.safetensors"
    save_safetensors({"blocks.0.self_attn.q.lora_A.weight": torch.zeros(2, 64)}, not_id)
    with pytest.raises(CheckpointError, match="not an ArcFace ID-projection file") as err:
        apply_id_projection_file(model, not_id)
    assert str(not_id) in str(err.value)
    _, deeper = make_pair(layers=3)
    other = tmp_path / "other.safetensors"
    save_safetensors({n: p.detach() for n, p in deeper.named_parameters() if n.startswith("id_projection.")}, other)
    with pytest.raises(CheckpointError, match="does not fit") as err:
        apply_id_projection_file(model, other)
    assert str(other) in str(err.value) and "blocks.2" in str(err.value)


def load_dit_from(model, tmp_path):
    path = tmp_path / "base.safetensors"
    save_dit(model, path)
    return load_dit(path, weight_dtype="fp32")


# ------------------------------------------------------------------------------------------------ training
def test_trainer_in_id_projection_mode_trains_only_the_projection(tmp_path):
    from tests.synthetic_data import write_synthetic_dataset
    from dreamidv_core.models.vae import TINY_VAE_CONFIG, WanVAE
    from training.dataset import collate
    from training.objective import FlowMatchingObjective
    from training.stages import colour_identity_encoder, make_loss_fn, stage_dataset
    from training.toy import tiny_model
    from training.trainer import TrainConfig, train

    write_synthetic_dataset(tmp_path / "data", 2, frames=5, size=(32, 32), direction="forward")
    data = stage_dataset(tmp_path / "data", "synthetic", 32, 32, 5)
    torch.manual_seed(0)
    vae = WanVAE(TINY_VAE_CONFIG).eval()
    # the colour stand-in encoder gives 3-d "identities": a projection of 3-d embeddings
    model = tiny_model(0, text_dim=32, id_tokens=2, id_embed_dim=3)
    context = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    seen = []

    def encoder(images):
        seen.append(images.shape[0])
        return colour_identity_encoder(images)

    loss_fn = make_loss_fn("synthetic", vae, context, FlowMatchingObjective(identity_dropout=0.0), encoder)
    batch = collate([data[0], data[1]])
    before_params = {n: p.detach().clone() for n, p in model.named_parameters()}

    def held_out():
        with torch.no_grad():
            return sum(float(loss_fn(model, batch, torch.Generator().manual_seed(s))) for s in range(2)) / 2

    model.id_projection.requires_grad_(True)  # as train() will: the ID path runs while the gates are 0
    before = held_out()
    res = train(model, data, loss_fn, TrainConfig(steps=8, lr=3e-2, seed=0, trainable="id_projection",
                                                  checkpoint_dir=str(tmp_path / "ckpt"), save_every=8))
    after = held_out()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before_params[n])}
    assert changed and all(n.startswith("id_projection.") for n in changed), sorted(changed)[:5]
    assert any(n.endswith(".gate") for n in changed)
    print("ID-projection training held-out loss", before, "->", after, res.losses)
    assert seen and after < 0.98 * before, (before, after, res.losses)
    # the checkpoint's model file holds only the projection and applies onto the base weights
    files = list((tmp_path / "ckpt").glob("step_*/model.safetensors"))
    assert files and is_id_projection_file(files[0])
    base = tiny_model(0, text_dim=32).requires_grad_(False)
    apply_id_projection_file(base, files[0])
    assert base.cfg.id_tokens == 2 and base.id_projection_active
    assert torch.equal(base.id_projection.blocks[0].gate, model.id_projection.blocks[0].gate.detach())
