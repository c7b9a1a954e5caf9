"""Writes ``workflows/dreamidv_swap.json`` (ComfyUI's UI/canvas format) from a compact layout and
the live ``/object_info`` of a ComfyUI with this pack, so sockets, widget order and widget values
match the node schemas exactly. Re-run after a node's inputs change:

    .venv/bin/python -m tests.build_workflow            # starts a throw-away ComfyUI ($COMFYUI_DIR)

tests/test_workflow.py checks that the committed file still matches the schemas.

Layout (every bundled workflow goes through :func:`build`, so every one gets it): a layout gives each node a
position and a size as *hints*. The saved size is at least the node's real size, computed from its schema
the way the ComfyUI frontend's ``LGraphNode.computeSize`` does (slot rows, one row per widget, the title and
labels), so no widget is ever hidden; nodes that would then overlap are pushed down; a group holds the
nodes whose hinted centre lies in its hinted rectangle and its saved rectangle is computed from them
(``LGraphGroup.resizeTo``: 10 px padding and the title band); groups and loose nodes that would overlap are
pushed down as blocks. tests/test_workflow_layout.py checks every JSON under workflows/ for overlapping
nodes, nodes outside their group and overlapping groups; tests/test_browser_workflow.py checks the saved
sizes against the real frontend's ``computeSize``.
"""
from __future__ import annotations

import json
import math
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
    6: ("DreamIDVTextContext", [340, 740], [330, 110], None, {"text_encoder": "auto", "precomputed_context": "none"}),
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


# ---------------------------------------------------------------------------------------------- layout
# LiteGraph's metrics in the ComfyUI frontend (1.32): title bar, slot row, widget row (+4 between widgets, +8
# under them, +6 at the bottom), fonts 14 px (title) / 12 px (slots, widgets), group title = font 24 * 1.4.
TITLE_H, SLOT_H, WIDGET_H, TITLE_FONT, INNER_FONT = 30, 20, 20, 14, 12
GROUP_FONT, GROUP_TITLE_H, GROUP_PAD, GAP = 24, 24 * 1.4, 10, 20
BADGE_H = 16  # the node-source badge ("comfyui-dreamidv") drawn above a node's title bar
DOM_WIDGET_H = 80  # multiline text (a DOM textarea; the frontend's minimum is 50)
# widgets the frontend adds to core nodes beyond their schema: (node type) -> heights
FRONTEND_WIDGETS = {"PreviewAny": [DOM_WIDGET_H]}


def _text_w(text: str, font: int) -> float:
    """The frontend's text width estimate (``compute_text_size`` without a canvas: 0.6 em per character);
    real fonts are narrower, so this errs on the wide side."""
    return font * 0.6 * len(text or "")


def min_node_size(info: dict, title: str) -> list:
    """[width, height] of a node of ``info`` (an /object_info entry) as ``LGraphNode.computeSize`` makes it:
    the height of its slot rows plus every widget row, the width of its title, labels and widget minimum."""
    specs = _input_specs(info)
    sockets = [name for name, spec in specs if not _is_widget(spec)]
    widget_labels, heights = [], []
    for name, spec in specs:
        if not _is_widget(spec):
            continue
        opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
        widget_labels.append(name)
        heights.append(DOM_WIDGET_H if opts.get("multiline") else WIDGET_H)
        if _has_control(name, spec):
            heights.append(WIDGET_H)
        if _has_upload(spec):
            heights.append(WIDGET_H)
    heights += FRONTEND_WIDGETS.get(info.get("name", ""), [])
    outputs = _output_names(info)
    rows = max(len(sockets), len(outputs), 1)
    height = rows * SLOT_H + (sum(h + 4 for h in heights) + 8 if heights else 0) + 6
    in_w = max((_text_w(n, INNER_FONT) for n in sockets), default=0)
    out_w = max((_text_w(n, INNER_FONT) for n in outputs), default=0)
    widths = [in_w + out_w + 2 * SLOT_H + (5 if in_w and out_w else 0),
              TITLE_H + _text_w(title, TITLE_FONT) + TITLE_H * 0.33,
              140 * (1.5 if heights else 1)]
    if widget_labels:
        widths.append(max(_text_w(n, INNER_FONT) for n in widget_labels) + 42 + 2 * (15 + 6 + 10))
    return [int(math.ceil(max(widths))), int(math.ceil(height))]


