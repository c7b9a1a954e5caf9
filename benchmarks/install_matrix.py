#!/usr/bin/env python3
"""What installing the pack does to a ComfyUI environment: size, time, OpenCV and onnxruntime builds.

For each Python version (pyenv's interpreters, else ``python3.X`` on PATH) and each scenario, a fresh
virtual environment gets:

1. torch 2.13.0 + torchvision (not measured: every ComfyUI has them). A local ``+cpu`` wheel folder is
   used where it has one for that Python (``--torch-find-links``); otherwise PyPI's wheel with
   ``--no-deps`` and its CUDA ``Requires-Dist`` lines removed from the installed METADATA, so that a later
   resolve through kornia -> torch sees a CPU-like torch instead of downloading ~3.4 GB of CUDA wheels
   (that torch cannot run without those libraries; nothing here imports it).
2. the scenario's "pre" packages: what the user already has (``gpu``: onnxruntime-gpu + opencv-python,
   a typical NVIDIA ComfyUI with other face/ONNX packs; ``cpu``: opencv-python only);
3. then, one by one, the pack's requirement files, each measured: wall time, bytes downloaded (pip's
   "Downloading NAME (SIZE)" lines, fresh pip cache), site-packages growth, distributions added; after
   each: the OpenCV distributions (exactly one expected), the onnxruntime distributions (``gpu``:
   onnxruntime-gpu kept and no CPU onnxruntime), what ``import onnxruntime`` really gives (version,
   providers), ``pip check``.

The measured steps see PyPI only (``PIP_CONFIG_FILE`` = devnull, no find-links), as a user does, under
``PIP_CONSTRAINT`` = the repository's constraints.txt (torch stays 2.13.0). The sam2 step runs the
README's source build (``SAM2_BUILD_CUDA=0 pip install --no-deps --no-build-isolation sam2==1.1.0``,
after ``requirements-sam2.txt`` and setuptools/wheel).

    python benchmarks/install_matrix.py                              # 3.10 3.11 3.13, scenario gpu
    python benchmarks/install_matrix.py --py 3.11 --scenario cpu --json out.json

Needs network access to PyPI and ~2 GB of disk per Python; the venvs are deleted afterwards (``--keep``).
Prints one table per Python and a summary; exits 1 when a check fails (two OpenCV builds, the GPU
onnxruntime replaced, a failed install).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OPENCV_DISTS = ("opencv-python", "opencv-python-headless", "opencv-contrib-python", "opencv-contrib-python-headless")
ORT_DISTS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-silicon", "onnxruntime-openvino",
             "onnxruntime-rocm", "onnxruntime-qnn", "onnxruntime-migraphx", "onnxruntime-cann", "onnxruntime-training")
TORCH_BASE_DEPS = ("filelock", "typing-extensions>=4.10.0", "setuptools>=77.0.3", "sympy>=1.13.3", "networkx>=2.5.1",
                   "jinja2", "fsspec>=0.8.5")
SCENARIOS = {
    # name: (pre-installed packages, steps: (label, pip arguments))
    "gpu": ("onnxruntime-gpu opencv-python",
            [("required", ["-r", "requirements.txt"]),
             ("face-gpu", ["-r", "requirements-face-gpu.txt"]),
             ("mediapipe", ["-r", "requirements-mediapipe.txt"]),
             ("sam2", ["-r", "requirements-sam2.txt"])]),
    "cpu": ("opencv-python",
            [("required", ["-r", "requirements.txt"]),
             ("face", ["-r", "requirements-face.txt"]),
             ("dwpose", ["-r", "requirements-dwpose.txt"]),
             ("mediapipe", ["-r", "requirements-mediapipe.txt"]),
             ("sam2", ["-r", "requirements-sam2.txt"])]),
}
SAM2_VERSION = "1.1.0"

PROBE = r"""
import importlib.metadata as md, json
out = {}
try:
    import onnxruntime as ort
    out["ort"] = {"version": ort.__version__, "providers": ort.get_available_providers()}
