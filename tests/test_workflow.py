"""The proof in a real ComfyUI: the pack loads, the bundled workflow runs through /prompt on tiny
models and a short generated clip with audio, interruption is honoured, bad input fails cleanly.

One ComfyUI process serves the whole module (tests/comfy_harness.py): a temporary base directory
with this pack symlinked into custom_nodes/ and an extra_model_paths.yaml pointing every model
folder at tiny random-weight models built here. The workflow is ``workflows/dreamidv_swap.json``
converted to API format with ``/object_info``, then pointed at the test files.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from tests.comfy_harness import (PACK_DIR, PACK_NAME, ComfyServer, PromptFailed, execution_error,
                                 missing_node_types, ui_to_api)

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

WORKFLOW = PACK_DIR / "workflows" / "dreamidv_swap.json"
PACK_NODES = ("DreamIDVModelLoader", "DreamIDVTextContext", "DreamIDVPoseGuider", "DreamIDVSampler",
              "DreamIDVPoseExtract", "DreamIDVIdentityEncoder", "DreamIDVBackgroundComposite")
FPS, FRAMES, W, H = 12, 9, 64, 48
NTSC = Fraction(30000, 1001)  # an odd frame rate, kept exactly from the source to the saved video
LONG_FRAMES = 19  # with window 9 / overlap 4: 3 windows over 21 padded frames
SAMPLE_RATE = 16000


# ----------------------------------------------------------------------------------- test inputs
def write_clip(path: Path, frames: np.ndarray, fps=FPS, audio: bool = True) -> Path:
    """uint8 [F, H, W, 3] -> H.264 mp4 (+ an AAC 440 Hz tone as long as the video) with PyAV (4:4:4 for an odd
    width or height, which 4:2:0 cannot hold); ``fps`` an int or a Fraction (30000/1001)."""
    import av

    with av.open(str(path), "w") as out:
        vs = out.add_stream("libx264", rate=fps)
        odd = frames.shape[1] % 2 or frames.shape[2] % 2
        vs.width, vs.height, vs.pix_fmt = frames.shape[2], frames.shape[1], "yuv444p" if odd else "yuv420p"
        vs.options = {"crf": "1", "preset": "ultrafast"}
        streams = [vs]
        if audio:
            aus = out.add_stream("aac", rate=SAMPLE_RATE)
            aus.layout = "mono"
        for f in frames:
            for pkt in vs.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(pkt)
        for pkt in vs.encode():
            out.mux(pkt)
        if audio:
            n = int(SAMPLE_RATE * len(frames) / fps)
            t = np.arange(n) / SAMPLE_RATE
            tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]
            chunk = 1024
            for i in range(0, n, chunk):
                af = av.AudioFrame.from_ndarray(tone[:, i:i + chunk].copy(), format="fltp", layout="mono")
                af.sample_rate, af.pts, af.time_base = SAMPLE_RATE, i, Fraction(1, SAMPLE_RATE)
                for pkt in aus.encode(af):
                    out.mux(pkt)
            for pkt in aus.encode():
                out.mux(pkt)
        del streams
    return path


def face_frames(count: int = FRAMES, face: bool = True, size=(H, W)) -> np.ndarray:
    """A moving face marker (tests/onnx_models.paint_face) on a grey background."""
    from tests.onnx_models import paint_face

    frames = np.full((count, *size, 3), 90, np.uint8)
    if face:
        for i in range(count):
            paint_face(frames[i], 4 + (i % 2), 3, green=30, seed=1)
    return frames


def _dwpose_models(folder: Path) -> None:
    """DWPose stand-ins (tests/onnx_pose_models.py): a detector that finds nobody (the whole frame is
    the person box) and a pose model whose 133 keypoints are a body plus a 68-point face ring in the
    middle of the crop; ``dw_noface.onnx`` reports every keypoint with score 0 (a video without a face)."""
    from tests.onnx_pose_models import SIMCC_X, SIMCC_Y, dwpose_model, yolox_model

    yolox_model(folder / "yolox_l.onnx", {})
    k = np.arange(133)
    xs = np.full(133, SIMCC_X // 2) + (k % 7 - 3) * 40
    ys = np.full(133, SIMCC_Y // 2) + (k % 5 - 2) * 60
    t = np.linspace(0, 2 * np.pi, 68, endpoint=False)
    xs[23:91] = SIMCC_X // 2 + 70 * np.cos(t)
    ys[23:91] = SIMCC_Y // 3 + 90 * np.sin(t)
    dwpose_model(folder / "dw-ll_ucoco_384.onnx", xs, ys, np.ones(133))
    dwpose_model(folder / "dw_noface.onnx", xs, ys, np.zeros(133))
    # two people side by side (stride-32 anchors at grid x 5 and 15, y 7 of the 640 letterbox): each gets the
    # pose model's face ring in its own box, so a clip shows two faces (the two-people workflow)
    two = {}
    for gx in (5, 15):
        anchor = np.zeros(85)
        anchor[:6] = [0.0, 0.6, np.log(200 / 32), np.log(400 / 32), 0.9, 0.9]
        two[6400 + 1600 + 7 * 20 + gx] = anchor
    yolox_model(folder / "yolox_two.onnx", two)


def _sam2_model(folder: Path) -> dict:
    """A random-weight SAM 2.1 tiny checkpoint and a copy of its config at image size 256 (CPU speed)."""
    import torch
    from dreamidv_core.preprocess import segmentation

    bundled = segmentation.resolve_config(segmentation.bundled_config("sam2.1", "t"))
    text = bundled.read_text()
    assert "image_size: 1024" in text, "sam2 changed its tiny config"
    cfg = folder / "sam2.1_hiera_t_256.yaml"
    cfg.write_text(text.replace("image_size: 1024", "image_size: 256"))
    torch.manual_seed(0)
    predictor = segmentation.build_video_predictor(cfg, None, device="cpu")
    torch.save({"model": predictor.state_dict()}, folder / "sam2.1_hiera_tiny.pt")
    return {"sam2": "sam2.1_hiera_tiny.pt", "sam2_config": cfg.name}


def build_tiny_models(models: Path) -> dict:
    """Tiny random-weight models in ComfyUI model folders; returns the file names to choose."""
    import torch
    from dreamidv_core.weights.checkpoints import save_dit
    from dreamidv_core.models.configs import tiny_config
    from dreamidv_core.models.dit import DreamIDVTransformer, init_random_
    from dreamidv_core.models.vae import WanVAE, WanVAEConfig
    from safetensors.torch import save_file
    from tests.onnx_models import build_pack

    for f in ("diffusion_models", "vae", "dreamidv", "insightface", "dwpose", "sam2"):
        (models / f).mkdir(parents=True, exist_ok=True)
    dit = init_random_(DreamIDVTransformer(tiny_config("full", text_dim=4096)), seed=0)
    save_dit(dit, models / "diffusion_models" / "dreamidv.safetensors")
    # ComfyUI's VAELoader reads a Wan 2.1 VAE of any width ("decoder.head.0.gamma") but always with
    # num_res_blocks=2, so the tiny VAE keeps 2 (dreamidv_core.models.vae.TINY_VAE_CONFIG has 1).
    torch.manual_seed(0)
    vae = WanVAE(WanVAEConfig(dim=8, num_res_blocks=2))
    with torch.no_grad():
        for p in vae.parameters():
            p.normal_(0, 0.05)
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()},
              str(models / "vae" / "wan_2.1_vae.safetensors"))
    save_file({"context": torch.randn(8, 4096) * 0.1}, str(models / "dreamidv" / "context.safetensors"))
    build_pack(models / "insightface", "antelopev2")  # -> insightface/models/antelopev2/
    _dwpose_models(models / "dwpose")
    return {"dit": "dreamidv.safetensors", "vae": "wan_2.1_vae.safetensors", "context": "context.safetensors",
            **_sam2_model(models / "sam2")}


# ----------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def server(comfyui_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("comfy_workflow")
    t0 = time.monotonic()
    names = build_tiny_models(root / "models")
    build_s = time.monotonic() - t0
    s = ComfyServer(comfyui_dir, root / "base", root / "models")
    s.prepare()
    from PIL import Image

    write_clip(s.input_dir / "clip.mp4", face_frames())
    write_clip(s.input_dir / "noface.mp4", face_frames(face=False))
    write_clip(s.input_dir / "short.mp4", face_frames(4))
    write_clip(s.input_dir / "long.mp4", face_frames(LONG_FRAMES))
    write_clip(s.input_dir / "odd.mp4", face_frames(size=(H - 1, W - 1)))  # 63x47: valid, but odd
    write_clip(s.input_dir / "ntsc.mp4", face_frames(), fps=NTSC)
    from dreamidv_core.io.video import remux_video

    remux_video(s.input_dir / "long.mp4", s.input_dir / "truncated.mp4")  # index first, then cut mid-clip
    data = (s.input_dir / "truncated.mp4").read_bytes()
    (s.input_dir / "truncated.mp4").write_bytes(data[: len(data) // 2])
    from tests.onnx_models import paint_face

    ref = np.full((96, 128, 3), 90, np.uint8)  # fits the 128 detection size at scale 1
    paint_face(ref, 8, 5, green=40, seed=3)
    Image.fromarray(ref).save(s.input_dir / "reference.png")
    Image.fromarray(np.full((96, 128, 3), 90, np.uint8)).save(s.input_dir / "noface.png")
    s.start()
    s.names = names
    print(f"[workflow] tiny models built in {build_s:.1f} s; ComfyUI started in {s.start_s} s")
    try:
        yield s
    finally:
        s.stop()


def load_workflow() -> dict:
    assert WORKFLOW.is_file(), f"{WORKFLOW} is missing"
    return json.loads(WORKFLOW.read_text())


def set_inputs(api: dict, object_info: dict, changes: dict) -> dict:
    """``changes``: {class_type: {input: value}}; every input must exist in the node's schema."""
    for cls, values in changes.items():
        targets = [n for n in api.values() if n["class_type"] == cls]
        assert targets, f"the workflow has no {cls} node"
        schema = object_info[cls]["input"]
        known = {**schema.get("required", {}), **schema.get("optional", {})}
        for name, value in values.items():
            assert name in known, f"{cls} has no input {name!r} (has {sorted(known)})"
            for node in targets:
                node["inputs"][name] = value
    return api


