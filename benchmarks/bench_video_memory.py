"""Host memory and time per frame of the swap workflow in a real ComfyUI, against clip length (prints figures;
not a test).

Two graphs run on 1920x1080, 24 fps clips made by looping and resizing a real clip (with its sound):

* ``stream``: the bundled ``workflows/dreamidv_swap.json`` (Load Video -> the pack's nodes, VIDEO in and out
  -> Save Video);
* ``image``: version 0.2.0's graph (Load Video -> Get Video Components -> IMAGE/MASK batches through the same
  nodes -> Create Video -> Save Video), which holds the clip at source resolution as float32 several times.

Each run starts a fresh ComfyUI server (tests/comfy_harness.py) with tiny random-weight models (the test
suite's), queues the graph and polls the RSS of the server's process tree every 0.2 s: the peak, and the
peak while each node runs (from the server's websocket messages). A watchdog kills the server when its RSS
passes ``--rss-limit-gb`` (the IMAGE path at 10 s of 1080p would need ~30 GB), so the machine never runs out
of memory; such a run is reported as stopped.

    python benchmarks/bench_video_memory.py --clip /path/to/a_girl.mp4          # 10, 30, 60 s + IMAGE 1, 2 s
    python benchmarks/bench_video_memory.py --lengths 10 --image-lengths 1 --area 64x48   # quick look

``--area`` is the sampler's (and PoseGuider's, identity encoder's) width x height: the bundled 832x480 by
default. The model's share of memory (its clip-length latents, ~11 float32 tensors of 16 channels at
1/8 of the model's frame size) grows with the clip at any area; on a GPU it is device memory, on a CPU it
is host memory and adds to the figures here (the report prints its size for the lengths run).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import threading
import time
import uuid
from fractions import Fraction
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FPS = 24
SIZE = (1920, 1080)

# version 0.2.0's swap graph (the IMAGE path), in tests/build_workflow.py's layout format
IMAGE_NODES = {
    1: ("LoadVideo", [0, 0], [300, 360], None, {"file": "source.mp4"}),
    2: ("GetVideoComponents", [340, 0], [240, 70], None, {}),
    3: ("LoadImage", [0, 420], [300, 340], None, {"image": "reference.png"}),
    4: ("DreamIDVModelLoader", [640, 420], [330, 130], None, {"model_name": "dreamidv.safetensors"}),
    5: ("VAELoader", [640, 590], [330, 60], None, {"vae_name": "wan_2.1_vae.safetensors"}),
    6: ("DreamIDVTextContext", [640, 690], [330, 110], None, {"precomputed_context": "none"}),
    7: ("DreamIDVPoseExtract", [640, 0], [330, 200], None, {"source": "dwpose"}),
    8: ("DreamIDVPoseGuider", [1010, 0], [300, 130], None, {}),
    9: ("DreamIDVIdentityEncoder", [1010, 420], [320, 290], None, {}),
    10: ("DreamIDVSampler", [1370, 0], [320, 340], None, {}),
    11: ("DreamIDVBackgroundComposite", [1730, 0], [330, 230], None, {}),
    12: ("CreateVideo", [2100, 0], [270, 80], None, {}),
    13: ("SaveVideo", [2100, 140], [420, 460], None, {"filename_prefix": "video/DreamID-V"}),
}
IMAGE_LINKS = [
    (1, "VIDEO", 2, "video"), (2, "images", 7, "frames"), (3, "IMAGE", 7, "reference"), (7, "pose", 8, "pose_video"),
    (4, "model", 8, "model"), (3, "IMAGE", 9, "reference"), (2, "images", 9, "video"), (5, "VAE", 9, "vae"),
    (4, "model", 10, "model"), (5, "VAE", 10, "vae"), (6, "positive", 10, "positive"), (9, "identity", 10, "identity"),
    (2, "images", 10, "video"), (7, "mask", 10, "mask"), (8, "pose_tokens", 10, "pose_tokens"),
    (2, "images", 11, "frames"), (10, "frames_in_source", 11, "generated"), (7, "mask", 11, "face_mask"),
    (11, "frames", 12, "images"), (2, "audio", 12, "audio"), (2, "fps", 12, "fps"), (12, "VIDEO", 13, "video"),
]


# ------------------------------------------------------------------------------------------------ clips

def find_clip(arg):
    for cand in ([Path(arg)] if arg else []) + [ROOT.parent / "shared" / "assets" / "a_girl.mp4"]:
        if cand.is_file():
            return cand
    return None


def make_clip(source: Path, seconds: int, out: Path) -> Path:
    """``seconds`` of 1920x1080 at 24 fps: the source's frames resized and looped, its sound looped along."""
    import av
    import numpy as np
    from PIL import Image

    if out.is_file():
        return out
    with av.open(str(source)) as c:
        frames = [np.asarray(Image.fromarray(f.to_ndarray(format="rgb24")).resize(SIZE, Image.BICUBIC))
                  for f in c.decode(video=0)]
        sound, rate = None, None
        if c.streams.audio:
            c.seek(0)
            rate = c.streams.audio[0].sample_rate
            sound = np.concatenate([f.to_ndarray().reshape(f.to_ndarray().shape[0], -1) for f in
                                    c.decode(audio=0)], axis=1).astype(np.float32)
    count = seconds * FPS
    tmp = out.with_suffix(".partial.mp4")
    with av.open(str(tmp), "w") as c:
        vs = c.add_stream("libx264", rate=FPS)
        vs.width, vs.height, vs.pix_fmt = *SIZE, "yuv420p"
        vs.options = {"crf": "20", "preset": "veryfast"}
        aus = None
        if sound is not None:
            aus = c.add_stream("aac", rate=rate)
            aus.layout = "stereo" if sound.shape[0] == 2 else "mono"
        for i in range(count):
            k = i % (2 * len(frames) - 2)  # back and forth: no jump at the loop point
            f = frames[k if k < len(frames) else 2 * len(frames) - 2 - k]
            for pk in vs.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(pk)
        for pk in vs.encode():
            c.mux(pk)
        if aus is not None:
            need = int(rate * seconds)
            wave = np.tile(sound, (1, need // sound.shape[1] + 1))[:, :need]
            for a in range(0, need, rate):
                fr = av.AudioFrame.from_ndarray(np.ascontiguousarray(wave[:, a:a + rate]), format="fltp",
                                                layout=aus.layout.name)
                fr.sample_rate, fr.pts, fr.time_base = rate, a, Fraction(1, rate)
                for pk in aus.encode(fr):
                    c.mux(pk)
            for pk in aus.encode():
                c.mux(pk)
    os.replace(tmp, out)
    return out


# ------------------------------------------------------------------------------------------------ memory

class TreeWatch(threading.Thread):
    """Polls the RSS of a process and its children; ``peak`` overall and per ``stage`` (set from outside);
    kills the process group above ``limit`` bytes."""

    def __init__(self, pid: int, limit: int, period: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.limit, self.period = pid, limit, period
        self.peak, self.by_stage, self.stage, self.killed = 0, {}, "start", None
        self.base = None
        self._halt = threading.Event()

    def rss(self) -> int:
        import psutil

        try:
            proc = psutil.Process(self.pid)
            procs = [proc] + proc.children(recursive=True)
        except psutil.NoSuchProcess:
            return 0
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    def run(self) -> None:
        while not self._halt.is_set():
            now = self.rss()
            if self.base is None and now:
                self.base = now
            self.peak = max(self.peak, now)
            self.by_stage[self.stage] = max(self.by_stage.get(self.stage, 0), now)
            if now > self.limit and self.killed is None:
                self.killed = now
                try:
                    os.killpg(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(self.period)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)


# ------------------------------------------------------------------------------------------------ one run

def prompt_for(server, graph: str, area, steps: int, prefix: str, sam2: bool = True) -> dict:
    from tests import build_workflow
    from tests.comfy_harness import ui_to_api
    from tests.test_workflow import set_inputs

    info = server.object_info()
    if graph == "stream":
        wf = json.loads((ROOT / "workflows" / "dreamidv_swap.json").read_text())
    else:
        wf = build_workflow.build(info, nodes_layout=IMAGE_NODES, links_layout=IMAGE_LINKS, groups_layout=[],
                                  control={10: "fixed"})
    api = ui_to_api(wf, info)
    w, h = area
    return set_inputs(api, info, {
        "LoadVideo": {"file": "source.mp4"},
        "LoadImage": {"image": "reference.png"},
        "DreamIDVModelLoader": {"model_name": server.names["dit"], "weight_dtype": "fp32", "device": "cpu"},
        "VAELoader": {"vae_name": server.names["vae"]},
        "DreamIDVTextContext": {"precomputed_context": server.names["context"]},
        "DreamIDVPoseExtract": {"source": "dwpose", "detector_model": "yolox_l.onnx",
                                "pose_model": "dw-ll_ucoco_384.onnx"},
        "DreamIDVPoseGuider": {"width": w, "height": h},
        "DreamIDVIdentityEncoder": {"width": w, "height": h, "insightface_pack": "antelopev2",
                                    "detection_size": 128, "provider": "CPU"},
        "DreamIDVSampler": {"width": w, "height": h, "steps": steps, "seed": 0},
        "DreamIDVBackgroundComposite": {"sam2_checkpoint": server.names["sam2"] if sam2 else "none",
                                        "sam2_config": server.names["sam2_config"], "device": "cpu",
                                        "prompt_frames": 1},
        "SaveVideo": {"filename_prefix": prefix},
    })


def run_once(comfy_dir: Path, work: Path, names: dict, clip: Path, reference: Path, graph: str, area, steps: int,
             limit: int, timeout: float, sam2: bool = True) -> dict:
    import asyncio

    import aiohttp

    from tests.comfy_harness import ComfyServer

    base = work / f"server_{graph}_{clip.stem}"
    shutil.rmtree(base, ignore_errors=True)
    server = ComfyServer(comfy_dir, base, work / "models")
    server.prepare()
    os.symlink(clip, server.input_dir / "source.mp4")
    shutil.copy(reference, server.input_dir / "reference.png")
    server.start()
    server.names = names
    watch = TreeWatch(server.proc.pid, limit)
    watch.start()
    result = {"graph": graph, "clip": clip.name, "status": "?"}
    try:
        prompt = prompt_for(server, graph, area, steps, f"bench/{graph}_{clip.stem}", sam2)
        titles = {k: v["class_type"] for k, v in prompt.items()}
        idle = watch.rss()
        times, t0 = {}, time.monotonic()

        async def drive():
            client = uuid.uuid4().hex
            async with aiohttp.ClientSession() as http:
                async with http.ws_connect(f"{server.url.replace('http', 'ws')}/ws?clientId={client}") as ws:
                    reply = await (await http.post(f"{server.url}/prompt",
                                                   json={"prompt": prompt, "client_id": client})).json()
                    pid, started = reply["prompt_id"], time.monotonic()
                    while time.monotonic() - t0 < timeout:
                        try:
                            msg = await ws.receive(timeout=5)
                        except asyncio.TimeoutError:
                            if server.proc.poll() is not None:
                                return "server died"
                            continue
                        if msg.type != aiohttp.WSMsgType.TEXT:
                            if msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                                return "server died"
                            continue
                        data = json.loads(msg.data)
                        kind, body = data.get("type"), data.get("data", {})
                        if body.get("prompt_id") not in (None, pid):
                            continue
                        if kind == "executing":
                            now = time.monotonic()
                            times[watch.stage] = times.get(watch.stage, 0) + now - started
                            started = now
                            node = body.get("node")
                            watch.stage = titles.get(str(node), "done") if node is not None else "done"
                            if node is None:
                                return "ok"
                        elif kind == "execution_error":
                            return f"error: {body.get('exception_message', '')[:300]}"
                        elif kind == "execution_success":
                            return "ok"
                    return "timeout"

        try:
            result["status"] = asyncio.run(drive())
        except Exception as exc:  # noqa: BLE001  (the watchdog killed the server, or it died)
            result["status"] = f"stopped ({type(exc).__name__})"
        result["wall_s"] = time.monotonic() - t0
        if watch.killed:
            result["status"] = f"killed by the watchdog at {watch.killed / 2**30:.1f} GiB"
        result.update(idle=idle, peak=watch.peak, by_stage=dict(watch.by_stage), stage_s=times)
    finally:
        watch.stop()
        server.stop()
    return result


# ------------------------------------------------------------------------------------------------ report

def gib(n) -> str:
    return f"{n / 2**30:6.2f}"


def latent_bytes(seconds: float, area) -> float:
    """The sampler's clip-length state at ``area``: ~11 float32 latents of 16 channels (y counts 2)."""
    from dreamidv_core.models.frame_grid import latent_frame_count, padded_frame_count
    from dreamidv_core.preprocess.video_ops import output_size

    h, w = output_size(SIZE[1], SIZE[0], *area)
    frames = latent_frame_count(padded_frame_count(int(seconds * FPS)))
    return 11 * 16 * frames * (h // 8) * (w // 8) * 4


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clip", help="the clip to loop (default ../shared/assets/a_girl.mp4)")
    ap.add_argument("--lengths", default="10,30,60", help="seconds, streaming path")
    ap.add_argument("--image-lengths", default="1,2", help="seconds, IMAGE path (0.2.0's graph)")
    ap.add_argument("--area", default="832x480", help="the sampler's width x height (bundled: 832x480)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--no-sam2", action="store_true",
                    help="the composite without SAM 2 (sam2_checkpoint 'none': inside the face mask only); SAM 2 "
                         "on a CPU takes ~2 s a 1080p frame, most of a CPU run's time")
    ap.add_argument("--rss-limit-gb", type=float, default=10.0, help="kill a server whose RSS passes this")
    ap.add_argument("--timeout", type=float, default=4 * 3600, help="seconds per run")
    ap.add_argument("--work", default=None, help="folder for clips, models and servers (default: a temp folder)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch/OpenMP threads in the server (1 on a small, busy machine: spinning threads stall)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)

    clip = find_clip(args.clip)
    if clip is None:
        print("skipped: no clip to loop (pass --clip, or put a_girl.mp4 in ../shared/assets/)")
        return 0
    comfy = Path(os.environ.get("COMFYUI_DIR", ROOT / ".cache" / "ComfyUI"))
    if not (comfy / "main.py").is_file():
        print(f"skipped: no ComfyUI at {comfy} (set COMFYUI_DIR)")
        return 0
    area = tuple(int(v) for v in args.area.lower().split("x"))
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # ComfyServer passes it on to the server
    work = Path(args.work or f"/tmp/dreamidv_bench_video_{os.getpid()}")
    work.mkdir(parents=True, exist_ok=True)

    import numpy as np
    from PIL import Image

    from tests.onnx_models import paint_face
    from tests.test_workflow import build_tiny_models

    names_file = work / "models" / "names.json"
    if names_file.is_file():
        names = json.loads(names_file.read_text())
    else:
        names = build_tiny_models(work / "models")
        names_file.write_text(json.dumps(names))
    reference = work / "reference.png"
    ref = np.full((96, 128, 3), 90, np.uint8)
    paint_face(ref, 8, 5, green=40, seed=3)
    Image.fromarray(ref).save(reference)

    runs = [("stream", int(s)) for s in args.lengths.split(",") if s] + \
           [("image", int(s)) for s in args.image_lengths.split(",") if s]
    results = []
    for graph, seconds in runs:
        path = make_clip(clip, seconds, work / f"clip_{seconds}s.mp4")
        print(f"[{graph} {seconds} s] running ({seconds * FPS} frames of {SIZE[0]}x{SIZE[1]})", flush=True)
        r = run_once(comfy, work, names, path, reference, graph, area, args.steps, int(args.rss_limit_gb * 2**30),
                     args.timeout, sam2=not args.no_sam2)
        r.update(seconds=seconds, frames=seconds * FPS)
        results.append(r)
        stages = ", ".join(f"{k} {gib(v).strip()}" for k, v in sorted(r.get("by_stage", {}).items(),
                                                                       key=lambda kv: -kv[1])[:4])
        slow = ", ".join(f"{k} {v:.0f} s" for k, v in sorted(r.get("stage_s", {}).items(), key=lambda kv: -kv[1])[:5])
        print(f"[{graph} {seconds} s] {r['status']}: peak {gib(r.get('peak', 0)).strip()} GiB (idle "
              f"{gib(r.get('idle', 0)).strip()}), {r.get('wall_s', 0) / r['frames']:.2f} s/frame; "
              f"highest stages: {stages}; slowest: {slow}", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))

    print(f"\narea {area[0]}x{area[1]}, {args.steps} steps, tiny random-weight models, {SIZE[0]}x{SIZE[1]} "
          f"{FPS} fps clips from {clip.name}, composite {'without SAM 2' if args.no_sam2 else 'with SAM 2'}")
    print(f"{'graph':7} {'length':>7} {'frames':>6} {'peak GiB':>9} {'idle GiB':>9} {'s/frame':>8}  "
          f"{'latents GiB':>11}  status")
    for r in results:
        print(f"{r['graph']:7} {r['seconds']:>5} s {r['frames']:>6} {gib(r.get('peak', 0)):>9} "
              f"{gib(r.get('idle', 0)):>9} {r.get('wall_s', 0) / r['frames']:8.2f}  "
              f"{gib(latent_bytes(r['seconds'], area)):>11}  {r['status']}")
    stream = {r["seconds"]: r for r in results if r["graph"] == "stream" and r["status"] == "ok"}
    if len(stream) >= 2:
        lo, hi = min(stream), max(stream)
        growth = stream[hi]["peak"] / stream[lo]["peak"] - 1
        lat = latent_bytes(hi, area) - latent_bytes(lo, area)
        print(f"streaming: peak grows {growth * 100:.1f}% from {lo} s to {hi} s "
              f"({(stream[hi]['peak'] - stream[lo]['peak']) / 2**20:.0f} MiB, of which the sampler's clip-length "
              f"latents account for ~{lat / 2**20:.0f} MiB)")
    image = sorted((r["frames"], r["peak"]) for r in results if r["graph"] == "image" and r["status"] == "ok")
    if len(image) >= 2:
        (f0, p0), (f1, p1) = image[0], image[-1]
        slope = (p1 - p0) / (f1 - f0)
        print(f"IMAGE path: {slope / 2**20:.0f} MiB per 1080p frame; projected peak: "
              + ", ".join(f"{s} s {gib(p0 + slope * (s * FPS - f0)).strip()} GiB" for s in (10, 30, 60)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
