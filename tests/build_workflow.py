"""Writes ``workflows/dreamidv_swap.json`` (ComfyUI's UI/canvas format) from a compact layout and
the live ``/object_info`` of a ComfyUI with this pack, so sockets, widget order and widget values
match the node schemas exactly. Re-run after a node's inputs change:

    .venv/bin/python -m tests.build_workflow            # starts a throw-away ComfyUI ($COMFYUI_DIR)

tests/test_workflow.py checks that the committed file still matches the schemas.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from tests.comfy_harness import REPO_ROOT, ComfyServer, _has_control, _has_upload, _input_specs, _is_widget

OUT = REPO_ROOT / "workflows" / "dreamidv_swap.json"
W, H, STEPS, SHIFT, GUIDANCE = 832, 480, 20, 5.0, 4.0

# id: (type, [x, y], [w, h], title, {widget: value})
WORKFLOW_ID = "5f0d9e2c-6d1b-4f7e-9a51-d7e1d2a0c0a1"
# The streaming path: core Load Video -> the pack's nodes (VIDEO in, read a piece at a time; pose and mask
# carried as keypoints and drawn on demand) -> core Save Video (the composite's VIDEO: the source's frame rate
# and sound, never a whole-clip IMAGE in memory).
NODES = {
    1: ("LoadVideo", [0, 0], [300, 360], "Source video", {"file": "source.mp4"}),
    3: ("LoadImage", [0, 420], [300, 340], "Reference face photo", {"image": "reference.png"}),
    4: ("DreamIDVModelLoader", [340, 470], [330, 130], None, {"model_name": "dreamidv.safetensors"}),
    5: ("VAELoader", [340, 640], [330, 60], None, {"vae_name": "wan_2.1_vae.safetensors"}),
    6: ("DreamIDVTextContext", [340, 740], [330, 110], None, {"text_encoder": "umt5_xxl_fp8_e4m3fn_scaled.safetensors",
                                                              "precomputed_context": "none"}),
    7: ("DreamIDVPoseExtract", [340, 0], [330, 350], None,
        {"source": "mediapipe", "mediapipe_model": "face_landmarker_v2_with_blendshapes.task",
         "detector_model": "yolox_l.onnx", "pose_model": "dw-ll_ucoco_384.onnx"}),
    8: ("DreamIDVPoseGuider", [710, 0], [300, 330], None, {"width": W, "height": H}),
    9: ("DreamIDVIdentityEncoder", [710, 470], [320, 300], None, {"width": W, "height": H}),
    10: ("DreamIDVSampler", [1090, 0], [320, 600], None,
         {"width": W, "height": H, "steps": STEPS, "shift": SHIFT, "identity_guidance": GUIDANCE, "seed": 0}),
    11: ("DreamIDVBackgroundComposite", [1450, 0], [330, 300], None,
         {"sam2_checkpoint": "sam2.1_hiera_tiny.pt", "sam2_config": "auto"}),
    13: ("SaveVideo", [1850, 0], [420, 460], None, {"filename_prefix": "video/DreamID-V"}),
    14: ("PrimitiveBoolean", [1450, 400], [330, 60], "Face crop (off: whole frame, as released)", {"value": False}),
    15: ("PrimitiveFloat", [1450, 490], [330, 60], "Crop margin (face sizes around the face)", {"value": 1.0}),
}
CONTROL = {10: "fixed"}  # control_after_generate value of seed widgets

# (from node, output name, to node, input name); output/input names as in /object_info
LINKS = [
    (1, "VIDEO", 7, "frames"),
    (3, "IMAGE", 7, "reference"),
    (7, "pose_mask", 8, "pose_video"),
    (4, "model", 8, "model"),
    (3, "IMAGE", 9, "reference"),
    (1, "VIDEO", 9, "video"),
    (5, "VAE", 9, "vae"),
    (4, "model", 10, "model"),
    (5, "VAE", 10, "vae"),
    (6, "positive", 10, "positive"),
    (9, "identity", 10, "identity"),
    (1, "VIDEO", 10, "video"),
    (7, "pose_mask", 10, "mask"),
    (8, "pose_tokens", 10, "pose_tokens"),
    (1, "VIDEO", 11, "frames"),
    (10, "video", 11, "generated"),
    (7, "pose_mask", 11, "face_mask"),
    (11, "video", 13, "video"),
    (7, "pose_mask", 8, "mask"),
    (14, "BOOLEAN", 8, "face_crop"),
    (14, "BOOLEAN", 10, "face_crop"),
    (15, "FLOAT", 8, "crop_margin"),
    (15, "FLOAT", 10, "crop_margin"),
]

GROUPS = [
    ("Source video, face photo", [-20, -90, 340, 870], "#3f789e"),
    ("Pose and face mask (drawn on demand)", [320, -90, 720, 470], "#b06634"),
    ("Models", [320, 400, 370, 470], "#88A"),
    ("Identity", [690, 400, 360, 400], "#b58b2a"),
    ("Sampling and background (streamed: flat memory for any clip length)", [1070, -90, 730, 720], "#b06634"),
    ("Face crop: small faces in large frames", [1430, 330, 370, 230], "#3f8f6e"),
    ("Output: source fps and audio", [1830, -90, 460, 570], "#a1309b"),
]

NODES_DEFAULT, LINKS_DEFAULT, GROUPS_DEFAULT, CONTROL_DEFAULT = NODES, LINKS, GROUPS, CONTROL


def _output_names(info: dict) -> list:
    return list(info.get("output_name") or info["output"])


def _default(spec):
    kind = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if "default" in opts:
        return opts["default"]
    options = kind if isinstance(kind, list) else opts.get("options", [])
    if options:
        return options[0]
    if isinstance(kind, list):
        return ""
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(kind, "")


def build(object_info: dict, allow_missing: bool = False, nodes_layout: dict = None, links_layout: list = None,
          groups_layout: list = None, control: dict = None, workflow_id: str = WORKFLOW_ID) -> dict:
    """The UI-format workflow of a layout (default: the swap workflow's NODES/LINKS/GROUPS);
    ``allow_missing`` drops node types /object_info lacks (drafts only)."""
    NODES = NODES_DEFAULT if nodes_layout is None else nodes_layout
    LINKS = LINKS_DEFAULT if links_layout is None else links_layout
    GROUPS = GROUPS_DEFAULT if groups_layout is None else groups_layout
    CONTROL = CONTROL_DEFAULT if control is None else control
    if allow_missing:
        NODES = {k: v for k, v in NODES.items() if v[0] in object_info}
        LINKS = [l for l in LINKS if l[0] in NODES and l[2] in NODES]
    links, link_rows = [], {}
    for i, (src, out_name, dst, in_name) in enumerate(LINKS, start=1):
        s_info = object_info[NODES[src][0]]
        slot = _output_names(s_info).index(out_name)
        links.append([i, src, slot, dst, in_name, s_info["output"][slot]])
        link_rows.setdefault((dst, in_name), []).append(i)
    nodes = []
    for order, (nid, (type_, pos, size, title, values)) in enumerate(NODES.items()):
        info = object_info[type_]
        unknown = set(values) - {n for n, _ in _input_specs(info)}
        assert not unknown, f"{type_} has no inputs {unknown}"
        inputs, widgets = [], []
        for name, spec in _input_specs(info):
            linked = [l for l in links if l[3] == nid and l[4] == name]
            optional = name in info["input"].get("optional", {})
            if _is_widget(spec):
                widgets.append(values.get(name, _default(spec)))
                if _has_control(name, spec):
                    widgets.append(CONTROL.get(nid, "fixed"))
                if _has_upload(spec):
                    widgets.append("image")
                if not linked:
                    continue
            row = {"name": name, "type": spec[0] if isinstance(spec[0], str) else "COMBO",
                   "link": linked[0][0] if linked else None}
            if optional:
                row["shape"] = 7
            if _is_widget(spec):
                row["widget"] = {"name": name}
            inputs.append(row)
        outputs = []
        for slot, (oname, otype) in enumerate(zip(_output_names(info), info["output"])):
            outputs.append({"name": oname, "type": otype, "slot_index": slot,
                            "links": [l[0] for l in links if l[1] == nid and l[2] == slot] or None})
        node = {"id": nid, "type": type_, "pos": pos, "size": size, "flags": {}, "order": order, "mode": 0,
                "inputs": inputs, "outputs": outputs,
                "properties": {"Node name for S&R": type_,
                               "cnr_id": "comfy-core" if not type_.startswith("DreamIDV") else "comfyui-dreamidv"},
                "widgets_values": widgets}
        if title:
            node["title"] = title
        nodes.append(node)
    # the canvas stores links as [id, origin, origin_slot, target, target_slot, type]
    for row in links:
        dst_inputs = next(n for n in nodes if n["id"] == row[3])["inputs"]
        row[4] = next(k for k, inp in enumerate(dst_inputs) if inp["name"] == row[4])
    groups = [{"id": i, "title": t, "bounding": b, "color": c, "font_size": 24, "flags": {}}
              for i, (t, b, c) in enumerate(GROUPS, start=1)]
    return {"id": workflow_id, "revision": 0, "last_node_id": max(NODES),
            "last_link_id": len(links), "nodes": nodes, "links": links, "groups": groups, "config": {},
            "extra": {"ds": {"scale": 0.62, "offset": [140, 260]}}, "version": 0.4}


def write_workflow(out: Path, **layout) -> int:
    """Start a throw-away ComfyUI ($COMFYUI_DIR), build the layout against its /object_info, write ``out``."""
    comfy = Path(os.environ.get("COMFYUI_DIR", REPO_ROOT / ".cache" / "ComfyUI"))
    tmp = Path(tempfile.mkdtemp(prefix="dreamidv-wf-"))
    with ComfyServer(comfy, tmp / "base", tmp / "models") as s:
        wf = build(s.object_info(), allow_missing="--draft" in sys.argv, **layout)
    out.write_text(json.dumps(wf, indent=2) + "\n")
    print(f"wrote {out} ({len(wf['nodes'])} nodes, {len(wf['links'])} links)", file=sys.stderr)
    return 0


def main() -> int:
    return write_workflow(OUT)


if __name__ == "__main__":
    sys.exit(main())
