"""Model/sampler nodes on tiny models: loader (cache, errors), text context, CONDITIONING conversion,
the ComfyUI VAE adapter, PoseGuider, sampler (outputs, determinism, interruption, errors), geometry."""
from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from dreamidv_core.pipelines.adapters import PixelSpaceVAE, context_from_conditioning, denormalise_latent, normalise_latent
from dreamidv_core.weights.checkpoints import save_dit
from dreamidv_core.models.configs import tiny_config
from dreamidv_core.models.dit import DreamIDVTransformer, init_random_
from dreamidv_core.errors import CheckpointError, InputError
from dreamidv_core.preprocess.geometry import CropBox, paste_back, source_crop_box
from dreamidv_core.preprocess.identity_bundle import IdentityBundle
from dreamidv_core.io.state_dict import save_safetensors
from dreamidv_core.models.vae import LATENT_MEAN, LATENT_STD
from tests.node_helpers import as_comfy_vae, model_folders, progress_updates, tiny_wan_vae

# A tiny Wan 2.1 VAE that ComfyUI's comfy.sd.VAE recognises (it fixes num_res_blocks=2, dim_mult 1,2,4,4).
F_SRC, H_SRC, W_SRC = 5, 40, 72  # source clip; area 64x32 -> resized 61x34 -> model frames 48x32
AREA = dict(width=64, height=32)


# ------------------------------------------------------------------------------------------ geometry

@pytest.mark.parametrize("h,w,area,box", [
    # 1080p at 832x480: resized 843x474, crop 832x464 at (6, 5) -> x 13.67..1908.6, y 11.39..1068.6
    (1080, 1920, (832, 480), CropBox(14, 11, 1895, 1058)),
    # smaller than the area: no resize, crop 96x48 at (round(4/2), round(12/2)) = (2, 6), exact
    (60, 100, (832, 480), CropBox(2, 6, 96, 48)),
    # 72x40 at 64x32: scale 0.8433 -> 61x34, crop 48x32 at (round(6.5)=6, 1) -> x 7.08..63.74, y 1.18..38.82
    (40, 72, (64, 32), CropBox(7, 1, 57, 38)),
])
def test_source_crop_box_hand_computed(h, w, area, box):
    assert source_crop_box(h, w, *area) == box


def test_paste_back_keeps_source_outside_the_box():
    src = torch.rand(2, 60, 100, 3)
    gen = torch.rand(2, 48, 96, 3)
    box = source_crop_box(60, 100, 832, 480)
    out = paste_back(src, gen, box)
    assert out.shape == src.shape
    assert torch.equal(out[:, 6:54, 2:98], gen)  # exact size: pasted unchanged
    keep = torch.ones(60, 100, dtype=torch.bool)
    keep[6:54, 2:98] = False
    assert torch.equal(out[:, keep], src[:, keep])
    with pytest.raises(InputError, match="frames"):
        paste_back(src, gen[:1], box)


def test_paste_back_resizes_into_the_box():
    src = torch.zeros(1, 40, 72, 3)
    out = paste_back(src, torch.full((1, 32, 48, 3), 0.5), source_crop_box(40, 72, 64, 32))
    assert torch.allclose(out[0, 1:39, 7:64], torch.tensor(0.5), atol=1e-5)
    assert out[0, :1].abs().max() == 0 and out[0, :, :7].abs().max() == 0 and out[0, :, 64:].abs().max() == 0


# ------------------------------------------------------------------------------------------ text

def test_context_from_padded_conditioning_strips_zero_rows():
    real = torch.randn(3, 4096)
    padded = torch.zeros(1, 512, 4096)
    padded[0, :3] = real
    assert torch.equal(context_from_conditioning(padded), real)
    mask = torch.zeros(1, 512, dtype=torch.long)
    mask[0, :3] = 1
    assert torch.equal(context_from_conditioning(padded, mask), real)
    with pytest.raises(InputError, match="4096"):
        context_from_conditioning(torch.randn(1, 77, 768))
    with pytest.raises(InputError, match="all zeros"):
        context_from_conditioning(torch.zeros(1, 512, 4096))


