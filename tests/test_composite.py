"""SAM2 background composite: blend math, mask morphology, SAM2 tracking (random weights, 128 px) and the node."""
from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch

from dreamidv_core.preprocess import composite as C
from dreamidv_core.preprocess import segmentation as S
from dreamidv_core.errors import CheckpointError, InputError
from tests.test_video_stream import NTSC, make_clip

TINY = "configs/sam2.1/sam2.1_hiera_t.yaml"


def _clip(n=3, h=48, w=64, box=(12, 36, 20, 44)):
    frames = torch.rand(n, h, w, 3)
    gen = torch.rand(n, h, w, 3)
    face = torch.zeros(n, h, w)
    y0, y1, x0, x1 = box
    face[:, y0:y1, x0:x1] = 1.0
    return frames, gen, face


# ---------------------------------------------------------------- blend math and morphology

def test_composite_formula_exact():
    orig, gen = torch.rand(2, 5, 6, 3), torch.rand(2, 5, 6, 3)
    m = torch.zeros(2, 5, 6)
    m[:, :2] = 1.0
    m[:, 2] = 0.5
    out = C.composite(orig, gen, m)
    assert torch.equal(out[:, :2], gen[:, :2])
    assert torch.equal(out[:, 3:], orig[:, 3:])
    assert torch.allclose(out[:, 2], (orig[:, 2] + gen[:, 2]) / 2, atol=1e-6)


def test_dilate_reach():
    m = torch.zeros(1, 41, 41)
    m[0, 20, 20] = 1
    assert torch.equal(C.dilate(m, 0), m)
    for r in (1, 4, 7):
        d = C.dilate(m, r)
        ys, xs = d[0].nonzero(as_tuple=True)
        assert d[0, 20, 20] == 1 and set(d.unique().tolist()) <= {0.0, 1.0}
        assert int((ys - 20).abs().max()) == r and int((xs - 20).abs().max()) == r  # axis reach r, never more
        k = math.ceil(r / 2)
        assert d[0, 20 + k, 20 + k] == 1 and d[0, 20 - k, 20 - k] == 1  # diagonal reach ceil(r/2)
        assert d[0, 20 + r, 20 + r] == (1 if r == 1 else 0)  # a rounded shape, not a square


def test_fast_paths_are_exact():
    """OpenCV dilation of bool masks equals max pooling, and the blend mask made on the box around the region
    equals the one made on the whole frame (edges of the frame included)."""
    g = torch.Generator().manual_seed(3)
    for r in (1, 2, 5, 8):
        m = torch.rand(3, 50, 70, generator=g) > 0.97
        m[:, 0, 0] = m[:, -1, 30] = True
        assert torch.equal(C.dilate(m, r), C.dilate(m.float(), r)), r
    face = torch.zeros(2, 60, 80)
    face[0, 20:30, 30:45] = 1
    face[1, 0:8, 70:80] = 1  # touches the frame's edge
    head = torch.zeros(2, 60, 80, dtype=torch.bool)
    head[:, 15:35, 25:50] = True
    for dil, fea in ((0, 0), (3, 0), (2, 7), (8, 16)):
        region = (face >= 0.5) | head
        whole = C.feather(C.dilate(region.float(), dil), fea)
        assert torch.equal(C.blend_mask(face, head, dil, fea), whole), (dil, fea)


def test_feather_edge_profile():
    hard = torch.zeros(1, 10, 80)
    hard[:, :, :30] = 1
    assert torch.equal(C.feather(hard, 0), hard)
    soft = C.feather(hard, 12)
    row = soft[0, 5]
    assert torch.all(row[:30] == 1.0)  # the mask itself is exactly 1
    assert torch.all(row[30 + 12 + 1:] == 0.0)  # nothing beyond 2*ceil(12/2) pixels
    assert torch.all(row[1:] <= row[:-1])  # non-increasing across the edge
    assert 0.2 < float(row[36]) < 0.8  # a real ramp, not a hard step
    assert float(soft.min()) >= 0 and float(soft.max()) <= 1


def test_composite_video_inside_outside_and_soft_edge():
    frames, gen, face = _clip(n=3, h=48, w=96, box=(10, 38, 30, 50))
    out, mask = C.composite_video(frames, gen, face, dilation=3, feather_radius=8, chunk=2)
    assert out.shape == (3, 48, 96, 3) and mask.shape == (3, 48, 96) and out.dtype == torch.float32
    assert torch.equal(out[:, 10:38, 30:50], gen[:, 10:38, 30:50])  # inside the face: generated
    far = 3 + 8 + 1  # dilation + feather reach
    assert torch.equal(out[:, :, 50 + far:], frames[:, :, 50 + far:])  # far outside: original
    assert torch.equal(out[:, :, :30 - far], frames[:, :, :30 - far])
    row = mask[0, 24, 50:]
    assert torch.all(row[1:] <= row[:-1]) and row[0] == 1 and row[-1] == 0
    assert ((mask > 0) & (mask < 1)).any()  # feathered


