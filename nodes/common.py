"""What every DreamID-V node shares: the category, the pack's custom types, model folders, progress
and interruption. The only module of the pack besides the node modules that imports ComfyUI."""
from __future__ import annotations

import os
import threading
import weakref
from pathlib import Path
from typing import Callable, Hashable, Iterable, NamedTuple, Optional, Tuple

import comfy.model_management
import comfy.utils
import folder_paths
from comfy_api.latest import io

from dreamidv_core.errors import CheckpointError, InputError
from dreamidv_core.preprocess.onnx_session import PROVIDER_CHOICES

CATEGORY = "DreamID-V"
NODE_PREFIX = "DreamIDV"

# The pack's own socket types (ComfyUI's IMAGE, MASK, VIDEO, VAE, CONDITIONING are used everywhere else).
DreamIDVModel = io.Custom("DREAMIDV_MODEL")  # a loaded DiT (full or faster) wrapped for ComfyUI's memory manager
PoseTokens = io.Custom("DREAMIDV_POSE_TOKENS")  # PoseGuider output, computed once per video
Identity = io.Custom("DREAMIDV_IDENTITY")  # reference photo, its face + ArcFace embedding, letterbox and latent
PoseKeypoint = io.Custom("POSE_KEYPOINT")  # controlnet_aux's keypoint format (list of per-frame dicts)

# Model folders this pack adds next to ComfyUI's own (extra_model_paths.yaml can name them too).
PACK_FOLDERS = {
    "mediapipe": {".task"},
    "insightface": {".onnx"},
    "sam2": {".pt", ".pth", ".safetensors", ".yaml"},
    "dwpose": {".onnx"},
    "dreamidv": {".safetensors", ".pth", ".pt"},  # text-context cache and pack-specific files
}


def onnx_provider_input(what: str, optional: bool = False) -> io.Combo.Input:
    """The ``provider`` combo of every node that runs ONNX models with onnxruntime."""
    return io.Combo.Input("provider", options=list(PROVIDER_CHOICES), default="auto", optional=optional,
                          tooltip=f"onnxruntime device for {what}. auto: the best the installed onnxruntime build "
                          "offers (CUDA, ROCm, DirectML, CoreML, OpenVINO, else CPU). A device the build lacks runs on "
                          "CPU with a note in the log; for CUDA install onnxruntime-gpu (instead of onnxruntime).")


def register_model_folders() -> None:
    """Add the pack's folders without dropping paths an extra_model_paths.yaml already gave them."""
    for name, exts in PACK_FOLDERS.items():
        default = os.path.join(folder_paths.models_dir, name)
        if name in folder_paths.folder_names_and_paths:
            paths, old_exts = folder_paths.folder_names_and_paths[name]
            if default not in paths:
                paths.append(default)
            folder_paths.folder_names_and_paths[name] = (paths, set(old_exts) | exts)
        else:
            folder_paths.folder_names_and_paths[name] = ([default], set(exts))


def model_choices(folder: str, suffixes: Iterable[str] = ()) -> list:
    """File names in a model folder (filtered by suffix), for a combo input."""
    names = folder_paths.get_filename_list(folder)
    suffixes = tuple(s.lower() for s in suffixes)
    return [n for n in names if not suffixes or n.lower().endswith(suffixes)]


def folder_hint(folder: str) -> str:
    """"the 'vae' model folder (/path/a, /path/b)": where a user should put a file."""
    paths = folder_paths.get_folder_paths(folder) if folder in folder_paths.folder_names_and_paths else []
    return f"the '{folder}' model folder ({', '.join(paths) or 'no paths registered'})"


def resolve_model_file(folder: str, name: str, expected: str) -> Path:
    """Full path of a combo choice in a model folder, or a CheckpointError naming the folder (every
    path of it, extra_model_paths.yaml included) and the expected file names."""
    path = folder_paths.get_full_path(folder, name) if name and name != "none" else None
    if path is None or not os.path.isfile(path):
        raise CheckpointError(name or "(no file chosen)",
                              f"not found in {folder_hint(folder)}; put {expected} there (or point '{folder}' "
                              "at it in extra_model_paths.yaml)")
    return Path(path)