# ------------------------------------------------------------------------------------------ VAE adapter

def test_normalisation_arithmetic():
    raw = torch.randn(1, 16, 2, 3, 4)
    n = normalise_latent(raw)
    assert torch.allclose(n[0, 5], (raw[0, 5] - LATENT_MEAN[5]) / LATENT_STD[5])
    assert torch.allclose(denormalise_latent(n), raw, atol=1e-6)


@pytest.fixture(scope="module")
def tiny_vaes(comfy):
    """(our WanVAE, ComfyUI's comfy.sd.VAE) with the same random weights."""
    ours = tiny_wan_vae()
    theirs = as_comfy_vae(ours)
    assert type(theirs.first_stage_model).__name__ == "WanVAE" and theirs.latent_channels == 16
    return ours, theirs


def test_comfy_vae_adapter_matches_core_vae(tiny_vaes):
    ours, theirs = tiny_vaes
    adapter = PixelSpaceVAE(theirs)
    video = torch.rand(1, 3, 5, 32, 48) * 2 - 1
    a, b = ours.encode(video), adapter.encode(video)
    assert a.shape == b.shape == (1, 16, 2, 4, 6)
    assert torch.allclose(a, b, atol=1e-4)
    da, db = ours.decode(a), adapter.decode(a)
    assert da.shape == db.shape == video.shape
    assert torch.allclose(da, db, atol=1e-4)


# ------------------------------------------------------------------------------------------ model files

@pytest.fixture
def model_dirs(comfy, tmp_path):
    """Temporary diffusion_models / dreamidv / text_encoders folders registered in folder_paths."""
    with model_folders(tmp_path, ("diffusion_models", "dreamidv", "text_encoders")) as dirs:
        yield dirs


def write_dit(folder, name, variant="full", seed=0):
    model = DreamIDVTransformer(tiny_config(variant, text_dim=4096))
    init_random_(model, seed=seed)
    save_dit(model, folder / name)
    return folder / name


@pytest.fixture
def loader(pack):
    return pack.nodes.loaders


def test_loader_caches_and_reports(model_dirs, loader):
    write_dit(model_dirs["diffusion_models"], "dreamidv.safetensors")
    a = loader.DreamIDVModelLoader.execute("dreamidv.safetensors", "fp32", "sdpa", "cpu").result[0]
    b = loader.DreamIDVModelLoader.execute("dreamidv.safetensors", "fp32", "sdpa", "cpu").result[0]
    assert a is b and a.variant == "full"
    assert a.patcher.model is a.dit and a.patcher.model_size() > 0
    c = loader.DreamIDVModelLoader.execute("dreamidv.safetensors", "bf16", "sdpa", "cpu").result[0]
    assert c is not a and c.dit.compute_dtype == torch.bfloat16
    a.load()  # through ComfyUI's memory manager
    import comfy.model_management as mm
    assert any(lm.model is a.patcher for lm in mm.current_loaded_models)
    loader.unload_patcher(a.patcher)  # what "auto_offload" does after a run
    assert not any(lm.model is a.patcher for lm in mm.current_loaded_models)
    key = next(k for k, v in loader._MODELS.items() if v is a)
    del a, b, c
    mm.unload_all_models()
    gc.collect()
    assert key not in dict(loader._MODELS.items())  # nothing holds it any more: freed


