"""SyncID-Pipe in a real ComfyUI: the bundled ``workflows/syncid_data_synthesis.json`` runs through
/prompt on tiny models, writes a training dataset, and the trainer loads that dataset and trains on it.

Graph: load the real clip V_r -> its face mask (Pose Extract) -> expression adaptation onto I_g ->
first/last frames -> image face swap of both to I_g -> IVS (first/last frame + pose) -> V_g -> SAM2
background recomposition -> V'_g -> pose of V'_g onto the real person -> quadruplet writer.

Stand-ins: every model is a tiny random-weight model in the official format (tests/test_workflow.py's
builders, plus a tiny IVS). MediaPipe's landmarker cannot be built small, so a test-only custom-node
folder (``aaa_dreamidv_test_doubles``, written by the fixture, never shipped) replaces the landmarker class
in the server by a deterministic fake with the same interface (a face in every non-black frame, whose
shape follows the frame's mean colour), and the writer's ArcFace encoder by a mean-colour one: the
random tiny IVS draws noise, in which the tiny ArcFace detector finds no face, so every forward pair would
be rejected (the writer's real ArcFace path and its thresholds are tested in tests/test_synthesis*.py).

Regenerate the workflow file after a node's inputs change: ``python -m tests.test_synthesis_workflow``.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.comfy_harness import PACK_DIR, ComfyServer, ui_to_api

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

WORKFLOW = PACK_DIR / "workflows" / "syncid_data_synthesis.json"
WORKFLOW_ID = "3b7e9a14-52c8-4f0e-8d6a-1c2f9e7b4a60"
W, H, FRAMES, FPS = 64, 48, 9, 12
STEPS = 20

# id: (type, [x, y], [w, h], title, {widget: value})
WF_NODES = {
    1: ("LoadVideo", [0, 0], [300, 360], "Real clip V_r", {"file": "real_clip.mp4"}),
    2: ("GetVideoComponents", [340, 0], [240, 70], None, {}),
    3: ("LoadImage", [0, 420], [300, 340], "New identity I_g (any text-to-image output works)",
        {"image": "identity_g.png"}),
    4: ("LoadImage", [0, 800], [300, 340], "Photo of the real person (another shot)", {"image": "real_person.png"}),
    5: ("DreamIDVModelLoader", [0, 1260], [330, 130], None, {"model_name": "dreamidv.safetensors"}),
    6: ("VAELoader", [0, 1540], [330, 60], None, {"vae_name": "wan_2.1_vae.safetensors"}),
    7: ("DreamIDVTextContext", [0, 1650], [330, 110], None, {"text_encoder": "auto", "precomputed_context": "none"}),
    8: ("DreamIDVPoseExtract", [640, 0], [330, 200], "Face mask of V_r",
        {"source": "mediapipe", "mediapipe_model": "face_landmarker_v2_with_blendshapes.task"}),
    9: ("DreamIDVExpressionAdaptation", [640, 410], [330, 130], None,
        {"mediapipe_model": "face_landmarker_v2_with_blendshapes.task"}),
    10: ("DreamIDVFirstLastFrames", [1010, 0], [300, 190], None, {}),
    11: ("DreamIDVIdentityEncoder", [1010, 250], [300, 300], "ArcFace ID of I_g", {"width": 832, "height": 480}),
    12: ("DreamIDVImageFaceSwap", [1350, 0], [320, 400], "Swap the first frame to I_g",
         {"width": 832, "height": 480, "steps": STEPS}),
    13: ("DreamIDVImageFaceSwap", [1350, 440], [320, 400], "Swap the last frame to I_g",
         {"width": 832, "height": 480, "steps": STEPS}),
    14: ("DreamIDVIVSLoader", [1710, 540], [320, 150], None, {"model_name": "dreamidv_ivs.safetensors"}),
    15: ("DreamIDVIVSSampler", [1710, 0], [320, 400], "IVS: V_g from first/last frame + pose",
         {"width": 832, "height": 480, "steps": STEPS}),
    16: ("DreamIDVBackgroundRecompose", [2110, 0], [340, 380], "V'_g: V_g over V_r's clean background",
         {"sam2_checkpoint": "sam2.1_hiera_tiny.pt", "sam2_config": "auto"}),
    17: ("DreamIDVPoseExtract", [2110, 440], [330, 200], "Pose of V'_g onto the real person",
         {"source": "mediapipe", "mediapipe_model": "face_landmarker_v2_with_blendshapes.task"}),
    18: ("DreamIDVQuadrupletWriter", [2500, 0], [360, 560], None,
         {"dataset_folder": "dreamidv_dataset", "sample_prefix": "clip_0001"}),
    19: ("CreateVideo", [2110, 700], [270, 80], "Preview V_g", {}),
    20: ("SaveVideo", [2110, 820], [400, 420], None, {"filename_prefix": "syncid/V_g"}),
    21: ("PreviewAny", [2500, 620], [360, 200], "Samples written / skipped / rejected", {}),
}
WF_CONTROL = {12: "fixed", 13: "fixed", 15: "fixed"}

# (from node, output name, to node, input name)
WF_LINKS = [
    (1, "VIDEO", 2, "video"),
    (1, "VIDEO", 8, "frames"),  # the nodes that read the clip take the VIDEO (streamed); Get Video Components
    (1, "VIDEO", 9, "frames"),  # feeds only the background recomposition and the writer, which hold the clip
    (3, "IMAGE", 9, "identity_image"),
    (1, "VIDEO", 10, "frames"),
    (8, "mask", 10, "mask"),
    (9, "pose", 10, "pose"),
    (3, "IMAGE", 11, "reference"),
    (1, "VIDEO", 11, "video"),
    (6, "VAE", 11, "vae"),
    (10, "first", 12, "image"),
    (10, "first_mask", 12, "mask"),
    (10, "first_pose", 12, "pose"),
    (10, "last", 13, "image"),
    (10, "last_mask", 13, "mask"),
    (10, "last_pose", 13, "pose"),
    (5, "model", 12, "model"),
    (5, "model", 13, "model"),
    (6, "VAE", 12, "vae"),
    (6, "VAE", 13, "vae"),
    (7, "positive", 12, "positive"),
    (7, "positive", 13, "positive"),
    (11, "identity", 12, "identity"),
    (11, "identity", 13, "identity"),
    (14, "model", 15, "model"),
    (6, "VAE", 15, "vae"),
    (7, "positive", 15, "positive"),
    (12, "image", 15, "first_frame"),
    (13, "image", 15, "last_frame"),
    (9, "pose", 15, "pose_video"),
    (2, "images", 16, "real_frames"),
    (8, "mask", 16, "real_mask"),
    (15, "frames", 16, "generated"),
    (9, "mask", 16, "generated_mask"),
    (16, "recomposed", 17, "frames"),
    (4, "IMAGE", 17, "reference"),
    (2, "images", 18, "real_frames"),
    (15, "frames", 18, "generated"),
    (3, "IMAGE", 18, "identity_image"),
    (8, "mask", 18, "forward_mask"),
    (17, "mask", 18, "backward_mask"),
    (9, "pose", 18, "forward_pose"),
    (17, "pose", 18, "backward_pose"),
    (16, "recomposed", 18, "recomposed"),
    (4, "IMAGE", 18, "real_identity"),
    (2, "fps", 18, "fps"),
    (15, "frames", 19, "images"),
    (2, "fps", 19, "fps"),
    (19, "VIDEO", 20, "video"),
    (18, "summary", 21, "source"),  # the writer's counts on the canvas (newer frontends do not draw a node's ui text)
]

WF_GROUPS = [  # rectangles are hints: a group holds the nodes whose centre lies in it (tests/build_workflow.py)
    ("Inputs: V_r, I_g, real person's photo", [-20, -90, 620, 1250], "#3f789e"),
    ("Models", [-20, 1200, 370, 600], "#88A"),
    ("Pose, expression adaptation, first/last frames", [620, -90, 710, 830], "#b06634"),
    ("Swap frames to I_g", [1330, -90, 360, 950], "#b58b2a"),
    ("IVS: V_g from the frames", [1690, -90, 400, 800], "#8A8"),
    ("Background recomposition and writer", [2090, -90, 800, 1340], "#a1309b"),
]


def build_workflow(info: dict) -> dict:
    """The UI-format workflow, through tests/build_workflow.py's builder with this layout."""
    from tests import build_workflow as bw

    wf = bw.build(info, nodes_layout=WF_NODES, links_layout=WF_LINKS, groups_layout=WF_GROUPS,
                  control=WF_CONTROL, workflow_id=WORKFLOW_ID)
    return json.loads(json.dumps(wf))


