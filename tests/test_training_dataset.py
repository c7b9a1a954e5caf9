"""training/dataset.py and the synthetic sample generator (tests/synthetic_data.py): round trip and bad input."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from dreamidv_core.errors import InputError
from dreamidv_core.io.video import read_video, write_video
from tests.synthetic_data import identity_of, write_synthetic_dataset, write_synthetic_sample
from training.dataset import DreamIDVDataset, collate, open_dataset, scan_dataset


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    write_synthetic_dataset(root, 3, frames=11, size=(48, 64), seed=3, direction="mixed")
    return root


def test_generator_is_deterministic(tmp_path):
    a = write_synthetic_sample(tmp_path / "a", seed=5)
    b = write_synthetic_sample(tmp_path / "b", seed=5)
    c = write_synthetic_sample(tmp_path / "c", seed=6)
    assert a == b and a["synthetic"] != c["synthetic"]
    # the drawn frames are identical; multi-threaded H.264 encoding is not bit-exact between runs, so
    # the decoded frames are compared with a small tolerance (mp4 headers also hold a timestamp)
    for name in ("driving.mp4", "target.mp4", "mask.mp4", "pose.mp4"):
        va, vb = read_video(tmp_path / "a" / name)[0].astype(int), read_video(tmp_path / "b" / name)[0].astype(int)
        assert np.abs(va - vb).mean() < 0.5 and np.abs(va - vb).max() < 64, name
    assert (tmp_path / "a" / "identity.png").read_bytes() == (tmp_path / "b" / "identity.png").read_bytes()
    assert not np.array_equal(read_video(tmp_path / "a" / "target.mp4")[0], read_video(tmp_path / "c" / "target.mp4")[0])


def test_generator_draws_identity_and_pose(tmp_path):
    write_synthetic_sample(tmp_path / "s", frames=9, seed=2)
    meta = identity_of(tmp_path / "s")
    assert meta["identity"]["id"] != meta["driving_identity"]["id"]
    target, _ = read_video(tmp_path / "s" / "target.mp4")
    driving, _ = read_video(tmp_path / "s" / "driving.mp4")
    mask, _ = read_video(tmp_path / "s" / "mask.mp4")
    for i, (cx, cy, r) in enumerate(meta["poses"]):
        # the cheek (below-left of the centre, away from eyes and mouth) has the identity's face colour
        y, x = int(cy + 0.1 * r), int(cx - 0.55 * r)
        assert np.abs(target[i, y, x].astype(int) - meta["identity"]["identity_colour"]).max() < 40
        assert np.abs(driving[i, y, x].astype(int) - meta["driving_identity"]["identity_colour"]).max() < 40
        ys, xs = np.nonzero(mask[i, ..., 0] > 127)  # the mask is the face region, centred on the pose
        assert abs(xs.mean() - cx) < 1.5 and abs(ys.mean() - cy) < 1.5
    # outside the face the driving and target videos are the same background
    outside = mask[..., 0] < 20
    assert np.abs(target.astype(int) - driving.astype(int))[outside].mean() < 6


def test_round_trip(dataset_dir):
    samples = scan_dataset(dataset_dir)
    assert [s.name for s in samples] == ["sample_000", "sample_001", "sample_002"]
    assert [s.direction for s in samples] == ["forward", "backward", "forward"]
    assert all(s.frames == 11 and (s.width, s.height) == (64, 48) and s.pose_source == "video" for s in samples)
    ds = DreamIDVDataset(dataset_dir, width=64, height=48, frames=5, seed=7)
    assert len(ds) == 3
    item = ds[1]
    for key in ("video", "mask", "pose", "target"):
        assert item[key].shape == (3, 5, 48, 64) and item[key].dtype == torch.float32, key
    assert item["identity"].shape == (3, 1, 48, 64)
    for key in ("video", "target", "identity"):
        assert item[key].min() >= -1 and item[key].max() <= 1 and item[key].min() < -0.5, key
    for key in ("mask", "pose"):
        assert item[key].min() >= 0 and item[key].max() <= 1 and item[key].max() > 0.9, key
    assert item["direction"] == "backward" and item["record"]["direction"] == "backward"
    # the window really is frames start..start+4 of the files
    target, _ = read_video(dataset_dir / "sample_001" / "target.mp4")
    s = item["start"]
    expect = torch.from_numpy(target[s:s + 5]).permute(3, 0, 1, 2).float() / 127.5 - 1
    assert torch.allclose(item["target"], expect, atol=1e-5)
    batch = collate([ds[0], ds[2]])
    assert batch["video"].shape == (2, 3, 5, 48, 64) and batch["index"] == [0, 2]
    assert torch.equal(ds.collate([ds[1]])["target"][0], item["target"])
    opened = open_dataset({"root": str(dataset_dir), "width": 64, "height": 48, "frames": 5, "seed": 7})
    assert torch.equal(opened[1]["video"], item["video"])
    with pytest.raises(InputError, match="unknown keys"):
        open_dataset({"root": str(dataset_dir), "fps": 3})


def test_window_cropping_is_deterministic(dataset_dir):
    a = DreamIDVDataset(dataset_dir, 64, 48, frames=5, seed=11)
    b = DreamIDVDataset(dataset_dir, 64, 48, frames=5, seed=11)
    wins = [a.window(i) for i in range(3)]
    assert wins == [b.window(i) for i in range(3)]
    assert all(0 <= s <= 6 and n == 5 for s, n in wins)
    assert torch.equal(a[2]["video"], b[2]["video"])
    draws = set()
    for epoch in range(8):
        a.set_epoch(epoch)
        draws |= {a.window(i)[0] for i in range(3)}
    assert len(draws) > 1  # windows vary with the epoch (and index)
    whole = DreamIDVDataset(dataset_dir, 64, 48)  # frames=None: whole clip floored to 4n+1 (11 -> 9)
    assert whole[0]["video"].shape[1] == 9


def test_area_cap_and_letterbox(tmp_path):
    write_synthetic_sample(tmp_path / "ds" / "s", frames=5, size=(64, 96), seed=1)
    ds = DreamIDVDataset(tmp_path / "ds", width=48, height=32, frames=5)
    item = ds[0]
    assert item["video"].shape == (3, 5, 32, 48) and item["identity"].shape == (3, 1, 32, 48)
    # a square identity photo letterboxed onto a wide frame: white bars left and right
    from PIL import Image
    Image.fromarray(np.full((40, 40, 3), 30, np.uint8)).save(tmp_path / "ds" / "s" / "identity.png")
    ident = DreamIDVDataset(tmp_path / "ds", 48, 32, frames=5)[0]["identity"]
    assert ident[:, 0, :, :4].min() > 0.95 and ident[:, 0, 8:24, 20:28].max() < -0.6


def test_keypoints_instead_of_pose_video(tmp_path):
    write_synthetic_dataset(tmp_path, 1, frames=5, pose_format="keypoints")
    (info,) = scan_dataset(tmp_path)
    assert info.pose_source == "keypoints"
    pose = DreamIDVDataset(tmp_path, 64, 48)[0]["pose"]
    assert pose.shape == (3, 5, 48, 64) and pose.max() > 0.5 and pose.mean() < 0.3


# ----------------------------------------------------------------------------- bad input
def _sample(tmp_path, **kw):
    root = tmp_path / "ds"
    folder = root / "clip_a"
    write_synthetic_sample(folder, frames=kw.pop("frames", 5), seed=0, **kw)
    return root, folder


def _edit_record(folder, **changes):
    rec = json.loads((folder / "record.json").read_text())
    rec.update(changes)
    (folder / "record.json").write_text(json.dumps(rec))


def _expect(root, folder, *words):
    with pytest.raises(InputError) as err:
        scan_dataset(root)
    msg = str(err.value)
    assert str(folder) in msg, msg
    for w in words:
        assert w in msg, msg


def test_empty_and_missing_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no sample folders") as err:
        scan_dataset(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(err.value)
    with pytest.raises(InputError, match="does not exist"):
        scan_dataset(tmp_path / "nowhere")


def test_missing_file(tmp_path):
    root, folder = _sample(tmp_path)
    (folder / "target.mp4").unlink()
    _expect(root, folder, "missing target.mp4")


def test_malformed_json(tmp_path):
    root, folder = _sample(tmp_path)
    (folder / "record.json").write_text('{"direction": "forward", ')
    _expect(root, folder, "record.json", "not valid JSON")


@pytest.mark.parametrize("changes,words", [
    ({"direction": "sideways"}, ("direction", "sideways")),
    ({"version": 2}, ("version",)),
    ({"fps": 0}, ("fps",)),
    ({"frames": 7}, ("says 7 frames", "5")),
    ({"identity_similarity": {"identity_target": "high"}}, ("identity_similarity",)),
])
def test_bad_record_values(tmp_path, changes, words):
    root, folder = _sample(tmp_path)
    _edit_record(folder, **changes)
    _expect(root, folder, *words)


def test_frame_counts_differ(tmp_path):
    root, folder = _sample(tmp_path, frames=9)
    mask, fps = read_video(folder / "mask.mp4")
    write_video(folder / "mask.mp4", mask[:7], fps)
    _expect(root, folder, "frame counts differ", "mask.mp4 7", "driving.mp4 9")


def test_keypoint_count_differs(tmp_path):
    root, folder = _sample(tmp_path, frames=5, pose_format="keypoints")
    data = json.loads((folder / "keypoints.json").read_text())
    (folder / "keypoints.json").write_text(json.dumps(data[:3]))
    _expect(root, folder, "frame counts differ", "keypoints.json 3")


def test_too_few_frames(tmp_path):
    root, folder = _sample(tmp_path, frames=4)
    _expect(root, folder, "only 4 frames", "at least 5")


def test_unreadable_video(tmp_path):
    root, folder = _sample(tmp_path)
    (folder / "driving.mp4").write_bytes(b"this is not an mp4 file" * 20)
    _expect(root, folder, "driving.mp4", "not a readable video")


def test_unreadable_identity_image(tmp_path):
    root, folder = _sample(tmp_path)
    (folder / "identity.png").write_bytes(b"\x89PNG broken")
    _expect(root, folder, "identity.png")


def test_sizes_differ(tmp_path):
    root, folder = _sample(tmp_path)
    target, fps = read_video(folder / "target.mp4")
    write_video(folder / "target.mp4", np.ascontiguousarray(target[:, :32]), fps)
    _expect(root, folder, "frame sizes differ", "target.mp4 64x32")


def test_window_errors(tmp_path):
    root, folder = _sample(tmp_path, frames=5)
    with pytest.raises(InputError, match="4n\\+1"):
        DreamIDVDataset(root, 64, 48, frames=6)
    with pytest.raises(InputError) as err:
        DreamIDVDataset(root, 64, 48, frames=9)
    assert str(folder) in str(err.value) and "fewer than the training window of 9" in str(err.value)


def test_mixed_pose_presence(tmp_path):
    root, folder = _sample(tmp_path)
    other = root / "clip_b"
    shutil.copytree(folder, other)
    (other / "pose.mp4").unlink()
    assert [s.pose_source for s in scan_dataset(root)] == ["video", None]
    with pytest.raises(InputError, match="clip_b"):
        DreamIDVDataset(root, 64, 48)
    (folder / "pose.mp4").unlink()
    assert "pose" not in DreamIDVDataset(root, 64, 48)[0]  # no pose anywhere: the faster model's dataset


def test_corrupt_video_at_load_names_sample(tmp_path):
    root, folder = _sample(tmp_path, frames=9)
    ds = DreamIDVDataset(root, 64, 48, frames=9)
    (folder / "target.mp4").write_bytes(b"garbage" * 50)
    with pytest.raises(InputError) as err:
        ds[0]
    assert str(folder) in str(err.value) and "target.mp4" in str(err.value)