except Exception as e:
    out["ort"] = {"error": f"{type(e).__name__}: {e}"}
try:
    import cv2
    out["cv2"] = {"version": cv2.__version__}
except Exception as e:
    out["cv2"] = {"error": f"{type(e).__name__}: {e}"[:200]}
owners = {}
for d in md.distributions():
    for f in d.files or []:
        if str(f) in ("onnxruntime/__init__.py", "cv2/__init__.py"):
            owners.setdefault(str(f).split("/")[0], []).append(d.metadata["Name"])
out["owners"] = owners
print(json.dumps(out))
"""


def interpreter(version: str) -> str:
    """pyenv's newest ``version.*`` interpreter, else ``python<version>`` on PATH."""
    try:
        root = subprocess.run(["pyenv", "root"], capture_output=True, text=True, check=True).stdout.strip()
        found = sorted(Path(root, "versions").glob(f"{version}.*"),
                       key=lambda p: [int(x) for x in re.findall(r"\d+", p.name)])
        if found:
            return str(found[-1] / "bin" / "python3")
    except (OSError, subprocess.CalledProcessError):
        pass
    exe = shutil.which(f"python{version}")
    if not exe:
        raise SystemExit(f"no Python {version} found (pyenv or python{version} on PATH)")
    return exe


def du_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def downloaded_mib(pip_output: str) -> float:
    unit = {"B": 1, "kB": 1e3, "KB": 1e3, "MB": 1e6, "GB": 1e9}
    return round(sum(float(m.group(1)) * unit[m.group(2)] for m in
                     re.finditer(r"Downloading \S+ \(([0-9.]+) (B|kB|KB|MB|GB)\)", pip_output)) / 2 ** 20, 1)


