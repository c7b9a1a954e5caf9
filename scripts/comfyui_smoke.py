"""Start ComfyUI, wait until it serves on 127.0.0.1, check that the DreamID-V pack loaded, stop it.

Used by ``bash scripts/run.sh --smoke`` and by the ``comfyui`` tests:

    python scripts/comfyui_smoke.py --comfyui DIR --port N --pack comfyui-dreamidv -- python main.py ...

Exit 0 when the pack was imported without error; 1 otherwise (the ComfyUI log is printed).
Only the process started here is stopped (its own process group).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def _get(url: str, timeout: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read()


def start_and_check(cmd, comfyui: str, port: int, pack: str, timeout: float = 240.0, log_path=None) -> dict:
    """Run ``cmd`` in ``comfyui``; return a dict with ok, problems, times and the log text."""
    log_path = Path(log_path or Path(comfyui) / "dreamidv_smoke.log")
    t0 = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=comfyui, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    result = {"ok": False, "problems": [], "log": "", "start_s": None, "port": port}
    base = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                result["problems"].append(f"ComfyUI exited with code {proc.returncode} before serving")
                break
            if time.monotonic() - t0 > timeout:
                result["problems"].append(f"ComfyUI did not serve {base} within {timeout:.0f} s")
                break
            try:
                status, _ = _get(base + "/system_stats", timeout=2)
                if status == 200:
                    result["start_s"] = round(time.monotonic() - t0, 1)
                    break
            except OSError:
                pass
            time.sleep(0.5)
        if result["start_s"] is not None:
            status, body = _get(base + "/object_info", timeout=60)
            result["object_info_nodes"] = len(json.loads(body))
            try:
                status, body = _get(base + "/api/workflow_templates", timeout=10)
                result["workflow_templates"] = json.loads(body).get(pack, [])
            except (OSError, ValueError):
                result["workflow_templates"] = None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    text = log_path.read_text(errors="replace")
    result["log"] = text
    if result["start_s"] is not None:
        pat = re.compile(r"^\s*[\d.]+ seconds( \(IMPORT FAILED\))?: (.*)$", re.M)
        rows = [(m.group(1), m.group(2)) for m in pat.finditer(text)
                if os.path.basename(m.group(2).rstrip("/")) == pack]
        if not rows:
            result["problems"].append(f"{pack} does not appear in ComfyUI's 'Import times for custom nodes' list")
        elif any(failed for failed, _ in rows):
            result["problems"].append(f"ComfyUI reports IMPORT FAILED for {pack}")
        for line in text.splitlines():
            if "Cannot import" in line and pack in line:
                result["problems"].append(line.strip())
        result["ok"] = not result["problems"]
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--comfyui", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--pack", required=True)
    ap.add_argument("--timeout", type=float, default=240.0)
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    print(f"[dreamidv] smoke test: {' '.join(cmd)}  (in {args.comfyui})", file=sys.stderr)
    r = start_and_check(cmd, args.comfyui, args.port, args.pack, args.timeout)
    if r["ok"]:
        print(f"[dreamidv] ComfyUI started in {r['start_s']} s on 127.0.0.1:{args.port} and loaded {args.pack} "
              f"({r.get('object_info_nodes')} nodes in /object_info; pack workflows served: "
              f"{r.get('workflow_templates')}); stopped again", file=sys.stderr)
        return 0
    print(r["log"][-6000:], file=sys.stderr)
    for p in r["problems"]:
        print(f"[dreamidv] smoke test FAILED: {p}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
