"""Catalogue of the model files this pack uses, and where each one goes.

Pure Python (no torch, no ComfyUI): the ComfyUI nodes, the command line (``check-models``),
``scripts/run.sh`` and the README table all read the same catalogue, so a user is always told the
same thing: which file is missing, which names are accepted, and in which ComfyUI model folder it goes.

A *models dir* is laid out like ``ComfyUI/models``: one sub-folder per kind of model
(``diffusion_models/``, ``vae/``, ``text_encoders/`` ...). Files may sit directly in that folder or
in a sub-folder of it (ComfyUI lists model folders recursively), and ComfyUI's legacy folder names
(``unet/`` for ``diffusion_models/``, ``clip/`` for ``text_encoders/``) are searched as well.

    report = find_model_files("ComfyUI/models")
    if not report.ready_for("swap"):
        print(format_missing(report))

Run ``python -m dreamidv_core.weights.model_files --models-dir DIR`` for the same check from a shell, or
``--markdown`` for the table that README.md embeds.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

PathLike = Union[str, "os.PathLike[str]"]

# What a file is needed for. ``swap`` is the core job; everything else is optional or comes later.
SWAP = "swap"
FASTER_SWAP = "faster swap"
POSE_MEDIAPIPE = "pose and mask from video (MediaPipe)"
POSE_DWPOSE = "pose and mask from video (DWPose)"
FACE_ID = "ArcFace ID token encoder (reference face)"
SEGMENTATION = "video segmentation (SAM 2)"
DATA_SYNTHESIS = "data synthesis (SyncID-Pipe IVS)"

# ComfyUI's older names for the same folders; searched after the main name.
FOLDER_ALIASES: Dict[str, Tuple[str, ...]] = {
    "diffusion_models": ("unet",),
    "text_encoders": ("clip",),
}

# How deep below a model folder a file is looked for (ComfyUI users like sub-folders such as wan/).
_MAX_DEPTH = 3


@dataclass(frozen=True)
class ModelFile:
    """One model the pack uses.

    ``options`` lists the accepted ways to provide it: each option is a tuple of paths relative to
    ``folder`` that must *all* be present; any one option satisfies the entry. A path ending in ``/``
    is a folder that must exist and hold at least one file. ``required`` entries are needed for the
    basic swap; ``coming`` marks files used by features of later milestones.
    """

    key: str
    folder: str
    options: Tuple[Tuple[str, ...], ...]
    what: str
    source: str
    required_for: Tuple[str, ...]
    required: bool = False
    coming: bool = False
    dir_must_contain: Tuple[str, ...] = ()  # for folder paths: file suffixes of which one must be present

    @property
    def accepted_names(self) -> Tuple[str, ...]:
        """Human-readable list of the options (``a + b`` for options needing several paths)."""
        return tuple(" + ".join(opt) for opt in self.options)


CATALOGUE: Tuple[ModelFile, ...] = (
    ModelFile(
        key="dit",
        folder="diffusion_models",
        options=(("dreamidv.safetensors",), ("dreamidv_bf16.safetensors",), ("dreamidv_fp16.safetensors",),
                 ("dreamidv.pth",)),
        what="DreamID-V diffusion transformer (Wan2.1-1.3B with pose attention), ~6.4 GB as .pth",
        source="DreamID-V release (bytedance/DreamID-V, Hugging Face); convert the .pth to .safetensors "
               "with `python -m dreamidv_core convert` if you like",
        required_for=(SWAP,),
        required=True,
    ),
    ModelFile(
        key="dit_faster",
        folder="diffusion_models",
        options=(("dreamidv_faster.safetensors",), ("dreamidv_faster_bf16.safetensors",),
                 ("dreamidv_faster_fp16.safetensors",), ("dreamidv_faster.pth",)),
        what="DreamID-V faster transformer (no pose branch)",
        source="DreamID-V release (bytedance/DreamID-V, Hugging Face)",
        required_for=(FASTER_SWAP,),
    ),
    ModelFile(
        key="vae",
        folder="vae",
        options=(("wan_2.1_vae.safetensors",), ("Wan2.1_VAE.pth",)),
        what="Wan 2.1 video VAE",
        source="Comfy-Org Wan 2.1 repackaged files (wan_2.1_vae.safetensors) or Wan-AI/Wan2.1-T2V-1.3B "
               "(Wan2.1_VAE.pth)",
        required_for=(SWAP, FASTER_SWAP),
        required=True,
    ),
    ModelFile(
        key="text_encoder",
        folder="text_encoders",
        options=(("umt5_xxl_fp8_e4m3fn_scaled.safetensors",), ("umt5_xxl_fp16.safetensors",),
                 ("models_t5_umt5-xxl-enc-bf16.pth", "google/umt5-xxl/")),
        what="umT5-XXL text encoder (the official .pth also needs the google/umt5-xxl tokenizer folder)",
        source="Comfy-Org Wan 2.1 repackaged files (umt5_xxl_*.safetensors) or Wan-AI/Wan2.1-T2V-1.3B "
               "(models_t5_umt5-xxl-enc-bf16.pth and google/umt5-xxl/)",
        required_for=(SWAP, FASTER_SWAP),
        required=True,
    ),
    ModelFile(
        key="face_landmarker",
        folder="mediapipe",
        options=(("face_landmarker_v2_with_blendshapes.task",), ("face_landmarker.task",)),
        what="MediaPipe face landmarker (pose and face mask from a video)",
        source="Google MediaPipe face landmarker model",
        required_for=(POSE_MEDIAPIPE,),
    ),
    ModelFile(
        key="insightface",
        folder="insightface",
        options=(("models/antelopev2/",), ("models/buffalo_l/",)),
        what="InsightFace face analysis pack (detection + ArcFace identity embedding)",
        source="deepinsight/insightface model packs antelopev2 or buffalo_l",
        required_for=(FACE_ID,),
        dir_must_contain=(".onnx",),
    ),
    ModelFile(
        key="sam2",
        folder="sam2",
        options=(("sam2.1_hiera_tiny.pt",), ("sam2.1_hiera_small.pt",), ("sam2.1_hiera_base_plus.pt",),
                 ("sam2.1_hiera_large.pt",), ("sam2_hiera_tiny.pt",), ("sam2_hiera_small.pt",),
                 ("sam2_hiera_base_plus.pt",), ("sam2_hiera_large.pt",)),
        what="Segment Anything 2 / 2.1 video model (background composite)",
        source="facebookresearch/sam2 checkpoints",
        required_for=(SEGMENTATION,),
    ),
    ModelFile(
        key="ivs",
        folder="diffusion_models",
        options=(("dreamidv_ivs.safetensors",),),
        what="Identity-Anchored Video Synthesizer (IVS): video from first/last frame + pose, for the "
             "data-synthesis workflow (not released: train it with training/configs/ivs_from_dreamidv.toml)",
        source="your own training run (`python -m training --config training/configs/ivs_from_dreamidv.toml`)",
        required_for=(DATA_SYNTHESIS,),
    ),
    ModelFile(
        key="dwpose_detector",
        folder="dwpose",
        options=(("yolox_l.onnx",),),
        what="DWPose person detector (YOLOX-L)",
        source="yzd-v/DWPose (the same file ComfyUI controlnet_aux users have)",
        required_for=(POSE_DWPOSE,),
    ),
    ModelFile(
        key="dwpose_estimator",
        folder="dwpose",
        options=(("dw-ll_ucoco_384.onnx",),),
        what="DWPose whole-body pose estimator",
        source="yzd-v/DWPose (the same file ComfyUI controlnet_aux users have)",
        required_for=(POSE_DWPOSE,),
    ),
)

_BY_KEY = {m.key: m for m in CATALOGUE}


def get_entry(key: str) -> ModelFile:
    try:
        return _BY_KEY[key]
    except KeyError:
        raise KeyError(f"unknown model entry {key!r}; known: {', '.join(_BY_KEY)}") from None


@dataclass
class EntryStatus:
    """What was found for one catalogue entry."""

    entry: ModelFile
    found: Optional[Tuple[Path, ...]]  # the paths of the satisfied option, or None
    searched: Tuple[Path, ...]  # the folders that were looked in, in order
    target_dir: Path  # where a missing file should be put

    @property
    def ok(self) -> bool:
        return self.found is not None

    @property
    def path(self) -> Optional[Path]:
        """The (first) path of the satisfied option, e.g. the weight file itself."""
        return self.found[0] if self.found else None


@dataclass
class ModelReport:
    models_dir: Path
    entries: List[EntryStatus] = field(default_factory=list)

    def __getitem__(self, key: str) -> EntryStatus:
        for st in self.entries:
            if st.entry.key == key:
                return st
        raise KeyError(key)

    def path(self, key: str) -> Optional[Path]:
        return self[key].path

    def missing(self, purpose: Optional[str] = None, include_optional: bool = True) -> List[EntryStatus]:
        out = []
        for st in self.entries:
            if st.ok:
                continue
            if purpose is not None and purpose not in st.entry.required_for:
                continue
            if purpose is None and not include_optional and not st.entry.required:
                continue
            out.append(st)
        return out

    def ready_for(self, purpose: str) -> bool:
        return not self.missing(purpose)

    @property
    def ok(self) -> bool:
        """True when everything the basic swap needs is present."""
        return not self.missing(include_optional=False)


def _file_ok(p: Path) -> bool:
    return p.is_file() and p.stat().st_size > 0


def _dir_ok(p: Path, suffixes: Sequence[str]) -> bool:
    if not p.is_dir():
        return False
    for root, _dirs, files in os.walk(p):
        for f in files:
            if not suffixes or f.lower().endswith(tuple(s.lower() for s in suffixes)):
                if (Path(root) / f).stat().st_size > 0:
                    return True
    return False


def _locate(base: Path, rel: str, entry: ModelFile) -> Optional[Path]:
    """Find ``rel`` under ``base``: at that exact place, or (for a plain file name) in a sub-folder."""
    if rel.endswith("/"):
        cand = base / rel.rstrip("/")
        return cand if _dir_ok(cand, entry.dir_must_contain) else None
    cand = base / rel
    if _file_ok(cand):
        return cand
    if "/" in rel or not base.is_dir():
        return None
    base_depth = len(base.parts)
    for root, dirs, files in os.walk(base, followlinks=True):
        depth = len(Path(root).parts) - base_depth
        if depth >= _MAX_DEPTH:
            dirs[:] = []
        dirs.sort()
        if rel in files and _file_ok(Path(root) / rel):
            return Path(root) / rel
    return None


def _normalise_extra(extra_dirs) -> Tuple[List[Path], Dict[str, List[Path]]]:
    roots: List[Path] = []
    per_folder: Dict[str, List[Path]] = {}
    if extra_dirs is None:
        return roots, per_folder
    if isinstance(extra_dirs, (str, os.PathLike)):
        return [Path(extra_dirs)], per_folder
    if isinstance(extra_dirs, Mapping):
        for folder, dirs in extra_dirs.items():
            if isinstance(dirs, (str, os.PathLike)):
                dirs = [dirs]
            per_folder[str(folder)] = [Path(d) for d in dirs]
        return roots, per_folder
    return [Path(d) for d in extra_dirs], per_folder


def search_dirs(models_dir: PathLike, folder: str, extra_dirs=None) -> List[Path]:
    """The folders searched for files of ``folder``, in priority order."""
    models_dir = Path(models_dir)
    roots, per_folder = _normalise_extra(extra_dirs)
    out: List[Path] = []
    for root in [models_dir, *roots]:
        for name in (folder, *FOLDER_ALIASES.get(folder, ())):
            out.append(root / name)
    out.extend(per_folder.get(folder, []))
    for alias in FOLDER_ALIASES.get(folder, ()):
        out.extend(per_folder.get(alias, []))
    seen, uniq = set(), []
    for p in out:
        if p not in seen:
            seen.add(p)
            uniq.append(p)
    return uniq


def find_model_files(models_dir: PathLike, extra_dirs=None,
                     catalogue: Iterable[ModelFile] = CATALOGUE) -> ModelReport:
    """Look for every catalogue entry under ``models_dir`` (laid out like ``ComfyUI/models``).

    ``extra_dirs``: further model roots with the same layout (a path or a list of paths), or a mapping
    ``{folder: [dirs]}`` such as ComfyUI's ``folder_paths`` gives (e.g. ``{"vae": ["/data/vae"]}``).
    For each entry the options are tried in catalogue order; the first option whose paths are all
    present in one of the searched folders wins.
    """
    models_dir = Path(models_dir).expanduser()
    report = ModelReport(models_dir=models_dir)
    for entry in catalogue:
        dirs = search_dirs(models_dir, entry.folder, extra_dirs)
        found = None
        for option in entry.options:
            for d in dirs:
                paths = [_locate(d, rel, entry) for rel in option]
                if all(p is not None for p in paths):
                    found = tuple(paths)  # type: ignore[arg-type]
                    break
            if found:
                break
        report.entries.append(EntryStatus(entry=entry, found=found, searched=tuple(dirs),
                                          target_dir=models_dir / entry.folder))
    return report


def _describe_missing(st: EntryStatus) -> str:
    e = st.entry
    names = list(e.accepted_names)
    if len(names) == 1:
        what_to_put = names[0]
    else:
        what_to_put = "one of " + ", ".join(names)
    return (f"missing: put {what_to_put} in {st.target_dir}{os.sep}\n"
            f"    ({e.what}; get it from: {e.source}; needed for: {', '.join(e.required_for)})")


def format_missing(report: ModelReport, include_optional: bool = True) -> str:
    """An actionable, multi-line message: what is missing and exactly where it goes."""
    lines: List[str] = []
    required = [st for st in report.entries if st.entry.required and not st.ok]
    optional = [st for st in report.entries if not st.entry.required and not st.ok]
    if required:
        lines.append(f"DreamID-V model files missing under {report.models_dir} (needed to swap faces):")
        lines.extend(_describe_missing(st) for st in required)
    else:
        lines.append(f"All model files needed to swap faces were found under {report.models_dir}:")
        for st in report.entries:
            if st.entry.required and st.ok:
                lines.append(f"    {st.entry.folder}/: {', '.join(str(p) for p in st.found)}")
    if include_optional and optional:
        note = "; the 'coming' ones are for later releases" if any(st.entry.coming for st in optional) else ""
        lines.append(f"Optional files (only for the features named{note}):")
        for st in optional:
            tag = " [coming]" if st.entry.coming else ""
            lines.append(_describe_missing(st) + tag)
    return "\n".join(lines)


def markdown_table(catalogue: Iterable[ModelFile] = CATALOGUE) -> str:
    """The README table of model folders and file names (README.md embeds this text verbatim)."""
    rows = ["| folder (under `ComfyUI/models/`) | file (any one option) | what | needed for |",
            "|---|---|---|---|"]
    for e in catalogue:
        names = "<br>".join(" + ".join(f"`{p}`" for p in opt) for opt in e.options)
        need = ", ".join(e.required_for)
        if e.required:
            need += " (**required**)"
        elif e.coming:
            need += " (coming)"
        else:
            need += " (optional)"
        rows.append(f"| `{e.folder}/` | {names} | {e.what} | {need} |")
    return "\n".join(rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dreamidv_core.weights.model_files",
                                 description="Check which DreamID-V model files are present and where missing ones go.")
    ap.add_argument("--models-dir", default=os.environ.get("DREAMIDV_MODELS_DIR", "models"),
                    help="a folder laid out like ComfyUI/models (default: $DREAMIDV_MODELS_DIR or ./models)")
    ap.add_argument("--extra-dir", action="append", default=[], help="another models root with the same layout")
    ap.add_argument("--markdown", action="store_true", help="print the README table of model files and exit")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a file needed to swap is missing")
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown_table())
        return 0
    report = find_model_files(args.models_dir, extra_dirs=args.extra_dir or None)
    print(format_missing(report))
    return 1 if (args.strict and not report.ok) else 0


if __name__ == "__main__":
    sys.exit(main())
