"""onnxruntime sessions on the best execution provider the installed onnxruntime build offers.

Several distributions provide the one ``onnxruntime`` module (onnxruntime = CPU, with CoreML on macOS;
onnxruntime-gpu = CUDA/TensorRT; onnxruntime-directml; onnxruntime-openvino; onnxruntime-rocm ...).
:func:`runtime_build` says which one is installed (and warns when two are, since they overwrite each
other's files); :func:`make_session` opens a model on the provider asked for:

* ``auto``: the first available of CUDA, ROCm, MIGraphX, DirectML, CoreML, OpenVINO, then CPU;
* ``CPU``, ``CUDA``, ``ROCm``, ``DirectML``, ``CoreML``, ``OpenVINO``: that one (CPU, with a note,
  when this build does not have it).

CPU is always the fallback for operators the accelerator lacks. The session records the providers
onnxruntime really activated (it silently drops e.g. CUDA when the CUDA libraries do not load), and
:attr:`OnnxSession.info` says which build ran the model where, for node info and logs.
"""
from __future__ import annotations

import functools
import importlib.metadata
import logging
import os
from dataclasses import dataclass, field
from typing import List, Tuple

from ..errors import CheckpointError, DreamIDVError, InputError
from .. import optional

log = logging.getLogger(__name__)

PROVIDER_CHOICES = ("auto", "CPU", "CUDA", "ROCm", "DirectML", "CoreML", "OpenVINO")
EXECUTION_PROVIDERS = {
    "CUDA": "CUDAExecutionProvider", "ROCm": "ROCMExecutionProvider", "MIGraphX": "MIGraphXExecutionProvider",
    "DirectML": "DmlExecutionProvider", "CoreML": "CoreMLExecutionProvider", "OpenVINO": "OpenVINOExecutionProvider",
    "CPU": "CPUExecutionProvider",
}
AUTO_ORDER = ("CUDA", "ROCm", "MIGraphX", "DirectML", "CoreML", "OpenVINO", "CPU")
# Grow the CUDA memory arena only by what is asked for: the diffusion model shares the GPU.
PROVIDER_OPTIONS = {"CUDAExecutionProvider": {"arena_extend_strategy": "kSameAsRequested"}}
SHORT_NAMES = {v: k for k, v in EXECUTION_PROVIDERS.items()}


@dataclass(frozen=True)
class RuntimeBuild:
    """The installed onnxruntime: the distributions providing the module (``name version``), the module's
    version and the execution providers it offers."""

    distributions: Tuple[str, ...]
    version: str
    available: Tuple[str, ...]

    @property
    def name(self) -> str:
        return " + ".join(self.distributions) or f"onnxruntime {self.version}"


def _distributions() -> Tuple[str, ...]:
    """``name version`` of every installed distribution that provides the ``onnxruntime`` module."""
    try:
        names = importlib.metadata.packages_distributions().get("onnxruntime", [])
    except Exception:  # noqa: BLE001  (broken metadata of an unrelated package must not stop us)
        return ()
    out = []
    for name in dict.fromkeys(names):
        try:
            out.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(name)
    return tuple(out)


def _repair_lines(distributions: Tuple[str, ...]) -> List[str]:
    """Commands that leave one working build: uninstall the others, reinstall the one kept (a GPU build if any)."""
    names = [d.split()[0] for d in distributions]
    keep = next((n for n in names if n != "onnxruntime"), names[0] if names else optional.onnxruntime_package())
    others = [n for n in names if n != keep]
    steps = [optional.Step(("-y", *others), verb="uninstall")] if others else []
    steps.append(optional.Step(("--force-reinstall", "--no-deps", keep)))
    return optional.install_lines(steps)