def test_loader_missing_and_wrong_files_name_folder_and_expected(model_dirs, loader):
    folder = str(model_dirs["diffusion_models"])
    with pytest.raises(CheckpointError) as err:
        loader.DreamIDVModelLoader.execute("dreamidv.pth", "bf16", "sdpa", "cpu")
    assert folder in str(err.value) and "dreamidv_faster.safetensors" in str(err.value)
    problem = loader.DreamIDVModelLoader.validate_inputs("dreamidv.pth")  # what the UI shows before a run
    assert isinstance(problem, str) and folder in problem and "dreamidv.safetensors" in problem
    save_safetensors({"foo.weight": torch.zeros(2, 2)}, model_dirs["diffusion_models"] / "other.safetensors")
    with pytest.raises(CheckpointError) as err:
        loader.DreamIDVModelLoader.execute("other.safetensors", "bf16", "sdpa", "cpu")
    assert folder in str(err.value) and "dreamidv.safetensors" in str(err.value) and "not a DreamID-V" in str(err.value)


def test_text_context_from_precomputed_file_and_missing_encoder(model_dirs, loader):
    ctx = torch.randn(3, 4096)
    save_safetensors({"context": ctx}, model_dirs["dreamidv"] / "context.safetensors")
    out = loader.DreamIDVTextContext.execute("none", "context.safetensors").result[0]
    assert torch.equal(out[0][0], ctx[None])
    with pytest.raises(CheckpointError, match="text_encoders"):
        loader.DreamIDVTextContext.execute("umt5_xxl_fp16.safetensors", "none")
    with pytest.raises(InputError, match="umt5_xxl_fp8_e4m3fn_scaled.safetensors"):
        loader.DreamIDVTextContext.execute("none", "none")


def test_text_context_cache_dir_is_under_the_dreamidv_folder(model_dirs, loader):
    assert loader.context_cache_dir() == model_dirs["dreamidv"] / "text_context"


# ------------------------------------------------------------------------------------------ sampler

@pytest.fixture
def models(model_dirs, loader):
    write_dit(model_dirs["diffusion_models"], "dreamidv.safetensors", "full")
    write_dit(model_dirs["diffusion_models"], "dreamidv_faster.safetensors", "faster", seed=1)
    full = loader.DreamIDVModelLoader.execute("dreamidv.safetensors", "fp32", "sdpa", "cpu").result[0]
    faster = loader.DreamIDVModelLoader.execute("dreamidv_faster.safetensors", "fp32", "sdpa", "cpu").result[0]
    return full, faster


