"""Launching ``torchrun`` from a test: CPU/gloo, one thread per process, the repository importable, and a
timeout that kills the launcher *and* its workers. torchrun starts each worker in a session of its own, so
killing the launcher's process group would leave them running: :func:`kill` kills every descendant."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Sequence, Tuple

REPO = Path(__file__).resolve().parent.parent


def torchrun_command(args: Sequence[str], nproc: int) -> list:
    """``python -m torch.distributed.run --nproc_per_node nproc --standalone <args>``; ``nproc`` 1: ``python <args>``
    (``args`` start with ``-m module`` or a script)."""
    if nproc <= 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone", *args]


def start(args: Sequence[str], nproc: int, **env) -> subprocess.Popen:
    environ = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **{k: str(v) for k, v in env.items()})
    return subprocess.Popen(torchrun_command(args, nproc), cwd=REPO, env=environ, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def kill(proc: subprocess.Popen) -> Tuple[str, str]:
    """SIGKILL the launcher and every process it started (as a power cut would); -> (stdout, stderr) so far."""
    import psutil

    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    for p in [*tree, proc]:
        try:
            os.kill(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return proc.communicate()


def run(args: Sequence[str], nproc: int, timeout: float, name: str, **env) -> Tuple[int, str, str]:
    """Run to the end -> (return code, stdout, stderr); on timeout everything is killed and the test fails."""
    import pytest

    proc = start(args, nproc, **env)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stdout, stderr = kill(proc)
        pytest.fail(f"{name}: did not finish in {timeout:.0f} s\n{stdout[-2000:]}\n{stderr[-4000:]}")
    return proc.returncode, stdout, stderr
