"""DreamID-V's text context: tokenize the prompt, run umT5-XXL once, cache the result on disk.

The released DreamID-V DiT is conditioned on the umT5-XXL encoder states of the fixed prompt
``"chang face"`` (no negative prompt): a ``[L, 4096]`` tensor with one row per token, the closing
``</s>`` included. The reference pipeline cleans whitespace (no lower-casing), tokenizes with
``</s>`` appended, pads to 512 tokens with an attention mask, runs the encoder in bfloat16 and keeps
the first L rows. We run the L real tokens without padding, which gives the same states (the
padding is masked out and T5's position bias depends only on relative distance).

Because the prompt never changes, the 11 GB encoder only needs to run once per encoder file:
:func:`get_text_context` keeps the result in a small ``.safetensors`` cache. Users who already have a
context (the official ``context.pth``, or a cache file) can load it with :func:`load_precomputed_context`.
"""
from __future__ import annotations

import gc
import hashlib
import html
import json
import logging
import os
import pickle
import re
from pathlib import Path
from typing import List, Optional, Union

import torch

from ..errors import CheckpointError, InputError
from ..io.state_dict import read_state_dict, save_safetensors
from ..models.umt5 import UMT5Encoder, load_umt5_encoder, read_embedded_tokenizer

__all__ = [
    "DEFAULT_PROMPT", "TEXT_LEN", "TEXT_DIM", "UMT5Tokenizer", "clean_prompt", "encode_prompt",
    "get_text_context", "load_precomputed_context", "default_cache_dir", "cache_key",
]

log = logging.getLogger(__name__)

DEFAULT_PROMPT = "chang face"
TEXT_LEN = 512    # the reference pipeline's maximum number of tokens (including </s>)
TEXT_DIM = 4096   # umT5-XXL width, what the DiT's text embedding expects
_CACHE_VERSION = 1
_CONTEXT_KEY = "context"
PathLike = Union[str, os.PathLike]

# Files a Hugging Face tokenizer folder (google/umt5-xxl) may hold, in order of preference.
_SPM_NAMES = ("spiece.model", "tokenizer.model", "sentencepiece.model")
_JSON_NAME = "tokenizer.json"


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------

def clean_prompt(text: str) -> str:
    """The reference pipeline's 'whitespace' cleaning: fix text (ftfy, if installed), unescape HTML
    twice, collapse runs of whitespace, strip. Case is kept."""
    try:  # optional, as in the reference; irrelevant for plain ASCII prompts such as "chang face"
        import ftfy  # type: ignore
        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class UMT5Tokenizer:
    """umT5 tokenizer: a sentencepiece model (``spiece.model`` or ComfyUI's embedded bytes), or a
    Hugging Face ``tokenizer.json`` when the optional ``tokenizers`` package is installed.

    :meth:`encode` returns token ids ending with ``</s>``, at most ``max_length`` of them.
    ``identity`` is a hash of the tokenizer's content (used in cache keys).
    """

    def __init__(self, *, spm_bytes: Optional[bytes] = None, json_path: Optional[PathLike] = None,
                 source: str = "<memory>"):
        self.source = source
        self._spm = None
        self._hf = None
        if spm_bytes is not None:
            import sentencepiece as spm

            self.identity = "spm:" + hashlib.sha256(spm_bytes).hexdigest()
            try:
                self._spm = spm.SentencePieceProcessor(model_proto=spm_bytes)
            except Exception as exc:  # sentencepiece raises RuntimeError/OSError with C++ messages
                raise CheckpointError(source, f"not a valid sentencepiece tokenizer model ({exc})") from None
            self.eos_id = self._spm.eos_id()
            if self.eos_id < 0:
                self.eos_id = self._spm.piece_to_id("</s>")
        elif json_path is not None:
            try:
                from tokenizers import Tokenizer  # optional dependency
            except ImportError:
                raise CheckpointError(json_path, "reading tokenizer.json needs the 'tokenizers' package; install "
                                                 "it, or point to the folder's spiece.model instead") from None
            data = Path(json_path).read_bytes()
            self.identity = "json:" + hashlib.sha256(data).hexdigest()
            try:
                self._hf = Tokenizer.from_str(data.decode("utf-8"))
            except Exception as exc:
                raise CheckpointError(json_path, f"not a valid tokenizer.json ({exc})") from None
            self.eos_id = self._hf.token_to_id("</s>")
        else:
            raise ValueError("give spm_bytes or json_path")
        if self.eos_id is None or self.eos_id < 0:
            raise CheckpointError(source, "tokenizer has no end-of-sequence token '</s>'")

    @classmethod
    def from_path(cls, path: PathLike) -> "UMT5Tokenizer":
        """From a ``.model`` sentencepiece file, a ``tokenizer.json``, or a folder holding either."""
        path = Path(path)
        if not path.exists():
            raise CheckpointError(path, "tokenizer not found")
        if path.is_dir():
            for name in _SPM_NAMES:
                if (path / name).is_file():
                    return cls.from_path(path / name)
            if (path / _JSON_NAME).is_file():
                return cls.from_path(path / _JSON_NAME)
            raise CheckpointError(path, f"no tokenizer in this folder; expected one of "
                                        f"{', '.join(_SPM_NAMES + (_JSON_NAME,))} (the google/umt5-xxl files)")
        if path.suffix.lower() == ".json":
            return cls(json_path=path, source=str(path))
        return cls(spm_bytes=path.read_bytes(), source=str(path))

    @classmethod
    def from_encoder_file(cls, encoder_path: PathLike) -> Optional["UMT5Tokenizer"]:
        """The tokenizer ComfyUI embeds in its umT5 files (``spiece_model`` tensor), or ``None``."""
        data = read_embedded_tokenizer(encoder_path)
        return None if data is None else cls(spm_bytes=data, source=f"{encoder_path} (embedded spiece_model)")

    def encode(self, text: str, max_length: int = TEXT_LEN) -> List[int]:
        if self._spm is not None:
            ids = list(self._spm.encode(text, out_type=int))
        else:
            ids = list(self._hf.encode(text, add_special_tokens=False).ids)
        return ids[: max_length - 1] + [self.eos_id]  # truncate, then close with </s>, as HF does


