"""Installing the pack never breaks a ComfyUI: light required set, optional extras that agree between
requirements-*.txt and pyproject.toml, Comfy Registry metadata, exact install messages, and a ComfyUI
0.3.75 that loads every node with the optional packages hidden (each optional node then explains what
to install)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dreamidv_core import optional

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli", reason="Python 3.10 needs tomli to read pyproject.toml "
                                                  "(requirements-test.txt installs it)")

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("insightface", "onnxruntime", "mediapipe", "opencv-python-headless", "opencv-contrib-python", "scipy",
         "scikit-image", "matplotlib", "einops", "torch", "hydra-core", "iopath", "sam2", "onnx")
EXTRA_FILES = {"face": "requirements-face.txt", "dwpose": "requirements-dwpose.txt", "gpu": "requirements-face-gpu.txt",
               "mediapipe": "requirements-mediapipe.txt", "sam2": "requirements-sam2.txt"}


def requirement_lines(path: Path) -> list:
    """The requirement lines of a requirements file (comments, blank lines and -r includes dropped)."""
    lines = [l.split("#")[0].strip() for l in path.read_text(encoding="utf-8").splitlines()]
    return [re.sub(r"\s+", "", l) for l in lines if l and not l.startswith("-")]


def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def name_of(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower()


def test_requirements_txt_and_pyproject_dependencies_agree():
    deps = [re.sub(r"\s+", "", d) for d in project()["project"]["dependencies"]]
    assert requirement_lines(REPO / "requirements.txt") == deps


def test_each_extra_has_a_requirements_file_with_the_same_lines():
    extras = {k: [re.sub(r"\s+", "", d) for d in v] for k, v in project()["project"]["optional-dependencies"].items()}
    for extra, file in EXTRA_FILES.items():
        assert extras[extra] == requirement_lines(REPO / file), extra
    assert sorted(extras["all"]) == sorted(set(extras["face"] + extras["mediapipe"] + extras["sam2"]))
    assert sorted(extras["all-gpu"]) == sorted(set(extras["gpu"] + extras["mediapipe"] + extras["sam2"]))
    # the test environment installs every extra (CPU onnxruntime), so every test runs
    includes = [l.split()[-1] for l in (REPO / "requirements-test.txt").read_text().splitlines() if l.startswith("-r")]
    assert set(includes) == {"requirements.txt", "requirements-face.txt", "requirements-mediapipe.txt",
                             "requirements-sam2.txt"}


def test_required_set_is_light_with_one_opencv():
    names = [name_of(l) for l in requirement_lines(REPO / "requirements.txt")]
    assert not [n for n in names if n in HEAVY or n.startswith("onnxruntime")], names
    assert [n for n in names if n.startswith("opencv")] == ["opencv-python"]
    # no extra pulls a second OpenCV: mediapipe is held below 0.10.32 (which started requiring opencv-contrib-python)
    spec = next(l for l in requirement_lines(REPO / "requirements-mediapipe.txt") if name_of(l) == "mediapipe")
    assert "<0.10.32" in spec and ">=0.10.30" in spec
    for file in EXTRA_FILES.values():
        assert not [l for l in requirement_lines(REPO / file) if name_of(l).startswith("opencv")], file
    # no extra file mixes two onnxruntime builds
    for file in EXTRA_FILES.values():
        assert len([l for l in requirement_lines(REPO / file) if name_of(l).startswith("onnxruntime")]) <= 1


def test_registry_metadata():
    data = project()
    proj, comfy = data["project"], data["tool"]["comfy"]
    assert re.fullmatch(r"[a-z][a-z0-9_.-]*", proj["name"]) and re.fullmatch(r"\d+\.\d+\.\d+", proj["version"])
    assert re.fullmatch(r"(>=|<=|==|~=|>|<|!=)\d+\.\d+\.\d+(,\s*(>=|<=|<|>|!=)\d+\.\d+\.\d+)*", comfy["requires-comfyui"])
    assert comfy["PublisherId"] and comfy["DisplayName"]
    assert re.fullmatch(r"https://\S+", comfy["Icon"]), "the registry wants an image URL"
    for key in ("Repository", "Documentation", "Issues"):  # the names comfy-cli reads
        assert proj["urls"][key].startswith("https://")
    assert "Bug Tracker" not in proj["urls"]
    assert proj["requires-python"] == ">=3.10"
    assert not any(name_of(d) == "torch" for d in proj["dependencies"])


def test_install_message_gives_every_form_of_the_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "mediapipe", None)
    with pytest.raises(optional.MissingDependency) as e:
        optional.require("mediapipe", "Pose node")
    msg = str(e.value)
    assert msg.startswith("Pose node: the Python package 'mediapipe' is not installed")
    spec = '"mediapipe>=0.10.30,<0.10.32"'
    assert f"{sys.executable} -m pip install {spec}" in msg
    assert f"python_embeded\\python.exe -s -m pip install {spec}" in msg
    assert f"<ComfyUI python> -m pip install {spec}" in msg
    assert "requirements-mediapipe.txt" in msg and "--no-deps mediapipe" in msg


def test_sam2_message_builds_from_source_without_changing_torch(monkeypatch):
    monkeypatch.setitem(sys.modules, "sam2", None)
    monkeypatch.setattr(sys, "platform", "linux")
    msg = str(pytest.raises(optional.MissingDependency, optional.require, "sam2", "SAM2").value)
    assert "SAM2_BUILD_CUDA=0 <ComfyUI python> -m pip install --no-deps --no-build-isolation sam2==1.1.0" in msg
    assert 'set "SAM2_BUILD_CUDA=0" && python_embeded\\python.exe -s -m pip install --no-deps' in msg


def test_a_missing_dependency_of_the_optional_package_is_named(monkeypatch):
    """mediapipe installed with --no-deps but matplotlib missing: the command installs matplotlib."""
    def broken(name, *a, **k):
        raise ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib")

    monkeypatch.setattr(optional.importlib, "import_module", broken)
    msg = str(pytest.raises(optional.MissingDependency, optional.require, "mediapipe", "Pose node").value)
    assert "'mediapipe' is installed but cannot import 'matplotlib'" in msg
    assert f"{sys.executable} -m pip install matplotlib" in msg


@pytest.mark.parametrize("platform, cuda, package", [("linux", "12.8", "onnxruntime-gpu"), ("linux", None, "onnxruntime"),
                                                      ("win32", None, "onnxruntime-directml"),
                                                      ("win32", "12.8", "onnxruntime-gpu"), ("darwin", None, "onnxruntime")])
def test_onnxruntime_build_recommended_for_this_machine(monkeypatch, platform, cuda, package):
    import types

    fake = types.SimpleNamespace(version=types.SimpleNamespace(cuda=cuda))
    monkeypatch.setitem(sys.modules, "torch", fake)
    monkeypatch.setattr(sys, "platform", platform)
    assert optional.onnxruntime_package() == package
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    msg = str(pytest.raises(optional.MissingDependency, optional.require, "face", "ID encoder").value)
    assert f'python_embeded\\python.exe -s -m pip install "{package}>=1.16"' in msg
    assert "Install ONE onnxruntime build" in msg


def test_windows_portable_python_gets_its_own_command(monkeypatch):
    monkeypatch.setattr(sys, "executable", r"C:\ComfyUI_windows_portable\python_embeded\python.exe")
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(optional.os.path, "basename", lambda p: p.replace("\\", "/").rsplit("/", 1)[-1])
    monkeypatch.setattr(optional.os.path, "dirname", lambda p: p.replace("\\", "/").rsplit("/", 1)[0])
    lines = optional.install_lines([optional.Step(("onnxruntime",))])
    assert lines[1].strip() == r"C:\ComfyUI_windows_portable\python_embeded\python.exe -s -m pip install onnxruntime"
    assert not any("ComfyUI_windows_portable folder" in l for l in lines)


def test_workflows_folder_is_the_one_comfyui_serves():
    """ComfyUI serves example_workflows/, example/, examples/, workflow/ and workflows/; the client's layout
    names workflows/, which is kept as the only copy."""
    assert (REPO / "workflows" / "dreamidv_swap.json").is_file()
    assert not (REPO / "example_workflows").exists()


# ------------------------------------------------------------------------- ComfyUI with extras hidden
HIDDEN = ("mediapipe", "onnxruntime", "sam2", "insightface", "hydra", "iopath", "omegaconf", "onnx", "skimage",
          "scipy", "matplotlib")
# modules only opencv-contrib-python has: the pack must not need them (opencv-python is its one OpenCV)
CONTRIB_ONLY = ("xfeatures2d", "ximgproc", "face", "aruco", "bgsegm", "optflow", "saliency", "xphoto", "tracking",
                "legacy", "sfm", "text", "rgbd", "superres", "wechat_qrcode", "freetype", "hfs", "img_hash",
                "intensity_transform", "line_descriptor", "mcc", "phase_unwrapping", "plot", "quality", "rapid",
                "reg", "stereo", "structured_light", "surface_matching", "xobjdetect", "bioinspired", "ccalib",
                "datasets", "dnn_superres", "dpm", "fuzzy", "alphamat", "cvv")

HIDDEN_RUN = r"""
import asyncio, importlib.util, json, sys, traceback
comfyui, repo, models, hidden = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split(",")
for name in hidden:
    sys.modules[name] = None          # 'import name' now fails as if it were not installed
