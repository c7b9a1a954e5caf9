"""DreamID-V as a native ComfyUI model, in a real ComfyUI server (tests/comfy_harness.py) on tiny models:

* the bundled ``workflows/dreamidv_swap_native.json`` (core Load Diffusion Model, a LoRA loader, DreamID-V Apply,
  KSampler) runs, and latent previews arrive over the websocket while it samples;
* a LoRA in each of three key formats (this pack's, ComfyUI/diffusers lora_A/lora_B, kohya lora_down/lora_up +
  alpha) through core's LoraLoaderModelOnly changes the output exactly as the same LoRA merged into the
  checkpoint by hand; changing its strength reloads no model (native path and the pack's loader);
* the pack's own path: previews while DreamID-V Sampler samples; after a run with ``offload_blocks`` ComfyUI's
  model manager reports the model's device memory and frees it (``/free``).

The server runs with ``--preview-method latent2rgb``; a test-only node folder (written here, never shipped)
reports ComfyUI's loaded models.
"""
from __future__ import annotations

import asyncio
import json
import struct
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.comfy_harness import PACK_DIR, ComfyServer, ui_to_api
from tests.test_lora_formats import adapters, hand_merge, lora_file
from tests.test_workflow import FRAMES, H, W, _dwpose_models, face_frames, write_clip

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

WORKFLOW = PACK_DIR / "workflows" / "dreamidv_swap_native.json"
LORA_LAYERS = ("blocks.0.self_attn.q", "blocks.1.ffn.2", "blocks.0.cross_attn.o")  # layers of core's Wan model
FORMATS = ("pack", "comfy", "kohya")

PROBE = '''"""Test-only node (written by tests/test_native_workflow.py, never shipped): reports ComfyUI's loaded models."""
import json
import sys

import comfy.model_management as mm


def _pack_dits():
    """The pack's loaded DiTs (its loader's caches: handles and the file's weights)."""
    for name, mod in list(sys.modules.items()):
        if name.endswith(".nodes.loaders") and hasattr(mod, "_BASES"):
            return list({id(p.model): p.model for _, p in mod._BASES.items()}.values())
    return []


class DreamIDVTestProbe:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"after": ("IMAGE",), "tag": ("STRING", {"default": ""})}}

    RETURN_TYPES = ("STRING",)
    FUNCTION = "probe"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def probe(self, after, tag):
        loaded = [{"model": type(lm.model.model).__name__, "patcher": type(lm.model).__name__,
                   "size": lm.model.model_size(), "loaded": lm.model_loaded_memory(),
                   "streamed": list(getattr(getattr(lm.model.model, "block_offload", None), "indices", None) or [])}
                  for lm in mm.current_loaded_models if lm.model is not None]
        dits = [{"streamed": list(getattr(d.block_offload, "indices", None) or []),
                 "devices": sorted({str(p.device) for p in d.parameters()})} for d in _pack_dits()]
        text = json.dumps({"tag": tag, "loaded": loaded, "pack_models": dits})
        return {"ui": {"text": [text]}, "result": (text,)}


NODE_CLASS_MAPPINGS = {"DreamIDVTestProbe": DreamIDVTestProbe}
'''


# ----------------------------------------------------------------------------------------- fixtures
def core_tiny_checkpoint(path: Path, merged=None):
    """A tiny DreamID-V (full) ComfyUI's Wan detection can load; ``merged``: (format, adapters) merged in by hand."""
    from dreamidv_core.models.dit import DreamIDVTransformer, init_random_
    from dreamidv_core.weights.checkpoints import save_dit
    from tests.test_native import core_tiny

    dit = init_random_(DreamIDVTransformer(core_tiny("full", num_layers=4)), seed=1)
    if merged is not None:
        hand_merge(dit, merged[1], merged[0], 1.0, LORA_LAYERS)
    save_dit(dit, path)
    return dit


def _build_models(models: Path, loras: Path) -> None:
    from dreamidv_core.models.vae import WanVAE, WanVAEConfig
    from safetensors.torch import save_file
    from tests.onnx_models import build_pack

    for f in ("diffusion_models", "vae", "dreamidv", "dwpose", "insightface"):
        (models / f).mkdir(parents=True, exist_ok=True)
    loras.mkdir(parents=True, exist_ok=True)
    dit = core_tiny_checkpoint(models / "diffusion_models" / "dreamidv.safetensors")
    ad = adapters(dit)
    for fmt in FORMATS:
        lora_file(loras, fmt, ad, LORA_LAYERS)
        core_tiny_checkpoint(models / "diffusion_models" / f"merged_{fmt}.safetensors", (fmt, ad))
    torch.manual_seed(0)
    vae = WanVAE(WanVAEConfig(dim=8, num_res_blocks=2))
    with torch.no_grad():
        for p in vae.parameters():
            p.normal_(0, 0.05)
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(models / "vae" / "wan_2.1_vae.safetensors"))
    save_file({"context": torch.randn(8, 4096) * 0.1}, str(models / "dreamidv" / "context.safetensors"))
    _dwpose_models(models / "dwpose")
    build_pack(models / "insightface", "antelopev2")


