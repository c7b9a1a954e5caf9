"""Writes ``workflows/dreamidv_swap_two_people.json``: swapping two people is two passes, the second on the
first one's output. Pass 1 swaps person 0 (the leftmost when people first appear) for photo A; pass 2 takes
pass 1's frames and swaps person 1 for photo B. Each pass's SAM 2 composite keeps everything outside the
pass's target head, so pass 2 leaves pass 1's new face as it is. One face-crop switch drives all four
nodes that have it (off: whole frame, as released). Both passes stream (VIDEO in, VIDEO out, pose and mask
drawn on demand): pass 2 reads pass 1's composited VIDEO, and Save Video writes pass 2's with the source's
frame rate and sound. Built from the live ``/object_info`` like
tests/build_workflow.py; re-run after a node's inputs change::

    .venv/bin/python -m tests.build_two_people_workflow      # starts a throw-away ComfyUI ($COMFYUI_DIR)

tests/test_workflow.py checks that the committed file still matches the schemas and runs it.
"""
from __future__ import annotations

import json
import sys

from tests import build_workflow as bw
from tests.comfy_harness import REPO_ROOT

OUT = REPO_ROOT / "workflows" / "dreamidv_swap_two_people.json"
WORKFLOW_ID = "0c6a4f1e-2b7d-4d55-8e3a-9f4b7c21d6e8"
W, H = bw.W, bw.H


def _pass(first: int, y: int, person: int, photo_title: str) -> dict:
    """The nodes of one pass, ids first..first+4: pose + mask of ``person``, PoseGuider, identity, sampler,
    SAM 2 composite."""
    return {
        first: ("DreamIDVPoseExtract", [640, y], [330, 420], f"Pass {person + 1}: pose and mask of person {person}",
                {"source": "mediapipe", "mediapipe_model": "face_landmarker_v2_with_blendshapes.task",
                 "detector_model": "yolox_l.onnx", "pose_model": "dw-ll_ucoco_384.onnx", "target": "index",
                 "target_index": person}),
        first + 1: ("DreamIDVPoseGuider", [1010, y], [300, 280], None, {"width": W, "height": H}),
        first + 2: ("DreamIDVIdentityEncoder", [1010, y + 320], [320, 290], f"Identity: {photo_title}",
                    {"width": W, "height": H}),
        first + 3: ("DreamIDVSampler", [1370, y], [320, 470], None,
                    {"width": W, "height": H, "steps": bw.STEPS, "shift": bw.SHIFT,
                     "identity_guidance": bw.GUIDANCE, "seed": 0}),
        first + 4: ("DreamIDVBackgroundComposite", [1730, y], [330, 230], None,
                    {"sam2_checkpoint": "sam2.1_hiera_tiny.pt", "sam2_config": "auto"}),
    }


PASS_2_Y = 760
NODES = {
    1: ("LoadVideo", [0, 0], [300, 360], "Source video (two people)", {"file": "source.mp4"}),
    3: ("LoadImage", [0, 420], [300, 340], "Photo A: new face for person 0 (leftmost)", {"image": "reference.png"}),
    4: ("LoadImage", [0, 800], [300, 340], "Photo B: new face for person 1", {"image": "reference.png"}),
    5: ("DreamIDVModelLoader", [0, 1260], [330, 160], None, {"model_name": "dreamidv.safetensors"}),
    6: ("VAELoader", [0, 1460], [330, 60], None, {"vae_name": "wan_2.1_vae.safetensors"}),
    7: ("DreamIDVTextContext", [0, 1560], [330, 130], None,
        {"text_encoder": "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "precomputed_context": "none"}),
    **_pass(8, 0, 0, "photo A"),
    **_pass(13, PASS_2_Y, 1, "photo B"),
    19: ("SaveVideo", [2100, PASS_2_Y], [420, 460], None, {"filename_prefix": "video/DreamID-V_two_people"}),
    20: ("PrimitiveBoolean", [340, 130], [260, 60], "Face crop (off: whole frame, as released)", {"value": False}),
    21: ("PrimitiveFloat", [340, 220], [260, 60], "Crop margin (face sizes around the face)", {"value": 1.0}),
}
CONTROL = {11: "fixed", 16: "fixed"}


def _pass_links(first: int, frames, photo: int) -> list:
    """Links of one pass; ``frames``: (node, output) of the frames it swaps."""
    pose, guider, ident, sampler, comp = range(first, first + 5)
    return [
        (*frames, pose, "frames"), (photo, "IMAGE", pose, "reference"),
        (pose, "pose_mask", guider, "pose_video"), (5, "model", guider, "model"), (pose, "pose_mask", guider, "mask"),
        (photo, "IMAGE", ident, "reference"), (*frames, ident, "video"), (6, "VAE", ident, "vae"),
        (5, "model", sampler, "model"), (6, "VAE", sampler, "vae"), (7, "positive", sampler, "positive"),
        (ident, "identity", sampler, "identity"), (*frames, sampler, "video"), (pose, "pose_mask", sampler, "mask"),
        (guider, "pose_tokens", sampler, "pose_tokens"),
        (*frames, comp, "frames"), (sampler, "video", comp, "generated"), (pose, "pose_mask", comp, "face_mask"),
        (20, "BOOLEAN", guider, "face_crop"), (20, "BOOLEAN", sampler, "face_crop"),
        (21, "FLOAT", guider, "crop_margin"), (21, "FLOAT", sampler, "crop_margin"),
    ]


LINKS = [
    *_pass_links(8, (1, "VIDEO"), 3),
    *_pass_links(13, (12, "video"), 4),  # pass 2 swaps pass 1's output
    (17, "video", 19, "video"),
]

GROUPS = [
    ("Inputs: the clip and one photo per person", [-20, -90, 640, 1250], "#3f789e"),
    ("Models", [-20, 1190, 370, 520], "#88A"),
    ("Pass 1: person 0 (leftmost at first appearance) -> photo A", [620, -90, 1460, 820], "#b06634"),
    ("Pass 2, on pass 1's output: person 1 -> photo B", [620, PASS_2_Y - 90, 1460, 820], "#b58b2a"),
    ("Output: source fps and audio", [2080, PASS_2_Y - 90, 460, 710], "#a1309b"),
]


def build(object_info: dict) -> dict:
    wf = bw.build(object_info, nodes_layout=NODES, links_layout=LINKS, groups_layout=GROUPS, control=CONTROL,
                  workflow_id=WORKFLOW_ID)
    return json.loads(json.dumps(wf))


def main() -> int:
    return bw.write_workflow(OUT, nodes_layout=NODES, links_layout=LINKS, groups_layout=GROUPS, control=CONTROL,
                             workflow_id=WORKFLOW_ID)


if __name__ == "__main__":
    sys.exit(main())