def swap_prompt(server, video="clip.mp4", reference="reference.png", steps=2, seed=0, prefix=None,
                pose_model="dw-ll_ucoco_384.onnx", window=None) -> dict:
    """The bundled workflow in API format, pointed at the tiny models and test inputs."""
    api = ui_to_api(load_workflow(), server.object_info())
    changes = {
        "LoadVideo": {"file": video},
        "LoadImage": {"image": reference},
        "DreamIDVModelLoader": {"model_name": server.names["dit"], "weight_dtype": "fp32", "device": "cpu"},
        "VAELoader": {"vae_name": server.names["vae"]},
        "DreamIDVTextContext": {"precomputed_context": server.names["context"]},
        "DreamIDVPoseExtract": {"source": "dwpose", "detector_model": "yolox_l.onnx", "pose_model": pose_model},
        "DreamIDVPoseGuider": {"width": W, "height": H},
        "DreamIDVIdentityEncoder": {"width": W, "height": H, "insightface_pack": "antelopev2",
                                    "detection_size": 128, "provider": "CPU"},
        "DreamIDVSampler": {"width": W, "height": H, "steps": steps, "seed": seed},
        "DreamIDVBackgroundComposite": {"sam2_checkpoint": server.names["sam2"],
                                        "sam2_config": server.names["sam2_config"], "device": "cpu",
                                        "prompt_frames": 1},
        "SaveVideo": {"filename_prefix": prefix or f"dreamidv_test/{uuid.uuid4().hex[:8]}"},
    }
    if window is not None:  # (window, overlap) on both the PoseGuider and the sampler
        for node in ("DreamIDVPoseGuider", "DreamIDVSampler"):
            changes[node].update(window=window[0], overlap=window[1])
    return set_inputs(api, server.object_info(), changes)



