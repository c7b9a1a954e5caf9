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
    import dreamidv_core

    assert Path(dreamidv_core.__file__).resolve().parent == repo_root / "dreamidv_core"


DECOY_CHECK = r"""
import importlib, importlib.util, json, sys
comfyui, repo, decoys = sys.argv[1:4]
sys.path[:0] = [decoys, comfyui]  # decoys first: another pack's 'training' and 'nodes' win any plain import
import comfy.cli_args
comfy.cli_args.args.cpu = True
import comfy.model_management, folder_paths  # noqa: E401,F401
spec = importlib.util.spec_from_file_location("comfyui-dreamidv", repo + "/__init__.py",
                                              submodule_search_locations=[repo])
pack = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = pack
spec.loader.exec_module(pack)
stages = pack.nodes.training._stages()          # what the fine-tune node imports when a run starts
import dreamidv_core
print(json.dumps({"stages": stages.__file__, "core": dreamidv_core.__file__,
                  "node_modules": sorted({m.__file__ for n, m in sys.modules.items()
                                          if n.startswith("comfyui-dreamidv.nodes")}),
                  "plain_training": sys.modules["training"].__file__ if "training" in sys.modules else None,
                  "path_has_repo": repo in sys.path}))
"""


@pytest.mark.comfyui
def test_pack_gets_its_own_modules_with_decoys_earlier_on_the_path(comfyui_dir, repo_root, tmp_path):
    import json
    import subprocess

    decoys = tmp_path / "decoys"
    (decoys / "training").mkdir(parents=True)
    (decoys / "training" / "__init__.py").write_text("DECOY = True\n")
    (decoys / "training" / "stages.py").write_text("raise ImportError('the decoy training.stages was imported')\n")
    (decoys / "dreamidv_nodes_decoy.py").write_text("")
    (decoys / "nodes.py").write_text("raise ImportError('the decoy nodes module was imported')\n")
    out = subprocess.run([sys.executable, "-c", DECOY_CHECK, str(comfyui_dir), str(repo_root), str(decoys)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(seen["stages"]).resolve() == repo_root / "training" / "stages.py"
    assert Path(seen["core"]).resolve() == repo_root / "dreamidv_core" / "__init__.py"
    assert seen["node_modules"] and all((repo_root / "nodes") in Path(f).resolve().parents
                                        for f in seen["node_modules"])
    assert seen["plain_training"] is None  # the decoy 'training' was never imported, nor was ours shadowing it
    assert not seen["path_has_repo"]


def test_a_second_copy_of_the_core_is_refused_with_a_clear_message(tmp_path, monkeypatch):
    import importlib.util

    other = tmp_path / "old_copy" / "dreamidv_core"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("")
    spec = importlib.util.spec_from_file_location("dreamidv_core", other / "__init__.py",
                                                  submodule_search_locations=[str(other)])
    fake = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "dreamidv_core", fake)
    root = importlib.util.spec_from_file_location("pack_root_under_test", Path(__file__).resolve().parents[1] /
                                                  "__init__.py")
    module = importlib.util.module_from_spec(root)
    with pytest.raises(ImportError, match="Two copies of the DreamID-V pack"):
        root.loader.exec_module(module)  # ComfyUI shows this message in its import failures
        module._register_core()  # (when the module stayed inert because comfy was not imported)


def test_pyproject_has_registry_metadata(repo_root):
    from training.__main__ import toml_module  # tomllib, or tomli on Python 3.10

    data = toml_module().loads((repo_root / "pyproject.toml").read_text(encoding="utf-8"))
    proj, comfy = data["project"], data["tool"]["comfy"]
    assert proj["name"] == "comfyui-dreamidv" and proj["version"] == "0.3.0"
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
