"""Fixtures shared by the whole suite.

- ``repo_root``: the repository folder.
- ``shared_dir``: the team's ``../shared`` folder (test videos, images, parameter manifests); tests
  using it skip with a clear reason where it is absent.
- ``comfyui_dir``: a real ComfyUI (``$COMFYUI_DIR``, else ``.cache/ComfyUI`` as made by
  ``scripts/get_comfyui.sh``); tests using it skip with a reason where there is none.
- every test starts from ``torch.manual_seed(0)``; torch uses 2 threads (the CI machines have 2 cores);
  ``one_thread`` sets 1 for a test.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DIR = REPO_ROOT.parent / "shared"

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED_DIR.is_dir():
        pytest.skip(f"shared assets folder {SHARED_DIR} is absent (it sits next to the repository: ../shared)")
    return SHARED_DIR


@pytest.fixture(scope="session")
def comfyui_dir() -> Path:
    env = os.environ.get("COMFYUI_DIR")
    cand = Path(env) if env else REPO_ROOT / ".cache" / "ComfyUI"
    if not (cand / "main.py").is_file():
        how = f"COMFYUI_DIR={env} has no main.py" if env else f"no ComfyUI at {cand}"
        pytest.skip(f"{how}: run `bash scripts/get_comfyui.sh` (or `bash scripts/test.sh`, which does it)")
    return cand


@pytest.fixture(autouse=True)
def _seed_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """Torch on one thread for the test: tiny models gain nothing from a second thread, and on a busy
    2-core machine two threads can spin-wait many times the run time (seen: 400 training steps in 414 s with
    2 threads, 300 in 24 s with 1)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def comfy(comfyui_dir, tmp_path_factory):
    """ComfyUI's own modules importable in this process (CPU), for node unit tests.

    ComfyUI's folder goes first on sys.path so that its top-level ``nodes`` module wins over this
    repository's ``nodes`` package; the pack itself is reached through :func:`load_pack` below, the
    way ComfyUI imports it (as a package named after its folder).
    """
    path = str(comfyui_dir)
    if sys.path[0] != path:
        sys.path.insert(0, path)
    mod = sys.modules.get("nodes")
    if mod is not None and not str(getattr(mod, "__file__", "")).startswith(path):
        del sys.modules["nodes"]  # the repository's package was imported by name: make room for ComfyUI's
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # no GPU here; must be set before comfy.model_management is imported
    import comfy.model_management  # noqa: F401
    import folder_paths

    folder_paths.set_temp_directory(str(tmp_path_factory.mktemp("comfy_temp")))  # never inside the ComfyUI folder
    return comfyui_dir


@pytest.fixture(scope="session")
def pack(comfy, repo_root):
    """This pack imported as ComfyUI imports it: ``pack.nodes.loaders`` etc."""
    import importlib.util

    name = "comfyui_dreamidv_under_test"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, repo_root / "__init__.py",
                                                  submodule_search_locations=[str(repo_root)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_swap_models():
    """A tiny random full DiT (text_dim 48) and tiny VAE, as the swap and window tests use them."""
    from dreamidv_core.models.configs import tiny_config
    from dreamidv_core.models.dit import DreamIDVTransformer, init_random_
    from dreamidv_core.models.vae import TINY_VAE_CONFIG, WanVAE

    torch.manual_seed(0)
    dit = init_random_(DreamIDVTransformer(tiny_config("full", text_dim=48)), seed=11).eval()
    return dit, WanVAE(TINY_VAE_CONFIG).eval()