def clip(frames=F_SRC, channels=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    video = torch.rand(frames, H_SRC, W_SRC, channels, generator=g)
    mask = torch.zeros(frames, H_SRC, W_SRC)
    mask[:, 8:32, 20:52] = 1
    return video, mask


def conditioning(tokens=3, padded=False):
    ctx = torch.randn(tokens, 4096, generator=torch.Generator().manual_seed(5))
    if padded:  # what CLIPTextEncode with umT5 gives: 512 rows, padding zeroed
        full = torch.zeros(512, 4096)
        full[:tokens] = ctx
        ctx = full
    return [[ctx[None], {"pooled_output": None}]]


def identity():
    img = (np.random.default_rng(0).random((30, 20, 3)) * 255).astype(np.uint8)
    return IdentityBundle(image=img)


def run(pack, model, vae, pose=None, video=None, mask=None, ident=None, cond=None, **kw):
    if video is None:
        video, mask = clip()
    args = dict(AREA, frame_num=81, steps=2, shift=5.0, identity_guidance=4.0, seed=0, sampler="unipc",
                batch_guidance=False)
    args.update(kw)
    return pack.nodes.sampler.DreamIDVSampler.execute(model, vae, cond or conditioning(), ident or identity(), video,
                                                      mask, pose_tokens=pose, **args).result[:3]  # the IMAGE outputs


def pose_for(pack, model, video=None, **kw):
    if video is None:
        video, _ = clip(seed=3)
    args = dict(AREA, frame_num=81)
    args.update(kw)
    return pack.nodes.sampler.DreamIDVPoseGuider.execute(model, video, **args).result[0]


def test_pose_guider_records_geometry(pack, models):
    full, faster = models
    tokens = pose_for(pack, full)
    assert tokens.tokens.shape == (1, 2 * 2 * 3, full.dit.cfg.dim)  # 2 latent frames x (32/16) x (48/16)
    assert tokens.plan.frames == 5 and tokens.plan.source_size == (W_SRC, H_SRC) and tokens.plan.area == (64, 32)
    with pytest.raises(InputError, match="faster"):
        pose_for(pack, faster)


def test_sampler_outputs_are_deterministic(pack, models, tiny_vaes):
    full, _ = models
    vae = tiny_vaes[1]
    pose = pose_for(pack, full)
    video, mask = clip()
    frames, in_source, count = run(pack, full, vae, pose, video, mask)
    assert count == 5 and frames.shape == (5, 32, 48, 3) and in_source.shape == (5, H_SRC, W_SRC, 3)
    assert 0 <= frames.min() and frames.max() <= 1
    box = source_crop_box(H_SRC, W_SRC, 64, 32)
    outside = torch.ones(H_SRC, W_SRC, dtype=torch.bool)
    outside[box.top:box.bottom, box.left:box.right] = False
    assert torch.equal(in_source[:, outside], video[:, outside])
    again = run(pack, full, vae, pose, video, mask)
    assert torch.equal(again[0], frames)
    other = run(pack, full, vae, pose, video, mask, seed=1)
    assert not torch.equal(other[0], frames)
    # CLIPTextEncode's padded umT5 output gives the same result as the un-padded context
    padded = run(pack, full, vae, pose, video, mask, cond=conditioning(padded=True))
    assert torch.equal(padded[0], frames)


def test_sampler_progress_and_interrupt(pack, models, tiny_vaes):
    import comfy.model_management as mm

    full, faster = models
    vae = tiny_vaes[1]
    with progress_updates() as seen:
        run(pack, faster, vae, steps=3, sampler="euler")
    assert seen[-3:] == [(1, 3), (2, 3), (3, 3)]

    calls = []
    original = faster.dit.forward

    def forward(*a, **k):
        calls.append(1)
        mm.interrupt_current_processing(True)  # the user presses Cancel during the first step
        return original(*a, **k)

    faster.dit.forward = forward
    try:
        with pytest.raises(mm.InterruptProcessingException):
            run(pack, faster, vae, steps=5)
    finally:
        del faster.dit.forward
        mm.interrupt_current_processing(False)
    assert 1 <= len(calls) <= 2  # one step (conditional + unconditional pass), then stopped
    frames, _, count = run(pack, faster, vae, steps=1)  # the next run works
    assert count == 5 and torch.isfinite(frames).all()


def test_sampler_uses_the_identity_latent_when_it_matches(pack, models, tiny_vaes, monkeypatch):
    _, faster = models
    vae = tiny_vaes[1]
    ident = identity()
    from dreamidv_core.pipelines.adapters import PixelSpaceVAE
    from dreamidv_core.preprocess.identity_bundle import encode_reference

    area = (AREA["width"], AREA["height"])
    ident.latent = encode_reference(PixelSpaceVAE(vae), ident.image, (W_SRC, H_SRC), area)
    ident.latent_key = ((W_SRC, H_SRC), area)
    expected = run(pack, faster, vae, ident=identity())[0]

    def refuse(*a, **k):
        raise AssertionError("the bundle's latent should have been used")

    monkeypatch.setattr(pack.nodes.sampler, "encode_reference", refuse)
    assert torch.allclose(run(pack, faster, vae, ident=ident)[0], expected, atol=1e-5)
    ident.latent_key = ((W_SRC, H_SRC), (832, 480))  # made for another area: must be encoded anew
    with pytest.raises(AssertionError, match="latent"):
        run(pack, faster, vae, ident=ident)


def test_sampler_handles_alpha_and_greyscale(pack, models, tiny_vaes):
    _, faster = models
    vae = tiny_vaes[1]
    video, mask = clip()
    rgba = torch.cat([video, torch.ones_like(video[..., :1])], dim=-1)
    assert torch.equal(run(pack, faster, vae, None, rgba, mask, steps=1)[0], run(pack, faster, vae, None, video, mask,
                                                                                  steps=1)[0])
    grey = video[..., :1]
    frames, in_source, _ = run(pack, faster, vae, None, grey, mask, steps=1)
    assert in_source.shape == (5, H_SRC, W_SRC, 3)


def test_sampler_errors(pack, models, tiny_vaes):
    full, faster = models
    vae = tiny_vaes[1]
    video, mask = clip()
    with pytest.raises(InputError, match="mask has 4 frames but the video has 5"):
        run(pack, faster, vae, None, video, mask[:4])
    with pytest.raises(InputError, match="at least 5"):
        run(pack, faster, vae, None, video[:4], mask[:4])
    with pytest.raises(InputError, match="DreamIDVPoseGuider"):
        run(pack, full, vae, None, video, mask)
    pose = pose_for(pack, full, width=48, height=32)  # another area
    with pytest.raises(InputError, match="area 48x32"):
        run(pack, full, vae, pose, video, mask)
    with pytest.raises(InputError, match="4096"):
        run(pack, faster, vae, None, video, mask, cond=[[torch.randn(1, 77, 768), {}]])


# ------------------------------------------------------------------------------------------ text encoder files

@pytest.fixture(scope="module")
def spm_bytes():
    spm = pytest.importorskip("sentencepiece")
    import io as _io

    out = _io.BytesIO()
    sentences = ["chang face", "a person changes face", "swap the face in this video", "hello world"] * 20
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=out, vocab_size=40, pad_id=0,
                                   eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2)
    return out.getvalue()


