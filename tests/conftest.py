"""Fixtures shared by the whole suite.

- ``repo_root``: the repository folder.
- ``shared_dir``: the team's ``../shared`` folder (test videos, images, parameter manifests); tests
  using it skip with a clear reason where it is absent.
- ``comfyui_dir``: a real ComfyUI (``$COMFYUI_DIR``, else ``.cache/ComfyUI`` as made by
  ``scripts/get_comfyui.sh``); tests using it skip with a reason where there is none.
- every test starts from ``torch.manual_seed(0)``; torch uses 2 threads (the CI machines have 2 cores).
"""
from __future__ import annotations

import os
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
