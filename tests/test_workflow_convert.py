"""The UI -> API workflow converter of tests/comfy_harness.py, on a hand-made workflow (no ComfyUI)."""
from __future__ import annotations

import json

import pytest

from tests.comfy_harness import map_widget_values, missing_node_types, ui_to_api, widget_names

# /object_info entries in the shapes ComfyUI 0.3.75 serves: V1 (combo as a list) and V3 ("COMBO").
OBJECT_INFO = {
    "LoadImage": {"input": {"required": {"image": [["a.png", "b.png"], {"image_upload": True}]}},
                  "input_order": {"required": ["image"]}, "output": ["IMAGE", "MASK"]},
    "LoadVideo": {"input": {"required": {"file": ["COMBO", {"options": ["c.mp4"], "video_upload": True}]}},
                  "input_order": {"required": ["file"]}, "output": ["VIDEO"]},
    "Sampler": {"input": {"required": {"model": ["MODEL", {}],
                                       "seed": ["INT", {"default": 0, "control_after_generate": True}],
                                       "steps": ["INT", {"default": 20}],
                                       "sampler": ["COMBO", {"options": ["unipc", "euler"]}]},
                          "optional": {"image": ["IMAGE", {}], "shift": ["FLOAT", {"default": 5.0}],
                                       "latent": ["LATENT", {"forceInput": True}]}},
                "input_order": {"required": ["model", "seed", "steps", "sampler"],
                                "optional": ["image", "shift", "latent"]},
                "output": ["IMAGE"]},
    "Loader": {"input": {"required": {"name": [["m.safetensors"], {}], "noise_seed": ["INT", {}]}},
               "input_order": {"required": ["name", "noise_seed"]}, "output": ["MODEL"]},
    "Scale": {"input": {"required": {"image": ["IMAGE", {}], "factor": ["FLOAT", {}]}},
              "input_order": {"required": ["image", "factor"]}, "output": ["IMAGE"]},
    "Save": {"input": {"required": {"images": ["IMAGE", {}], "prefix": ["STRING", {}]}},
             "input_order": {"required": ["images", "prefix"]}, "output": []},
}


def _node(nid, type_, inputs=(), outputs=(), widgets=None, mode=0):
    return {"id": nid, "type": type_, "pos": [0, 0], "size": [100, 100], "flags": {}, "order": nid, "mode": mode,
            "inputs": list(inputs), "outputs": list(outputs), "properties": {}, "widgets_values": widgets or []}


def _workflow():
    nodes = [
        _node(1, "Loader", outputs=[{"name": "MODEL", "type": "MODEL", "links": [1]}],
              widgets=["m.safetensors", 7, "fixed"]),
        _node(2, "LoadImage", outputs=[{"name": "IMAGE", "type": "IMAGE", "links": [2]},
                                       {"name": "MASK", "type": "MASK", "links": None}],
              widgets=["b.png", "image"]),
        _node(3, "Reroute", inputs=[{"name": "", "type": "*", "link": 2}],
              outputs=[{"name": "", "type": "IMAGE", "links": [3]}]),
        _node(4, "PrimitiveNode", outputs=[{"name": "INT", "type": "INT", "links": [4],
                                            "widget": {"name": "steps"}}], widgets=[33, "fixed"]),
        _node(5, "Sampler",
              inputs=[{"name": "model", "type": "MODEL", "link": 1},
                      {"name": "steps", "type": "INT", "link": 4, "widget": {"name": "steps"}},
                      {"name": "image", "type": "IMAGE", "link": 3, "shape": 7},
                      {"name": "shift", "type": "FLOAT", "link": 6, "widget": {"name": "shift"}}],
              outputs=[{"name": "IMAGE", "type": "IMAGE", "links": [5]}],
              widgets=[123, "randomize", 20, "euler", 5.0]),
        _node(6, "Scale", inputs=[{"name": "image", "type": "IMAGE", "link": 5}],
              outputs=[{"name": "IMAGE", "type": "IMAGE", "links": [7]}], widgets=[2.0], mode=4),
        _node(7, "Save", inputs=[{"name": "images", "type": "IMAGE", "link": 7}], widgets=["out/x"]),
        _node(8, "Note", widgets=["a note"]),
        _node(9, "Save", inputs=[{"name": "images", "type": "IMAGE", "link": None}], widgets=["muted"], mode=2),
        _node(10, "LoadVideo", outputs=[{"name": "VIDEO", "type": "VIDEO", "links": None}],
              widgets=["c.mp4", "image"]),
        _node(11, "Loader", outputs=[{"name": "FLOAT", "type": "FLOAT", "links": [6]}],
              widgets=["m.safetensors", 1]),
    ]
    links = [[1, 1, 0, 5, 0, "MODEL"], [2, 2, 0, 3, 0, "IMAGE"], [3, 3, 0, 5, 2, "IMAGE"],
             [4, 4, 0, 5, 1, "INT"], [5, 5, 0, 6, 0, "IMAGE"], [6, 11, 0, 5, 3, "FLOAT"],
             [7, 6, 0, 7, 0, "IMAGE"]]
    return {"last_node_id": 11, "last_link_id": 7, "nodes": nodes, "links": links, "groups": [],
            "config": {}, "extra": {}, "version": 0.4}