def tiny_4096_encoder():
    from dreamidv_core.models.umt5 import UMT5Config, UMT5Encoder

    model = UMT5Encoder(UMT5Config(vocab_size=64, d_model=4096, num_layers=1, num_heads=2, d_kv=8, d_ff=16))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if p.dim() == 1 else 0.0))
    return model.eval()


def test_text_context_from_encoder_files_is_cached(model_dirs, loader, spm_bytes, monkeypatch):
    from dreamidv_core.pipelines import text_context
    from dreamidv_core.models.umt5 import LAYOUT_HF, LAYOUT_OFFICIAL, export_state_dict

    model = tiny_4096_encoder()
    te = model_dirs["text_encoders"]
    sd = dict(export_state_dict(model, LAYOUT_HF))
    sd["spiece_model"] = torch.frombuffer(bytearray(spm_bytes), dtype=torch.uint8)
    save_safetensors(sd, te / "umt5_xxl_fp16.safetensors")  # ComfyUI's layout, tokenizer embedded
    first = loader.DreamIDVTextContext.execute("umt5_xxl_fp16.safetensors").result[0][0][0]
    assert first.shape[0] == 1 and first.shape[2] == 4096 and 2 <= first.shape[1] <= 6
    assert list((model_dirs["dreamidv"] / "text_context").glob("*.safetensors"))

    def no_encoder(*a, **k):
        raise AssertionError("the encoder should not run again")

    monkeypatch.setattr(text_context, "load_umt5_encoder", no_encoder)
    assert torch.equal(loader.DreamIDVTextContext.execute("umt5_xxl_fp16.safetensors").result[0][0][0], first)
    monkeypatch.undo()

    # the official .pth needs the google/umt5-xxl folder: missing -> error saying where it looked
    torch.save(export_state_dict(model, LAYOUT_OFFICIAL), te / "models_t5_umt5-xxl-enc-bf16.pth")
    with pytest.raises(CheckpointError, match="google/umt5-xxl"):
        loader.DreamIDVTextContext.execute("models_t5_umt5-xxl-enc-bf16.pth")
    (te / "google" / "umt5-xxl").mkdir(parents=True)
    (te / "google" / "umt5-xxl" / "spiece.model").write_bytes(spm_bytes)
    official = loader.DreamIDVTextContext.execute("models_t5_umt5-xxl-enc-bf16.pth").result[0][0][0]
    assert official.shape == first.shape
    assert torch.allclose(official, first, atol=0.05 * first.abs().max().item())  # same weights, bf16 runs