def test_composite_video_head_mask_union_and_channels():
    frames, gen, face = _clip(n=2)
    head = torch.zeros(2, 48, 64, dtype=torch.bool)
    head[:, 0:8, 0:8] = True  # a region the face mask lacks
    grey, rgba = frames[..., :1], torch.cat([gen, torch.ones(2, 48, 64, 1)], dim=-1)
    out, mask = C.composite_video(grey, rgba, face, head_mask=head)
    assert out.shape == (2, 48, 64, 3)
    assert torch.equal(mask[:, 0:8, 0:8], torch.ones(2, 8, 8))
    assert torch.equal(out[:, 0:8, 0:8], gen[:, 0:8, 0:8])
    assert torch.equal(out[:, 40:, 50:], grey[:, 40:, 50:].expand(-1, -1, -1, 3))


def test_shorter_generated_uses_first_frames():
    frames, gen, face = _clip(n=5)
    out, mask = C.composite_video(frames, gen[:3], face)
    assert out.shape[0] == 3 and mask.shape[0] == 3
    assert torch.equal(out[:, 0:2], frames[:3, 0:2])


@pytest.mark.parametrize("case, match", [
    ("mask_len", "face_mask has 2 frames"),
    ("mask_size", "face_mask is 32x48"),
    ("gen_size", "generated frames are 32x48"),
    ("gen_long", "generated has 4 frames"),
    ("channels", "expected an IMAGE batch"),
])
def test_input_errors(case, match):
    frames, gen, face = _clip(n=3)
    if case == "mask_len":
        face = face[:2]
    elif case == "mask_size":
        face = torch.zeros(3, 48, 32)
    elif case == "gen_size":
        gen = torch.rand(3, 48, 32, 3)
    elif case == "gen_long":
        gen = torch.rand(4, 48, 64, 3)
    else:
        frames = torch.rand(3, 48, 64, 2)
    with pytest.raises(InputError, match=match):
        C.composite_video(frames, gen, face)


# ---------------------------------------------------------------- SAM2 (random weights, 128 px)

@pytest.fixture(scope="module")
def predictor():
    pytest.importorskip("sam2.sam2_video_predictor", reason="the sam2 package is not installed (scripts/setup_env.sh)")
    return S.build_video_predictor(S.resolve_config(TINY), None, "cpu", image_size=128)


def test_sam2_tracks_and_union_contains_face(predictor):
    frames, gen, face = _clip(n=3, h=40, w=56, box=(8, 30, 16, 40))
    face[0] = 0  # no face on the first frame: prompted on frame 1, tracked forward and backward
    seen = []
    head = S.track_head(predictor, frames, face, prompt_frames=2, progress=lambda s, i, n: seen.append((s, i, n)))
    assert head.shape == (3, 40, 56) and head.dtype == torch.bool
    assert seen[-1] == ("segment", 3, 3)
    assert sorted({i for _s, i, _n in seen}) == [1, 2, 3]
    out, mask = C.composite_video(frames, gen, face, head_mask=head, dilation=2, feather_radius=4)
    assert out.shape == (3, 40, 56, 3)
    assert float(mask.min()) >= 0 and float(mask.max()) <= 1
    assert torch.all(mask[face >= 0.5] == 1) and torch.all(mask[head] == 1)  # union of face and head
    with pytest.raises(InputError, match="empty on every frame"):
        S.track_head(predictor, frames, torch.zeros(3, 40, 56))


def test_old_tracking_memory_is_dropped(predictor):
    keep = max(predictor.num_maskmem, predictor.max_obj_ptrs_in_encoder) + 2
    state = {"output_dict_per_obj": {0: {"cond_frame_outputs": {0: "c"},
                                         "non_cond_frame_outputs": {t: "x" for t in range(1, 60)}}}}
    S._drop_old_memory(predictor, state, 50)
    left = state["output_dict_per_obj"][0]
    assert sorted(left["non_cond_frame_outputs"]) == list(range(50 - keep, 60))
    assert left["cond_frame_outputs"] == {0: "c"}  # prompts are kept for the whole clip


