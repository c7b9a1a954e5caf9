"""Writes ``workflows/dreamidv_swap_native.json``: DreamID-V on ComfyUI's own model and sampler (core Load Diffusion
Model, a LoRA loader, DreamID-V Apply, KSampler), through tests/build_workflow.py's builder and the live
``/object_info`` of a ComfyUI with this pack. Re-run after a node's inputs change:

    .venv/bin/python -m tests.build_native_workflow      # starts a throw-away ComfyUI ($COMFYUI_DIR)

tests/test_native_workflow.py checks that the committed file still matches the schemas.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from tests.comfy_harness import REPO_ROOT, ComfyServer

OUT = REPO_ROOT / "workflows" / "dreamidv_swap_native.json"
W, H, STEPS, SHIFT, CFG = 832, 480, 20, 5.0, 5.0  # CFG 5 = identity guidance 4
WORKFLOW_ID = "8b2f4c1e-3a7d-4e55-9c0b-1f6a2d9e7c31"
LORA_NODE = 5  # bypassed in the file: enable it (Ctrl+B) after choosing a LoRA

# id: (type, [x, y], [w, h], title, {widget: value})
NODES = {
    1: ("LoadVideo", [0, 0], [300, 360], "Source video", {"file": "source.mp4"}),
    2: ("GetVideoComponents", [340, 0], [240, 70], None, {}),
    3: ("LoadImage", [0, 420], [300, 340], "Reference face photo", {"image": "reference.png"}),
    4: ("UNETLoader", [640, 420], [330, 90], None, {"unet_name": "dreamidv.safetensors", "weight_dtype": "default"}),
    5: ("LoraLoaderModelOnly", [640, 550], [330, 90], "LoRA (bypassed: enable it after choosing one)",
        {"lora_name": "dreamidv_lora.safetensors", "strength_model": 1.0}),
    6: ("DreamIDVApply", [640, 680], [330, 130], None, {"model_name": "dreamidv.safetensors", "shift": SHIFT}),
    7: ("DreamIDVWindows", [640, 850], [330, 100], None, {"window": 81, "overlap": 16}),
    8: ("VAELoader", [640, 990], [330, 60], None, {"vae_name": "wan_2.1_vae.safetensors"}),
    9: ("DreamIDVTextContext", [640, 1090], [330, 110], None,
        {"text_encoder": "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "precomputed_context": "none"}),
    10: ("DreamIDVPoseExtract", [640, 0], [330, 200], None,
         {"source": "mediapipe", "mediapipe_model": "face_landmarker_v2_with_blendshapes.task",
          "detector_model": "yolox_l.onnx", "pose_model": "dw-ll_ucoco_384.onnx"}),
    11: ("DreamIDVConditioning", [1010, 0], [320, 300], None, {"width": W, "height": H, "frame_num": 0}),
    12: ("KSampler", [1370, 0], [320, 270], None,
         {"seed": 0, "steps": STEPS, "cfg": CFG, "sampler_name": "uni_pc_bh2", "scheduler": "normal", "denoise": 1.0}),
    13: ("DreamIDVDecode", [1730, 0], [300, 170], None, {}),
    14: ("CreateVideo", [2070, 0], [270, 80], None, {}),
    15: ("SaveVideo", [2070, 140], [420, 460], None, {"filename_prefix": "video/DreamID-V-native"}),
}
CONTROL = {12: "fixed"}

# (from node, output name, to node, input name); names as in /object_info
LINKS = [
    (1, "VIDEO", 2, "video"),
    (2, "images", 10, "frames"),
    (3, "IMAGE", 10, "reference"),
    (4, "MODEL", 5, "model"),
    (5, "MODEL", 6, "model"),
    (6, "model", 7, "model"),
    (7, "MODEL", 12, "model"),
    (9, "positive", 11, "positive"),
    (8, "VAE", 11, "vae"),
    (2, "images", 11, "video"),
    (10, "mask", 11, "mask"),
    (3, "IMAGE", 11, "reference"),
    (10, "pose", 11, "pose_video"),
    (11, "positive", 12, "positive"),
    (11, "negative", 12, "negative"),
    (11, "latent", 12, "latent_image"),
    (8, "VAE", 13, "vae"),
    (12, "LATENT", 13, "samples"),
    (2, "images", 13, "video"),
    (13, "frames_in_source", 14, "images"),
    (2, "audio", 14, "audio"),
    (2, "fps", 14, "fps"),
    (14, "VIDEO", 15, "video"),
]

GROUPS = [
    ("Inputs: source video and reference face", [-20, -90, 620, 870], "#3f789e"),
    ("ComfyUI model and LoRA", [620, 330, 370, 880], "#88A"),
    ("Pose, conditioning, KSampler (cfg 5 = identity guidance 4), decode", [620, -90, 1430, 410], "#b06634"),
    ("Output: source fps and audio", [2050, -90, 460, 710], "#a1309b"),
]


def build(info: dict) -> dict:
    """The UI-format workflow, through tests/build_workflow.py's builder with this layout (the LoRA bypassed)."""
    from tests import build_workflow as bw

    wf = bw.build(info, nodes_layout=NODES, links_layout=LINKS, groups_layout=GROUPS, control=CONTROL,
                  workflow_id=WORKFLOW_ID)
    for node in wf["nodes"]:
        if node["id"] == LORA_NODE:
            node["mode"] = 4
    return json.loads(json.dumps(wf))


def main() -> int:
    comfy = Path(os.environ.get("COMFYUI_DIR", REPO_ROOT / ".cache" / "ComfyUI"))
    tmp = Path(tempfile.mkdtemp(prefix="dreamidv-wf-"))
    with ComfyServer(comfy, tmp / "base", tmp / "models") as s:
        wf = build(s.object_info())
    OUT.write_text(json.dumps(wf, indent=2) + "\n")
    print(f"wrote {OUT} ({len(wf['nodes'])} nodes, {len(wf['links'])} links)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