def saved_videos(entry: dict, server: ComfyServer) -> list:
    files = []
    for out in entry.get("outputs", {}).values():
        for item in out.get("images", []) + out.get("videos", []) + out.get("gifs", []):
            files.append(server.output_dir / item.get("subfolder", "") / item["filename"])
    return files


def outputs_under(server: ComfyServer, prefix: str) -> list:
    folder = server.output_dir / Path(prefix).parent
    return sorted(folder.glob(Path(prefix).name + "*")) if folder.is_dir() else []


# ----------------------------------------------------------------------------------- tests
def test_comfyui_loads_pack_without_import_errors(server):
    assert not server.import_problems(), server.log()[-4000:]
    assert "Traceback" not in server.log(), server.log()[-4000:]


def test_object_info_lists_every_pack_node(server):
    info = server.object_info()
    missing = [n for n in PACK_NODES if n not in info]
    assert not missing, f"/object_info lacks {missing}"
    for name, node in info.items():
        if name.startswith("DreamIDV"):
            assert node["category"].startswith("DreamID-V"), (name, node["category"])
            for group in ("required", "optional"):
                for inp, spec in node["input"].get(group, {}).items():
                    opts = spec[1] if len(spec) > 1 else {}
                    assert opts.get("tooltip"), f"{name}.{inp} has no tooltip"