@pytest.fixture(scope="module")
def server(comfyui_dir, tmp_path_factory):
    from PIL import Image
    from tests.onnx_models import paint_face

    root = tmp_path_factory.mktemp("comfy_native")
    s = ComfyServer(comfyui_dir, root / "base", root / "models", extra_args=["--preview-method", "latent2rgb"])
    s.prepare()
    t0 = time.monotonic()
    _build_models(root / "models", s.base_dir / "models" / "loras")
    probe = s.base_dir / "custom_nodes" / "dreamidv_test_probe"
    probe.mkdir(parents=True, exist_ok=True)
    (probe / "__init__.py").write_text(PROBE)
    write_clip(s.input_dir / "clip.mp4", face_frames())
    ref = np.full((96, 128, 3), 90, np.uint8)
    paint_face(ref, 8, 5, green=40, seed=3)
    Image.fromarray(ref).save(s.input_dir / "reference.png")
    build_s = time.monotonic() - t0
    s.start()
    print(f"[native workflow] models built in {build_s:.1f} s; ComfyUI started in {s.start_s} s")
    try:
        yield s
    finally:
        s.stop()


# ----------------------------------------------------------------------------------------- prompts
def set_inputs(api: dict, changes: dict) -> dict:
    for cls, values in changes.items():
        nodes = [n for n in api.values() if n["class_type"] == cls]
        assert nodes, f"no {cls} node"
        for n in nodes:
            n["inputs"].update(values)
    return api


def native_prompt(server, lora=None, strength=1.0, unet="dreamidv.safetensors", steps=2, seed=0, tag=""):
    """The bundled native workflow in API format on the tiny models (LoRA node enabled when ``lora``), plus a
    PreviewImage of the decoded frames (lossless) and the probe."""
    wf = json.loads(WORKFLOW.read_text())
    for node in wf["nodes"]:
        if node["type"] == "LoraLoaderModelOnly" and lora:
            node["mode"] = 0
    api = ui_to_api(wf, server.object_info())
    set_inputs(api, {
        "LoadVideo": {"file": "clip.mp4"}, "LoadImage": {"image": "reference.png"},
        "UNETLoader": {"unet_name": unet}, "DreamIDVApply": {"model_name": unet},
        "VAELoader": {"vae_name": "wan_2.1_vae.safetensors"},
        "DreamIDVTextContext": {"precomputed_context": "context.safetensors"},
        "DreamIDVPoseExtract": {"source": "dwpose", "detector_model": "yolox_l.onnx",
                                "pose_model": "dw-ll_ucoco_384.onnx"},
        "DreamIDVConditioning": {"width": W, "height": H},
        "KSampler": {"steps": steps, "seed": seed},
        "SaveVideo": {"filename_prefix": f"native_test/{uuid.uuid4().hex[:8]}"},
    })
    if lora:
        set_inputs(api, {"LoraLoaderModelOnly": {"lora_name": f"{lora}.safetensors", "strength_model": strength}})
    decode = next(k for k, n in api.items() if n["class_type"] == "DreamIDVDecode")
    sampler = next(k for k, n in api.items() if n["class_type"] == "KSampler")
    api["900"] = {"class_type": "PreviewImage", "inputs": {"images": [decode, 0]}}
    api["902"] = {"class_type": "SaveLatent", "inputs": {"samples": [sampler, 0],
                                                         "filename_prefix": f"native_latent/{uuid.uuid4().hex[:8]}"}}
    api["901"] = {"class_type": "DreamIDVTestProbe", "inputs": {"after": [decode, 0], "tag": tag or uuid.uuid4().hex}}
    return api


def with_defaults(api: dict, info: dict) -> dict:
    """Every widget a node's schema has and the prompt does not set, at its default."""
    from tests.build_workflow import _default
    from tests.comfy_harness import _input_specs, _is_widget

    for node in api.values():
        for name, spec in _input_specs(info[node["class_type"]]):
            if _is_widget(spec) and name not in node["inputs"]:
                node["inputs"][name] = _default(spec)
    return api