def test_widget_names_follow_input_order_and_skip_sockets():
    assert widget_names(OBJECT_INFO["Sampler"]) == ["seed", "steps", "sampler", "shift"]
    assert widget_names(OBJECT_INFO["LoadVideo"]) == ["file"]


def test_extra_frontend_values_are_skipped():
    assert map_widget_values(OBJECT_INFO["Sampler"], [1, "increment", 4, "unipc", 3.0]) == \
        {"seed": 1, "steps": 4, "sampler": "unipc", "shift": 3.0}
    # an older save without the control value still maps
    assert map_widget_values(OBJECT_INFO["Sampler"], [1, 4, "unipc", 3.0]) == \
        {"seed": 1, "steps": 4, "sampler": "unipc", "shift": 3.0}
    # seed-named INT without the flag gets the control value too (frontend behaviour)
    assert map_widget_values(OBJECT_INFO["Loader"], ["m.safetensors", 7, "fixed"]) == \
        {"name": "m.safetensors", "noise_seed": 7}
    assert map_widget_values(OBJECT_INFO["LoadImage"], ["b.png", "image"]) == {"image": "b.png"}
    assert map_widget_values(OBJECT_INFO["LoadImage"], ["b.png"]) == {"image": "b.png"}


def test_ui_to_api_full_graph():
    api = ui_to_api(_workflow(), OBJECT_INFO)
    json.dumps(api)  # serialisable
    assert set(api) == {"1", "2", "5", "7", "10", "11"}  # Note, Reroute, Primitive, muted, bypassed gone
    assert api["1"]["inputs"] == {"name": "m.safetensors", "noise_seed": 7}
    assert api["2"]["inputs"] == {"image": "b.png"}
    assert api["10"] == {"class_type": "LoadVideo", "inputs": {"file": "c.mp4"}, "_meta": {"title": "LoadVideo"}}
    s = api["5"]["inputs"]
    assert s["model"] == ["1", 0]
    assert s["image"] == ["2", 0]  # through the Reroute
    assert s["steps"] == 33  # from the PrimitiveNode, not the stale widget value
    assert s["shift"] == ["11", 0]  # converted widget fed by a link
    assert s["seed"] == 123 and s["sampler"] == "euler"
    assert "latent" not in s
    assert api["7"]["inputs"] == {"images": ["5", 0], "prefix": "out/x"}  # bypassed Scale passed through


def test_missing_nodes_are_named():
    wf = _workflow()
    wf["nodes"].append(_node(12, "NotInstalledNode"))
    assert missing_node_types(wf, OBJECT_INFO) == ["NotInstalledNode"]
    with pytest.raises(KeyError, match="NotInstalledNode"):
        ui_to_api(wf, OBJECT_INFO)
