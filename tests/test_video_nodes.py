"""VIDEO in, VIDEO out through the nodes, in-process on tiny random-weight models: the streaming path gives the
IMAGE path's frames (bit-identical at the model's resolution, within one level of 255 pasted into the
source), one window equals the single-pass swap, core Save Video writes the pack's VIDEO with the source's
exact frame rate (30000/1001) and sound, frame ranges (start, cap, stride), too-short ranges, and a source
that vanishes or is cut short (a clear error, no output file)."""
from __future__ import annotations

import io
import os
import shutil
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from dreamidv_core.errors import InputError
from tests.node_helpers import as_comfy_vae, model_folders, tiny_wan_vae
from tests.test_nodes_model import conditioning, identity, write_dit
from tests.test_video_stream import NTSC, RATE, level, make_clip, tone

pytestmark = pytest.mark.comfyui

W, H = 72, 40  # source; area 64x32 -> model frames 48x32
AREA = dict(width=64, height=32)
SAMPLING = dict(steps=2, shift=5.0, identity_guidance=4.0, seed=0, sampler="unipc", batch_guidance=False)


def face_keypoints(count: int) -> list:
    """POSE_KEYPOINT with one face (a square of 4 points, normalised) per frame, moving a little."""
    frames = []
    for i in range(count):
        x0, y0, s = 0.3 + 0.01 * (i % 3), 0.25, 0.4
        pts = [[x0, y0, 1], [x0 + s, y0, 1], [x0 + s, y0 + s, 1], [x0, y0 + s, 1]] + [[0, 0, 0]] * 64
        frames.append({"people": [{"pose_keypoints_2d": [0.0] * 54, "face_keypoints_2d": [v for p in pts for v in p]}],
                       "canvas_width": W, "canvas_height": H})
    return frames


@pytest.fixture(scope="module")
def nodes(pack, tmp_path_factory):
    """The pack's node modules, tiny models (full and faster DiT, ComfyUI VAE), clips and an output folder."""
    import folder_paths

    root = tmp_path_factory.mktemp("video_nodes")
    with model_folders(root, ("diffusion_models", "dreamidv", "text_encoders")) as dirs:
        write_dit(dirs["diffusion_models"], "dreamidv.safetensors", "full")
        write_dit(dirs["diffusion_models"], "dreamidv_faster.safetensors", "faster", seed=1)
        load = pack.nodes.loaders.DreamIDVModelLoader.execute
        full = load("dreamidv.safetensors", "fp32", "sdpa", "cpu").result[0]
        faster = load("dreamidv_faster.safetensors", "fp32", "sdpa", "cpu").result[0]
        vae = as_comfy_vae(tiny_wan_vae())
        output = root / "output"
        output.mkdir()
        saved_output = folder_paths.get_output_directory()
        folder_paths.set_output_directory(str(output))
        clip12 = make_clip(root / "clip12.mp4", frames=12, size=(W, H))
        clip20 = make_clip(root / "clip20.mp4", frames=20, size=(W, H), faststart=True)
        try:
            yield dict(pack=pack, full=full, faster=faster, vae=vae, root=root, output=output, clip12=clip12,
                       clip20=clip20)
        finally:
            folder_paths.set_output_directory(saved_output)


def video(path):
    from comfy_api.latest import InputImpl

    return InputImpl.VideoFromFile(str(path))


def pose_track(n, src, count, **kw):
    return n["pack"].nodes.pose.DreamIDVPoseExtract.execute(src, "keypoints", keypoints=face_keypoints(count),
                                                            **kw).result


def sample(n, model, src, mask, tokens=None, **kw):
    args = dict(AREA, frame_num=0, window=81, overlap=16, **SAMPLING)
    args.update(kw)
    return n["pack"].nodes.sampler.DreamIDVSampler.execute(model, n["vae"], conditioning(), identity(), src, mask,
                                                           pose_tokens=tokens, **args).result


def guide(n, pose, **kw):
    args = dict(AREA, frame_num=0, window=81, overlap=16)
    args.update(kw)
    return n["pack"].nodes.sampler.DreamIDVPoseGuider.execute(n["full"], pose, **args).result[0]


def save_video(vid, prefix: str, prompt=None):
    """Core Save Video, as ComfyUI runs it (its hidden prompt holder set)."""
    from comfy_api.latest import io as cio
    from comfy_extras.nodes_video import SaveVideo

    node = SaveVideo.PREPARE_CLASS_CLONE({cio.Hidden.prompt: prompt or {"1": {"class_type": "test"}}})
    return node.execute(vid, prefix, "auto", "auto")


def saved_file(n, result) -> Path:
    item = result.ui.as_dict()["images"][0]
    return n["output"] / item["subfolder"] / item["filename"]


