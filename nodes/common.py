"""What every DreamID-V node shares: the category, the pack's custom types, model folders, progress
and interruption. The only module of the pack besides the node modules that imports ComfyUI."""
from __future__ import annotations

import os
import threading
import weakref
from pathlib import Path
from typing import Callable, FrozenSet, Hashable, Iterable, NamedTuple, Optional, Tuple

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
# A clip's pose and face mask as found by the pose node (keypoints, drawn on demand at the frames' size) and
# which source frames they belong to: the streaming alternative to the pose IMAGE and mask MASK outputs.
PoseMask = io.Custom("DREAMIDV_POSE_MASK")

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


# ------------------------------------------------------------------------------------------------ frame range

def frame_range_inputs(frame_num: bool = False) -> list:
    """VideoHelperSuite-like frame range widgets, appended (optional) after a node's existing widgets:
    ``start_frame``, ``frame_num`` (only where the node has none yet) and ``select_every_nth``."""
    rows = [io.Int.Input("start_frame", default=0, min=0, max=10_000_000, optional=True,
                         tooltip="Skip this many frames at the start of the clip (VideoHelperSuite's "
                                 "skip_first_frames). Set the same frame range on every DreamID-V node that "
                                 "reads this clip.")]
    if frame_num:
        rows.append(io.Int.Input("frame_num", default=0, min=0, max=10_000_000, optional=True,
                                 tooltip="0: every frame of the range. Otherwise at most this many frames (at "
                                         "least 5; VideoHelperSuite's frame_load_cap)."))
    rows.append(io.Int.Input("select_every_nth", default=1, min=1, max=1000, optional=True,
                             tooltip="Keep every n-th frame of the range (1: all). The result plays at the source's "
                                     "frame rate / n with the source's sound unchanged, so both stay in sync."))
    return rows


# ------------------------------------------------------------------------------------------------ outputs

def linked_outputs(prompt, node_id) -> Optional[FrozenSet[int]]:
    """Output slots of node ``node_id`` that a node of ``prompt`` (API format) takes an input from; None when
    that cannot be told (no prompt, or the node is not in it)."""
    if not isinstance(prompt, dict) or node_id is None or str(node_id) not in prompt:
        return None
    used = set()
    for node in prompt.values():
        for value in (node.get("inputs") or {}).values() if isinstance(node, dict) else ():
            if isinstance(value, (list, tuple)) and len(value) == 2 and str(value[0]) == str(node_id):
                used.add(int(value[1]))
    return frozenset(used)


def wanted_outputs(node_cls) -> Optional[FrozenSet[int]]:
    """The output slots of the executing node that something uses (its hidden prompt and id), or None (all).

    Nodes whose IMAGE/MASK outputs would hold a whole clip compute them only when connected."""
    hidden = getattr(node_cls, "hidden", None)
    if hidden is None:
        return None
    return linked_outputs(getattr(hidden, "prompt", None), getattr(hidden, "unique_id", None))


def output_links_fingerprint():
    """For ``fingerprint_inputs``: which outputs of the node being checked are connected in the prompt being
    run, so connecting a formerly unused IMAGE output runs the node again (instead of reusing a cached result
    that skipped it). None when the running prompt cannot be found."""
    try:
        from comfy_execution.utils import get_executing_context
        from server import PromptServer

        context = get_executing_context()
        running, _ = PromptServer.instance.prompt_queue.get_current_queue_volatile()
    except Exception:  # noqa: BLE001  (another ComfyUI version or no server: the cache keys stay as they were)
        return None
    for item in running:
        if context is not None and len(item) > 2 and item[1] == context.prompt_id:
            links = linked_outputs(item[2], context.node_id)
            return None if links is None else tuple(sorted(links))
    return None


def temp_folder() -> Path:
    """Where the pack keeps intermediate files (swapped frames, rendered videos): ComfyUI's temporary folder,
    which ComfyUI empties when it starts."""
    folder = Path(folder_paths.get_temp_directory()) / "dreamidv"
    folder.mkdir(parents=True, exist_ok=True)
    return folder
