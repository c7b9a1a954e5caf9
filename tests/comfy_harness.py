"""A real ComfyUI server for the workflow tests, and a UI-format -> API-format workflow converter.

:class:`ComfyServer` starts ``main.py`` of a ComfyUI folder (``$COMFYUI_DIR``) on 127.0.0.1 and a
free port, with a temporary ``--base-directory`` (custom_nodes/ holds a symlink to this pack; input/,
output/, user/ are fresh) and an ``extra_model_paths.yaml`` naming the model folders. It runs in its
own process group and :meth:`ComfyServer.stop` ends exactly that group.

:func:`ui_to_api` turns what the canvas saves (``nodes`` + ``links`` + ``widgets_values``) into the
``/prompt`` format (``{id: {"class_type", "inputs"}}``) using ``/object_info`` to name the widget
values, the way the frontend does: widgets follow the node's input order; an INT with
``control_after_generate`` (or named seed/noise_seed) stores one extra value ("randomize", ...); an
upload combo (``image_upload``/``video_upload``/``audio_upload``) may store one extra value; a widget
converted to a socket keeps its slot in ``widgets_values`` but takes the linked value.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

REPO_ROOT = Path(__file__).resolve().parent.parent
# The pack folder ComfyUI loads (default: this checkout; DREAMIDV_PACK_DIR tests another copy).
PACK_DIR = Path(os.environ.get("DREAMIDV_PACK_DIR") or REPO_ROOT)
PACK_NAME = "comfyui-dreamidv"  # the folder name ComfyUI sees (custom_nodes/<PACK_NAME>)
# Model folders the tests point at through extra_model_paths.yaml.
MODEL_FOLDERS = ("diffusion_models", "vae", "text_encoders", "mediapipe", "insightface", "sam2",
                 "dwpose", "dreamidv")

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
UPLOAD_FLAGS = ("image_upload", "video_upload", "audio_upload", "animated_image_upload")
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PromptFailed(AssertionError):
    """A prompt ended with status error (``messages`` holds ComfyUI's execution_error etc.)."""

    def __init__(self, prompt_id: str, entry: dict):
        self.prompt_id, self.entry = prompt_id, entry
        self.error = execution_error(entry) or {}
        super().__init__(f"prompt {prompt_id} failed: {self.error.get('exception_type')}: "
                         f"{self.error.get('exception_message')} (node {self.error.get('node_type')})")


def execution_error(entry: dict) -> Optional[dict]:
    """The ``execution_error`` message of a /history entry, if any."""
    for kind, data in (entry.get("status") or {}).get("messages", []):
        if kind == "execution_error":
            return data
    return None


def write_extra_model_paths(path: Path, models_dir: Path, folders: Iterable[str] = MODEL_FOLDERS) -> Path:
    """An extra_model_paths.yaml giving each of ``folders`` as ``models_dir/<folder>/``."""
    lines = ["dreamidv_tests:", f"    base_path: {models_dir}"]
    for f in folders:
        (models_dir / f).mkdir(parents=True, exist_ok=True)
        lines.append(f"    {f}: {f}/")
    path.write_text("\n".join(lines) + "\n")
    return path


class ComfyServer:
    """One ComfyUI process. ``with ComfyServer(...) as s:`` starts it and always stops it."""

    def __init__(self, comfyui_dir: Path, base_dir: Path, models_dir: Path, pack_dir: Path = PACK_DIR,
                 pack_name: str = PACK_NAME, port: Optional[int] = None, python: str = sys.executable,
                 extra_args: Iterable[str] = ()):
        self.comfyui_dir, self.base_dir, self.models_dir = Path(comfyui_dir), Path(base_dir), Path(models_dir)
        self.pack_dir, self.pack_name = Path(pack_dir), pack_name
        self.port = port or free_port()
        self.python, self.extra_args = python, list(extra_args)
        self.proc: Optional[subprocess.Popen] = None
        self.log_path = self.base_dir / "comfyui.log"
        self.start_s: Optional[float] = None
        self._object_info: Optional[dict] = None

    # ----------------------------------------------------------------- process
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def input_dir(self) -> Path:
        return self.base_dir / "input"

    @property
    def output_dir(self) -> Path:
        return self.base_dir / "output"

    def prepare(self) -> None:
        for sub in ("custom_nodes", "input", "output", "temp", "user"):
            (self.base_dir / sub).mkdir(parents=True, exist_ok=True)
        link = self.base_dir / "custom_nodes" / self.pack_name
        if not link.exists():
            link.symlink_to(self.pack_dir, target_is_directory=True)
        self.yaml_path = write_extra_model_paths(self.base_dir / "extra_model_paths.yaml", self.models_dir)

    def command(self) -> List[str]:
        return [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
                "--base-directory", str(self.base_dir), "--extra-model-paths-config", str(self.yaml_path),
                "--disable-auto-launch", *self.extra_args]

    def start(self, timeout: float = 180.0) -> "ComfyServer":
        self.prepare()
        t0 = time.monotonic()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.setdefault("OMP_NUM_THREADS", str(min(os.cpu_count() or 2, 4)))
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.command(), cwd=self.comfyui_dir, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True, env=env)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with code {self.proc.returncode} before serving:\n"
                                   + self.log()[-4000:])
            if time.monotonic() - t0 > timeout:
                self.stop()
                raise RuntimeError(f"ComfyUI did not serve {self.url} within {timeout:.0f} s:\n" + self.log()[-4000:])
            try:
                self.get("/system_stats", timeout=2)
                break
            except (OSError, ValueError):
                time.sleep(0.3)
        self.start_s = round(time.monotonic() - t0, 1)
        return self

    def stop(self) -> None:
        """Stop the process group started here (SIGTERM, then SIGKILL after 15 s)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        except ProcessLookupError:
            pass

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def import_problems(self) -> List[str]:
        """Problems loading this pack, from ComfyUI's log ("IMPORT FAILED", tracebacks naming it)."""
        text, problems = self.log(), []
        rows = [(m.group(1), m.group(2)) for m in
                re.finditer(r"^\s*[\d.]+ seconds( \(IMPORT FAILED\))?: (.*)$", text, re.M)
                if os.path.basename(m.group(2).rstrip("/")) == self.pack_name]
        if not rows:
            problems.append(f"{self.pack_name} is not in ComfyUI's 'Import times for custom nodes' list")
        elif any(failed for failed, _ in rows):
            problems.append(f"ComfyUI reports IMPORT FAILED for {self.pack_name}")
        problems += [ln.strip() for ln in text.splitlines() if self.pack_name in ln
                     and ("Cannot import" in ln or "Error" in ln or "Traceback" in ln)]
        return problems

    # ----------------------------------------------------------------- HTTP
    def request(self, path: str, data: Any = None, timeout: float = 30.0, raw: bool = False):
        body = None if data is None else json.dumps(data).encode()
        req = urllib.request.Request(self.url + path, data=body, method="POST" if body is not None else "GET",
                                     headers={"Content-Type": "application/json"} if body is not None else {})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            payload = r.read()
        if raw:
            return payload
        return json.loads(payload) if payload.strip() else None

    def get(self, path: str, timeout: float = 30.0):
        return self.request(path, timeout=timeout)

    def object_info(self, refresh: bool = False) -> dict:
        if self._object_info is None or refresh:
            self._object_info = self.get("/object_info", timeout=120)
        return self._object_info

    def queue_prompt(self, prompt: dict, client_id: str = "dreamidv-tests") -> str:
        """POST /prompt; returns the prompt id. A validation failure raises ValueError with the reply."""
        try:
            reply = self.request("/prompt", {"prompt": prompt, "client_id": client_id})
        except urllib.error.HTTPError as e:
            raise ValueError(f"/prompt refused the prompt: {e.read().decode(errors='replace')}") from None
        return reply["prompt_id"]

    def history(self, prompt_id: str) -> Optional[dict]:
        return (self.get(f"/history/{prompt_id}") or {}).get(prompt_id)

    def wait(self, prompt_id: str, timeout: float = 120.0, poll: float = 0.25) -> dict:
        """Poll /history until the prompt is done; returns its entry (status error included)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            entry = self.history(prompt_id)
            if entry and entry.get("status"):  # ComfyUI writes history only once a prompt is done
                return entry
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError("ComfyUI died while running the prompt:\n" + self.log()[-4000:])
            time.sleep(poll)
        raise TimeoutError(f"prompt {prompt_id} not done after {timeout:.0f} s; queue: {self.queue()}")

    def run(self, prompt: dict, timeout: float = 120.0) -> dict:
        """Queue, wait, raise :class:`PromptFailed` unless it succeeded; returns the /history entry."""
        pid = self.queue_prompt(prompt)
        entry = self.wait(pid, timeout)
        if entry["status"].get("status_str") != "success":
            raise PromptFailed(pid, entry)
        return entry

    def interrupt(self) -> None:
        self.request("/interrupt", {})

    def queue(self) -> dict:
        return self.get("/queue")

    def progress_seen(self) -> bool:
        """Whether anything is executing now (the running part of /queue)."""
        return bool(self.queue().get("queue_running"))


# --------------------------------------------------------------------------- UI -> API format
def _input_specs(info: dict) -> List[tuple]:
    """[(name, spec)] in the node's input order (required, then optional)."""
    order = info.get("input_order") or {k: list(v.keys()) for k, v in info.get("input", {}).items()}
    out = []
    for group in ("required", "optional"):
        specs = info.get("input", {}).get(group, {}) or {}
        for name in order.get(group, list(specs)):
            if name in specs:
                out.append((name, specs[name]))
    return out