def pack_prompt(server, lora=None, strength=1.0, offload_blocks=0, tag=""):
    """The pack's own path: DreamIDVModelLoader -> PoseGuider -> DreamIDVSampler, then the probe."""
    loader = {"model_name": "dreamidv.safetensors", "weight_dtype": "fp32", "attention": "sdpa", "device": "auto",
              "offload_blocks": offload_blocks, "lora": f"{lora}.safetensors" if lora else "none",
              "lora_strength": strength, "id_projection": "none"}
    geom = {"width": W, "height": H, "frame_num": 0, "window": 81, "overlap": 16}
    return with_defaults({
        "1": {"class_type": "LoadVideo", "inputs": {"file": "clip.mp4"}},
        "2": {"class_type": "GetVideoComponents", "inputs": {"video": ["1", 0]}},
        "3": {"class_type": "LoadImage", "inputs": {"image": "reference.png"}},
        "4": {"class_type": "DreamIDVModelLoader", "inputs": loader},
        "5": {"class_type": "VAELoader", "inputs": {"vae_name": "wan_2.1_vae.safetensors"}},
        "6": {"class_type": "DreamIDVTextContext", "inputs": {"text_encoder": "none",
                                                              "precomputed_context": "context.safetensors"}},
        "7": {"class_type": "DreamIDVPoseExtract", "inputs": {"frames": ["2", 0], "reference": ["3", 0],
                                                              "source": "dwpose", "detector_model": "yolox_l.onnx",
                                                              "pose_model": "dw-ll_ucoco_384.onnx"}},
        "8": {"class_type": "DreamIDVPoseGuider", "inputs": {"model": ["4", 0], "pose_video": ["7", 0], **geom}},
        "9": {"class_type": "DreamIDVIdentityEncoder", "inputs": {"reference": ["3", 0], "video": ["2", 0],
                                                                  "vae": ["5", 0], "insightface_pack": "antelopev2",
                                                                  "detection_size": 128, "width": W, "height": H}},
        "10": {"class_type": "DreamIDVSampler", "inputs": {
            "model": ["4", 0], "vae": ["5", 0], "positive": ["6", 0], "identity": ["9", 0], "video": ["2", 0],
            "mask": ["7", 1], "pose_tokens": ["8", 0], **geom, "steps": 2, "shift": 5.0, "identity_guidance": 4.0,
            "seed": 0, "sampler": "unipc", "batch_guidance": False, "background_strength": 0.0, "step_cache": 0.0,
            "vae_tile": 0, "vae_tile_overlap": 8}},
        "11": {"class_type": "PreviewImage", "inputs": {"images": ["10", 0]}},
        "12": {"class_type": "DreamIDVTestProbe", "inputs": {"after": ["10", 0], "tag": tag or uuid.uuid4().hex}},
    }, server.object_info())


async def _run_ws(server: ComfyServer, prompt: dict, timeout: float):
    import aiohttp

    client_id = uuid.uuid4().hex
    seen = {"previews": [], "progress": [], "end": None}
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(f"{server.url.replace('http', 'ws')}/ws?clientId={client_id}") as ws:
            reply = await (await http.post(f"{server.url}/prompt", json={"prompt": prompt, "client_id": client_id})).json()
            assert "prompt_id" in reply, reply
            pid = reply["prompt_id"]
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and seen["end"] is None:
                msg = await ws.receive(timeout=max(0.1, deadline - time.monotonic()))
                if msg.type == aiohttp.WSMsgType.BINARY:
                    kind = struct.unpack(">I", msg.data[:4])[0]
                    if kind in (1, 4):  # PREVIEW_IMAGE, PREVIEW_IMAGE_WITH_METADATA
                        seen["previews"].append(len(seen["progress"]))
                elif msg.type == aiohttp.WSMsgType.TEXT:
                    data = json.loads(msg.data)
                    kind, body = data.get("type"), data.get("data", {})
                    if kind == "progress":
                        seen["progress"].append(body.get("node"))
                    elif kind in ("execution_success", "execution_error", "execution_interrupted") and \
                            body.get("prompt_id") == pid:
                        seen["end"] = (kind, body)
    seen["prompt_id"] = pid
    return seen


def run(server: ComfyServer, prompt: dict, timeout: float = 300):
    """Run a prompt watching the websocket -> (history entry, websocket events)."""
    seen = asyncio.run(_run_ws(server, prompt, timeout))
    assert seen["end"] is not None and seen["end"][0] == "execution_success", seen["end"] or server.log()[-3000:]
    return server.wait(seen["prompt_id"], 30), seen


def preview_frames(server: ComfyServer, entry: dict, node: str) -> np.ndarray:
    from PIL import Image

    images = entry["outputs"][node]["images"]
    return np.stack([np.asarray(Image.open(server.base_dir / item["type"] / item.get("subfolder", "") /
                                           item["filename"])) for item in images]).astype(np.int16)


def saved_latent(server: ComfyServer, entry: dict, node: str = "902") -> torch.Tensor:
    from safetensors.torch import load_file

    item = entry["outputs"][node]["latents"][0]
    return load_file(str(server.output_dir / item.get("subfolder", "") / item["filename"]))["latent_tensor"]


def probe(entry: dict, node: str) -> dict:
    return json.loads(entry["outputs"][node]["text"][0])