def test_comfy_umt5_tokenizer_pads_to_512_after_eos(comfy, spm_bytes):
    """A fact context_from_conditioning relies on: ComfyUI's Wan tokenizer gives our tokens (</s> included)
    followed by pad id 0 up to 512 (its encoder then masks and zeroes the padding rows)."""
    from comfy.text_encoders.wan import WanT5Tokenizer

    from dreamidv_core.pipelines.text_context import UMT5Tokenizer

    tokens = WanT5Tokenizer(tokenizer_data={"spiece_model": spm_bytes}).tokenize_with_weights("chang face")["umt5xxl"]
    ids = [t for t, _ in tokens[0]]
    ours = UMT5Tokenizer(spm_bytes=spm_bytes, source="test").encode("chang face")
    assert len(tokens) == 1 and len(ids) == 512
    assert ids[:len(ours)] == ours and ours[-1] == 1 and set(ids[len(ours):]) == {0}


def test_sampler_swaps_a_clip_longer_than_one_window(pack, models, tiny_vaes):
    full, _ = models
    vae = tiny_vaes[1]
    video, mask = clip(frames=15, seed=4)  # window 9 / overlap 4 -> 3 windows over 17 padded frames
    pose = pose_for(pack, full, video=clip(frames=15, seed=5)[0], frame_num=0, window=9, overlap=4)
    assert pose.plan.frames == 15 and pose.plan.window == (9, 4)
    frames, in_source, count = run(pack, full, vae, pose, video, mask, frame_num=0, window=9, overlap=4,
                                   background_strength=0.5, step_cache=0.2)
    assert count == 15 and frames.shape == (15, 32, 48, 3) and in_source.shape == (15, H_SRC, W_SRC, 3)
    # tokens made for other windows are refused with a message naming the mismatch
    with pytest.raises(InputError, match="window 9 / overlap 4"):
        run(pack, full, vae, pose, video, mask, frame_num=0, window=13, overlap=4)


def test_loader_block_offload_option(model_dirs, loader):
    write_dit(model_dirs["diffusion_models"], "dreamidv.safetensors", "full")
    handle = loader.DreamIDVModelLoader.execute("dreamidv.safetensors", "fp32", "sdpa", "cpu", 2).result[0]
    assert handle.offload_blocks == 2
    again = loader.DreamIDVModelLoader.execute("dreamidv.safetensors", "fp32", "sdpa", "cpu", 0).result[0]
    assert again is not handle  # a different option is a different cached model
    with pytest.raises(InputError, match="has 2 blocks"):
        loader.DreamIDVModelLoader.execute("dreamidv.safetensors", "fp32", "sdpa", "cpu", 5)


