"""The umT5 text encoder (encoder half only) that produces DreamID-V's text context.

DreamID-V conditions its Wan2.1 DiT on the last hidden states of umT5-XXL's encoder
(``[L, 4096]``, one row per prompt token including the closing ``</s>``).

Architecture (umT5 = T5 v1.1 with an un-shared relative position bias in every layer)::

    x = token_embedding[ids]
    for each block:
        x = x + SelfAttention(RMSNorm(x))     # no 1/sqrt(d) scaling; + this layer's own position bias
        x = x + GatedGELU_FFN(RMSNorm(x))     # down( gelu_tanh(gate(x)) * up(x) )
    out = RMSNorm(x)                          # T5 norm: weight * x / rms(x), no mean, no bias

Parameter names used by :class:`UMT5Encoder` (our own, shown with the two file layouts we read)::

    ours                              official Wan .pth                 Hugging Face / ComfyUI .safetensors
    token_embedding.weight            token_embedding.weight            shared.weight
    blocks.N.attn_norm.weight         blocks.N.norm1.weight             encoder.block.N.layer.0.layer_norm.weight
    blocks.N.attn.{q,k,v,o}.weight    blocks.N.attn.{q,k,v,o}.weight    encoder.block.N.layer.0.SelfAttention.{q,k,v,o}.weight
    blocks.N.attn.rel_bias.weight     blocks.N.pos_embedding.embedding.weight
                                                                        encoder.block.N.layer.0.SelfAttention.relative_attention_bias.weight
    blocks.N.ffn_norm.weight          blocks.N.norm2.weight             encoder.block.N.layer.1.layer_norm.weight
    blocks.N.ffn.gate.weight (GELU)   blocks.N.ffn.gate.0.weight        encoder.block.N.layer.1.DenseReluDense.wi_0.weight
    blocks.N.ffn.up.weight (linear)   blocks.N.ffn.fc1.weight           encoder.block.N.layer.1.DenseReluDense.wi_1.weight
    blocks.N.ffn.down.weight          blocks.N.ffn.fc2.weight           encoder.block.N.layer.1.DenseReluDense.wo.weight
    final_norm.weight                 norm.weight                       encoder.final_layer_norm.weight

The table lives in code exactly once, in :data:`_NAME_TABLE`.

ComfyUI "scaled fp8" files store each quantised linear weight as float8 plus a float32 scale
(``<layer>.scale_weight``, or ``<layer>.weight_scale`` in ComfyUI's newer naming, optionally with a
``<layer>.comfy_quant`` JSON description), and a marker tensor ``scaled_fp8``. The real weight is
``fp8_weight * scale``; we dequantise once on load into the compute dtype. ComfyUI's umT5 files also
embed the sentencepiece tokenizer as a uint8 tensor ``spiece_model`` (see :func:`read_embedded_tokenizer`).

Loading builds the model on the ``meta`` device and assigns each tensor into place one at a time, so a
file whose dtype equals the compute dtype is used straight from the memory map (no second copy in RAM).
The token embedding (256384 x 4096) is kept in its stored dtype and only the looked-up rows are converted.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, fields
from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import CheckpointError
from ..io.state_dict import StateDictReader, check_floating, read_state_dict

__all__ = [
    "UMT5Config", "UMT5Encoder", "load_umt5_encoder", "read_embedded_tokenizer",
    "detect_layout", "to_our_name", "from_our_name", "export_state_dict",
    "LAYOUT_OFFICIAL", "LAYOUT_HF",
]

LAYOUT_OFFICIAL = "official"  # Wan / DreamID-V `models_t5_umt5-xxl-enc-bf16.pth`
LAYOUT_HF = "hf"              # Hugging Face T5 names, as in ComfyUI's `umt5_xxl_*.safetensors`

_FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))
_SUPPORTED_QUANT_FORMATS = ("float8_e4m3fn", "float8_e5m2")
_EMBEDDED_TOKENIZER_KEY = "spiece_model"
_SCALED_FP8_MARKER = "scaled_fp8"


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class UMT5Config:
    """Shape of a umT5 encoder. Defaults are umT5-XXL (the only size DreamID-V's DiT accepts)."""

    vocab_size: int = 256384
    d_model: int = 4096
    num_layers: int = 24
    num_heads: int = 64
    d_kv: int = 64
    d_ff: int = 10240
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    @classmethod
    def xxl(cls) -> "UMT5Config":
        return cls()

    @classmethod
    def tiny(cls, vocab_size: int = 256) -> "UMT5Config":
        """A few-kB model for tests."""
        return cls(vocab_size=vocab_size, d_model=64, num_layers=2, num_heads=4, d_kv=16, d_ff=96)

    def describe(self) -> str:
        return (f"d_model {self.d_model}, {self.num_layers} layers, {self.num_heads} heads x {self.d_kv}, "
                f"d_ff {self.d_ff}, vocab {self.vocab_size}")

    def differences(self, other: "UMT5Config") -> List[str]:
        return [f"{f.name} {getattr(other, f.name)} (expected {getattr(self, f.name)})"
                for f in fields(self) if getattr(self, f.name) != getattr(other, f.name)]


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------

def _upcast(t: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 -> float32 for reductions; float32/float64 unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class RMSNorm(nn.Module):
    """T5 layer norm: ``weight * x / sqrt(mean(x^2) + eps)``, statistics in float32, no mean, no bias."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = _upcast(x)
        normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * normed.to(self.weight.dtype)


def relative_position_buckets(length_q: int, length_k: int, num_buckets: int, max_distance: int,
                              device=None) -> torch.Tensor:
    """Bidirectional T5 bucket index of ``key_pos - query_pos`` for every (query, key) pair: ``[Lq, Lk]``.

    Half the buckets are for keys after the query, half for keys before; within each half the first
    half of the buckets are exact distances and the rest grow logarithmically up to ``max_distance``.
    """
    rel = torch.arange(length_k, device=device)[None, :] - torch.arange(length_q, device=device)[:, None]
    half = num_buckets // 2
    bucket = (rel > 0).long() * half
    dist = rel.abs()
    exact = half // 2
    # clamp(min=1) only keeps log() finite for distances that take the exact branch anyway
    log_bucket = exact + (torch.log(dist.clamp(min=1).float() / exact) / math.log(max_distance / exact)
                          * (half - exact)).long()
    log_bucket = log_bucket.clamp(max=half - 1)
    return bucket + torch.where(dist < exact, dist, log_bucket)


def _clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    """T5 overflows in float16; like the reference pipeline, pull infinities back into range."""
    if x.dtype == torch.float16 and torch.isinf(x).any():
        limit = torch.finfo(torch.float16).max - 1000
        x = x.clamp(-limit, limit)
    return x


class SelfAttention(nn.Module):
    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.num_heads, self.d_kv = cfg.num_heads, cfg.d_kv
        self.q = nn.Linear(cfg.d_model, cfg.inner_dim, bias=False)
        self.k = nn.Linear(cfg.d_model, cfg.inner_dim, bias=False)
        self.v = nn.Linear(cfg.d_model, cfg.inner_dim, bias=False)
        self.o = nn.Linear(cfg.inner_dim, cfg.d_model, bias=False)
        self.rel_bias = nn.Embedding(cfg.num_buckets, cfg.num_heads)  # umT5: one table per layer

    def forward(self, x: torch.Tensor, buckets: torch.Tensor, key_mask: Optional[torch.Tensor]) -> torch.Tensor:
        b, n, _ = x.shape

        def heads(t):  # [B, L, H*D] -> [B, H, L, D]
            return t.view(b, n, self.num_heads, self.d_kv).transpose(1, 2)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        bias = self.rel_bias(buckets).permute(2, 0, 1).unsqueeze(0).to(q.dtype)  # [1, H, L, L]
        if key_mask is not None:
            blocked = ~key_mask.bool()[:, None, None, :]
            bias = bias.masked_fill(blocked, torch.finfo(q.dtype).min)
        scores = torch.matmul(q, k.transpose(-1, -2)) + bias  # T5 does not scale by 1/sqrt(d)
        probs = torch.softmax(_upcast(scores), dim=-1).to(q.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(b, n, self.num_heads * self.d_kv)
        return self.o(out)


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def gelu_tanh(t: torch.Tensor) -> torch.Tensor:
    """tanh-approximated GELU, evaluated step by step in ``t``'s dtype.

    Mathematically ``F.gelu(t, approximate="tanh")`` (what Hugging Face / ComfyUI use), but the reference
    Wan/DreamID-V encoder evaluates the formula op by op in bfloat16, and that rounding is part of the
    context the DiT was trained on; this form reproduces the reference bit for bit in bf16/fp16.
    """
    return 0.5 * t * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (t + 0.044715 * torch.pow(t, 3.0))))


class GatedGELUFeedForward(nn.Module):
    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(gelu_tanh(self.gate(x)) * self.up(x))


class EncoderBlock(nn.Module):
    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.eps)
        self.attn = SelfAttention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.eps)
        self.ffn = GatedGELUFeedForward(cfg)

    def forward(self, x, buckets, key_mask=None):
        x = _clamp_fp16(x + self.attn(self.attn_norm(x), buckets, key_mask))
        return _clamp_fp16(x + self.ffn(self.ffn_norm(x)))


class TokenEmbedding(nn.Module):
    """Embedding table kept in its stored dtype (possibly float8 with a scale); rows are converted on lookup."""

    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, dim))
        self.scale: Optional[torch.Tensor] = None

    def forward(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        rows = F.embedding(ids, self.weight)
        if rows.dtype in _FP8_DTYPES or self.scale is not None:
            rows = rows.float()
            if self.scale is not None:
                scale = self.scale.to(rows.device, torch.float32).reshape(-1)
                rows = rows * (scale[ids].unsqueeze(-1) if scale.numel() > 1 else scale[0])
            rows = torch.nan_to_num(rows)
        return rows.to(dtype)


class UMT5Encoder(nn.Module):
    """umT5 encoder stack. ``forward(ids [B, L], key_mask [B, L] or None) -> hidden states [B, L, d_model]``.

    Computes in ``self.compute_dtype`` (the dtype of the linear weights; set by the loader).
    """

    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.config = cfg
        self.token_embedding = TokenEmbedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.num_layers))
        self.final_norm = RMSNorm(cfg.d_model, cfg.eps)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.final_norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.final_norm.weight.device

    def forward(self, ids: torch.Tensor, key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``key_mask`` (1 = real token, 0 = padding) hides padded keys. Running an unpadded sequence gives
        the same per-token states as running it padded with a mask, because T5's position bias only
        depends on relative distance."""
        if ids.dim() != 2:
            raise ValueError(f"ids must be [batch, length], got shape {tuple(ids.shape)}")
        ids = ids.to(self.device)
        if key_mask is not None:
            key_mask = key_mask.to(self.device)
        x = self.token_embedding(ids, self.compute_dtype)
        n = ids.shape[1]
        buckets = relative_position_buckets(n, n, self.config.num_buckets, self.config.max_distance, ids.device)
        for block in self.blocks:
            x = block(x, buckets, key_mask)
        return self.final_norm(x)


# --------------------------------------------------------------------------------------------------
# Names: the single place where file layouts are mapped to our parameter names
# --------------------------------------------------------------------------------------------------

# (our name, official Wan name, Hugging Face / ComfyUI name); "{i}" is the block index.
_NAME_TABLE: Tuple[Tuple[str, str, str], ...] = (
    ("token_embedding.weight", "token_embedding.weight", "shared.weight"),
    ("final_norm.weight", "norm.weight", "encoder.final_layer_norm.weight"),
    ("blocks.{i}.attn_norm.weight", "blocks.{i}.norm1.weight", "encoder.block.{i}.layer.0.layer_norm.weight"),
    ("blocks.{i}.attn.q.weight", "blocks.{i}.attn.q.weight", "encoder.block.{i}.layer.0.SelfAttention.q.weight"),
    ("blocks.{i}.attn.k.weight", "blocks.{i}.attn.k.weight", "encoder.block.{i}.layer.0.SelfAttention.k.weight"),
    ("blocks.{i}.attn.v.weight", "blocks.{i}.attn.v.weight", "encoder.block.{i}.layer.0.SelfAttention.v.weight"),
    ("blocks.{i}.attn.o.weight", "blocks.{i}.attn.o.weight", "encoder.block.{i}.layer.0.SelfAttention.o.weight"),
    ("blocks.{i}.attn.rel_bias.weight", "blocks.{i}.pos_embedding.embedding.weight",
     "encoder.block.{i}.layer.0.SelfAttention.relative_attention_bias.weight"),
    ("blocks.{i}.ffn_norm.weight", "blocks.{i}.norm2.weight", "encoder.block.{i}.layer.1.layer_norm.weight"),
    ("blocks.{i}.ffn.gate.weight", "blocks.{i}.ffn.gate.0.weight", "encoder.block.{i}.layer.1.DenseReluDense.wi_0.weight"),
    ("blocks.{i}.ffn.up.weight", "blocks.{i}.ffn.fc1.weight", "encoder.block.{i}.layer.1.DenseReluDense.wi_1.weight"),
    ("blocks.{i}.ffn.down.weight", "blocks.{i}.ffn.fc2.weight", "encoder.block.{i}.layer.1.DenseReluDense.wo.weight"),
)
_LAYOUT_COLUMN = {"ours": 0, LAYOUT_OFFICIAL: 1, LAYOUT_HF: 2}
# A name that only the given layout has; used to find the layout and any key prefix.
_ANCHORS = {LAYOUT_OFFICIAL: "blocks.0.attn.q.weight", LAYOUT_HF: "encoder.block.0.layer.0.SelfAttention.q.weight"}


def _pattern(template: str) -> "re.Pattern[str]":
    return re.compile("^" + re.escape(template).replace(re.escape("{i}"), r"(\d+)") + "$")


_PATTERNS = {layout: [(_pattern(row[col]), row) for row in _NAME_TABLE] for layout, col in _LAYOUT_COLUMN.items()}


def _translate(name: str, src: str, dst: str) -> Optional[str]:
    for pattern, row in _PATTERNS[src]:
        m = pattern.match(name)
        if m:
            target = row[_LAYOUT_COLUMN[dst]]
            return target.replace("{i}", m.group(1)) if m.groups() else target
    return None


def to_our_name(name: str, layout: str) -> Optional[str]:
    """Map a weight name of ``layout`` (prefix already removed) to ours; ``None`` if it is not an encoder weight."""
    return _translate(name, layout, "ours")


def from_our_name(name: str, layout: str) -> str:
    out = _translate(name, "ours", layout)
    if out is None:
        raise KeyError(name)
    return out


def export_state_dict(model: UMT5Encoder, layout: str) -> Dict[str, torch.Tensor]:
    """Our weights renamed to ``layout`` (used to write test fixtures and conversions)."""
    return {from_our_name(k, layout): v for k, v in model.state_dict().items()}


def detect_layout(names: Iterable[str]) -> Optional[Tuple[str, str]]:
    """Return ``(layout, prefix)`` of an umT5/T5 encoder state dict, or ``None`` if the names are neither."""
    names = list(names)
    for layout, anchor in _ANCHORS.items():
        for n in names:
            if n.endswith(anchor):
                return layout, n[: len(n) - len(anchor)]
    return None


def _describe_foreign(names: List[str]) -> str:
    """A human guess at what a file that is not a umT5 encoder actually is."""
    joined = "\n".join(names[:5000])

    def has(fragment):
        return fragment in joined

    if has("text_model.encoder.layers.") or (has("transformer.resblocks.") and has("token_embedding")):
        return "this looks like a CLIP text encoder (e.g. CLIP-L/CLIP-G), not umT5-XXL"
    if has("vision_model.") or has("visual.transformer"):
        return "this looks like a CLIP vision encoder, not umT5-XXL"
    if has("model.layers.") and has("self_attn"):
        return "this looks like an LLM text encoder (Llama/Qwen/Gemma), not umT5-XXL"
    if has("self_attn.q.weight") or has("patch_embedding.weight") or has("cross_attn."):
        return "this looks like a Wan/DreamID-V diffusion model (DiT), not the umT5-XXL text encoder"
    if has("decoder.conv_in") or has("encoder.conv1") or has("downsamples.") or has("decoder.upsamples"):
        return "this looks like a VAE, not the umT5-XXL text encoder"
    sample = ", ".join(repr(n) for n in names[:4])
    return (f"no umT5 encoder weights found among its {len(names)} tensors (e.g. {sample}); expected "
            f"'shared.weight' + 'encoder.block.N...' (ComfyUI/Hugging Face umt5_xxl) or "
            f"'token_embedding.weight' + 'blocks.N...' (models_t5_umt5-xxl-enc-bf16.pth)")


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------

def read_embedded_tokenizer(path_or_reader) -> Optional[bytes]:
    """The sentencepiece model bytes ComfyUI stores in a ``spiece_model`` uint8 tensor, or ``None``."""
    reader = path_or_reader if isinstance(path_or_reader, StateDictReader) else read_state_dict(path_or_reader)
    key = next((k for k in reader if k == _EMBEDDED_TOKENIZER_KEY or k.endswith("." + _EMBEDDED_TOKENIZER_KEY)), None)
    if key is None:
        return None
    t = reader[key]
    if t.dtype != torch.uint8 or t.dim() != 1:
        raise CheckpointError(reader.path, f"'{key}' should be the tokenizer as a 1-D uint8 tensor, "
                                           f"found {t.dtype} {tuple(t.shape)}")
    return t.contiguous().numpy().tobytes()


def _infer_config(reader: StateDictReader, ours_to_file: Dict[str, str], base: UMT5Config) -> UMT5Config:
    path = reader.path

    def shape(our_name):
        if our_name not in ours_to_file:
            raise CheckpointError(path, f"missing umT5 weight '{our_name}'")
        return reader.shape(ours_to_file[our_name])

    layers = sorted({int(m.group(1)) for n in ours_to_file for m in [re.match(r"blocks\.(\d+)\.", n)] if m})
    if not layers or layers != list(range(len(layers))):
        raise CheckpointError(path, f"encoder blocks are not numbered 0..N-1 (found {layers[:8]}...)")
    vocab, d_model = shape("token_embedding.weight")
    inner = shape("blocks.0.attn.q.weight")[0]
    rel = [n for n in ours_to_file if n.endswith("attn.rel_bias.weight")]
    if len(rel) != len(layers):
        raise CheckpointError(path, f"has a relative position bias in {len(rel)} of {len(layers)} layers; umT5 has "
                                    f"one in every layer - this looks like a T5 v1.1 encoder (e.g. the t5xxl used "
                                    f"by Flux/SD3), not umT5-XXL")
    num_buckets, num_heads = shape("blocks.0.attn.rel_bias.weight")
    d_ff = shape("blocks.0.ffn.gate.weight")[0]
    if inner % num_heads:
        raise CheckpointError(path, f"attention width {inner} is not a multiple of {num_heads} heads")
    return UMT5Config(vocab_size=vocab, d_model=d_model, num_layers=len(layers), num_heads=num_heads,
                      d_kv=inner // num_heads, d_ff=d_ff, num_buckets=num_buckets,
                      max_distance=base.max_distance, eps=base.eps)


def _quant_formats(reader: StateDictReader, prefix: str) -> Dict[str, str]:
    """``file layer name -> quantisation format`` from ComfyUI's ``.comfy_quant`` tensors / file metadata."""
    formats: Dict[str, str] = {}
    meta = reader.metadata.get("_quantization_metadata")
    if meta:
        try:
            for layer, conf in json.loads(meta).get("layers", {}).items():
                formats[layer] = str(conf.get("format"))
        except (ValueError, AttributeError) as exc:
            raise CheckpointError(reader.path, f"unreadable _quantization_metadata ({exc})") from None
    for k in reader:
        if k.endswith(".comfy_quant"):
            try:
                conf = json.loads(reader[k].numpy().tobytes().decode("utf-8"))
            except ValueError as exc:
                raise CheckpointError(reader.path, f"unreadable quantisation description '{k}' ({exc})") from None
            formats[k[: -len(".comfy_quant")]] = str(conf.get("format"))
    return formats


def _dequantise(t: torch.Tensor, scale: Optional[torch.Tensor], dtype: torch.dtype, where: str, path) -> torch.Tensor:
    if scale is None and t.dtype not in _FP8_DTYPES:
        return t.to(dtype)  # no copy when the file already holds the compute dtype
    w = t.to(torch.float32)
    if scale is not None:
        scale = scale.to(torch.float32)
        if scale.numel() == 1:
            w = w * scale.reshape(())
        elif scale.numel() == w.shape[0]:
            w = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
        else:
            raise CheckpointError(path, f"scale of '{where}' has shape {tuple(scale.shape)}; only per-tensor or "
                                        f"per-row scales are supported (weight {tuple(w.shape)})")
    return w.to(dtype)


def _assign(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_path, leaf = name.rsplit(".", 1)
    module = model.get_submodule(module_path)
    module._parameters[leaf] = nn.Parameter(value, requires_grad=False)


def load_umt5_encoder(path, dtype: torch.dtype = torch.bfloat16, device="cpu",
                      expected: Optional[UMT5Config] = None) -> UMT5Encoder:
    """Load a umT5 encoder from either layout (fp32/bf16/fp16, plain or ComfyUI scaled fp8).

    ``dtype`` is the compute dtype all weights are converted to (fp8 is dequantised into it).
    ``expected``: if given, the file's shapes must match this config (e.g. ``UMT5Config.xxl()``).
    Raises :class:`CheckpointError` naming the file and what was wrong.
    """
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"compute dtype must be float32, bfloat16 or float16, not {dtype}")
    reader = read_state_dict(path)
    names = list(reader)
    found = detect_layout(names)
    if found is None:
        raise CheckpointError(path, _describe_foreign(names))
    layout, prefix = found

    ours_to_file: Dict[str, str] = {}
    for n in names:
        if n.startswith(prefix):
            ours = to_our_name(n[len(prefix):], layout)
            if ours is not None:
                ours_to_file[ours] = n
    if "token_embedding.weight" not in ours_to_file and layout == LAYOUT_HF \
            and f"{prefix}encoder.embed_tokens.weight" in reader:  # some exports keep only the tied copy
        ours_to_file["token_embedding.weight"] = f"{prefix}encoder.embed_tokens.weight"
    base = expected or UMT5Config()
    cfg = _infer_config(reader, ours_to_file, base)
    if expected is not None and expected.differences(cfg):
        size = {768: "umT5-base", 1024: "umT5-large", 2048: "umT5-XL", 4096: "umT5-XXL"}.get(cfg.d_model, "another")
        raise CheckpointError(path, f"this is a {size} encoder ({cfg.describe()}), but umT5 with "
                                    f"{expected.describe()} is needed; differences: "
                                    f"{'; '.join(expected.differences(cfg))}")

    formats = _quant_formats(reader, prefix)
    bad = sorted({f for f in formats.values() if f not in _SUPPORTED_QUANT_FORMATS})
    if bad:
        raise CheckpointError(path, f"uses quantisation format(s) {bad}, which this loader cannot read; only "
                                    f"(scaled) float8 is supported - use umt5_xxl_fp16 / _fp8_e4m3fn_scaled instead")

    with torch.device("meta"):
        model = UMT5Encoder(cfg)
    expected_names = set(model.state_dict().keys())
    missing = sorted(expected_names - set(ours_to_file))
    if missing:
        shown = ", ".join(from_our_name(m, layout) for m in missing[:4])
        raise CheckpointError(path, f"incomplete umT5 encoder: {len(missing)} weight(s) missing, e.g. {shown}")

    check_floating(reader, [ours_to_file[n] for n in sorted(expected_names)], "umT5 encoder")
    for ours in sorted(expected_names):
        file_name = ours_to_file[ours]
        layer = file_name[: -len(".weight")]
        scale = None
        for scale_key in (f"{layer}.scale_weight", f"{layer}.weight_scale"):
            if scale_key in reader:
                scale = reader[scale_key]
                break
        raw = reader[file_name]
        expected_shape = tuple(model.get_parameter(ours).shape)
        if tuple(raw.shape) != expected_shape:
            raise CheckpointError(path, f"'{file_name}' has shape {tuple(raw.shape)}, expected {expected_shape}")
        if ours == "token_embedding.weight":
            # keep the big table as stored; TokenEmbedding converts only the rows it looks up
            keep = raw if raw.dtype in _FP8_DTYPES + (torch.float32, torch.bfloat16, torch.float16) else raw.float()
            _assign(model, ours, keep)
            model.token_embedding.scale = None if scale is None else scale.to(torch.float32).clone()
            continue
        _assign(model, ours, _dequantise(raw, scale, dtype, file_name, path))
        del raw

    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:  # cannot happen unless the table above and the model disagree
        raise CheckpointError(path, f"internal error: weights not loaded: {still_meta[:4]}")
    model.eval().requires_grad_(False)
    model.layout = layout  # type: ignore[attr-defined]
    model.source_path = str(path)  # type: ignore[attr-defined]
    if torch.device(device) != torch.device("cpu"):
        model.to(device)
    return model