# --------------------------------------------------------------------------- test doubles in the server
DOUBLES = '''"""Test-only custom node folder (written by tests/test_synthesis_workflow.py): replaces MediaPipe's
face landmarker by a deterministic fake with the same interface. Never shipped."""
import os
import sys

import numpy as np

sys.path.insert(0, {pack!r})
from dreamidv_core.preprocess.pose import face_geometry as _fg  # noqa: E402
from dreamidv_core.preprocess.pose import mediapipe_face as _mpf  # noqa: E402

_REAL = _mpf.FaceLandmarker


class FakeFaceLandmarker:
    """A face in every frame that is not black; its shape follows the frame's mean green, its expression
    the mean blue; it sits in the middle of the frame."""

    def __init__(self, path=None, *args, **kwargs):
        self.canonical = np.random.default_rng(0).normal(size=(468, 3)) * np.array([6.0, 8.0, 3.0])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def close(self):
        pass

    def __call__(self, img):
        img = np.asarray(img)
        mean = img.reshape(-1, img.shape[-1])[:, :3].mean(0)
        if mean.max() < 8:
            return None
        h, w = img.shape[:2]
        mesh = self.canonical * (0.8 + 0.4 * mean[1] / 255.0)
        mesh[13, 1] -= mean[2] / 255.0
        pose = np.eye(4)
        pose[:3, 3] = [0, 0, -60]
        pts = _fg.project(mesh, pose, w, h)
        lm = np.zeros((478, 3))
        lm[:468, 0], lm[:468, 1] = pts[:, 0] / w, pts[:, 1] / h
        lm[468:, :2] = lm[[33] * 5 + [263] * 5, :2]
        return _mpf.FaceFrame(lm, mesh, pose, float(mean[2]) / 255.0, w, h)


_mpf.FaceLandmarker = FakeFaceLandmarker
for _mod in list(sys.modules.values()):  # the pack may have been imported first
    if getattr(_mod, "FaceLandmarker", None) is _REAL:
        _mod.FaceLandmarker = FakeFaceLandmarker


def colour_encoder(analyzer):
    """The writer's identity encoder: a face in every non-black image, embedded by its centred mean colour
    (a random tiny IVS cannot draw the face marker the tiny ArcFace detector needs)."""

    def encode(images):
        return [None if im.max() < 8 else im.reshape(-1, 3).mean(0) / 255.0 - 0.5 for im in images]

    return encode


import dreamidv_core.synthesis as _syn  # noqa: E402

_syn.analyzer_encoder = colour_encoder
NODE_CLASS_MAPPINGS = {{}}
'''