def test_loader_applies_an_id_projection_and_the_sampler_needs_the_embedding(model_dirs, loader, pack, tiny_vaes,
                                                                            tmp_path):
    from dreamidv_core.preprocess.identity_bundle import FaceBox

    with model_folders(tmp_path, ("loras",), (".safetensors",)) as folders:
        loras = folders["loras"]
        write_dit(model_dirs["diffusion_models"], "dreamidv_faster.safetensors", "faster", seed=1)
        trained = init_random_(DreamIDVTransformer(tiny_config("faster", text_dim=4096, id_tokens=2, id_embed_dim=8)))
        with torch.no_grad():
            for blk in trained.id_projection.blocks:
                blk.gate.fill_(0.5)
        save_safetensors({n: p.detach() for n, p in trained.named_parameters() if n.startswith("id_projection.")},
                         loras / "id.safetensors")
        save_safetensors({"blocks.0.ffn.0.lora_A.weight": torch.zeros(2, 64)}, loras / "lora.safetensors")
        node = loader.DreamIDVModelLoader
        plain = node.execute("dreamidv_faster.safetensors", "fp32", "sdpa", "cpu").result[0]
        model = node.execute("dreamidv_faster.safetensors", "fp32", "sdpa", "cpu", id_projection="id.safetensors").result[0]
        assert model is not plain and model.dit.id_projection_active and not plain.dit.cfg.id_tokens
        with pytest.raises(CheckpointError, match="not an ArcFace ID-projection file"):
            node.execute("dreamidv_faster.safetensors", "fp32", "sdpa", "cpu", id_projection="lora.safetensors")
        with pytest.raises(CheckpointError, match="id_projection input"):
            node.execute("dreamidv_faster.safetensors", "fp32", "sdpa", "cpu", lora="id.safetensors")
        vae = tiny_vaes[1]
        with pytest.raises(InputError, match="face detection"):
            run(pack, model, vae)  # identity without an ArcFace embedding
        ident = identity()
        ident.face = FaceBox(bbox=(0, 0, 20, 30), score=1.0, embedding=np.ones(8, np.float32) / 8 ** 0.5)
        frames = run(pack, model, vae, ident=ident)[0]
        base = run(pack, plain, vae, ident=ident)[0]
        assert frames.shape == base.shape and not torch.equal(frames, base)


# ------------------------------------------------------------------------------------------ issue 11 guards
def test_loader_names_a_plain_wan_t2v_file_and_the_expected_one(model_dirs, loader):
    write_dit(model_dirs["diffusion_models"], "wan2.1_t2v_1.3B_fp16.safetensors", "wan_t2v")
    with pytest.raises(CheckpointError) as err:
        loader.DreamIDVModelLoader.execute("wan2.1_t2v_1.3B_fp16.safetensors", "fp32", "sdpa", "cpu")
    msg = str(err.value)
    assert "wan2.1_t2v_1.3B_fp16.safetensors" in msg and "plain Wan2.1-T2V" in msg and "dreamidv.safetensors" in msg


def test_text_context_defaults_to_auto_which_is_never_a_missing_file(model_dirs, loader):
    """The encoder combo's default is 'auto' (always in the list), so a workflow using a precomputed context
    is not flagged for a missing encoder file; 'auto' takes the catalogue's first umT5 file found."""
    schema = loader.DreamIDVTextContext.define_schema()
    combo = next(i for i in schema.inputs if i.id == "text_encoder")
    assert combo.default == "auto" and "auto" in combo.options
    save_safetensors({"context": torch.randn(3, 4096)}, model_dirs["dreamidv"] / "context.safetensors")
    assert loader.DreamIDVTextContext.validate_inputs("auto", "context.safetensors") is True
    problem = loader.DreamIDVTextContext.validate_inputs("auto", "none")  # nothing there: said before a run
    assert isinstance(problem, str) and "umt5_xxl_fp8_e4m3fn_scaled.safetensors" in problem
    for name in ("umt5_xxl_fp16.safetensors", "umt5_xxl_fp8_e4m3fn_scaled.safetensors"):
        (model_dirs["text_encoders"] / name).write_bytes(b"stand-in")
    import folder_paths
    folder_paths.filename_list_cache.clear()
    assert loader.auto_text_encoder() == "umt5_xxl_fp8_e4m3fn_scaled.safetensors"  # the catalogue's order


def test_every_node_input_and_output_has_a_tooltip_and_the_pack_prefix(pack):
    for node in pack.nodes.all_nodes():
        schema = node.define_schema()
        assert schema.display_name.startswith("DreamID-V"), schema.display_name
        missing = [i.id for i in schema.inputs if not i.tooltip]
        assert not missing, f"{schema.node_id}: inputs without a tooltip: {missing}"
        missing = [o.display_name or o.id for o in schema.outputs if not o.tooltip]
        assert not missing, f"{schema.node_id}: outputs without a tooltip: {missing}"


