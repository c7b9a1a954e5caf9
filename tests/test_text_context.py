"""Tests of the umT5 encoder loader and the DreamID-V text context (tiny random models, no downloads)."""
import io
import json
import math
import os
import pickle

import pytest
import torch

from dreamidv_core.pipelines import text_context as tc
from dreamidv_core.models import umt5
from dreamidv_core.errors import CheckpointError, InputError
from dreamidv_core.io.state_dict import save_safetensors
from dreamidv_core.models.umt5 import (LAYOUT_HF, LAYOUT_OFFICIAL, UMT5Config, UMT5Encoder, export_state_dict,
                                       load_umt5_encoder, relative_position_buckets)

CFG = UMT5Config.tiny(vocab_size=128)
FP8 = torch.float8_e4m3fn


# ------------------------------------------------------------------------------------------- fixtures

def random_encoder(cfg=CFG, seed=0, dtype=torch.float32) -> UMT5Encoder:
    g = torch.Generator().manual_seed(seed)
    model = UMT5Encoder(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif "rel_bias" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif "token_embedding" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
    return model.to(dtype).eval().requires_grad_(False)


def ids(n=7, seed=1, vocab=CFG.vocab_size):
    return torch.randint(3, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def spm_bytes():
    spm = pytest.importorskip("sentencepiece")
    sentences = ["chang face", "a person changes face", "the face of a person in a video",
                 "swap the face in this video", "change face identity", "hello world, this is a test",
                 "faces and videos and people", "a quick brown fox jumps over the lazy dog"] * 20
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=out, vocab_size=60,
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False,
                                   minloglevel=2)
    return out.getvalue()


@pytest.fixture
def spm_file(tmp_path, spm_bytes):
    p = tmp_path / "tok" / "spiece.model"
    p.parent.mkdir()
    p.write_bytes(spm_bytes)
    return p


def quantise_fp8(w: torch.Tensor, per_row=False):
    if per_row:
        scale = w.abs().amax(dim=1).float() / 448.0
        return (w.float() / scale[:, None]).to(FP8), scale
    scale = w.abs().max().float() / 448.0
    return (w.float() / scale).to(FP8), scale.reshape(())


def write_scaled_fp8(model, path, new_style=False, spm=None, per_row=False, embedding=False):
    """A ComfyUI-style scaled fp8 file: fp8 linear weights + per-weight scale + marker; the rest fp16."""
    sd = {}
    for name, t in export_state_dict(model, LAYOUT_HF).items():
        is_linear = name.endswith(("q.weight", "k.weight", "v.weight", "o.weight", "wi_0.weight",
                                   "wi_1.weight", "wo.weight"))
        if is_linear or (embedding and name == "shared.weight"):
            q, s = quantise_fp8(t, per_row)
            layer = name[: -len(".weight")]
            sd[name] = q
            if new_style:
                sd[f"{layer}.weight_scale"] = s
                sd[f"{layer}.comfy_quant"] = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()),
                                                          dtype=torch.uint8)
            else:
                sd[f"{layer}.scale_weight"] = s
                sd[f"{layer}.scale_input"] = torch.ones(())
        else:
            sd[name] = t.to(torch.float16)
    if not new_style:
        sd["scaled_fp8"] = torch.empty(0, dtype=FP8)
    if spm is not None:
        sd["spiece_model"] = torch.frombuffer(bytearray(spm), dtype=torch.uint8)
    save_safetensors(sd, path)
    return sd


def dequantised_reference(model, sd):
    """The model the fp8 file describes: weights = fp8 * scale, others rounded to fp16."""
    ref = UMT5Encoder(model.config)
    state = {}
    for ours in ref.state_dict():
        hf = umt5.from_our_name(ours, LAYOUT_HF)
        layer = hf[: -len(".weight")]
        scale = sd.get(f"{layer}.scale_weight", sd.get(f"{layer}.weight_scale"))
        t = sd[hf].float()
        if scale is not None:
            t = t * (scale[:, None] if scale.dim() == 1 else scale)
        state[ours] = t
    ref.load_state_dict(state)
    return ref.eval()


# ------------------------------------------------------------------------------------------- loaders

