"""The pack's optional dependencies: which capability needs which package, and the exact command that
installs it into the Python that runs the pack (ComfyUI's own Python inside ComfyUI).

The pack itself needs only light packages (``requirements.txt``). Each heavy capability is an *extra*
(``requirements-<extra>.txt`` and ``[project.optional-dependencies]`` in ``pyproject.toml``), imported
only when it is used: :func:`require` imports it or raises :class:`MissingDependency`, whose message
names the capability, what is missing and the commands for this Python, for the Windows portable build
(``python_embeded\\python.exe -s -m pip ...``) and for any other ComfyUI.

onnxruntime is special: several distributions provide the same ``onnxruntime`` module (the CPU build,
onnxruntime-gpu, -directml, -openvino ...) and installing one over another replaces its files, so the
message recommends the one build that suits this machine (:func:`onnxruntime_package`) and says to
install only one.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from .errors import DreamIDVError

PACK_DIR = Path(__file__).resolve().parent.parent  # the repository / custom_nodes folder of the pack
SAM2_VERSION = "1.1.0"
# mediapipe 0.10.30 and 0.10.31: py3 wheels (any Python 3), no opencv-contrib-python / matplotlib dependency
MEDIAPIPE_SPEC = "mediapipe>=0.10.30,<0.10.32"
ONNXRUNTIME_MIN = ">=1.16"
PORTABLE_PIP = r"python_embeded\python.exe -s -m pip"
# import name -> pip name, where they differ (for a package an optional module's own import misses)
PIP_NAMES = {"cv2": "opencv-python", "yaml": "pyyaml", "PIL": "pillow", "skimage": "scikit-image",
             "google": "protobuf", "omegaconf": "omegaconf", "hydra": "hydra-core"}


@dataclass(frozen=True)
class Step:
    """One pip command: its arguments after ``pip <verb>`` and environment variables it needs."""

    args: Tuple[str, ...]
    env: Tuple[Tuple[str, str], ...] = ()
    verb: str = "install"


@dataclass(frozen=True)
class Extra:
    """An optional capability. ``modules``: what must import; ``steps``: how to install it;
    ``enables``: what it is for; ``notes``: advice shown under the commands."""

    name: str
    modules: Tuple[str, ...]
    steps: Tuple[Step, ...]
    enables: str
    notes: Tuple[str, ...] = ()


def _ort_extra(name: str, enables: str) -> Extra:
    return Extra(name, ("onnxruntime",), (Step((f"{onnxruntime_package()}{ONNXRUNTIME_MIN}",)),), enables, (
        "Install ONE onnxruntime build: onnxruntime-gpu (NVIDIA GPU), onnxruntime-directml (Windows, any DirectX 12 "
        "GPU), onnxruntime (CPU; on macOS it includes CoreML). Two builds share one folder and overwrite each "
        "other; if another pack already installed one, nothing needs installing.",))


def extras() -> dict:
    """name -> :class:`Extra` (built on call: the onnxruntime recommendation depends on this machine)."""
    return {
        "face": _ort_extra("face", "face detection and the ArcFace identity embedding: ID token encoder, "
                                   "identity report, quadruplet writer, IRL training"),
        "dwpose": _ort_extra("dwpose", "the DWPose pose source"),
        "mediapipe": Extra("mediapipe", ("mediapipe",), (Step((MEDIAPIPE_SPEC,)),),
                           "the MediaPipe pose source, the face mask and expression adaptation", (
            "These mediapipe releases pull no second OpenCV and have wheels for every Python 3 on Linux x86_64, "
            "Windows x64 and macOS arm64. Elsewhere (Linux aarch64, Windows arm64), or for the newest mediapipe "
            "without its opencv-contrib-python: pip install --no-deps mediapipe, then pip install numpy certifi "
            "matplotlib (the pack's opencv-python serves it).",)),
        "sam2": Extra("sam2", ("sam2", "hydra", "iopath"), (
            Step(("hydra-core>=1.3.2", "iopath>=0.1.10", "setuptools", "wheel")),
            Step(("--no-deps", "--no-build-isolation", f"sam2=={SAM2_VERSION}"), (("SAM2_BUILD_CUDA", "0"),))),
            "the SAM 2 head segmentation of the background composite and recomposition", (
            "sam2 is published as source only: it is built against the torch you have, without its CUDA "
            "extension, and --no-deps keeps pip from changing torch.",)),
    }


def onnxruntime_package() -> str:
    """The onnxruntime distribution that suits this machine: onnxruntime-gpu with a CUDA torch,
    onnxruntime-directml on Windows without CUDA, else the CPU build (which has CoreML on macOS).
    Looks at an already-imported torch only (never imports it)."""
    torch = sys.modules.get("torch")
    cuda = bool(getattr(getattr(torch, "version", None), "cuda", None))
    if sys.platform == "darwin":
        return "onnxruntime"
    if cuda:
        return "onnxruntime-gpu"
    if sys.platform == "win32":
        return "onnxruntime-directml"
    return "onnxruntime"


def _quote(arg: str) -> str:
    return f'"{arg}"' if any(c in arg for c in " <>|&,;") else arg


def _portable_python() -> Optional[str]:
    """This interpreter's path when it is the Windows portable build's ``python_embeded\\python.exe``."""
    exe = sys.executable or ""
    return exe if os.path.basename(os.path.dirname(exe)).lower() == "python_embeded" else None


def _command(prefix: str, step: Step, windows: bool) -> str:
    cmd = f"{prefix} {step.verb} {' '.join(_quote(a) for a in step.args)}"
    if not step.env:
        return cmd
    if windows:  # cmd.exe: quoted so that no trailing space becomes part of the value
        return " && ".join([*(f'set "{k}={v}"' for k, v in step.env), cmd])
    return " ".join([*(f"{k}={v}" for k, v in step.env), cmd])


def install_lines(steps: Sequence[Step], python: Optional[str] = None) -> List[str]:
    """The commands for ``steps``, in three forms: this Python, the Windows portable build, any ComfyUI."""
    exe = python or sys.executable or "python"
    portable = _portable_python()

    def form(prefix: str, windows: bool) -> str:
        return " && ".join(_command(prefix, step, windows) for step in steps)

    here = f"{_quote(exe)}{' -s' if portable else ''} -m pip"
    lines = [f"  this Python ({exe}):", f"    {form(here, sys.platform == 'win32')}"]
    if not portable:
        lines += ["  Windows portable ComfyUI (in the ComfyUI_windows_portable folder):",
                  f"    {form(PORTABLE_PIP, True)}"]
    lines += ["  any other ComfyUI (the Python it runs with, e.g. its venv's):",
              f"    {form('<ComfyUI python> -m pip', False)}"]
    return lines


def requirements_file_for(steps: Sequence[Step], prefer: str = "") -> Optional[Path]:
    """The pack's ``requirements-*.txt`` that lists exactly what ``steps`` installs (one plain step), if any;
    ``requirements-<prefer>.txt`` first."""
    if len(steps) != 1 or steps[0].env or steps[0].verb != "install":
        return None
    files = sorted(PACK_DIR.glob("requirements-*.txt"), key=lambda p: (p.name != f"requirements-{prefer}.txt", p.name))
    for path in files:
        lines = [l.split("#")[0].strip() for l in path.read_text(encoding="utf-8").splitlines()]
        if [l for l in lines if l] == list(steps[0].args):
            return path
    return None


class MissingDependency(DreamIDVError):
    """An optional package is not importable; the message says exactly how to install it.

    ``steps``: what to install (the extra's own steps, or the one package its import was missing)."""

    def __init__(self, extra: Extra, what: str, cause: str, steps: Optional[Sequence[Step]] = None):
        self.extra, self.what, self.cause = extra, what, cause
        self.steps = tuple(steps or extra.steps)
        lines = [f"{what}: {cause} (optional; needed for {extra.enables}).",
                 "Install it into the Python that runs ComfyUI, then restart ComfyUI:"]
        lines += install_lines(self.steps)
        same = requirements_file_for(self.steps, extra.name)
        if same is not None:
            lines.append(f"  (the same as: pip install -r {same})")
        lines += [f"  {n}" for n in extra.notes]
        super().__init__("\n".join(lines))


def get_extra(name: str) -> Extra:
    try:
        return extras()[name]
    except KeyError:
        raise ValueError(f"unknown optional extra {name!r}; known: {', '.join(extras())}") from None


def missing_modules(name: str) -> List[str]:
    """The modules of extra ``name`` that cannot be found (without importing them)."""
    out = []
    for mod in get_extra(name).modules:
        try:
            if importlib.util.find_spec(mod) is None:
                out.append(mod)
        except (ImportError, ValueError):  # a parent package that fails, or sys.modules[mod] = None
            out.append(mod)
    return out


def is_available(name: str) -> bool:
    return not missing_modules(name)


def require(name: str, what: str, module: Optional[str] = None):
    """Import extra ``name``'s first module (or ``module``) and return it; raise :class:`MissingDependency`
    naming ``what`` (the node or step that needs it) when any of the extra's modules cannot be imported.
    When the extra's package is there but one of *its* imports is missing (e.g. mediapipe installed with
    --no-deps), the command installs that package instead."""
    extra = get_extra(name)
    for mod in extra.modules if module is None else (*extra.modules, module):
        try:
            importlib.import_module(mod)
        except ImportError as exc:
            missing = (getattr(exc, "name", None) or mod).split(".")[0]
            if missing == mod.split(".")[0]:
                raise MissingDependency(extra, what, f"the Python package '{missing}' is not installed") from exc
            package = PIP_NAMES.get(missing, missing)
            raise MissingDependency(extra, what, f"'{mod}' is installed but cannot import '{missing}' ({exc})",
                                    [Step((package,))]) from exc
    return importlib.import_module(module or extra.modules[0])