def node_rect(pos, size) -> tuple:
    """(left, top, right, bottom) of a node on the canvas, title bar included."""
    return pos[0], pos[1] - TITLE_H, pos[0] + size[0], pos[1] + size[1]


def group_rect(rects, title: str = "") -> tuple:
    """A group around node rectangles as ``LGraphGroup.resizeTo`` makes it (padding, title band on top, plus room
    for the nodes' source badges under the title), at least as wide as its title."""
    left, top = min(r[0] for r in rects) - GROUP_PAD, min(r[1] for r in rects) - GROUP_PAD - GROUP_TITLE_H - BADGE_H
    right, bottom = max(r[2] for r in rects) + GROUP_PAD, max(r[3] for r in rects) + GROUP_PAD
    right = max(right, left + group_title_width(title))
    return math.floor(left), math.floor(top), math.ceil(right), math.ceil(bottom)


def group_title_width(title: str) -> int:
    """Room a group's title needs (estimated on the wide side, like node text)."""
    return int(math.ceil(_text_w(title, GROUP_FONT) + 2 * GROUP_PAD))


def overlap(a, b, gap: float = 0) -> bool:
    """Rectangles (left, top, right, bottom) closer than ``gap`` (touching is not overlapping when gap is 0)."""
    return a[0] < b[2] + gap and b[0] < a[2] + gap and a[1] < b[3] + gap and b[1] < a[3] + gap


def _push_down(items: list, rect_of, move) -> None:
    """Place ``items`` in order (top to bottom, then left to right); each is moved down until it keeps ``GAP``
    from every item placed before it."""
    placed = []
    for item in sorted(items, key=lambda it: (rect_of(it)[1], rect_of(it)[0])):
        moved = True
        while moved:
            moved = False
            for other in placed:
                a, b = rect_of(item), rect_of(other)
                if overlap(a, b, GAP):
                    move(item, b[3] + GAP - a[1])
                    moved = True
        placed.append(item)


def arrange(nodes: dict, sizes: dict, groups: list) -> tuple:
    """Positions and group rectangles without overlaps. ``nodes``: {id: (type, pos, size, ...)} (hints);
    ``sizes``: {id: [w, h]} (at least the real sizes); ``groups``: [(title, [x, y, w, h] hint, colour)].
    -> ({id: [x, y]}, [(title, [x, y, w, h], colour)])."""
    pos = {nid: list(spec[1]) for nid, spec in nodes.items()}
    members = {i: [] for i in range(len(groups))}
    loose = []
    for nid, spec in nodes.items():
        cx, cy = spec[1][0] + spec[2][0] / 2, spec[1][1] + (spec[2][1] - TITLE_H) / 2
        home = next((i for i, (_, (x, y, w, h), _c) in enumerate(groups) if x <= cx <= x + w and y <= cy <= y + h),
                    None)
        (members[home] if home is not None else loose).append(nid)

    def rect(nid):
        return node_rect(pos[nid], sizes[nid])

    def move_node(nid, dy):
        pos[nid][1] += dy

    for ids in list(members.values()) + [loose]:  # nodes of one group (and loose ones) do not overlap
        _push_down(ids, rect, move_node)
    blocks = [("group", i) for i, ids in members.items() if ids] + [("node", nid) for nid in loose]

    def block_rect(block):
        kind, key = block
        return group_rect([rect(n) for n in members[key]], groups[key][0]) if kind == "group" else rect(key)

    def move_block(block, dy):
        for nid in (members[block[1]] if block[0] == "group" else [block[1]]):
            move_node(nid, dy)

    _push_down(blocks, block_rect, move_block)
    out_groups = []
    for i, (title, _hint, colour) in enumerate(groups):
        if members[i]:
            left, top, right, bottom = group_rect([rect(n) for n in members[i]], title)
            out_groups.append((title, [left, top, right - left, bottom - top], colour))
    return {nid: [int(round(p[0])), int(round(p[1]))] for nid, p in pos.items()}, out_groups


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
    sizes = {nid: [max(int(a), b) for a, b in zip(spec[2], min_node_size(
        {**object_info[spec[0]], "name": spec[0]}, spec[3] or object_info[spec[0]].get("display_name") or spec[0]))]
        for nid, spec in NODES.items()}
    positions, GROUPS = arrange(NODES, sizes, GROUPS)
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
        node = {"id": nid, "type": type_, "pos": positions[nid], "size": sizes[nid], "flags": {}, "order": order,
                "mode": 0,
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