def outputs(n) -> list:
    return sorted(str(p.relative_to(n["output"])) for p in n["output"].rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------- exactness

def test_streaming_swap_equals_the_image_path(nodes):
    """VIDEO + pose_mask against GetVideoComponents' IMAGE + the pose node's MASK/IMAGE, three windows."""
    n = nodes
    src = video(n["clip12"])
    images = src.get_components().images  # what Get Video Components gives the IMAGE path
    track = pose_track(n, src, 12)[4]
    pose_img, mask_img = pose_track(n, images, 12)[:2]
    tokens_s, tokens_i = guide(n, track, window=5, overlap=4), guide(n, pose_img, window=5, overlap=4)
    assert torch.equal(tokens_s.tokens, tokens_i.tokens)  # the pose drawn on demand is the IMAGE pose
    s = sample(n, n["full"], src, track, tokens_s, window=5, overlap=4)
    i = sample(n, n["full"], images, mask_img, tokens_i, window=5, overlap=4)
    assert torch.equal(s[0], i[0]) and torch.equal(s[1], i[1])  # the IMAGE outputs of both paths
    clip = s[3].clip
    assert np.array_equal(clip.store[:], (i[0] * 255).round().byte().numpy())  # model frames: bit-identical
    with clip.open() as frames:
        streamed = torch.from_numpy(frames[0:12]).int()
    image_path = (i[1] * 255).round().int()  # frames_in_source as an encoder would get them
    diff = (streamed - image_path).abs()
    assert int(diff.max()) <= 1, "the streamed frames must be within one level of the IMAGE path's"
    print(f"[video] streamed vs IMAGE path after paste-back: max {int(diff.max())}/255, "
          f"{float((diff > 0).float().mean()) * 100:.2f}% of values differ by one level")


@pytest.mark.parametrize("frame_range", [dict(), dict(start_frame=1, select_every_nth=2)], ids=["all", "range"])
def test_streaming_face_crop_equals_the_image_path_face_crop(nodes, frame_range):
    """Face-crop mode streams: the sampler's VIDEO pastes each window back into the full-resolution source
    frame (the crop track's feathered paste) as it is read, within one level of frames_in_source."""
    n = nodes
    src = video(n["clip12"])
    images = src.get_components().images
    track = pose_track(n, src, 12)[4]
    pose_img, mask_img = pose_track(n, images, 12)[:2]
    crop = dict(face_crop=True, crop_margin=0.5, window=5, overlap=4, **frame_range)
    tokens_s, tokens_i = guide(n, track, mask=track, **crop), guide(n, pose_img, mask=mask_img, **crop)
    assert tokens_s.plan.track is not None and tokens_s.plan.track == tokens_i.plan.track
    assert torch.equal(tokens_s.tokens, tokens_i.tokens)
    s = sample(n, n["full"], src, track, tokens_s, **crop)
    i = sample(n, n["full"], images, mask_img, tokens_i, **crop)
    count = s[2]
    assert count == (12 if not frame_range else 6) and torch.equal(s[0], i[0]) and torch.equal(s[1], i[1])
    with s[3].clip.open() as frames:
        streamed = torch.from_numpy(frames[0:count]).int()
    assert streamed.shape == (count, H, W, 3)  # the source's size: pasted back, not the model's window
    diff = (streamed - (i[1] * 255).round().int()).abs()
    assert int(diff.max()) <= 1, "streamed face-crop frames must be within one level of the IMAGE path's"
    source = (images[list(s[3].clip.plan.source_frames)] * 255).round().int()
    changed = (streamed != source).any(-1)
    assert changed.any() and not changed.all(), "the swap changes the face window only"
    print(f"[video] face crop {frame_range or 'all frames'}: streamed vs IMAGE path max {int(diff.max())}/255, "
          f"{float(changed.float().mean()) * 100:.1f}% of pixels changed")


def test_one_window_equals_the_single_pass_swap(nodes):
    from dreamidv_core.io.video import read_video
    from dreamidv_core.pipelines.adapters import PixelSpaceVAE, context_from_conditioning
    from dreamidv_core.pipelines.swap import SwapSettings, swap_face
    from dreamidv_core.preprocess.identity_bundle import encode_reference

    n = nodes
    src = video(n["clip12"])
    result = pose_track(n, src, 12)
    track, pose_img, mask_img = result[4], result[0], result[1]
    streamed = sample(n, n["full"], src, track, guide(n, track))
    frames, _ = read_video(n["clip12"])
    adapter = PixelSpaceVAE(n["vae"])
    ref = encode_reference(adapter, identity().image, (W, H), (64, 32))
    with torch.no_grad():
        single = swap_face(n["full"].dit, adapter, frames, mask_img.numpy(), None,
                           context_from_conditioning(conditioning()[0][0]), pose=pose_img.numpy(),
                           settings=SwapSettings(**AREA, steps=2, guidance=4.0), ref_latent=ref)
    assert single.plan.layout.count == 1
    assert torch.equal(streamed[0], single.frames)


# ---------------------------------------------------------------------------------------------- VIDEO out

def test_video_out_keeps_the_odd_frame_rate_and_the_sound(nodes, monkeypatch):
    import av

    n = nodes
    src = video(n["clip12"])
    out = sample(n, n["faster"], src, pose_track(n, src, 12)[4])[3]
    assert out.get_frame_rate() == NTSC and out.get_frame_count() == 12  # exact, told without decoding
    first = saved_file(n, save_video(out, "odd/first"))
    with av.open(str(first)) as c:
        v, a = c.streams.video[0], c.streams.audio[0]
        assert v.average_rate == NTSC and v.frames == 12 and a.sample_rate == RATE
        assert c.metadata.get("prompt"), "Save Video's metadata was dropped"
        assert float(a.duration * a.time_base) == pytest.approx(float(12 / NTSC), abs=0.03)
        c.seek(0)
        sound = np.concatenate([f.to_ndarray()[0] for f in c.decode(audio=0)])
    ref = tone(float(12 / NTSC))[0]
    m = min(len(sound), len(ref)) - 2048
    assert np.corrcoef(sound[1024:m], ref[1024:m])[0, 1] > 0.95, "the source's sound was not kept"
    # a second save copies the encoded file: no frame is produced or encoded again
    calls = []
    monkeypatch.setattr(n["pack"].nodes.video, "write_clip", lambda *a, **k: calls.append(1))
    second = saved_file(n, save_video(out, "odd/second"))
    assert calls == [] and second.is_file() and second != first
    with av.open(str(first)) as c1, av.open(str(second)) as c2:
        assert [bytes(p) for p in c1.demux(video=0)] == [bytes(p) for p in c2.demux(video=0)]


def test_video_output_answers_without_decoding_and_saves_anywhere(nodes, monkeypatch):
    from comfy_extras.nodes_video import GetVideoComponents

    n = nodes
    src = video(n["clip12"])
    out = sample(n, n["faster"], src, pose_track(n, src, 12)[4])[3]
    weakref.ref(out)
    hash(out)  # ComfyUI caches previews in a WeakKeyDictionary keyed by the video
    with monkeypatch.context() as m:
        m.setattr(out.clip, "open", lambda: (_ for _ in ()).throw(AssertionError("decoded")))
        assert out.get_dimensions() == (W, H) and out.get_frame_count() == 12
        assert out.get_duration() == pytest.approx(float(12 / NTSC)) and out.get_container_format() == "mp4"
    buf = io.BytesIO()
    out.save_to(buf, format="mp4", codec="h264", metadata={"k": "v"}, crf=23, preset="ultrafast")
    assert buf.getvalue()[4:8] == b"ftyp"
    with pytest.raises(InputError, match="mp4"):
        out.save_to(io.BytesIO(), format="webm")
    parts = out.get_components()
    assert parts.images.shape == (12, H, W, 3) and parts.images.dtype == torch.float32
    assert parts.frame_rate == NTSC and parts.audio["sample_rate"] == RATE and parts.audio["waveform"].shape[1] == 2
    assert torch.equal(out.get_components().images, parts.images)  # re-iterable: nothing consumed
    images, audio, fps = GetVideoComponents.execute(out).result
    assert torch.equal(images, parts.images) and fps == pytest.approx(float(NTSC))
    trimmed = out.as_trimmed(start_time=float(2 / NTSC), duration=float(6 / NTSC))
    assert trimmed.get_frame_count() == 6 and trimmed.get_frame_rate() == NTSC
    assert torch.equal(trimmed.get_components().images, parts.images[2:8])
    assert out.as_trimmed(start_time=10.0) is None


def test_image_outputs_are_made_only_when_connected(nodes):
    from comfy_api.latest import io as cio

    n = nodes
    src = video(n["clip12"])
    track = pose_track(n, src, 12)[4]
    node = n["pack"].nodes.sampler.DreamIDVSampler

    def run(links):
        prompt = {"10": {"class_type": "DreamIDVSampler", "inputs": {}},
                  **{str(20 + k): {"class_type": "X", "inputs": {"x": ["10", slot]}} for k, slot in enumerate(links)}}
        clone = node.PREPARE_CLASS_CLONE({cio.Hidden.prompt: prompt, cio.Hidden.unique_id: "10"})
        args = dict(AREA, frame_num=0, window=81, overlap=16, **SAMPLING)
        return clone.execute(n["faster"], n["vae"], conditioning(), identity(), src, track, **args).result

    streamed = run([3])
    assert streamed[0] is None and streamed[1] is None and streamed[2] == 12 and streamed[3] is not None
    legacy = run([1])
    assert legacy[1].shape == (12, H, W, 3) and legacy[0] is None and legacy[3] is None
    common = n["pack"].nodes.common
    assert common.linked_outputs({"1": {"inputs": {"a": ["10", 2], "b": 3}}, "10": {"inputs": {}}}, "10") == {2}
    assert common.linked_outputs({"1": {"inputs": {}}}, "10") is None  # not in the prompt: everything is made


# ---------------------------------------------------------------------------------------------- frame ranges

def test_frame_start_cap_and_stride(nodes):
    import av

    n = nodes
    src = video(n["clip20"])
    whole = pose_track(n, src, 20)[4]  # the pose node on the whole clip ...
    ranged = pose_track(n, src, 20, start_frame=3, select_every_nth=2)[4]
    assert (ranged.start, ranged.stride, len(ranged), ranged.available) == (3, 2, 9, 20)
    result = sample(n, n["faster"], src, whole, start_frame=3, frame_num=5, select_every_nth=2)
    again = sample(n, n["faster"], src, ranged, start_frame=3, frame_num=5, select_every_nth=2)
    assert result[2] == 5 and torch.equal(result[0], again[0])  # ... serves any range inside it
    out = result[3]
    assert out.get_frame_count() == 5 and out.get_frame_rate() == NTSC / 2
    clip = out.clip
    box = clip.plan.crop
    with clip.open() as frames:
        picked = frames[0:5]
    outside = np.ones((H, W), bool)
    outside[box.top:box.bottom, box.left:box.right] = False
    got = [float(f[..., 1][outside].mean()) for f in picked]
    assert all(abs(g - level(i)) <= 2 for g, i in zip(got, (3, 5, 7, 9, 11))), got  # source frames 3, 5, ..., 11
    path = saved_file(n, save_video(out, "range/r"))
    with av.open(str(path)) as c:
        v, a = c.streams.video[0], c.streams.audio[0]
        assert v.frames == 5 and v.average_rate == NTSC / 2
        # like VideoHelperSuite: the sound is not decimated, it covers the real time of the 10 source frames
        assert float(a.duration * a.time_base) == pytest.approx(float(10 / NTSC), abs=0.03)
    with pytest.raises(InputError, match=r"covers source frames 3\.\.19"):
        sample(n, n["faster"], src, ranged, start_frame=0, frame_num=5)
    tokens = guide(n, whole, start_frame=3, frame_num=5, select_every_nth=2)  # the full model's pose tokens
    assert sample(n, n["full"], src, whole, tokens, start_frame=3, frame_num=5, select_every_nth=2)[2] == 5
    with pytest.raises(InputError, match="start_frame 3, select_every_nth 2"):  # made for other frames
        sample(n, n["full"], src, whole, tokens, start_frame=5, frame_num=5, select_every_nth=2)


@pytest.mark.parametrize("range_args, words", [
    (dict(start_frame=16), ("leaves 4", "at least 5", "start_frame 16")),
    (dict(select_every_nth=5), ("leaves 4", "every 5th", "at least 5")),
    (dict(start_frame=30), ("past the end", "20 frames")),
])
def test_a_range_of_fewer_than_5_frames_is_a_clear_error(nodes, range_args, words):
    n = nodes
    src = video(n["clip20"])
    with pytest.raises(InputError) as err:
        sample(n, n["faster"], src, pose_track(n, src, 20)[4], **range_args)
    assert all(w in str(err.value) for w in words), str(err.value)


# ---------------------------------------------------------------------------------------------- bad sources

def test_a_vanished_or_truncated_source_fails_clearly_and_writes_nothing(nodes, tmp_path):
    n = nodes
    before = outputs(n)
    gone = shutil.copy(n["clip20"], tmp_path / "gone.mp4")
    src = video(gone)
    out = sample(n, n["faster"], src, pose_track(n, src, 20)[4])[3]
    os.unlink(gone)
    with pytest.raises(InputError, match=r"gone\.mp4.*missing"):
        save_video(out, "bad/gone")
    cut = Path(shutil.copy(n["clip20"], tmp_path / "cut.mp4"))
    src = video(cut)
    out = sample(n, n["faster"], src, pose_track(n, src, 20)[4])[3]
    data = cut.read_bytes()
    cut.write_bytes(data[: len(data) // 2])  # cut short mid-clip after the swap read it
    with pytest.raises(InputError, match=r"cut\.mp4.*truncated"):
        save_video(out, "bad/cut")
    assert outputs(n) == before, "a partial output file was left"
    with pytest.raises(InputError, match=r"cut\.mp4.*truncated"):  # and a VIDEO already cut short when loaded
        sample(n, n["faster"], video(cut), torch.zeros(20, H, W))