def _is_widget(spec) -> bool:
    kind = spec[0] if isinstance(spec, (list, tuple)) and spec else spec
    opts = spec[1] if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict) else {}
    if opts.get("forceInput") or opts.get("rawLink"):
        return False
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _has_control(name: str, spec) -> bool:
    opts = spec[1] if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict) else {}
    if spec[0] != "INT":
        return False
    if "control_after_generate" in opts:
        return bool(opts["control_after_generate"])
    return name in ("seed", "noise_seed")


def _has_upload(spec) -> bool:
    opts = spec[1] if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict) else {}
    return any(opts.get(flag) for flag in UPLOAD_FLAGS)


def widget_names(info: dict) -> List[str]:
    """The node's widget input names in order (what its ``widgets_values`` describe)."""
    return [name for name, spec in _input_specs(info) if _is_widget(spec)]


def map_widget_values(info: dict, values: list) -> Dict[str, Any]:
    """Name ``widgets_values`` by the node's widget inputs, skipping the frontend's extra values."""
    specs = [(n, s) for n, s in _input_specs(info) if _is_widget(s)]
    values = list(values or [])
    out, i = {}, 0
    for k, (name, spec) in enumerate(specs):
        if i >= len(values):
            break
        out[name] = values[i]
        i += 1
        later = len(specs) - k - 1
        if _has_control(name, spec) and i < len(values) and values[i] in CONTROL_VALUES:
            i += 1
        elif _has_upload(spec) and len(values) - i > later:
            i += 1
    return out