def test_official_pth_roundtrip(tmp_path):
    model = random_encoder()
    path = tmp_path / "models_t5_umt5-xxl-enc-fp32.pth"
    torch.save(export_state_dict(model, LAYOUT_OFFICIAL), path)
    loaded = load_umt5_encoder(path, dtype=torch.float32)
    assert loaded.layout == LAYOUT_OFFICIAL and loaded.config == CFG
    assert not any(p.is_meta for p in loaded.parameters())
    x = ids()
    assert torch.equal(loaded(x), model(x))


def test_official_names_match_reference_layout():
    names = set(export_state_dict(random_encoder(), LAYOUT_OFFICIAL))
    assert {"token_embedding.weight", "norm.weight", "blocks.1.norm1.weight", "blocks.1.attn.q.weight",
            "blocks.1.pos_embedding.embedding.weight", "blocks.1.ffn.gate.0.weight", "blocks.1.ffn.fc1.weight",
            "blocks.1.ffn.fc2.weight", "blocks.1.norm2.weight"} <= names
    hf = set(export_state_dict(random_encoder(), LAYOUT_HF))
    assert "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" in hf
    assert "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in hf and "shared.weight" in hf


def test_bf16_official_file_is_used_without_copy(tmp_path):
    model = random_encoder(dtype=torch.bfloat16)
    path = tmp_path / "enc-bf16.pth"
    torch.save(export_state_dict(model, LAYOUT_OFFICIAL), path)
    loaded = load_umt5_encoder(path, dtype=torch.bfloat16)
    assert loaded.compute_dtype == torch.bfloat16
    x = ids()
    assert torch.equal(loaded(x), model(x))


def test_hf_fp16_safetensors_with_prefix(tmp_path):
    model = random_encoder()
    sd = {"umt5xxl.transformer." + k: v.to(torch.float16) for k, v in export_state_dict(model, LAYOUT_HF).items()}
    path = tmp_path / "umt5_xxl_fp16.safetensors"
    save_safetensors(sd, path)
    loaded = load_umt5_encoder(path, dtype=torch.float32)
    assert loaded.layout == LAYOUT_HF
    rounded = random_encoder().to(torch.float16).float()
    x = ids()
    torch.testing.assert_close(loaded(x), rounded(x), rtol=0, atol=1e-5)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=2e-2)  # fp16 rounding of the weights only
    assert loaded.token_embedding.weight.dtype == torch.float16  # big table kept as stored


@pytest.mark.parametrize("new_style", [False, True])
def test_scaled_fp8_is_dequantised(tmp_path, new_style):
    model = random_encoder()
    path = tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
    sd = write_scaled_fp8(model, path, new_style=new_style)
    loaded = load_umt5_encoder(path, dtype=torch.float32)
    x = ids()
    # exactly the dequantised weights ...
    torch.testing.assert_close(loaded(x), dequantised_reference(model, sd)(x), rtol=0, atol=1e-5)
    # ... and close to the full-precision model (fp8 has a 3-bit mantissa)
    rel = ((loaded(x) - model(x)).norm() / model(x).norm()).item()
    assert rel < 0.15, rel
    # forgetting the scale would be grossly wrong: the test can fail
    assert loaded.blocks[0].attn.q.weight.abs().max() > 1e-2


def test_scaled_fp8_per_row_scales_and_fp8_embedding(tmp_path):
    model = random_encoder()
    path = tmp_path / "fp8_rows.safetensors"
    sd = write_scaled_fp8(model, path, per_row=True, embedding=True)
    loaded = load_umt5_encoder(path, dtype=torch.float32)
    assert loaded.token_embedding.weight.dtype == FP8
    x = ids()
    torch.testing.assert_close(loaded(x), dequantised_reference(model, sd)(x), rtol=0, atol=1e-5)


def test_unsupported_quant_format_is_refused(tmp_path):
    model = random_encoder()
    path = tmp_path / "nvfp4.safetensors"
    sd = {k: v for k, v in export_state_dict(model, LAYOUT_HF).items()}
    sd["encoder.block.0.layer.0.SelfAttention.q.comfy_quant"] = torch.tensor(
        list(json.dumps({"format": "nvfp4"}).encode()), dtype=torch.uint8)
    save_safetensors(sd, path)
    with pytest.raises(CheckpointError, match="nvfp4"):
        load_umt5_encoder(path)