def test_node_schemas_stay_compatible_with_saved_workflows(server):
    """Node ids, input names and types, widget order and output slots of the v0.2.0 snapshot still hold
    (tests/node_schema.py says what may change: appended widgets and outputs, widened input types)."""
    from tests.node_schema import SNAPSHOT, compatibility_problems, pack_schemas

    snapshot = json.loads(SNAPSHOT.read_text())
    current = pack_schemas(server.object_info())
    assert len(snapshot) >= 16
    assert compatibility_problems(snapshot, current) == []


def test_schema_check_sees_a_breaking_change():
    from tests.node_schema import compatibility_problems

    old = {"N": {"inputs": [["a", "INT", "required"], ["b", "FLOAT", "required"], ["v", "IMAGE", "required"]],
                 "outputs": [["x", "IMAGE"]]}}
    assert compatibility_problems(old, old) == []
    grown = {"N": {"inputs": old["N"]["inputs"][:2] + [["v", "IMAGE,VIDEO", "required"], ["c", "INT", "optional"]],
                   "outputs": [["x", "IMAGE"], ["y", "VIDEO"]]}}
    assert compatibility_problems(old, grown) == []
    swapped = {"N": {"inputs": [["b", "FLOAT", "required"], ["a", "INT", "required"], ["v", "IMAGE", "required"]],
                     "outputs": [["x", "IMAGE"]]}}
    assert any("widgets" in p for p in compatibility_problems(old, swapped))
    retyped = {"N": {"inputs": [["a", "FLOAT", "required"], ["b", "FLOAT", "required"], ["v", "MASK", "required"]],
                     "outputs": []}}
    problems = compatibility_problems(old, retyped)
    assert any("'a'" in p for p in problems) and any("'v'" in p for p in problems) and any("slot 0" in p for p in problems)
    assert compatibility_problems(old, {}) == ["N: node id is gone"]


def test_bundled_workflow_is_served_as_template(server):
    templates = server.get("/api/workflow_templates")
    assert "dreamidv_swap" in templates.get(PACK_NAME, []), templates
    served = server.request(f"/api/workflow_templates/{PACK_NAME}/dreamidv_swap.json", raw=True)
    assert json.loads(served) == load_workflow()
    thumb = server.request(f"/api/workflow_templates/{PACK_NAME}/dreamidv_swap.jpg", raw=True)
    assert thumb[:3] == b"\xff\xd8\xff", "the template thumbnail (dreamidv_swap.jpg) is not a JPEG"
    assert not missing_node_types(load_workflow(), server.object_info())