# ----------------------------------------------------------------------------------------- tests
def test_native_workflow_matches_node_schemas(server):
    """The committed file is what tests/build_native_workflow.py makes from the live schemas."""
    from tests import build_native_workflow

    expected = build_native_workflow.build(server.object_info())
    have = json.loads(WORKFLOW.read_text())
    strip = lambda wf: ([{k: n[k] for k in ("id", "type", "inputs", "outputs", "widgets_values", "mode")}  # noqa
                         for n in wf["nodes"]], wf["links"])
    assert strip(have) == strip(expected), "stale: python -m tests.build_native_workflow"
    types = {n["type"] for n in have["nodes"]}
    assert {"UNETLoader", "LoraLoaderModelOnly", "DreamIDVApply", "KSampler"} <= types


def test_native_workflow_runs_and_previews_arrive_during_sampling(server):
    import av

    entry, seen = run(server, native_prompt(server))
    sampler = {k for k, n in native_prompt(server).items() if n["class_type"] == "KSampler"}
    sampling = [i for i, node in enumerate(seen["progress"]) if node in sampler]
    assert sampling, f"no KSampler progress: {seen['progress']}"
    during = [i for i in seen["previews"] if sampling[0] <= i <= sampling[-1] + 1]
    assert during, f"no preview image while KSampler sampled (previews after progress #{seen['previews']})"
    videos = [server.output_dir / v.get("subfolder", "") / v["filename"] for o in entry["outputs"].values()
              for v in o.get("images", []) + o.get("videos", []) if v.get("type") == "output"]
    assert len(videos) == 1
    with av.open(str(videos[0])) as c:
        assert len(list(c.decode(video=0))) == FRAMES and c.streams.audio
    frames = preview_frames(server, entry, "900")
    assert frames.shape == (FRAMES, H, W, 3)
    print(f"[native workflow] ran; {len(during)} previews during {len(sampling)} sampler progress updates")


def test_lora_formats_change_the_output_like_a_hand_merge_and_strength_reloads_nothing(server):
    base = saved_latent(server, run(server, native_prompt(server))[0])
    for fmt in FORMATS:
        patched = saved_latent(server, run(server, native_prompt(server, lora=fmt))[0])
        merged = saved_latent(server, run(server, native_prompt(server, unet=f"merged_{fmt}.safetensors"))[0])
        change = (patched - base).abs().mean().item()
        err = (patched - merged).abs().max().item()
        print(f"[native workflow] LoRA {fmt}: max |LoRA - merged by hand| = {err:.1e}, mean |LoRA - none| = "
              f"{change:.3f} (latent)")
        assert err < 1e-4 and change > 1e-2, (fmt, err, change)
    # a new strength re-runs the LoRA loader and what follows; the checkpoint is not loaded again
    patched = saved_latent(server, run(server, native_prompt(server, lora="pack"))[0])
    loads = server.log().count("model_type FLOW"), server.log().count("DreamID-V: pose branch of")
    half = saved_latent(server, run(server, native_prompt(server, lora="pack", strength=0.5))[0])
    assert (server.log().count("model_type FLOW"), server.log().count("DreamID-V: pose branch of")) == loads
    assert (half - base).abs().mean().item() > 1e-3 and (half - patched).abs().mean().item() > 1e-3
    # the pack's loader: the LoRA is a patch too
    run(server, pack_prompt(server, lora="pack", strength=1.0))
    reads = server.log().count("DreamID-V: loaded dreamidv.safetensors")
    run(server, pack_prompt(server, lora="pack", strength=0.5))
    assert server.log().count("DreamID-V: loaded dreamidv.safetensors") == reads == 1


def test_pack_path_previews_and_offload_is_accounted_and_freed(server):
    entry, seen = run(server, pack_prompt(server, offload_blocks=3, tag="after run"))
    assert seen["previews"], "no preview image while DreamID-V Sampler sampled"
    report = probe(entry, "12")
    dit = [m for m in report["loaded"] if m["model"] == "DreamIDVTransformer"]
    assert len(dit) == 1 and dit[0]["patcher"] == "DiTPatcher", report
    assert dit[0]["streamed"] == [1, 2, 3] and 0 < dit[0]["loaded"] < dit[0]["size"], report
    server.request("/free", {"unload_models": True, "free_memory": True})
    time.sleep(2.5)  # the prompt worker handles the flags within a second
    after = {k: v for k, v in pack_prompt(server, offload_blocks=3).items() if k in ("3",)}
    after["20"] = {"class_type": "DreamIDVTestProbe", "inputs": {"after": ["3", 0], "tag": "after free"}}
    report = probe(run(server, after)[0], "20")
    assert not [m for m in report["loaded"] if m["model"] == "DreamIDVTransformer"], report
    assert report["pack_models"] and all(not m["streamed"] for m in report["pack_models"]), report