def build_models(models: Path) -> dict:
    """The swap workflow's tiny models, a tiny IVS and a placeholder landmarker file."""
    import torch
    from dreamidv_core.weights.checkpoints import save_dit
    from dreamidv_core.models.configs import tiny_config
    from dreamidv_core.models.dit import DreamIDVTransformer, init_random_
    from tests.test_workflow import build_tiny_models

    names = build_tiny_models(models)
    torch.manual_seed(0)
    ivs = init_random_(DreamIDVTransformer(tiny_config("ivs", text_dim=4096)), seed=5)
    save_dit(ivs, models / "dreamidv" / "dreamidv_ivs.safetensors")
    (models / "mediapipe").mkdir(parents=True, exist_ok=True)
    (models / "mediapipe" / "face_landmarker_v2_with_blendshapes.task").write_bytes(b"stand-in")
    return {**names, "ivs": "dreamidv_ivs.safetensors"}


def write_inputs(folder: Path) -> None:
    from PIL import Image
    from tests.onnx_models import paint_face
    from tests.test_workflow import write_clip

    frames = np.full((FRAMES, H, W, 3), 90, np.uint8)
    for i in range(FRAMES):
        frames[i, :, :, 2] = 90 + 4 * i  # the expression (fake landmarker: mean blue) changes over the clip
        paint_face(frames[i], 4 + (i % 2), 3, green=30, seed=1)
    write_clip(folder / "real_clip.mp4", frames, fps=FPS)
    ig = np.full((96, 128, 3), 140, np.uint8)  # another face shape for the fake landmarker (mean green)
    paint_face(ig, 8, 5, green=40, seed=3)
    Image.fromarray(ig).save(folder / "identity_g.png")
    real = np.full((96, 128, 3), 90, np.uint8)
    paint_face(real, 8, 5, green=40, seed=1)
    Image.fromarray(real).save(folder / "real_person.png")