def test_bundled_workflow_matches_node_schemas(server):
    """The committed file is what tests/build_workflow.py makes from the live schemas (widget order,
    sockets, link slots); after a node's inputs change: `python -m tests.build_workflow`."""
    from tests import build_workflow

    expected = build_workflow.build(server.object_info())
    have = load_workflow()
    # pos and size too: the saved layout is the builder's, made from the nodes' real sizes (no hidden widget)
    strip = lambda wf: ([{k: n[k] for k in ("id", "type", "inputs", "outputs", "widgets_values", "pos", "size")}
                         for n in wf["nodes"]], wf["links"], [g["bounding"] for g in wf["groups"]])
    assert strip(have) == strip(expected), "workflows/dreamidv_swap.json is stale: run python -m tests.build_workflow"
    assert have["version"] == 0.4


@pytest.mark.parametrize("video, count, window, rate", [("ntsc.mp4", FRAMES, None, NTSC),
                                                        ("long.mp4", LONG_FRAMES, (9, 4), Fraction(FPS))],
                         ids=["one_window_30000/1001", "three_windows"])
def test_bundled_workflow_runs_and_keeps_fps_and_audio(server, video, count, window, rate):
    import av

    prefix = f"dreamidv_test/run_{count}"
    t0 = time.monotonic()
    entry = server.run(swap_prompt(server, video=video, prefix=prefix, window=window), timeout=180)
    run_s = time.monotonic() - t0
    files = saved_videos(entry, server)
    assert len(files) == 1 and files[0].is_file(), entry.get("outputs")
    with av.open(str(files[0])) as c:
        v = c.streams.video[0]
        frames = [f for f in c.decode(video=0)]
        assert len(frames) == count
        assert v.average_rate == rate, v.average_rate  # exactly: 30000/1001 is not rounded to 2997/100
        assert (frames[0].width, frames[0].height) == (W, H)
        assert c.streams.audio, "the swapped video has no audio track"
        c.seek(0)
        audio = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])
        seconds = float(count / rate)
        assert abs(audio.size - SAMPLE_RATE * seconds) < 0.1 * SAMPLE_RATE and np.abs(audio).max() > 0.1
    print(f"[workflow] swap of {count} frames {W}x{H} through /prompt: {run_s:.1f} s")


def test_bundled_workflow_saves_a_clip_of_odd_size(server):
    """A valid 63x47 clip used to be swapped completely and then fail at Save Video (libx264 needs even
    sizes); the sampler's frames_in_source and the composite now come out 62x46 and the video is saved."""
    import av

    entry = server.run(swap_prompt(server, video="odd.mp4", prefix="dreamidv_test/odd"), timeout=180)
    files = saved_videos(entry, server)
    assert len(files) == 1 and files[0].is_file(), entry.get("outputs")
    with av.open(str(files[0])) as c:
        frame = next(c.decode(video=0))
        assert (frame.width, frame.height) == (W - 2, H - 2)


async def _interrupt_during_sampling(server: ComfyServer, prompt: dict, sampler_ids: set) -> dict:
    import aiohttp

    client_id = uuid.uuid4().hex
    timing = {}
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(f"{server.url.replace('http', 'ws')}/ws?clientId={client_id}") as ws:
            reply = await (await http.post(f"{server.url}/prompt",
                                           json={"prompt": prompt, "client_id": client_id})).json()
            pid = reply["prompt_id"]
            deadline = time.monotonic() + 150
            while time.monotonic() < deadline:
                msg = await ws.receive(timeout=max(0.1, deadline - time.monotonic()))
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                data = json.loads(msg.data)
                kind, body = data.get("type"), data.get("data", {})
                if kind == "progress" and body.get("node") in sampler_ids and body.get("value", 0) >= 2 \
                        and "interrupt_at" not in timing:
                    timing["interrupt_at"] = time.monotonic()
                    timing["step_at_interrupt"] = body["value"]
                    await http.post(f"{server.url}/interrupt", json={})
                elif kind == "progress" and body.get("node") in sampler_ids:
                    timing["last_step"] = body["value"]
                elif kind in ("execution_interrupted", "execution_error", "execution_success") and \
                        body.get("prompt_id") == pid:
                    timing["end"] = kind
                    timing["stop_s"] = time.monotonic() - timing.get("interrupt_at", time.monotonic())
                    break
    timing["prompt_id"] = pid
    return timing