sys.path.insert(0, comfyui)
import comfy.cli_args
comfy.cli_args.args.cpu = True
import comfy.model_management, folder_paths, torch
spec = importlib.util.spec_from_file_location("comfyui-dreamidv", repo + "/__init__.py", submodule_search_locations=[repo])
pack = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = pack
spec.loader.exec_module(pack)
ext = asyncio.run(pack.comfy_entrypoint())
nodes = {n.define_schema().node_id: n for n in asyncio.run(ext.get_node_list())}
for folder in ("mediapipe", "dwpose", "insightface", "sam2"):
    folder_paths.add_model_folder_path(folder, models + "/" + folder)
out = {"nodes": sorted(nodes), "loaded_hidden": [n for n in hidden if sys.modules.get(n) is not None]}
frames = torch.rand(2, 64, 64, 3)
mask = torch.ones(2, 64, 64)
runs = {
    "pose mediapipe": lambda: nodes["DreamIDVPoseExtract"].execute(frames, "mediapipe", mediapipe_model="f.task"),
    "pose dwpose": lambda: nodes["DreamIDVPoseExtract"].execute(frames, "dwpose", detector_model="yolox_l.onnx",
                                                                pose_model="dw-ll_ucoco_384.onnx"),
    "identity": lambda: nodes["DreamIDVIdentityEncoder"].execute(frames[:1], "antelopev2", "auto", 640, 0.5, "largest", 0),
    "report": lambda: nodes["DreamIDVIdentityReport"].execute(frames, reference=frames[:1], insightface_pack="antelopev2"),
    "writer": lambda: nodes["DreamIDVQuadrupletWriter"].execute(models + "/ds", "s", frames, frames, frames[:1], mask),
    "expression": lambda: nodes["DreamIDVExpressionAdaptation"].execute(frames, frames[:1], mediapipe_model="f.task"),
    "composite sam2": lambda: nodes["DreamIDVBackgroundComposite"].execute(frames, frames, mask, "sam2.1_hiera_tiny.pt"),
    "recompose sam2": lambda: nodes["DreamIDVBackgroundRecompose"].execute(frames, mask, frames, mask,
                                                                           sam2_checkpoint="sam2.1_hiera_tiny.pt"),
    "composite none": lambda: nodes["DreamIDVBackgroundComposite"].execute(frames, frames, mask, "none"),
}
out["runs"] = {}
for name, run in runs.items():
    try:
        result = run()
        out["runs"][name] = {"ok": [list(r.shape) if hasattr(r, "shape") else type(r).__name__ for r in result.result]}
    except Exception as exc:
        out["runs"][name] = {"error": type(exc).__name__, "message": str(exc)}