# --------------------------------------------------------------------------------------------------
# Encoding and cache
# --------------------------------------------------------------------------------------------------

@torch.inference_mode()
def encode_prompt(encoder: UMT5Encoder, tokenizer: UMT5Tokenizer, prompt: str = DEFAULT_PROMPT) -> torch.Tensor:
    """Per-token encoder states ``[L, d_model]`` of ``prompt`` (cleaned, with ``</s>``), on the CPU."""
    ids = tokenizer.encode(clean_prompt(prompt))
    if max(ids) >= encoder.config.vocab_size:
        raise InputError(f"tokenizer {tokenizer.source} produced id {max(ids)}, beyond the encoder's vocabulary of "
                         f"{encoder.config.vocab_size}; tokenizer and encoder do not belong together")
    states = encoder(torch.tensor([ids], dtype=torch.long))
    return states[0].to("cpu").clone()


def default_cache_dir() -> Path:
    env = os.environ.get("DREAMIDV_CACHE_DIR")
    base = Path(env) if env else Path.home() / ".cache" / "dreamidv"
    return base / "text_context"


def _file_fingerprint(path: PathLike, chunk: int = 1 << 20) -> str:
    """Cheap identity of a (possibly 11 GB) file: its size and a hash of three 1 MiB samples
    (start, middle, end). The name and mtime are left out, so a moved or copied file keeps its cache."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        for offset in sorted({0, max(0, size // 2 - chunk // 2), max(0, size - chunk)}):
            fh.seek(offset)
            h.update(fh.read(chunk))
    return f"{size}:{h.hexdigest()}"


def _resolve_tokenizer(encoder_path: PathLike, tokenizer_path: Optional[PathLike]) -> UMT5Tokenizer:
    if tokenizer_path is not None:
        return UMT5Tokenizer.from_path(tokenizer_path)
    tok = UMT5Tokenizer.from_encoder_file(encoder_path)
    if tok is None:
        raise CheckpointError(encoder_path, "has no embedded tokenizer ('spiece_model'); give tokenizer_path: the "
                                            "google/umt5-xxl folder or its spiece.model")
    return tok


def cache_key(prompt: str, encoder_path: PathLike, tokenizer: UMT5Tokenizer, dtype: torch.dtype) -> str:
    """Hex key of everything the cached context depends on."""
    parts = {"version": _CACHE_VERSION, "prompt": clean_prompt(prompt), "text_len": TEXT_LEN,
             "encoder": _file_fingerprint(encoder_path), "tokenizer": tokenizer.identity,
             "dtype": str(dtype).replace("torch.", "")}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _read_cache(path: Path, key: str, text_dim: int) -> Optional[torch.Tensor]:
    try:
        reader = read_state_dict(path)
        if reader.metadata.get("cache_key") != key or _CONTEXT_KEY not in reader:
            return None
        return _validate_context(reader[_CONTEXT_KEY].clone(), path, text_dim)
    except (CheckpointError, InputError) as exc:
        log.warning("ignoring unusable text-context cache %s: %s", path, exc)
        return None


def get_text_context(encoder_path: PathLike, tokenizer_path: Optional[PathLike] = None,
                     prompt: str = DEFAULT_PROMPT, cache_dir: Optional[PathLike] = None,
                     device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.bfloat16,
                     text_dim: int = TEXT_DIM, use_cache: bool = True) -> torch.Tensor:
    """The text context ``[L, text_dim]`` (CPU, ``dtype``) of ``prompt`` under the umT5 encoder file.

    ``tokenizer_path``: a sentencepiece model / ``tokenizer.json`` / google/umt5-xxl folder; ``None`` uses the
    tokenizer embedded in ComfyUI's umT5 files. ``device``/``dtype``: where and in what precision the encoder
    runs (the reference uses bfloat16). ``cache_dir`` defaults to ``$DREAMIDV_CACHE_DIR/text_context`` or
    ``~/.cache/dreamidv/text_context``. The encoder is loaded only on a cache miss and freed afterwards.
    """
    encoder_path = Path(encoder_path)
    if not encoder_path.is_file():
        raise CheckpointError(encoder_path, "text encoder file not found")
    tokenizer = _resolve_tokenizer(encoder_path, tokenizer_path)
    key = cache_key(prompt, encoder_path, tokenizer, dtype)
    cache_file = Path(cache_dir or default_cache_dir()) / f"umt5_context_{key[:32]}.safetensors"

    if use_cache and cache_file.is_file():
        cached = _read_cache(cache_file, key, text_dim)
        if cached is not None:
            return cached

    encoder = load_umt5_encoder(encoder_path, dtype=dtype, device=device)
    try:
        if encoder.config.d_model != text_dim:
            raise CheckpointError(encoder_path, f"encoder width is {encoder.config.d_model}, but the DiT needs "
                                                f"{text_dim}-dim contexts (umT5-XXL)")
        context = encode_prompt(encoder, tokenizer, prompt)
        if not torch.isfinite(context.float()).all():  # never cached, never handed on as a valid context
            raise CheckpointError(encoder_path, f"the encoder produced NaN or infinite text states in "
                                                f"{str(dtype).replace('torch.', '')}: its weights are damaged, or "
                                                "it overflows in this precision (use bf16 or fp32)")
    finally:
        del encoder
        gc.collect()
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()

    if use_cache:
        meta = {"cache_key": key, "prompt": clean_prompt(prompt), "encoder": encoder_path.name,
                "tokenizer": tokenizer.identity, "dtype": str(dtype).replace("torch.", ""),
                "tokens": str(context.shape[0])}
        try:
            save_safetensors({_CONTEXT_KEY: context}, cache_file, metadata=meta)
        except (OSError, InputError) as exc:  # a read-only cache folder must not stop inference
            log.warning("could not write text-context cache %s: %s", cache_file, exc)
    return context


# --------------------------------------------------------------------------------------------------
# Precomputed contexts
# --------------------------------------------------------------------------------------------------

def _validate_context(t, path, text_dim: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise InputError(f"{path}: expected a tensor [L, {text_dim}], found {type(t).__name__}")
    if t.dim() == 3 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 2:
        raise InputError(f"{path}: text context must be 2-D [L, {text_dim}], found shape {tuple(t.shape)}")
    if t.shape[1] != text_dim:
        raise InputError(f"{path}: text context width is {t.shape[1]}, expected {text_dim} (umT5-XXL states)")
    if not 1 <= t.shape[0] <= TEXT_LEN:
        raise InputError(f"{path}: text context has {t.shape[0]} tokens, expected 1..{TEXT_LEN}")
    if not t.is_floating_point():
        raise InputError(f"{path}: text context has dtype {t.dtype}, expected floating point")
    if not torch.isfinite(t.float()).all():
        raise InputError(f"{path}: text context contains NaN or infinite values")
    return t


def load_precomputed_context(path: PathLike, text_dim: int = TEXT_DIM) -> torch.Tensor:
    """Load a context ``[L, text_dim]`` from ``.safetensors`` (one tensor, or one named 'context') or from a
    ``.pth``/``.pt`` holding a tensor, a list/tuple of one tensor (the official ``context.pth``), or a dict
    with one tensor. Never executes pickled code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "context file not found")
    suffix = path.suffix.lower()
    if suffix in (".safetensors", ".sft"):
        reader = read_state_dict(path)
        names = list(reader)
        name = _CONTEXT_KEY if _CONTEXT_KEY in names else (names[0] if len(names) == 1 else None)
        if name is None:
            raise CheckpointError(path, f"expected one tensor (or one named '{_CONTEXT_KEY}'), found {len(names)}: "
                                        f"{names[:5]}")
        obj = reader[name].clone()
    elif suffix in (".pth", ".pt", ".ckpt", ".bin"):
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(path, "refused to load: the file contains Python objects other than tensors "
                                        f"(executing them could run arbitrary code); detail: "
                                        f"{str(exc).splitlines()[0]}") from None
        except Exception as exc:
            raise CheckpointError(path, f"not a readable PyTorch file ({type(exc).__name__}: {exc})") from None
        if isinstance(obj, dict):
            tensors = [v for v in obj.values() if isinstance(v, torch.Tensor)]
            obj = obj.get(_CONTEXT_KEY, tensors[0] if len(tensors) == 1 else obj)
        if isinstance(obj, (list, tuple)):
            if len(obj) != 1:
                raise InputError(f"{path}: expected a list of one context tensor, found {len(obj)} items")
            obj = obj[0]
    else:
        raise CheckpointError(path, f"unknown context format '{suffix}'; expected .safetensors or .pth")
    return _validate_context(obj, path, text_dim)