class Venv:
    def __init__(self, python: str, where: Path, log: Path, constraints: Path, cache: Path):
        self.dir, self.log = where, log
        shutil.rmtree(where, ignore_errors=True)
        subprocess.run([python, "-m", "venv", str(where)], check=True)
        self.py = str(where / "bin" / "python")
        self.site = Path(subprocess.run([self.py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        capture_output=True, text=True, check=True).stdout.strip())
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
        self.env.update(PIP_CONFIG_FILE=os.devnull, PIP_CONSTRAINT=str(constraints), PIP_CACHE_DIR=str(cache),
                        PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_DEFAULT_TIMEOUT="180", PIP_NO_INPUT="1")
        for keep in ("PIP_CERT",):
            if keep in os.environ:
                self.env[keep] = os.environ[keep]

    def run(self, args, env=None, timeout=3600):
        t0 = time.monotonic()
        r = subprocess.run([self.py, *args], env=env or self.env, capture_output=True, text=True, timeout=timeout,
                           cwd=REPO)
        dt = time.monotonic() - t0
        with open(self.log, "a") as f:
            f.write(f"\n$ python {' '.join(args)}\n[rc={r.returncode} {dt:.1f}s]\n{r.stdout}\n{r.stderr}\n")
        return r, dt

    def pip_list(self) -> dict:
        r, _ = self.run(["-m", "pip", "list", "--format=json"])
        return {p["name"].lower(): p["version"] for p in json.loads(r.stdout or "[]")}

    def state(self) -> dict:
        listed = self.pip_list()
        check, _ = self.run(["-m", "pip", "check"])
        probe, _ = self.run(["-c", PROBE])
        try:
            seen = json.loads(probe.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            seen = {"error": probe.stderr[-500:]}
        return {"dists": listed, "opencv": {k: listed[k] for k in OPENCV_DISTS if k in listed},
                "ort": {k: listed[k] for k in ORT_DISTS if k in listed}, "probe": seen,
                "pip_check": [l for l in check.stdout.splitlines() if l.strip() and "No broken" not in l]}


def install_torch(v: Venv, find_links: str, torch_cache: Path) -> str:
    """torch 2.13.0 and torchvision, unmeasured; returns how."""
    env = dict(v.env, PIP_CACHE_DIR=str(torch_cache))
    if find_links:
        r, _ = v.run(["-m", "pip", "install", "--no-deps", "--no-index", "-f", find_links, "torch==2.13.0"], env)
        if r.returncode == 0:
            v.run(["-m", "pip", "install", *TORCH_BASE_DEPS], env)
            v.run(["-m", "pip", "install", "--no-deps", "torchvision==0.28.0"], env)
            return "local +cpu torch wheel"
    r, _ = v.run(["-m", "pip", "install", "--no-deps", "torch==2.13.0", "torchvision==0.28.0"], env)
    if r.returncode:
        raise SystemExit(f"torch install failed, see {v.log}")
    removed = 0
    for meta in v.site.glob("torch-*.dist-info/METADATA"):
        lines = meta.read_text().splitlines(keepends=True)
        keep = [l for l in lines if not (l.startswith("Requires-Dist:") and 'platform_system == "Linux"' in l)]
        removed += len(lines) - len(keep)
        meta.write_text("".join(keep))
    v.run(["-m", "pip", "install", *TORCH_BASE_DEPS], env)
    return f"PyPI torch --no-deps, {removed} CUDA requirements removed from its metadata"


def measure_step(v: Venv, label: str, args: list, cache: Path) -> dict:
    shutil.rmtree(cache, ignore_errors=True)
    before_list, before_size = v.pip_list(), du_bytes(v.site)
    t0 = time.monotonic()
    r, _ = v.run(["-m", "pip", "install", *args])
    rc, out = r.returncode, r.stdout
    if label == "sam2" and rc == 0:  # the README's source build after the file's hydra-core/iopath
        v.run(["-m", "pip", "install", "setuptools", "wheel"])
        r2, _ = v.run(["-m", "pip", "install", "--no-deps", "--no-build-isolation", f"sam2=={SAM2_VERSION}"],
                      dict(v.env, SAM2_BUILD_CUDA="0"))
        rc, out = r2.returncode, out + r2.stdout
    seconds = time.monotonic() - t0
    state = v.state()
    return {"step": label, "rc": rc, "seconds": round(seconds, 1), "download_MiB": downloaded_mib(out),
            "added_MiB": round((du_bytes(v.site) - before_size) / 2 ** 20, 1),
            "added": sorted(f"{k}=={x}" for k, x in state["dists"].items() if k not in before_list),
            "changed": sorted(f"{k} {before_list[k]}->{x}" for k, x in state["dists"].items()
                              if k in before_list and before_list[k] != x),
            **{k: state[k] for k in ("opencv", "ort", "probe", "pip_check")},
            "error": (r.stderr.strip().splitlines()[-8:] if rc else [])}


def problems(step: dict, scenario: str) -> list:
    bad = []
    if step["rc"]:
        bad.append(f"{step['step']}: install failed")
    if len(step["opencv"]) > 1:
        bad.append(f"{step['step']}: {len(step['opencv'])} OpenCV distributions {sorted(step['opencv'])}")
    if scenario == "gpu":
        if "onnxruntime-gpu" not in step["ort"] or "onnxruntime" in step["ort"]:
            bad.append(f"{step['step']}: onnxruntime builds now {sorted(step['ort'])}")
        if "CUDAExecutionProvider" not in step["probe"].get("ort", {}).get("providers", []):
            bad.append(f"{step['step']}: import onnxruntime gives {step['probe'].get('ort')}")
    return bad


def run_python(version: str, scenario: str, a) -> dict:
    work = Path(a.workdir)
    v = Venv(interpreter(version), work / f"venv-{version}-{scenario}", work / f"log-{version}-{scenario}.txt",
             Path(a.constraints).resolve(), work / f"cache-{version}")
    v.log.write_text("")
    record = {"python": version, "scenario": scenario,
              "interpreter": subprocess.run([v.py, "-V"], capture_output=True, text=True).stdout.strip()}
    record["torch"] = install_torch(v, a.torch_find_links, Path(a.torch_cache))
    pre, steps = SCENARIOS[scenario]
    r, dt = v.run(["-m", "pip", "install", *pre.split()])
    record["pre"] = {"packages": pre, "rc": r.returncode, "seconds": round(dt, 1), **v.state()}
    record["pre"].pop("dists")
    record["steps"] = [measure_step(v, label, args, work / f"cache-{version}") for label, args in steps]
    record["problems"] = [p for s in record["steps"] for p in problems(s, scenario)]
    if not a.keep:
        shutil.rmtree(v.dir, ignore_errors=True)
    shutil.rmtree(work / f"cache-{version}", ignore_errors=True)
    return record


def print_record(rec: dict) -> None:
    pre = rec["pre"]
    print(f"\n== Python {rec['interpreter'].split()[-1]}, scenario '{rec['scenario']}' "
          f"(torch: {rec['torch']}; pre-installed: {pre['packages']} -> ort {pre['ort']}, "
          f"providers {pre['probe'].get('ort', {}).get('providers')})")
    print(f"{'step':<10} {'rc':>2} {'time s':>7} {'download MiB':>12} {'added MiB':>9} {'dists':>5}  "
          f"{'OpenCV dists':<28} {'onnxruntime dists':<34} import onnxruntime -> providers")
    for s in rec["steps"]:
        ort = s["probe"].get("ort", {})
        seen = (f"{ort.get('version')} {ort.get('providers')}" if "version" in ort else ort.get("error", "-"))
        print(f"{s['step']:<10} {s['rc']:>2} {s['seconds']:>7} {s['download_MiB']:>12} {s['added_MiB']:>9} "
              f"{len(s['added']):>5}  {', '.join(f'{k} {x}' for k, x in s['opencv'].items()):<28} "
              f"{', '.join(f'{k} {x}' for k, x in s['ort'].items()):<34} {seen}")
    for s in rec["steps"]:
        print(f"  {s['step']}: added {' '.join(s['added']) or '-'}" + (f"; changed {s['changed']}" if s["changed"] else ""))
        print(f"  {s['step']}: pip check: {'; '.join(s['pip_check']) or 'clean'}")
        if s["error"]:
            print("  error:", *s["error"], sep="\n    ")
    print("  checks:", "; ".join(rec["problems"]) or "one OpenCV distribution, onnxruntime build kept, all installs ok")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--py", nargs="+", default=["3.10", "3.11", "3.13"], help="Python versions")
    ap.add_argument("--scenario", nargs="+", default=["gpu"], choices=sorted(SCENARIOS))
    ap.add_argument("--constraints", default=str(REPO / "constraints.txt"))
    ap.add_argument("--torch-find-links", default="/opt/wheels",
                    help="folder with torch +cpu wheels (used where it has one for the Python; '' for PyPI)")
    ap.add_argument("--torch-cache", default=str(Path(tempfile.gettempdir()) / "dreamidv-install-matrix-torch"),
                    help="pip cache for the unmeasured torch step (kept between runs)")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "dreamidv-install-matrix"))
    ap.add_argument("--keep", action="store_true", help="keep the venvs")
    ap.add_argument("--json", help="also write every figure here")
    a = ap.parse_args()
    Path(a.workdir).mkdir(parents=True, exist_ok=True)
    records = []
    for version in a.py:
        for scenario in a.scenario:
            rec = run_python(version, scenario, a)
            records.append(rec)
            print_record(rec)
            sys.stdout.flush()
            if a.json:
                Path(a.json).write_text(json.dumps(records, indent=1))
    failed = [f"{r['python']}/{r['scenario']}: {p}" for r in records for p in r["problems"]]
    print("\nsummary:", "; ".join(failed) if failed else "every check passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