def test_config_detection(predictor):
    assert S.config_from_name("sam2.1_hiera_tiny.pt") == TINY
    assert S.config_from_name("sam2.1_hiera_base_plus.pt") == "configs/sam2.1/sam2.1_hiera_b+.yaml"
    assert S.config_from_name("sam2_hiera_large.safetensors") == "configs/sam2/sam2_hiera_l.yaml"
    assert S.config_from_name("sam2_hiera_small.pt") == "configs/sam2/sam2_hiera_s.yaml"
    assert S.config_from_name("my_model.pt") is None
    assert S.config_from_weights(predictor.state_dict()) == TINY
    assert S.resolve_config("sam2.1/sam2.1_hiera_l.yaml").is_file()
    with pytest.raises(CheckpointError, match="cannot tell which SAM2"):
        S.resolve_config("auto", None, "my_model.pt")
    with pytest.raises(CheckpointError, match="no such SAM2 config"):
        S.resolve_config("configs/sam3/nope.yaml")


def test_config_may_only_build_sam2_classes(tmp_path):
    pytest.importorskip("sam2.sam2_video_predictor", reason="the sam2 package is not installed")
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(str(S.resolve_config(TINY)))
    cfg.model.image_encoder.neck._target_ = "os.system"
    OmegaConf.save(cfg, str(tmp_path / "evil.yaml"))
    with pytest.raises(CheckpointError, match="builds os.system"):
        S.build_video_predictor(S.resolve_config(str(tmp_path / "evil.yaml")), image_size=128)


def test_checkpoint_loading(predictor, tmp_path):
    sd = predictor.state_dict()
    official = tmp_path / "renamed.pt"
    torch.save({"model": sd}, official)  # the official layout, read with weights_only=True
    loaded = S.load_state_dict(official)
    assert loaded.keys() == sd.keys()
    assert S.resolve_config("auto", loaded, "renamed.pt").name == "sam2.1_hiera_t.yaml"  # told from the weights
    with pytest.raises(CheckpointError, match="not found"):
        S.load_state_dict(tmp_path / "absent.pt")
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"model": InputError("x")}, protocol=2))
    with pytest.raises(CheckpointError, match="weights-only"):
        S.load_state_dict(evil)
    partial = dict(sd)
    partial.pop("no_obj_embed_spatial")
    with pytest.raises(CheckpointError, match="1 missing"):
        S.build_video_predictor(S.resolve_config(TINY), partial, image_size=128, source="x.pt")


# ---------------------------------------------------------------- the node

@pytest.fixture
def sam2_folder(pack, predictor, tmp_path):
    import folder_paths
    from omegaconf import OmegaConf

    folder = tmp_path / "sam2"
    folder.mkdir()
    torch.save({"model": predictor.state_dict()}, folder / "sam2.1_hiera_tiny.pt")
    cfg = OmegaConf.load(str(S.resolve_config(TINY)))
    cfg.model.image_size = 128  # fast on CPU; also exercises the config override from the model folder
    OmegaConf.save(cfg, str(folder / "tiny128.yaml"))
    saved = folder_paths.folder_names_and_paths["sam2"]
    folder_paths.folder_names_and_paths["sam2"] = ([str(folder)], set(saved[1]))
    try:
        yield folder
    finally:
        folder_paths.folder_names_and_paths["sam2"] = saved


def test_node_schema(pack, sam2_folder):
    node = pack.nodes.composite.BackgroundComposite
    schema = node.define_schema()
    schema.validate()  # what ComfyUI checks when it registers the node (unique ids, ...)
    assert list(node.RETURN_TYPES) == ["IMAGE", "MASK", "VIDEO"] and "frames" in node.INPUT_TYPES()["required"]
    assert schema.node_id == "DreamIDVBackgroundComposite" and schema.category == "DreamID-V"
    assert all(i.tooltip for i in schema.inputs)
    inputs = {i.id: i for i in schema.inputs}
    assert inputs["sam2_checkpoint"].options == ["sam2.1_hiera_tiny.pt", "none"]  # none: face mask only, no sam2
    assert "tiny128.yaml" in inputs["sam2_config"].options and TINY in inputs["sam2_config"].options
    assert node in pack.nodes.composite.NODES


def test_node_execute(pack, sam2_folder):
    node = pack.nodes.composite.BackgroundComposite
    frames, gen, face = _clip(n=3, h=40, w=56, box=(8, 30, 16, 40))
    res = node.execute(frames, gen, face, "sam2.1_hiera_tiny.pt", "tiny128.yaml", prompt_frames=2,
                       mask_dilation=2, feather=4, device="cpu")
    out, mask, video = res.result
    assert out.shape == (3, 40, 56, 3) and mask.shape == (3, 40, 56)
    assert torch.equal(video.get_components().images, (out * 255).round() / 255)  # the VIDEO: the same frames
    assert torch.equal(out[:, 8:30, 16:40], gen[:, 8:30, 16:40])
    assert torch.all(mask[face >= 0.5] == 1) and float(mask.min()) >= 0 and float(mask.max()) <= 1
    off = mask == 0
    assert torch.equal(out[off], frames[off])