def _resolve_links(wf: dict) -> Dict[int, tuple]:
    """link id -> (origin node id, origin slot), following Reroute nodes to their source."""
    nodes = {n["id"]: n for n in wf["nodes"]}
    links = {}
    for link in wf.get("links", []):
        if isinstance(link, dict):
            links[link["id"]] = (link["origin_id"], link["origin_slot"])
        else:
            links[link[0]] = (link[1], link[2])

    def follow(lid):
        seen = set()
        while lid in links:
            origin, slot = links[lid]
            node = nodes.get(origin)
            if node is None or node["type"] != "Reroute" or origin in seen:
                return origin, slot
            seen.add(origin)
            lid = (node.get("inputs") or [{}])[0].get("link")
        return None
    return {lid: follow(lid) for lid in links}


def ui_to_api(wf: dict, object_info: dict) -> Dict[str, dict]:
    """A UI-format workflow (canvas JSON) -> API format for POST /prompt.

    Muted nodes (mode 2) are dropped, bypassed ones (mode 4) are passed through (each output takes
    the first input of the same type). PrimitiveNode values go into the widgets they feed.
    Raises KeyError naming a node type that ``object_info`` does not know (a missing node).
    """
    nodes = {n["id"]: n for n in wf["nodes"]}
    links = _resolve_links(wf)
    unknown = sorted({n["type"] for n in wf["nodes"] if n["type"] not in FRONTEND_ONLY
                      and n["type"] not in object_info})
    if unknown:
        raise KeyError(f"node types missing from /object_info: {unknown}")

    def source(lid):
        """(node id, slot) feeding link ``lid``, through bypassed nodes; None if nothing does."""
        while lid is not None and links.get(lid) is not None:
            origin, slot = links[lid]
            node = nodes[origin]
            if node.get("mode", 0) == 4:
                out_type = node["outputs"][slot]["type"]
                nxt = [i.get("link") for i in node.get("inputs", []) if i.get("type") == out_type]
                lid = nxt[0] if nxt else None
                continue
            if node.get("mode", 0) == 2:
                return None
            return origin, slot
        return None

    prompt = {}
    for nid, node in nodes.items():
        if node["type"] in FRONTEND_ONLY or node.get("mode", 0) in (2, 4):
            continue
        info = object_info[node["type"]]
        inputs: Dict[str, Any] = map_widget_values(info, node.get("widgets_values"))
        for inp in node.get("inputs") or []:
            src = source(inp.get("link"))
            name = (inp.get("widget") or {}).get("name") or inp["name"]
            if src is None:
                continue
            origin = nodes[src[0]]
            if origin["type"] == "PrimitiveNode":  # a value, not a link
                inputs[name] = (origin.get("widgets_values") or [None])[0]
            else:
                inputs[name] = [str(src[0]), src[1]]
        prompt[str(nid)] = {"class_type": node["type"], "inputs": inputs,
                            "_meta": {"title": node.get("title") or info.get("display_name") or node["type"]}}
    return prompt


def missing_node_types(wf: dict, object_info: dict) -> List[str]:
    return sorted({n["type"] for n in wf["nodes"] if n["type"] not in FRONTEND_ONLY
                   and n["type"] not in object_info})