def output_path(value: str, what: str, default: str = "") -> Path:
    """A folder named in a node's text input: an absolute path as given (``~`` expanded), a relative one under
    ComfyUI's output folder (where the pack's writers put datasets and checkpoints)."""
    raw = (value or "").strip() or default
    if not raw:
        raise InputError(f"{what}: empty; give a folder (a relative path is under ComfyUI's output folder)")
    path = Path(os.path.expanduser(raw))
    return path if path.is_absolute() else Path(folder_paths.get_output_directory()) / path


class FileStamp(NamedTuple):
    """A model file as a cache key: its path, size and modification time (a changed file loads anew)."""

    path: str
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path) -> "FileStamp":
        st = os.stat(path)
        return cls(str(path), st.st_size, st.st_mtime_ns)


class ModelCache:
    """Loaded models by key, kept only while something else (ComfyUI's output cache, a node) holds them.

    ``get_or_load(key, load)`` returns the cached object for ``key`` or calls ``load() -> (obj, extra)``
    once, under a lock, and caches ``obj`` (weakly) with its ``extra`` (e.g. a load report).
    ``keep_last``: also hold the most recently used object until another key is asked for, so that a node
    re-run with other settings (ComfyUI drops its old output first) finds the weights still loaded; the held
    object is let go before a different one loads (never two held).
    """

    def __init__(self, keep_last: bool = False):
        self._objects: "weakref.WeakValueDictionary[Hashable, object]" = weakref.WeakValueDictionary()
        self._extra: dict = {}
        self._lock = threading.Lock()
        self._keep_last, self._last = keep_last, None

    def get_or_load(self, key: Hashable, load: Callable[[], Tuple[object, object]]) -> Tuple[object, object]:
        with self._lock:
            if self._last is not None and self._last[0] != key:
                self._last = None
            obj = self._objects.get(key)
            if obj is None:
                obj, extra = load()
                self._objects[key] = obj
                self._extra[key] = extra
            if self._keep_last:
                self._last = (key, obj)
            # forget the extras of models that were garbage-collected
            for gone in [k for k in self._extra if k not in self._objects]:
                del self._extra[gone]
            return obj, self._extra.get(key)

    def items(self) -> list:
        """(key, model) of every model still held somewhere."""
        with self._lock:
            return list(self._objects.items())


def cache_key_text(key: tuple) -> str:
    """A cache key as one string (pose tokens record which model made them)."""
    return "|".join(map(str, key))


def cancel_hook() -> Callable[[], bool]:
    """For dreamidv_core's ``cancel``: raises ComfyUI's interruption as soon as the user cancels."""
    def cancel() -> bool:
        comfy.model_management.throw_exception_if_processing_interrupted()
        return False
    return cancel


def sampling_progress(total_steps: int) -> Tuple[Callable[[str, int, int], None], Optional[Callable]]:
    """(progress, preview) for dreamidv_core's swap: one ComfyUI progress bar for the sampling steps, each step
    with ComfyUI's latent preview (Wan 2.1 latent format, ``--preview-method``) of the step's denoised latent
    when previews are on (``preview`` is None when they are off; ``progress`` then moves the bar)."""
    import comfy.latent_formats
    import latent_preview

    previewer = latent_preview.get_previewer(comfy.model_management.get_torch_device(), comfy.latent_formats.Wan21())
    if previewer is None:
        return progress_hook(total_steps), None
    bar = comfy.utils.ProgressBar(total_steps)

    def progress(name: str, i: int, n: int) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()

    def preview(step: int, steps: int, x0) -> None:
        bar.update_absolute(step + 1, steps, previewer.decode_latent_to_preview_image("JPEG", x0))
    return progress, preview


def progress_hook(total_steps: int, stage: str = "sample") -> Callable[[str, int, int], None]:
    """For dreamidv_core's ``progress(stage, i, n)``: drives ComfyUI's progress bar for one stage."""
    bar = comfy.utils.ProgressBar(total_steps)

    def progress(name: str, i: int, n: int) -> None:
        if name == stage:
            bar.update_absolute(i, n)
        comfy.model_management.throw_exception_if_processing_interrupted()
    return progress