print(json.dumps(out))
"""


@pytest.mark.comfyui
def test_nodes_register_and_optional_nodes_give_install_commands_with_extras_hidden(comfyui_dir, tmp_path):
    models = tmp_path / "models"
    for folder, name in (("mediapipe", "f.task"), ("dwpose", "yolox_l.onnx"), ("dwpose", "dw-ll_ucoco_384.onnx"),
                         ("insightface", "models/antelopev2/scrfd_10g_bnkps.onnx"),
                         ("insightface", "models/antelopev2/glintr100.onnx"), ("sam2", "sam2.1_hiera_tiny.pt")):
        path = models / folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"stand-in: never read, the missing package is reported first")
    out = subprocess.run([sys.executable, "-c", HIDDEN_RUN, str(comfyui_dir), str(REPO), str(models), ",".join(HIDDEN)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-4000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(seen["nodes"]) >= 16 and "DreamIDVIdentityEncoder" in seen["nodes"]
    assert seen["loaded_hidden"] == []
    runs = seen["runs"]
    ort = f'"{optional.onnxruntime_package()}>=1.16"'  # onnxruntime-gpu where torch is a CUDA build
    expected = {"pose mediapipe": '"mediapipe>=0.10.30,<0.10.32"', "expression": '"mediapipe>=0.10.30,<0.10.32"',
                "pose dwpose": ort, "identity": ort, "report": ort,
                "writer": ort, "composite sam2": "--no-deps --no-build-isolation sam2==1.1.0",
                "recompose sam2": "--no-deps --no-build-isolation sam2==1.1.0"}
    for name, command in expected.items():
        got = runs[name]
        assert got.get("error") == "MissingDependency", (name, got)
        msg = got["message"]
        assert f"{sys.executable} -m pip install" in msg, (name, msg)
        assert "python_embeded\\python.exe -s -m pip install" in msg and command in msg, (name, msg)
    assert runs["composite none"] == {"ok": [[2, 64, 64, 3], [2, 64, 64], "DreamIDVVideo"]}, runs["composite none"]


def test_the_pack_uses_no_opencv_contrib_module():
    used = set()
    for path in [*(REPO / "dreamidv_core").rglob("*.py"), *(REPO / "nodes").rglob("*.py"), *(REPO / "training").rglob("*.py")]:
        used |= set(re.findall(r"\bcv2\.([a-zA-Z_]\w*)", path.read_text(encoding="utf-8")))
    assert used and not used & set(CONTRIB_ONLY), sorted(used & set(CONTRIB_ONLY))


def test_hidden_module_list_covers_every_optional_import():
    """Every module an extra needs is among those the ComfyUI test hides."""
    for extra in optional.extras().values():
        assert set(extra.modules) <= set(HIDDEN), extra.name