@pytest.fixture(scope="module")
def server(comfyui_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("syncid_workflow")
    names = build_models(root / "models")
    s = ComfyServer(comfyui_dir, root / "base", root / "models")
    s.prepare()
    doubles = s.base_dir / "custom_nodes" / "aaa_dreamidv_test_doubles"
    doubles.mkdir(exist_ok=True)
    (doubles / "__init__.py").write_text(DOUBLES.format(pack=str(PACK_DIR)))
    write_inputs(s.input_dir)
    s.start()
    s.names = names
    try:
        yield s
    finally:
        s.stop()


def synthesis_prompt(server) -> dict:
    """The bundled workflow in API format, pointed at the tiny models and test inputs (by node id)."""
    info = server.object_info()
    api = ui_to_api(json.loads(WORKFLOW.read_text()), info)
    small = {"width": W, "height": H, "steps": 2}
    changes = {
        5: {"model_name": server.names["dit"], "weight_dtype": "fp32", "device": "cpu"},
        6: {"vae_name": server.names["vae"]},
        7: {"precomputed_context": server.names["context"]},
        11: {"width": W, "height": H, "insightface_pack": "antelopev2", "detection_size": 128},
        12: small, 13: small, 15: small,
        14: {"model_name": server.names["ivs"], "weight_dtype": "fp32", "device": "cpu"},
        16: {"sam2_checkpoint": server.names["sam2"], "sam2_config": server.names["sam2_config"], "device": "cpu",
             "prompt_frames": 1},
        # stand-in identity scores mean nothing: thresholds off here (tested in tests/test_synthesis.py)
        18: {"min_identity_target": -1.0, "max_identity_driving": 1.0, "insightface_pack": "antelopev2",
             "detection_size": 128},
        20: {"filename_prefix": "syncid_test/V_g"},
    }
    for nid, values in changes.items():
        node = api[str(nid)]
        known = {**info[node["class_type"]]["input"].get("required", {}),
                 **info[node["class_type"]]["input"].get("optional", {})}
        for name, value in values.items():
            assert name in known, f"{node['class_type']} has no input {name!r}"
            node["inputs"][name] = value
    return api


# --------------------------------------------------------------------------- tests
def test_bundled_synthesis_workflow_matches_node_schemas(server):
    """The committed file is what this module's layout makes from the live schemas."""
    expected = build_workflow(server.object_info())
    have = json.loads(WORKFLOW.read_text())
    # pos and size too: the saved layout is the builder's, made from the nodes' real sizes (no hidden widget)
    strip = lambda wf: ([{k: n[k] for k in ("id", "type", "inputs", "outputs", "widgets_values", "pos", "size")}
                         for n in wf["nodes"]], wf["links"], [g["bounding"] for g in wf["groups"]])
    assert strip(have) == strip(expected), "workflows/syncid_data_synthesis.json is stale: " \
                                           "python -m tests.test_synthesis_workflow"


def test_graph_to_dataset_to_training(server, tmp_path):
    """graph -> dataset folder (forward + backward samples, record.json) -> the trainer trains on it."""
    import torch
    from dreamidv_core.models.configs import tiny_config
    from dreamidv_core.models.dit import DreamIDVTransformer, init_random_
    from dreamidv_core.models.vae import TINY_VAE_CONFIG, WanVAE
    from training.dataset import scan_dataset
    from training.stages import make_loss_fn, stage_dataset
    from training.trainer import TrainConfig, train

    t0 = time.monotonic()
    entry = server.run(synthesis_prompt(server), timeout=600)
    run_s = time.monotonic() - t0
    root = server.output_dir / "dreamidv_dataset"
    samples = scan_dataset(root)
    names = sorted(s.path.name for s in samples)
    assert names == ["clip_0001_backward", "clip_0001_forward"], names
    for s in samples:
        record = json.loads((s.path / "record.json").read_text())
        assert record["frames"] == FRAMES and record["fps"] == pytest.approx(FPS)
        assert record["direction"] == s.path.name.rsplit("_", 1)[1]
        assert set(record["identity_similarity"]) >= {"identity_target", "identity_driving"}
    summary = [o["text"] for o in entry["outputs"].values() if "text" in o]
    assert summary and "2 written" in str(summary), summary
    # what the canvas shows: the writer's summary in the core "Preview as Text" node wired to it
    preview = next(nid for nid, (type_, *_rest) in WF_NODES.items() if type_ == "PreviewAny")
    assert "2 written" in str(entry["outputs"][str(preview)]["text"]), entry["outputs"]
    assert (server.output_dir / "syncid_test").is_dir(), "the V_g preview was not saved"
    # a second run (the writer re-runs: ComfyUI would serve an identical prompt from its cache) skips both
    rerun = synthesis_prompt(server)
    rerun["18"]["inputs"]["source"] = "second run"
    again = server.run(rerun, timeout=600)
    again_summary = [o["text"] for o in again["outputs"].values() if "text" in o]
    assert "2 skipped" in str(again_summary), again_summary
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == names
    # the trainer loads the folder and trains a few steps on it
    torch.manual_seed(0)
    model = init_random_(DreamIDVTransformer(tiny_config("full", text_dim=32)), seed=1)
    vae = WanVAE(TINY_VAE_CONFIG).eval()
    context = torch.randn(4, 32)
    losses = []
    for stage in ("synthetic", "real"):
        data = stage_dataset(root, stage, width=W, height=H, frames=5, seed=0)
        assert len(data) == 1, f"{stage}: one sample of its direction"
        cfg = TrainConfig(steps=3, lr=1e-3, batch_size=1, checkpoint_dir=str(tmp_path / stage), save_every=3,
                          seed=0, trainable="full")
        result = train(model, data, make_loss_fn(stage, vae, context), cfg)
        losses += list(result.losses)
    assert len(losses) == 6 and all(np.isfinite(losses)), losses
    print(f"[syncid] graph ran in {run_s:.1f} s; losses {np.round(losses, 4).tolist()}; {summary}")


def main() -> int:
    """Regenerate workflows/syncid_data_synthesis.json from a throw-away ComfyUI's /object_info."""
    import os
    import tempfile

    comfy = Path(os.environ.get("COMFYUI_DIR", PACK_DIR / ".cache" / "ComfyUI"))
    tmp = Path(tempfile.mkdtemp(prefix="dreamidv-wf-"))
    with ComfyServer(comfy, tmp / "base", tmp / "models") as s:
        wf = build_workflow(s.object_info())
    WORKFLOW.write_text(json.dumps(wf, indent=2) + "\n")
    print(f"wrote {WORKFLOW} ({len(wf['nodes'])} nodes, {len(wf['links'])} links)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