def test_padded_with_mask_equals_unpadded():
    model = random_encoder()
    x = ids(5)
    padded = torch.cat([x, torch.zeros(1, 11, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 5), torch.zeros(1, 11)], dim=1)
    torch.testing.assert_close(model(padded, mask)[:, :5], model(x), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------- independent reference math

def _bucket_reference(rel: int, num_buckets=32, max_distance=128) -> int:
    """Bidirectional T5 bucket of one relative position, written from the definition with Python floats."""
    half = num_buckets // 2
    base = half if rel > 0 else 0
    n = abs(rel)
    exact = half // 2
    if n < exact:
        return base + n
    large = exact + int(math.log(n / exact) / math.log(max_distance / exact) * (half - exact))
    return base + min(large, half - 1)


def test_relative_position_buckets_match_definition():
    got = relative_position_buckets(300, 300, 32, 128)
    for q in (0, 1, 7, 150, 299):
        for k in range(300):
            assert got[q, k].item() == _bucket_reference(k - q), (q, k)


def _reference_forward(model: UMT5Encoder, token_ids):
    """A straightforward float64 implementation (per head, explicit formulas) to check the module against."""
    sd = {k: v.double() for k, v in model.state_dict().items()}
    cfg = model.config
    x = sd["token_embedding.weight"][token_ids[0]]
    n = x.shape[0]

    def rms(t, w):
        return w * t / torch.sqrt((t * t).mean(-1, keepdim=True) + cfg.eps)

    def gelu_tanh(t):
        return 0.5 * t * (1 + torch.tanh(math.sqrt(2 / math.pi) * (t + 0.044715 * t ** 3)))

    rel = torch.tensor([[_bucket_reference(k - q) for k in range(n)] for q in range(n)])
    for i in range(cfg.num_layers):
        p = lambda s: sd[f"blocks.{i}.{s}"]  # noqa: E731
        h = rms(x, p("attn_norm.weight"))
        q, k, v = h @ p("attn.q.weight").T, h @ p("attn.k.weight").T, h @ p("attn.v.weight").T
        bias = p("attn.rel_bias.weight")[rel]  # [n, n, heads]
        heads = []
        for hd in range(cfg.num_heads):
            sl = slice(hd * cfg.d_kv, (hd + 1) * cfg.d_kv)
            scores = q[:, sl] @ k[:, sl].T + bias[:, :, hd]  # no 1/sqrt(d) in T5
            heads.append(torch.softmax(scores, -1) @ v[:, sl])
        x = x + torch.cat(heads, -1) @ p("attn.o.weight").T
        h = rms(x, p("ffn_norm.weight"))
        x = x + (gelu_tanh(h @ p("ffn.gate.weight").T) * (h @ p("ffn.up.weight").T)) @ p("ffn.down.weight").T
    return rms(x, sd["final_norm.weight"])


def test_block_math_matches_independent_reference():
    model = random_encoder()
    x = ids(9)
    ref = _reference_forward(model, x)
    got = model.double()(x)[0]
    assert (got - ref).abs().max().item() < 1e-10


def test_matches_transformers_umt5_if_installed():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.UMT5Config(vocab_size=CFG.vocab_size, d_model=CFG.d_model, d_kv=CFG.d_kv, d_ff=CFG.d_ff,
                                  num_layers=CFG.num_layers, num_heads=CFG.num_heads,
                                  relative_attention_num_buckets=32, relative_attention_max_distance=128,
                                  feed_forward_proj="gated-gelu", dropout_rate=0.0)
    hf = transformers.UMT5EncoderModel(cfg).eval()
    model = random_encoder()
    sd = export_state_dict(model, LAYOUT_HF)
    sd["encoder.embed_tokens.weight"] = sd["shared.weight"]
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    x = ids(9)
    with torch.no_grad():
        ref = hf(input_ids=x).last_hidden_state
    assert (model(x) - ref).abs().max().item() < 1e-4


# ------------------------------------------------------------------------------------------- errors

def test_random_state_dict_is_rejected_naming_file(tmp_path):
    path = tmp_path / "random_weights.safetensors"
    save_safetensors({"foo.weight": torch.randn(3, 3), "bar.bias": torch.randn(3)}, path)
    with pytest.raises(CheckpointError) as exc:
        load_umt5_encoder(path)
    assert "random_weights.safetensors" in str(exc.value) and "umT5" in str(exc.value)


def test_clip_file_is_recognised(tmp_path):
    path = tmp_path / "clip_l.safetensors"
    save_safetensors({"text_model.encoder.layers.0.self_attn.q_proj.weight": torch.zeros(4, 4),
                      "text_model.embeddings.token_embedding.weight": torch.zeros(8, 4)}, path)
    with pytest.raises(CheckpointError, match="CLIP"):
        load_umt5_encoder(path)


def test_t5_v11_is_recognised(tmp_path):
    sd = export_state_dict(random_encoder(), LAYOUT_HF)
    del sd["encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"]
    path = tmp_path / "t5xxl_fp16.safetensors"
    save_safetensors(sd, path)
    with pytest.raises(CheckpointError, match="T5 v1.1"):
        load_umt5_encoder(path)


def test_wrong_size_against_expected_config(tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save(export_state_dict(random_encoder(), LAYOUT_OFFICIAL), path)
    with pytest.raises(CheckpointError, match="d_model 64"):
        load_umt5_encoder(path, expected=UMT5Config.xxl())


def test_truncated_file_is_rejected(tmp_path):
    sd = export_state_dict(random_encoder(), LAYOUT_OFFICIAL)
    del sd["blocks.1.ffn.fc2.weight"]
    path = tmp_path / "partial.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match="blocks.1.ffn.fc2.weight"):
        load_umt5_encoder(path)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED_MARKER",))


def test_malicious_pickle_is_not_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "context.pth"
    with open(path, "wb") as fh:
        pickle.dump({"context": _Evil()}, fh)
    with pytest.raises(CheckpointError, match="refused"):
        tc.load_precomputed_context(path)
    with pytest.raises(CheckpointError):
        load_umt5_encoder(path)
    assert not (tmp_path / "PWNED_MARKER").exists()


# ------------------------------------------------------------------------------------------ tokenizer

def test_tokenizer_appends_eos_and_keeps_case(spm_file):
    tok = tc.UMT5Tokenizer.from_path(spm_file.parent)  # folder form, as google/umt5-xxl
    out = tok.encode("chang face")
    assert out[-1] == 1 and len(out) >= 2 and 0 not in out
    assert tok.encode(tc.clean_prompt("  chang \n  face ")) == out
    assert tc.clean_prompt("Chang&amp;amp;Face") == "Chang&Face"
    assert len(tok.encode("face " * 1000)) == tc.TEXT_LEN


def test_missing_tokenizer_folder_error(tmp_path):
    with pytest.raises(CheckpointError, match="spiece.model"):
        tc.UMT5Tokenizer.from_path(tmp_path)


# ------------------------------------------------------------------------------------- text context

def _official_files(tmp_path, spm_file, model=None):
    model = model or random_encoder()
    enc = tmp_path / "models_t5_umt5-xxl-enc-bf16.pth"
    torch.save(export_state_dict(model, LAYOUT_OFFICIAL), enc)
    return model, enc


def test_get_text_context_and_cache(tmp_path, spm_file, monkeypatch):
    model, enc = _official_files(tmp_path, spm_file)
    cache = tmp_path / "cache"
    calls = []
    real_loader = tc.load_umt5_encoder

    def counting_loader(*a, **k):
        calls.append(a)
        return real_loader(*a, **k)

    monkeypatch.setattr(tc, "load_umt5_encoder", counting_loader)
    ctx = tc.get_text_context(enc, spm_file, cache_dir=cache, dtype=torch.float32, text_dim=CFG.d_model)
    tok = tc.UMT5Tokenizer.from_path(spm_file)
    expected = model(torch.tensor([tok.encode("chang face")]))[0]
    assert ctx.shape == expected.shape and torch.equal(ctx, expected)
    assert len(calls) == 1 and len(list(cache.glob("*.safetensors"))) == 1

    def must_not_load(*a, **k):
        raise AssertionError("encoder loaded despite a cached context")

    monkeypatch.setattr(tc, "load_umt5_encoder", must_not_load)
    again = tc.get_text_context(enc, spm_file, cache_dir=cache, dtype=torch.float32, text_dim=CFG.d_model)
    assert torch.equal(again, ctx)

    # a different prompt or dtype is a different cache entry
    monkeypatch.setattr(tc, "load_umt5_encoder", counting_loader)
    other = tc.get_text_context(enc, spm_file, prompt="swap face", cache_dir=cache, dtype=torch.float32,
                                text_dim=CFG.d_model)
    assert len(calls) == 2 and not torch.equal(other[:2], ctx[:2])
    tc.get_text_context(enc, spm_file, cache_dir=cache, dtype=torch.bfloat16, text_dim=CFG.d_model)
    assert len(calls) == 3


def test_corrupt_cache_is_recomputed(tmp_path, spm_file):
    _, enc = _official_files(tmp_path, spm_file)
    cache = tmp_path / "cache"
    ctx = tc.get_text_context(enc, spm_file, cache_dir=cache, dtype=torch.float32, text_dim=CFG.d_model)
    (cached,) = cache.glob("*.safetensors")
    cached.write_bytes(b"garbage")
    again = tc.get_text_context(enc, spm_file, cache_dir=cache, dtype=torch.float32, text_dim=CFG.d_model)
    assert torch.equal(again, ctx)
    assert cached.stat().st_size > 100  # rewritten


def test_embedded_tokenizer_in_comfy_fp8_file(tmp_path, spm_file, spm_bytes):
    model = random_encoder()
    path = tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
    sd = write_scaled_fp8(model, path, spm=spm_bytes)
    ctx = tc.get_text_context(path, None, cache_dir=tmp_path / "c", dtype=torch.float32, text_dim=CFG.d_model)
    tok = tc.UMT5Tokenizer.from_path(spm_file)
    assert tc.UMT5Tokenizer.from_encoder_file(path).identity == tok.identity
    expected = dequantised_reference(model, sd)(torch.tensor([tok.encode("chang face")]))[0]
    torch.testing.assert_close(ctx, expected, rtol=0, atol=1e-5)


def test_no_tokenizer_anywhere(tmp_path, spm_file):
    _, enc = _official_files(tmp_path, spm_file)
    with pytest.raises(CheckpointError, match="tokenizer_path"):
        tc.get_text_context(enc, None, cache_dir=tmp_path / "c", text_dim=CFG.d_model)


def test_wrong_width_for_dit(tmp_path, spm_file):
    _, enc = _official_files(tmp_path, spm_file)
    with pytest.raises(CheckpointError, match="4096"):
        tc.get_text_context(enc, spm_file, cache_dir=tmp_path / "c")


# ------------------------------------------------------------------------------- precomputed context

def test_precomputed_list_pth_and_safetensors(tmp_path):
    ctx = torch.randn(3, 4096, dtype=torch.bfloat16)
    p = tmp_path / "context.pth"
    torch.save([ctx], p)
    assert torch.equal(tc.load_precomputed_context(p), ctx)
    p2 = tmp_path / "ctx.safetensors"
    save_safetensors({"anything": ctx.float()}, p2)
    assert torch.equal(tc.load_precomputed_context(p2), ctx.float())
    p3 = tmp_path / "plain.pt"
    torch.save(ctx[None], p3)  # [1, L, C] is accepted
    assert tc.load_precomputed_context(p3).shape == (3, 4096)


@pytest.mark.parametrize("bad, match", [
    (torch.randn(3, 768), "width is 768"),
    (torch.randn(2, 3, 4096), "2-D"),
    ([torch.randn(3, 4096), torch.randn(3, 4096)], "list of one"),
    (torch.full((2, 4096), float("nan")), "NaN"),
])
def test_precomputed_context_validation(tmp_path, bad, match):
    p = tmp_path / "bad.pth"
    torch.save(bad, p)
    with pytest.raises(InputError, match=match):
        tc.load_precomputed_context(p)


def test_precomputed_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        tc.load_precomputed_context(tmp_path / "nope.pth")