def test_node_without_sam2_composites_inside_the_face_mask(pack):
    """sam2_checkpoint 'none': no SAM2 model and no sam2 package, the face mask alone (dilated, feathered)."""
    from dreamidv_core.preprocess import composite as C

    node = pack.nodes.composite.BackgroundComposite
    frames, gen, face = _clip(n=3, h=40, w=56, box=(8, 30, 16, 40))
    out, mask, video = node.execute(frames, gen, face, "none", mask_dilation=2, feather=4, device="cpu").result
    ref_out, ref_mask = C.composite_video(frames, gen, face, None, 2, 4)
    assert torch.equal(out, ref_out) and torch.equal(mask, ref_mask)
    assert torch.equal(out[:, 8:30, 16:40], gen[:, 8:30, 16:40]) and torch.equal(out[mask == 0], frames[mask == 0])


def test_node_errors(pack, sam2_folder):
    node = pack.nodes.composite.BackgroundComposite
    frames, gen, face = _clip(n=3)
    with pytest.raises(CheckpointError) as err:
        node.execute(frames, gen, face, "sam2.1_hiera_large.pt", "auto")
    assert str(sam2_folder) in str(err.value) and "sam2.1_hiera_base_plus.pt" in str(err.value)
    with pytest.raises(InputError, match="face_mask has 2 frames"):
        node.execute(frames, gen, face[:2], "sam2.1_hiera_tiny.pt", "auto")
    with pytest.raises(InputError, match="generated frames are"):
        node.execute(frames, gen[:, :, :30], face, "sam2.1_hiera_tiny.pt", "auto")
    with pytest.raises(CheckpointError, match="config not found"):
        node.execute(frames, gen, face, "sam2.1_hiera_tiny.pt", "absent.yaml")


def test_node_takes_the_samplers_even_sized_frames_of_an_odd_source(pack, sam2_folder):
    """A 55x39 source: the sampler's frames_in_source are 54x38 (video encoders need even sizes); the
    composite takes them with the odd source frames and mask and returns 54x38 frames Save Video accepts."""
    node = pack.nodes.composite.BackgroundComposite
    frames, gen, face = _clip(n=3, h=39, w=55, box=(8, 30, 16, 40))
    out, mask, _ = node.execute(frames, gen[:, :38, :54], face, "sam2.1_hiera_tiny.pt", "tiny128.yaml",
                             prompt_frames=1, device="cpu").result
    assert out.shape == (3, 38, 54, 3) and mask.shape == (3, 38, 54)
    assert pack.nodes.composite.BackgroundComposite.define_schema().display_name == "DreamID-V SAM2 Background Composite"


def test_node_streams_a_video_and_equals_the_image_path(pack, sam2_folder, tmp_path):
    """VIDEO frames + a pose track (drawn on demand) composite exactly as the IMAGE frames + MASK do, and
    the VIDEO output keeps the source's 30000/1001 frame rate and its sound."""
    import av
    from comfy_api.latest import InputImpl
    from dreamidv_core.preprocess.pose.extract import PoseTrack

    node = pack.nodes.composite.BackgroundComposite
    src = InputImpl.VideoFromFile(str(make_clip(tmp_path / "c.mp4", frames=6, size=(56, 40))))
    images = src.get_components().images
    pts = [[np.array([[16.0 + i, 8], [40, 8], [40, 30], [16, 30]] + [[20, 12]] * 474)] for i in range(6)]
    track = PoseTrack("face", [p[0] for p in pts], 40, 56)
    gen = torch.rand(5, 40, 56, 3)
    args = dict(sam2_checkpoint="sam2.1_hiera_tiny.pt", sam2_config="tiny128.yaml", prompt_frames=2,
                mask_dilation=2, feather=4, device="cpu")
    streamed = node.execute(src, gen, track, **args).result
    mask = torch.from_numpy(np.stack([track.mask_frame(i) for i in range(6)]) > 0).float()
    image_path = node.execute(images, gen, mask, **args).result
    assert torch.equal(streamed[0], image_path[0]) and torch.equal(streamed[1], image_path[1])
    video = streamed[2]
    assert video.get_frame_rate() == NTSC and video.get_frame_count() == 5
    with av.open(video.get_stream_source()) as c:  # encoded while the node ran
        assert c.streams.video[0].average_rate == NTSC and c.streams.video[0].frames == 5 and c.streams.audio
    assert torch.equal(video.get_components().images, (streamed[0] * 255).round() / 255)
