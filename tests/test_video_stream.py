"""Streaming video in the core (no ComfyUI): the seekable lazy reader, the exact frame rate and the sound
through the writer, frame ranges in the clip plan, the on-disk frame store, lazily drawn pose tracks, and the
swapped / composited clips made a chunk at a time. Tiny clips: every test takes well under a second or two."""
from __future__ import annotations

import io
import os
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from dreamidv_core.errors import InputError
from dreamidv_core.io.audio import AudioClip, FileAudio, WaveformAudio
from dreamidv_core.io.frame_store import FrameStore, MaskStore
from dreamidv_core.io.frames import LazyFrames, select_frames
from dreamidv_core.io.video import VideoReader, VideoWriter, probe_video, remux_video, write_video
from dreamidv_core.pipelines.clips import (CompositedClip, SourceClip, StoreSink, SwappedClip, clip_tensor,
                                           write_clip)
from dreamidv_core.pipelines.plan import ClipPlan, FrameSpan, frame_range
from dreamidv_core.preprocess.geometry import paste_back

NTSC = Fraction(30000, 1001)
RATE = 48000


def level(i: int) -> int:
    """The grey level frame ``i`` of a test clip is painted with (readable back after lossless H.264)."""
    return (i * 6 + 10) % 250


def tone(seconds: float, channels: int = 2) -> np.ndarray:
    t = np.arange(int(round(seconds * RATE))) / RATE
    return np.stack([np.sin(2 * np.pi * (440 + 110 * c) * t) for c in range(channels)]).astype(np.float32) * 0.3


def make_clip(path: Path, frames: int = 40, rate=NTSC, size=(64, 48), audio: bool = True, gop: int = 4,
              faststart: bool = False) -> Path:
    """A lossless H.264 mp4 (frame i painted ``level(i)``, key frames every ``gop``, B-frames) with AAC sound."""
    import av

    w, h = size
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as c:
        vs = c.add_stream("libx264", rate=rate)
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv444p"
        vs.options = {"qp": "0", "g": str(gop), "bf": "2", "preset": "ultrafast"}
        if audio:
            aus = c.add_stream("aac", rate=RATE)
            aus.layout = "stereo"
        for i in range(frames):
            f = np.full((h, w, 3), level(i), np.uint8)
            f[:, : w // 4, 0] = (i * 37) % 256  # a colour stripe: frames differ in more than grey
            for pk in vs.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(pk)
        for pk in vs.encode():
            c.mux(pk)
        if audio:
            af = av.AudioFrame.from_ndarray(tone(float(frames / rate)), format="fltp", layout="stereo")
            af.sample_rate, af.pts = RATE, 0
            for pk in aus.encode(af):
                c.mux(pk)
            for pk in aus.encode():
                c.mux(pk)
    return path


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory) -> Path:
    return make_clip(tmp_path_factory.mktemp("clips") / "ntsc.mp4")


def frame_level(frame: np.ndarray) -> float:
    return float(frame[..., 1].mean())


# ---------------------------------------------------------------------------------------------- reading

def test_reader_seeks_in_any_order_and_strides(clip_path):
    probe = probe_video(clip_path)
    assert probe.rate == NTSC and probe.count == 40 and probe.keyframes[:3] == (0, 4, 8) and probe.has_audio
    with VideoReader(clip_path, cache=4) as reader:
        for i in (5, 6, 33, 2, 39, 0, 17, 16, 15):
            assert abs(frame_level(reader[i]) - level(i)) <= 2, i
        assert len(reader._cache) <= 4
        strided = reader[1:20:6]
        assert all(abs(frame_level(f) - level(i)) <= 2 for f, i in zip(strided, (1, 7, 13, 19)))
    # the file is opened only while frames are read
    reader = VideoReader(clip_path)
    assert reader._container is None
    reader[3]
    assert reader._container is not None
    reader.close()
    assert reader._container is None