@functools.lru_cache(maxsize=None)
def runtime_build(extra: str = "face", what: str = "onnxruntime") -> RuntimeBuild:
    """The installed build (imports onnxruntime; :class:`optional.MissingDependency` when it is absent,
    :class:`DreamIDVError` with the repair commands when its files are broken). Warns once when two
    builds are installed over each other."""
    ort = optional.require(extra, what)
    dists = _distributions()
    if not hasattr(ort, "InferenceSession") or not hasattr(ort, "get_available_providers"):
        raise DreamIDVError("\n".join([
            f"{what}: the installed onnxruntime is broken (the module has no InferenceSession; installed "
            f"distributions: {', '.join(dists) or 'none listed'}). This happens when two onnxruntime builds were "
            "installed over each other and one was uninstalled. Repair it in the Python that runs ComfyUI:",
            *_repair_lines(dists)]))
    build = RuntimeBuild(dists, getattr(ort, "__version__", "?"), tuple(ort.get_available_providers()))
    if len(dists) > 1:
        log.warning("\n".join([
            f"DreamID-V: {len(dists)} onnxruntime builds are installed ({', '.join(dists)}); they share one folder, "
            f"so the files of the last one installed are used (version {build.version}, providers "
            f"{', '.join(build.available)}) and uninstalling either breaks the other. Keep one:",
            *_repair_lines(dists)]))
    return build


@dataclass
class OnnxSession:
    """An onnxruntime session, the providers it really uses and a note when that is not what was asked."""

    session: object
    path: str
    providers: List[str]
    build: RuntimeBuild
    note: str = ""
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)

    @property
    def device(self) -> str:
        """The short name of the main provider (CUDA, CPU, ...)."""
        return SHORT_NAMES.get(self.providers[0], self.providers[0]) if self.providers else "CPU"

    @property
    def info(self) -> str:
        return f"{self.build.name} on {self.device}" + (f" ({self.note})" if self.note else "")

    def run(self, feeds: dict) -> list:
        return self.session.run([o.name for o in self.outputs], feeds)


def provider_chain(choice: str, available) -> Tuple[List[str], str]:
    """Provider choice -> (providers for onnxruntime, best first, CPU last; a note when the choice is not
    available and CPU is used instead)."""
    if choice not in PROVIDER_CHOICES:
        raise InputError(f"provider must be one of {', '.join(PROVIDER_CHOICES)}, got {choice!r}")
    available = list(available)
    if choice == "auto":
        wanted = next((EXECUTION_PROVIDERS[c] for c in AUTO_ORDER if EXECUTION_PROVIDERS[c] in available),
                      EXECUTION_PROVIDERS["CPU"])
        note = ""
    else:
        wanted = EXECUTION_PROVIDERS[choice]
        note = ""
        if wanted not in available:
            note = (f"{choice} asked for, but this onnxruntime offers {', '.join(available) or 'nothing'}; "
                    f"ran on CPU (for {choice}: {_build_for(choice)})")
            wanted = EXECUTION_PROVIDERS["CPU"]
    chain = [wanted] + ([EXECUTION_PROVIDERS["CPU"]] if wanted != EXECUTION_PROVIDERS["CPU"] else [])
    return chain, note


def _build_for(choice: str) -> str:
    return {"CUDA": "install onnxruntime-gpu instead of onnxruntime", "ROCm": "onnxruntime-rocm or AMD's build",
            "DirectML": "onnxruntime-directml (Windows)", "CoreML": "onnxruntime on macOS",
            "OpenVINO": "onnxruntime-openvino"}.get(choice, "another onnxruntime build")


def make_session(path, provider: str = "auto", extra: str = "face", what: str = "onnxruntime") -> OnnxSession:
    """Open ``path`` on ``provider`` (see the module doc). ``extra``/``what`` name the optional extra and
    the caller in the install message when onnxruntime is missing."""
    if not os.path.isfile(path):
        raise CheckpointError(path, "file not found")
    ort = optional.require(extra, what)
    build = runtime_build(extra, what)
    chain, note = provider_chain(provider, build.available)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if EXECUTION_PROVIDERS["DirectML"] in chain:  # DirectML supports neither memory patterns nor parallel runs
        opts.enable_mem_pattern = False
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    try:
        session = ort.InferenceSession(str(path), sess_options=opts, providers=chain,
                                       provider_options=[PROVIDER_OPTIONS.get(p, {}) for p in chain])
    except Exception as exc:  # noqa: BLE001  (onnxruntime raises its own types for unreadable files)
        raise CheckpointError(path, f"onnxruntime cannot load it ({exc})") from exc
    used = list(session.get_providers())
    if used and used[0] != chain[0] and not note:
        note = f"{SHORT_NAMES.get(chain[0], chain[0])} could not start (see the log above); ran on {used[0]}"
    if note:
        log.warning("DreamID-V: %s: %s", os.path.basename(str(path)), note)
    return OnnxSession(session, str(path), used, build, note, list(session.get_inputs()), list(session.get_outputs()))
