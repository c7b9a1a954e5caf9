"""Safe, lazy reading and atomic writing of weight files (.safetensors, .pth/.pt/.ckpt/.bin).

No pickle is ever executed: ``.pth`` files are read with ``torch.load(weights_only=True, mmap=True)``,
so a file holding anything but tensors and plain containers is refused. Tensors stay memory-mapped
until a caller copies them into place, so a model built on the ``meta`` device and filled from a
``StateDictReader`` never holds two copies of its weights in RAM.
"""
from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Dict, Iterator, Mapping, Optional, Tuple

import torch

from ..errors import CheckpointError

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")
# Containers some trainers wrap a state dict in; unwrapped when they are the only content.
_WRAPPER_KEYS = ("state_dict", "model", "module", "model_state_dict", "params")


class StateDictReader(Mapping):
    """A read-only, lazy ``name -> tensor`` mapping over one weight file.

    ``reader[name]`` returns a CPU tensor (memory-mapped where the format allows);
    ``reader.shape(name)`` and ``reader.dtype(name)`` never read tensor data.
    """

    def __init__(self, path, tensors: Optional[Dict[str, torch.Tensor]] = None, handle=None,
                 metadata: Optional[Dict[str, str]] = None):
        self.path = Path(path)
        self._tensors = tensors
        self._handle = handle
        self.metadata = dict(metadata or {})
        self._keys = list(handle.keys()) if handle is not None else list(tensors.keys())

    def __getitem__(self, name: str) -> torch.Tensor:
        if self._handle is not None:
            if name not in self._keys:
                raise KeyError(name)
            return self._handle.get_tensor(name)
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, name) -> bool:
        return name in set(self._keys)

    def shape(self, name: str) -> Tuple[int, ...]:
        if self._handle is not None:
            return tuple(self._handle.get_slice(name).get_shape())
        return tuple(self._tensors[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        if self._handle is not None:
            return _SAFETENSORS_DTYPES[self._handle.get_slice(name).get_dtype()]
        return self._tensors[name].dtype

    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        return {k: self.shape(k) for k in self._keys}


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


def read_state_dict(path) -> StateDictReader:
    """Open a weight file without executing code. Raises :class:`CheckpointError` naming the file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(path, "file not found")
    if path.is_dir():
        raise CheckpointError(path, "is a folder; expected a .safetensors or .pth weight file")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return _read_safetensors(path)
    if suffix in PICKLE_SUFFIXES:
        return _read_pickle(path)
    raise CheckpointError(path, f"unknown weight format '{suffix}'; expected one of "
                                f"{', '.join(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)}")


def _read_safetensors(path: Path) -> StateDictReader:
    from safetensors import safe_open

    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
        metadata = handle.metadata()
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise CheckpointError(path, f"not a readable safetensors file ({exc})") from None
    return StateDictReader(path, handle=handle, metadata=metadata)


def _read_pickle(path: Path) -> StateDictReader:
    obj = None
    for mmap in (True, False):  # legacy (non-zip) files cannot be memory-mapped
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
            break
        except pickle.UnpicklingError as exc:
            raise CheckpointError(
                path, "refused to load: the file contains Python objects other than tensors, and "
                      "executing them could run arbitrary code. Convert it to .safetensors with a "
                      f"trusted tool, or re-save only its state dict. (detail: {str(exc).splitlines()[0]})"
            ) from None
        except RuntimeError as exc:
            if mmap and "mmap" in str(exc).lower():
                continue
            raise CheckpointError(path, f"not a readable PyTorch file ({exc})") from None
        except Exception as exc:
            raise CheckpointError(path, f"not a readable PyTorch file ({type(exc).__name__}: {exc})") from None
    tensors = _unwrap(obj, path)
    return StateDictReader(path, tensors=tensors)


def _unwrap(obj, path: Path) -> Dict[str, torch.Tensor]:
    for _ in range(3):
        if isinstance(obj, Mapping) and not _is_tensor_dict(obj):
            inner = [k for k in _WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping)]
            if inner:
                obj = obj[inner[0]]
                continue
        break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(path, f"expected a state dict (a mapping of names to tensors), found "
                                    f"{type(obj).__name__}")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(path, "holds no tensors; expected a state dict of model weights")
    if all(k.startswith("module.") for k in tensors):  # saved from a DistributedDataParallel wrapper
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


def _is_tensor_dict(obj: Mapping) -> bool:
    return any(isinstance(v, torch.Tensor) for v in obj.values())


def strip_prefix(names, prefixes) -> Optional[str]:
    """Return the first prefix in ``prefixes`` that every name carries (``None`` if none does)."""
    names = list(names)
    for prefix in prefixes:
        if prefix and names and all(n.startswith(prefix) for n in names):
            return prefix
    return None


def atomic_write(path, write_fn) -> None:
    """Call ``write_fn(tmp_path)`` then move the result over ``path`` in one rename.

    A crash or error at any point leaves the previous ``path`` (if any) untouched, and no partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=str(path.parent))
    os.close(fd)
    try:
        write_fn(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files: give the result a normal write's mode
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _umask() -> int:
    """The process umask, read without changing it where the OS tells it (Linux), else set and restored."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_safetensors(tensors: Mapping[str, torch.Tensor], path, metadata: Optional[Dict[str, str]] = None) -> None:
    """Write ``tensors`` as safetensors atomically (contiguous CPU copies made one at a time by safetensors)."""
    from safetensors.torch import save_file

    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(clean, tmp, metadata=metadata))