def test_interrupt_during_sampling_then_next_prompt_runs(server):
    prompt = swap_prompt(server, steps=200, seed=1, prefix="dreamidv_test/interrupted")
    sampler_ids = {k for k, n in prompt.items() if n["class_type"] == "DreamIDVSampler"}
    timing = asyncio.run(_interrupt_during_sampling(server, prompt, sampler_ids))
    assert "interrupt_at" in timing, f"never saw the sampler's progress: {timing}"
    assert timing.get("end") == "execution_interrupted", timing
    assert timing.get("last_step", timing["step_at_interrupt"]) <= timing["step_at_interrupt"] + 2, timing
    assert not outputs_under(server, "dreamidv_test/interrupted")
    # the server leaves the interrupted prompt's queue slot just after it reports the interruption
    deadline = time.monotonic() + 30
    while server.queue()["queue_running"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.queue()["queue_running"] == []
    entry = server.run(swap_prompt(server, steps=1, seed=2, prefix="dreamidv_test/after"), timeout=120)
    assert len(saved_videos(entry, server)) == 1
    print(f"[workflow] interrupt honoured {timing['stop_s']:.2f} s after step {timing['step_at_interrupt']}")


@pytest.mark.parametrize("case, changes, words", [
    ("reference_without_face", {"reference": "noface.png"}, ("face", "reference")),
    ("video_without_face", {"video": "noface.mp4", "pose_model": "dw_noface.onnx"}, ("face",)),
    ("fewer_than_5_frames", {"video": "short.mp4"}, ("5", "frame")),
    ("truncated_video", {"video": "truncated.mp4"}, ("truncated.mp4", "truncated")),
])
def test_bad_input_fails_with_clear_error_and_no_output(server, case, changes, words):
    prefix = f"dreamidv_test/bad_{case}"
    prompt = swap_prompt(server, prefix=prefix, **changes)
    with pytest.raises(PromptFailed) as err:
        server.run(prompt, timeout=120)
    e = err.value.error
    message = (e.get("exception_message") or "").lower()
    assert all(w in message for w in words), f"{case}: unclear error {e.get('node_type')}: {message!r}"
    assert "Traceback" not in message
    assert not outputs_under(server, prefix), f"{case}: an output was written"
    print(f"[workflow] {case}: {e.get('node_type')}: {e.get('exception_message')}")
    assert execution_error(err.value.entry) is not None


def test_connecting_an_unused_image_output_later_runs_the_node_again(server):
    """The streaming workflow leaves the sampler's IMAGE outputs unconnected, so the sampler does not make them;
    connecting one afterwards must run the sampler again (not reuse its cached result without the frames)."""
    prompt = swap_prompt(server, video="ntsc.mp4", prefix="dreamidv_test/cached")
    server.run(prompt, timeout=180)
    sampler = next(k for k, n in prompt.items() if n["class_type"] == "DreamIDVSampler")
    prompt["900"] = {"class_type": "PreviewImage", "inputs": {"images": [sampler, 0]}}
    prompt = {k: v for k, v in prompt.items() if v["class_type"] != "SaveVideo"}  # nothing else to do
    entry = server.run(prompt, timeout=180)
    previews = entry["outputs"]["900"]["images"]
    assert len(previews) == FRAMES, entry["outputs"]
# ----------------------------------------------------------------------------------- who and where
TWO_PEOPLE = PACK_DIR / "workflows" / "dreamidv_swap_two_people.json"


def test_two_people_workflow_matches_node_schemas(server):
    """The committed two-pass workflow is what tests/build_two_people_workflow.py makes from the live schemas."""
    from tests import build_two_people_workflow as b2

    strip = lambda wf: ([{k: n[k] for k in ("id", "type", "inputs", "outputs", "widgets_values")}
                         for n in wf["nodes"]], wf["links"])
    assert strip(json.loads(TWO_PEOPLE.read_text())) == strip(b2.build(server.object_info())), \
        "workflows/dreamidv_swap_two_people.json is stale: run python -m tests.build_two_people_workflow"
    templates = server.get("/api/workflow_templates")
    assert "dreamidv_swap_two_people" in templates.get(PACK_NAME, []), templates


def test_two_people_workflow_swaps_both_in_two_passes(server):
    """Pass 1 swaps person 0, pass 2 swaps person 1 on pass 1's output; face crop on through the one switch."""
    import av

    info = server.object_info()
    api = ui_to_api(json.loads(TWO_PEOPLE.read_text()), info)
    pose = {"source": "dwpose", "detector_model": "yolox_two.onnx", "pose_model": "dw-ll_ucoco_384.onnx"}
    ident = {"width": W, "height": H, "insightface_pack": "antelopev2", "detection_size": 128, "provider": "CPU"}
    changes = {
        "1": {"file": "clip.mp4"}, "3": {"image": "reference.png"}, "4": {"image": "reference.png"},
        "5": {"model_name": server.names["dit"], "weight_dtype": "fp32", "device": "cpu"},
        "6": {"vae_name": server.names["vae"]}, "7": {"precomputed_context": server.names["context"]},
        "8": pose, "13": pose, "10": ident, "15": ident,
        "9": {"width": W, "height": H}, "14": {"width": W, "height": H},
        "11": {"width": W, "height": H, "steps": 1}, "16": {"width": W, "height": H, "steps": 1},
        "12": {"sam2_checkpoint": server.names["sam2"], "sam2_config": server.names["sam2_config"],
               "device": "cpu", "prompt_frames": 1},
        "19": {"filename_prefix": "dreamidv_test/two_people"}, "20": {"value": True},
    }
    changes["17"] = changes["12"]
    for nid, values in changes.items():
        api[nid]["inputs"].update(values)
    assert api["13"]["inputs"]["target_index"] == 1 and api["13"]["inputs"]["frames"] == ["12", 2]
    entry = server.run(api, timeout=300)
    files = saved_videos(entry, server)
    assert len(files) == 1
    with av.open(str(files[0])) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == FRAMES and frames[0].shape == (H, W, 3)


def test_swap_workflow_has_one_face_crop_switch_off_by_default(server):
    """One switch (and one margin) in the bundled swap workflow drives the PoseGuider and the sampler; it is off
    (whole frame, as released). The two-people workflow above runs the same wiring with the switch on."""
    api = swap_prompt(server)
    switch = [k for k, n in api.items() if n["class_type"] == "PrimitiveBoolean"]
    margin = [k for k, n in api.items() if n["class_type"] == "PrimitiveFloat"]
    assert len(switch) == len(margin) == 1 and api[switch[0]]["inputs"]["value"] is False
    for cls in ("DreamIDVPoseGuider", "DreamIDVSampler"):
        node = next(n for n in api.values() if n["class_type"] == cls)
        assert node["inputs"]["face_crop"] == [switch[0], 0] and node["inputs"]["crop_margin"] == [margin[0], 0]
    guider = next(n for n in api.values() if n["class_type"] == "DreamIDVPoseGuider")
    extract = next(k for k, n in api.items() if n["class_type"] == "DreamIDVPoseExtract")
    assert guider["inputs"]["mask"] == [extract, 4]  # pose_mask: drawn on demand