@pytest.mark.parametrize("case", ["video_0_255", "mask_0_255", "nan_outside_crop", "steps_0", "thin_clip"])
def test_sampler_says_what_is_wrong_before_sampling(pack, models, tiny_vaes, monkeypatch, case):
    _, faster = models
    video, mask = clip()
    kw, words = {}, ""
    if case == "video_0_255":
        video, words = video * 255, "these look like 0..255 pixels"
    elif case == "mask_0_255":
        mask, words = mask * 255, "mask: values go up to 255"
    elif case == "nan_outside_crop":  # the crop of a 72x40 source at 64x32 leaves column 0 out
        video[2, 5, 0] = float("nan")
        words = "video: frame 2 contains NaN"
    elif case == "steps_0":
        kw, words = dict(steps=0), "steps must be >= 1, got 0"
    else:
        video, mask, words = torch.rand(5, 16, 400, 3), torch.zeros(5, 16, 400), "400x16 are too small for the 64x32 area"

    def refuse(*a, **k):
        raise AssertionError("sampling started")
    monkeypatch.setattr(pack.nodes.sampler, "swap_face", refuse)
    with pytest.raises(InputError) as err:
        run(pack, faster, tiny_vaes[1], None, video, mask, **kw)
    assert words in str(err.value)


def test_sampler_frames_in_source_of_an_odd_source_are_even(pack, models, tiny_vaes):
    _, faster = models
    g = torch.Generator().manual_seed(0)
    video, mask = torch.rand(5, 39, 71, 3, generator=g), torch.zeros(5, 39, 71)
    mask[:, 8:30, 20:50] = 1
    frames, in_source, _ = run(pack, faster, tiny_vaes[1], None, video, mask, steps=1)
    assert in_source.shape == (5, 38, 70, 3)  # H.264 (Save Video) needs even sizes
    assert frames.shape[1] % 16 == 0 and frames.shape[2] % 16 == 0


# ------------------------------------------------------------------------------------------ face crop

def test_pose_guider_and_sampler_in_face_crop_mode(pack, models, tiny_vaes, one_thread):
    """face_crop on both nodes (same mask and margin): the model sees the face windows at the area's size;
    frames_in_source is the source outside the windows and on frames whose mask is empty, bit for bit."""
    full, _ = models
    vae = tiny_vaes[1]
    video, _ = clip()
    mask = torch.zeros(F_SRC, H_SRC, W_SRC)
    for i in range(F_SRC):
        mask[i, 10:18, 24 + 4 * i:32 + 4 * i] = 1  # an 8x8 face moving right
    mask[2] = 0
    crop = dict(face_crop=True, crop_margin=1.0)
    pose = pose_for(pack, full, mask=mask, **crop)
    assert pose.plan.track is not None and pose.plan.size == (32, 64)
    frames, in_source, count = run(pack, full, vae, pose, video, mask, **crop)
    assert count == 5 and frames.shape == (5, 32, 64, 3) and in_source.shape == (5, H_SRC, W_SRC, 3)
    track = pose.plan.track
    assert torch.equal(in_source[2], video[2])
    for i in (0, 1, 3, 4):
        x0, y0, x1, y1 = track.region(i)
        assert (x1 - x0, y1 - y0) in ((64, 32), (65, 32), (64, 33), (65, 33))  # 3x the face -> the 32 px minimum
        keep = torch.ones(H_SRC, W_SRC, dtype=torch.bool)
        keep[y0:y1, x0:x1] = False
        assert torch.equal(in_source[i][keep], video[i][keep]) and not torch.equal(in_source[i], video[i])
    with pytest.raises(InputError, match="face crop off \\(the sampler's is on\\)"):
        run(pack, full, vae, pose_for(pack, full), video, mask, **crop)
    with pytest.raises(InputError, match="another face-crop track"):
        run(pack, full, vae, pose_for(pack, full, mask=mask, face_crop=True, crop_margin=0.5), video, mask, **crop)
    with pytest.raises(InputError, match="face_crop is on but no mask is connected"):
        pose_for(pack, full, **crop)
