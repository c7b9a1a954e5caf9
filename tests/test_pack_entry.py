"""The pack's ComfyUI entry point: importable as a package outside ComfyUI, and loaded by a real
ComfyUI (0.3.75 from scripts/get_comfyui.sh) without an import error."""
from __future__ import annotations

import importlib.util
import socket
import sys
from pathlib import Path

import pytest


def _load_pack(repo_root: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, repo_root / "__init__.py",
                                                  submodule_search_locations=[str(repo_root)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(name, None)
        sys.modules.pop(name + ".nodes", None)
    return module


def test_pack_imports_like_comfyui_imports_it(repo_root):
    # ComfyUI uses the folder's path as the module name
    mod = _load_pack(repo_root, str(repo_root / "custom_nodes" / "comfyui-dreamidv"))
    assert isinstance(mod.NODE_CLASS_MAPPINGS, dict)
    assert isinstance(mod.NODE_DISPLAY_NAME_MAPPINGS, dict)
    assert set(mod.NODE_DISPLAY_NAME_MAPPINGS) <= set(mod.NODE_CLASS_MAPPINGS)
    assert str(repo_root) in sys.path  # so that node code can `import dreamidv_core`


def test_pyproject_has_registry_metadata(repo_root):
    import tomllib

    data = tomllib.loads((repo_root / "pyproject.toml").read_text(encoding="utf-8"))
    proj, comfy = data["project"], data["tool"]["comfy"]
    assert proj["name"] == "comfyui-dreamidv" and proj["version"] == "0.1.0"
    assert "Repository" in proj["urls"]
    for key in ("PublisherId", "DisplayName", "Icon"):
        assert key in comfy
    assert not any(d.replace(" ", "").startswith("torch==") for d in proj["dependencies"])


@pytest.mark.comfyui
@pytest.mark.slow
def test_real_comfyui_starts_and_loads_the_pack(comfyui_dir, repo_root, tmp_path):
    sys.path.insert(0, str(repo_root / "scripts"))
    try:
        import comfyui_smoke
    finally:
        sys.path.pop(0)
    base = tmp_path / "comfy_base"
    (base / "custom_nodes").mkdir(parents=True)
    (base / "custom_nodes" / "comfyui-dreamidv").symlink_to(repo_root, target_is_directory=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
           "--base-directory", str(base)]
    r = comfyui_smoke.start_and_check(cmd, str(comfyui_dir), port, "comfyui-dreamidv", timeout=240,
                                      log_path=tmp_path / "comfyui.log")
    assert r["ok"], "\n".join(r["problems"]) + "\n" + r["log"][-4000:]
    assert r["object_info_nodes"] > 100  # core nodes (LoadVideo, ...) and ours
