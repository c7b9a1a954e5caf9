"""A real browser (Debian's chromium, headless) opens the bundled workflow in a real ComfyUI.

The page is opened as the templates browser opens a pack's example workflow
(``/?template=dreamidv_swap&source=comfyui-dreamidv``); the test then reads the canvas through the
page's own ``app`` object: every node of the bundled workflow is on the graph and none is of a type
the frontend does not know (what ComfyUI would list in its "missing nodes" dialog). A screenshot is
kept in ``test-artifacts/``. Chromium is driven over the DevTools protocol with aiohttp (a ComfyUI
dependency), so no extra package is needed. Skips when chromium is absent.
"""
from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.comfy_harness import PACK_DIR, PACK_NAME, REPO_ROOT, ComfyServer

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

WORKFLOWS = ("dreamidv_swap", "dreamidv_irl_finetune", "syncid_data_synthesis", "dreamidv_swap_two_people")  # every bundled workflow
ARTIFACTS = REPO_ROOT / "test-artifacts"
HEADLESS_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1800,1000"]

# Runs in the page: the loaded graph, node types the frontend has no definition for, visible dialogs.
GRAPH_JS = """(() => {
  const app = window.app || (window.comfyAPI && window.comfyAPI.app && window.comfyAPI.app.app);
  if (!app || !app.graph) return null;
  const LG = window.LiteGraph || (app.graph.constructor && app.graph.constructor.LiteGraph);
  const registered = (LG && LG.registered_node_types) || {};
  const nodes = (app.graph._nodes || app.graph.nodes || []).map(n => ({
      id: n.id, type: n.type, known: !!registered[n.type], errors: !!n.has_errors}));
  const dialogs = Array.from(document.querySelectorAll('.p-dialog')).map(d => d.innerText.slice(0, 300));
  return {nodes, dialogs, n_registered: Object.keys(registered).length};
})()"""


def chromium_path():
    for name in ("chromium", "chromium-browser"):
        p = shutil.which(name)
        if p:
            return p
    return None


class CDP:
    """The smallest DevTools-protocol client: one page, request/response by id."""

    def __init__(self, ws):
        self.ws, self.next_id = ws, 0

    async def call(self, method: str, timeout: float = 30.0, **params):
        self.next_id += 1
        my_id = self.next_id
        await self.ws.send_json({"id": my_id, "method": method, "params": params})
        deadline = time.monotonic() + timeout
        while True:
            msg = await self.ws.receive_json(timeout=max(0.1, deadline - time.monotonic()))
            if msg.get("id") == my_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    async def evaluate(self, expr: str):
        res = await self.call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        return res.get("result", {}).get("value")


async def _open_and_inspect(devtools_port: int, url: str, shot: Path, timeout: float = 90.0) -> dict:
    import aiohttp

    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{devtools_port}/json/list") as r:
            pages = [t for t in await r.json() if t.get("type") == "page"]
        async with http.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            cdp = CDP(ws)
            await cdp.call("Page.enable")
            await cdp.call("Runtime.enable")
            await cdp.call("Page.navigate", url=url)
            t0, state, stable = time.monotonic(), None, 0
            while time.monotonic() - t0 < timeout:
                state = await cdp.evaluate(GRAPH_JS)
                # the page first shows an empty/default graph; wait for the template's nodes to settle
                if state and any(n["type"].startswith("DreamIDV") for n in state["nodes"]):
                    stable += 1
                    if stable >= 3:
                        break
                await asyncio.sleep(1.0)
            state = state or {}
            state["load_s"] = round(time.monotonic() - t0, 1)
            await asyncio.sleep(1.0)  # let the canvas draw
            png = await cdp.call("Page.captureScreenshot", format="png")
            shot.write_bytes(base64.b64decode(png["data"]))
            return state


@pytest.fixture(scope="module")
def browser_server(comfyui_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy_browser")
    server = ComfyServer(comfyui_dir, base / "base", base / "models")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("name", WORKFLOWS)
def test_bundled_workflow_opens_in_chromium_with_no_missing_nodes(browser_server, name):
    exe = chromium_path()
    if exe is None:
        pytest.skip("chromium is not installed (Debian: apt-get update && apt-get install -y chromium)")
    workflow = PACK_DIR / "workflows" / f"{name}.json"
    assert workflow.is_file(), f"{workflow} is missing"
    templates = browser_server.get("/api/workflow_templates")
    assert name in templates.get(PACK_NAME, []), templates
    expected = json.loads(workflow.read_text())
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / f"browser_{name}.png"
    profile = Path(tempfile.mkdtemp(prefix="dreamidv-chromium-"))
    url = f"{browser_server.url}/?template={name}&source={PACK_NAME}"
    proc = subprocess.Popen([exe, *HEADLESS_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0",
                             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        port_file, t0 = profile / "DevToolsActivePort", time.monotonic()
        while not port_file.is_file() or not port_file.read_text().strip():
            assert proc.poll() is None, f"chromium exited with code {proc.returncode}"
            assert time.monotonic() - t0 < 30, "chromium did not open its DevTools port within 30 s"
            time.sleep(0.2)
        devtools_port = int(port_file.read_text().split()[0])
        state = asyncio.run(_open_and_inspect(devtools_port, url, shot))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(profile, ignore_errors=True)
    print(f"[browser] workflow loaded in {state.get('load_s')} s; screenshot {shot}")
    assert shot.is_file() and shot.stat().st_size > 1000
    nodes = state.get("nodes") or []
    assert nodes, f"the page never showed a graph: {state}"
    types_on_canvas = sorted(n["type"] for n in nodes)
    assert types_on_canvas == sorted(n["type"] for n in expected["nodes"]), \
        f"canvas does not hold the bundled workflow: {types_on_canvas}"
    assert state.get("n_registered", 0) > 100, f"could not read the frontend's node registry: {state}"
    missing = sorted({n["type"] for n in nodes if not n["known"]})
    assert not missing, f"missing node types in the browser: {missing}"
    assert not any("missing" in d.lower() for d in state.get("dialogs", [])), state["dialogs"]