def test_reader_names_a_vanished_or_truncated_file(tmp_path):
    path = make_clip(tmp_path / "v.mp4", frames=24, faststart=True)
    reader = VideoReader(path)
    os.unlink(path)  # gone before the first frame is read
    with pytest.raises(InputError, match="missing"):
        reader[0]
    path = make_clip(tmp_path / "t.mp4", frames=24, faststart=True)
    reader = VideoReader(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # cut short after it was opened
    with pytest.raises(InputError, match=r"t\.mp4.*(truncated|damaged)"):
        reader[:24]
    with pytest.raises(InputError, match=r"t\.mp4.*truncated"):  # and when it is opened cut short
        probe_video(path)


def test_frame_selection_is_lazy():
    reads = []
    frames = LazyFrames(30, lambda idx: reads.append(list(idx)) or np.zeros((len(idx), 2, 2, 3), np.uint8))
    view = select_frames(frames, range(4, 30, 3))
    assert len(view) == 9 and reads == []
    view[2:5]
    assert reads == [[10, 13, 16]]
    assert select_frames(frames, range(30)) is frames


# ---------------------------------------------------------------------------------------------- writing

def test_writer_keeps_the_fraction_rate_and_interleaves_sound(clip_path, tmp_path):
    import av

    sound = AudioClip(FileAudio(clip_path), 0.0, float(10 / NTSC))
    buf = io.BytesIO()
    with VideoReader(clip_path) as reader, VideoWriter(buf, NTSC, audio=sound) as writer:
        for a in range(0, 10, 3):
            writer.write(reader[a:min(a + 3, 10)])
    buf.seek(0)
    with av.open(buf) as c:
        v, a = c.streams.video[0], c.streams.audio[0]
        assert v.average_rate == NTSC and v.frames == 10 and a.sample_rate == RATE
        kinds = [p.stream.type for p in c.demux() if p.size]
    assert kinds.index("audio") < len(kinds) - kinds[::-1].index("video") - 1, "sound written after all frames"
    write_video(tmp_path / "o.mp4", np.zeros((3, 16, 16, 3), np.uint8), NTSC)
    remux_video(tmp_path / "o.mp4", tmp_path / "r.mp4", {"prompt": {"a": 1}})
    with av.open(str(tmp_path / "r.mp4")) as c:
        assert c.streams.video[0].average_rate == NTSC and c.metadata["prompt"] == '{"a": 1}'
    assert (os.stat(tmp_path / "r.mp4").st_mode & 0o777) == 0o666 & ~_umask()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.mp4", "r.mp4"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_audio_windows_are_sample_exact(clip_path):
    wave = tone(2.0)
    mem = WaveformAudio(wave[None], RATE)
    part = AudioClip(mem, 0.5, 0.25).waveform()
    assert part.shape == (2, 12000) and np.array_equal(part, wave[:, 24000:36000])
    sound = FileAudio(clip_path)
    assert (sound.sample_rate, sound.channels, sound.layout) == (RATE, 2, "stereo")
    start = float(12 / NTSC)
    got = AudioClip(sound, start, 0.1).waveform()
    assert got.shape == (2, 4800)
    ref = tone(2.0)[:, int(round(start * RATE)):int(round(start * RATE)) + 4800]
    assert np.corrcoef(got[0], ref[0])[0, 1] > 0.98  # the same stretch of the tone (AAC is lossy)


# ---------------------------------------------------------------------------------------------- frame ranges

def test_frame_range_start_cap_stride():
    assert frame_range(20) == range(20)
    assert frame_range(20, 5, start=3, stride=2) == range(3, 13, 2)
    assert frame_range(20, None, start=10, stride=2) == range(10, 20, 2)
    plan = ClipPlan.build(72, 40, 20, 5, 64, 32, 81, 16, start=3, stride=2)
    assert plan.frames == 5 and plan.source_frames == range(3, 13, 2)
    # a track of every source frame from 1 holds them at 2, 4, ..., 10
    assert plan.indices_in(1, 1, 19, "pose") == range(2, 12, 2)
    with pytest.raises(InputError, match="start_frame and select_every_nth"):
        plan.indices_in(0, 3, 7, "the pose_mask")
    for args, words in [((20, None, 17, 1), ("leaves 3", "at least 5")), ((20, None, 0, 5), ("every 5th", "leaves 4")),
                        ((20, None, 25, 1), ("past the end",)), ((4, None, 0, 1), ("4 frames", "at least 5"))]:
        with pytest.raises(InputError) as err:
            frame_range(*args)
        assert all(w in str(err.value) for w in words), str(err.value)
    assert frame_range(3, None, 1, 1, minimum=1) == range(1, 3)  # pose extraction takes any count


# ---------------------------------------------------------------------------------------------- stores

def test_frame_store_is_exact_and_removes_its_file(tmp_path):
    frames = np.random.default_rng(0).integers(0, 256, (7, 5, 6, 3), dtype=np.uint8)
    store = FrameStore(5, 6, tmp_path)
    store.append(frames[:3])
    store.append(frames[3:])
    assert len(store) == 7 and np.array_equal(store[:], frames) and np.array_equal(store[1:7:3], frames[1:7:3])
    path = store.path
    del store
    assert not os.path.exists(path)
    masks = MaskStore(3, 5, 6)
    m = torch.rand(5, 6) > 0.5
    masks[1] = m
    assert torch.equal(masks[1], m) and not masks[0].any() and masks[0:3].shape == (3, 5, 6)


# ---------------------------------------------------------------------------------------------- clips

def test_swapped_clip_pastes_within_one_level_of_paste_back(clip_path, tmp_path):
    source = SourceClip.from_file(clip_path)
    plan = ClipPlan.build(64, 48, source.count, 6, 48, 32, 81, 16, start=4, stride=3)
    gen = torch.rand(plan.frames, *plan.size, 3)
    sink = StoreSink(plan, tmp_path)
    sink(gen[:4], 0)
    sink(gen[4:], 4)
    clip = SwappedClip(source, plan, sink.store)
    assert clip.rate == NTSC / 3 and clip.count == 6
    assert clip.audio.start == pytest.approx(float(4 / NTSC)) and clip.audio.duration == pytest.approx(float(18 / NTSC))
    with clip.open() as frames:
        streamed = frames[0:6]
    with VideoReader(clip_path) as reader:
        src = torch.from_numpy(reader[4:22:3]).float() / 255.0
    expected = paste_back(src, gen, plan.crop)
    # the encoder's input: the whole-clip path rounded to uint8, and the streamed frames, one level apart at most
    diff = (torch.from_numpy(streamed).int() - (expected * 255).round().int()).abs()
    assert int(diff.max()) <= 1
    box = plan.crop
    outside = torch.ones(48, 64, dtype=torch.bool)
    outside[box.top:box.bottom, box.left:box.right] = False
    assert np.array_equal(streamed[:, outside.numpy()], (src[:, outside] * 255).round().byte().numpy())


def test_write_clip_keeps_rate_and_sound_and_leaves_nothing_when_the_source_goes(tmp_path):
    import av

    path = make_clip(tmp_path / "src.mp4", frames=20)
    source = SourceClip.from_file(path)
    part = source.select(range(2, 14, 2))
    write_clip(part, tmp_path / "out.mp4")
    with av.open(str(tmp_path / "out.mp4")) as c:
        v, a = c.streams.video[0], c.streams.audio[0]
        assert v.average_rate == NTSC / 2 and v.frames == 6
        assert float(a.duration * a.time_base) == pytest.approx(float(12 / NTSC), abs=0.03)
        levels = [round(frame_level(f.to_ndarray(format="rgb24"))) for f in c.decode(video=0)]
    assert all(abs(a - level(i)) <= 2 for a, i in zip(levels, range(2, 14, 2))), levels
    os.unlink(path)
    with pytest.raises(InputError, match="missing"):
        write_clip(part, tmp_path / "gone.mp4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]


def test_clip_tensor_and_in_memory_source():
    frames = torch.rand(6, 8, 10, 3)
    source = SourceClip.from_frames(frames, audio={"waveform": torch.zeros(1, 1, 100), "sample_rate": 400})
    assert source.rate == 24 and source.audio.duration == pytest.approx(0.25)
    assert torch.equal(clip_tensor(source), frames)
    assert torch.equal(clip_tensor(source.select(range(1, 6, 2))), frames[1:6:2])


def test_composited_clip_equals_composite_video():
    from dreamidv_core.preprocess.composite import composite_video

    orig, gen = torch.rand(5, 12, 16, 3), torch.rand(5, 12, 16, 3)
    face = torch.zeros(5, 12, 16)
    face[:, 3:9, 4:12] = 1
    heads = MaskStore(5, 12, 16)
    head = torch.zeros(5, 12, 16, dtype=torch.bool)
    head[:, 2:10, 3:13] = True
    for i in range(5):
        heads[i] = head[i]
    comp = CompositedClip(SourceClip.from_frames(orig), SourceClip.from_frames(gen[:4]), face, heads, 1, 2)
    with comp.chunks(size=3) as parts:
        got = list(parts)
    expected, mask = composite_video(orig, gen[:4], face, head, 1, 2)
    assert torch.equal(torch.cat([p[1] for p in got]), expected) and torch.equal(torch.cat([p[2] for p in got]), mask)
    span = FrameSpan.of(16, 12, range(0, 4))
    assert span.source_frames == range(4)
