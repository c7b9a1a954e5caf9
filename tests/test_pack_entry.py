"""The pack's ComfyUI entry point: importable as a package outside ComfyUI, and loaded by a real
ComfyUI (0.3.75 from scripts/get_comfyui.sh) without an import error."""
from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest


def test_pack_loads_like_comfyui_loads_it(pack, repo_root):
    import asyncio

    from comfy_api.latest import ComfyExtension

    extension = asyncio.run(pack.comfy_entrypoint())
    assert isinstance(extension, ComfyExtension)
    nodes = asyncio.run(extension.get_node_list())
    ids = [n.define_schema().node_id for n in nodes]
    assert len(ids) == len(set(ids))
    assert all(i.startswith("DreamIDV") for i in ids)
    assert str(repo_root) in sys.path  # so that node code can `import dreamidv_core`


def test_pyproject_has_registry_metadata(repo_root):
    import tomllib

    data = tomllib.loads((repo_root / "pyproject.toml").read_text(encoding="utf-8"))
    proj, comfy = data["project"], data["tool"]["comfy"]
    assert proj["name"] == "comfyui-dreamidv" and proj["version"] == "0.2.0"
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
