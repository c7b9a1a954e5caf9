"""The training dataset (format: training/DATASET.md): scanning with validation, and a torch Dataset.

``scan_dataset(root)`` checks every sample folder up front (files present, record.json well formed,
videos readable, equal frame counts and sizes, at least 5 frames) and raises
:class:`dreamidv_core.errors.InputError` naming the sample folder and the problem.

``DreamIDVDataset`` returns each sample prepared exactly as the sampler (``dreamidv_core.pipelines.swap``)
prepares its inputs (area resize to at most width*height, centre crop to multiples of 16):

===========  ==================  ==========  =============================================
key          shape               range       what
===========  ==================  ==========  =============================================
video        [3, F, H, W]        [-1, 1]     driving.mp4 (the VAE's video input)
mask         [3, F, H, W]        [0, 1]      mask.mp4 (VAE-encoded *without* normalising)
pose         [3, F, H, W]        [0, 1]      pose.mp4 or keypoints.json drawn (PoseGuider input)
identity     [3, 1, H, W]        [-1, 1]     identity.png letterboxed in white onto the driving
                                             frame's original size, then resized like the video
target       [3, F, H, W]        [-1, 1]     target.mp4 (what the flow-matching loss supervises)
===========  ==================  ==========  =============================================

plus ``index`` (int), ``start`` (first frame of the window), ``direction`` ("forward"/"backward"),
``path`` (the sample folder, str) and ``record`` (record.json as a dict). ``pose`` is absent when
the dataset has no pose for any sample (the faster model). F = ``frames`` (a 4n+1 window), or the
whole clip floored to 4n+1 when ``frames`` is None; a clip longer than F gives a random window,
the same for the same (seed, epoch, index).
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from dreamidv_core.errors import InputError
from dreamidv_core.models.frame_grid import MIN_FRAMES, TEMPORAL_STRIDE
from dreamidv_core.io.video import read_image, read_video
from dreamidv_core.preprocess.video_ops import prepare_frames, prepare_reference

FORMAT_VERSION = 1
DIRECTIONS = ("forward", "backward")
IDENTITY_FILE, RECORD_FILE = "identity.png", "record.json"
VIDEO_FILES = ("driving.mp4", "mask.mp4", "target.mp4")
POSE_VIDEO, KEYPOINTS_FILE = "pose.mp4", "keypoints.json"


@dataclass
class SampleInfo:
    """One validated sample folder."""
    path: Path
    direction: str  # "forward" | "backward"
    fps: float
    frames: int  # frames in every video of the sample
    width: int  # driving frame size (every video has it)
    height: int
    pose_source: Optional[str]  # "video" (pose.mp4), "keypoints" (keypoints.json) or None
    record: Dict = field(repr=False)

    @property
    def name(self) -> str:
        return self.path.name


def _fail(folder: Path, problem: str) -> InputError:
    return InputError(f"dataset sample {folder}: {problem}")


def floor_4n1(frames: int) -> int:
    """The largest 4n+1 <= frames (frames >= 1)."""
    return (frames - 1) // TEMPORAL_STRIDE * TEMPORAL_STRIDE + 1


def probe_video(path: Path, folder: Path):
    """-> (frame count, width, height) without decoding the whole file: the container's frame count
    (or a count of the packets when the container has none) and the first decoded frame's size."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise _fail(folder, f"{path.name} has no video stream")
            stream = container.streams.video[0]
            first = next(container.decode(stream), None)
            if first is None:
                raise _fail(folder, f"{path.name} contains no frames")
            size = (first.width, first.height)
            count = int(stream.frames or 0)
        if count <= 0:
            with av.open(str(path)) as container:
                count = sum(1 for p in container.demux(container.streams.video[0]) if p.size)
    except av.error.FFmpegError as exc:
        raise _fail(folder, f"{path.name} is not a readable video ({exc})") from None
    return count, size[0], size[1]


def _read_record(folder: Path) -> Dict:
    try:
        record = json.loads((folder / RECORD_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(folder, f"{RECORD_FILE} is not valid JSON ({exc})") from None
    if not isinstance(record, dict):
        raise _fail(folder, f"{RECORD_FILE} must hold a JSON object, got {type(record).__name__}")
    if record.get("version") != FORMAT_VERSION:
        raise _fail(folder, f"{RECORD_FILE}: 'version' must be {FORMAT_VERSION}, got {record.get('version')!r}")
    if record.get("direction") not in DIRECTIONS:
        raise _fail(folder, f"{RECORD_FILE}: 'direction' must be 'forward' or 'backward', got {record.get('direction')!r}")
    fps = record.get("fps")
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
        raise _fail(folder, f"{RECORD_FILE}: 'fps' must be a positive number, got {fps!r}")
    frames = record.get("frames")
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise _fail(folder, f"{RECORD_FILE}: 'frames' must be a positive integer, got {frames!r}")
    sims = record.get("identity_similarity", {})
    if not isinstance(sims, dict) or not all(
            isinstance(k, str) and (v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))
                                    or (isinstance(v, list) and all(x is None or isinstance(x, (int, float)) for x in v)))
            for k, v in sims.items()):
        raise _fail(folder, f"{RECORD_FILE}: 'identity_similarity' must map names to numbers (or lists of "
                            f"per-frame numbers), got {sims!r}")
    return record


def _keypoint_frames(folder: Path) -> int:
    try:
        data = json.loads((folder / KEYPOINTS_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(folder, f"{KEYPOINTS_FILE} is not valid JSON ({exc})") from None
    if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
        raise _fail(folder, f"{KEYPOINTS_FILE} must be a POSE_KEYPOINT list (one dict with 'people' per frame)")
    return len(data)


def check_sample(folder) -> SampleInfo:
    """Validate one sample folder -> SampleInfo; InputError naming the folder and the problem."""
    folder = Path(folder)
    missing = [n for n in (IDENTITY_FILE, RECORD_FILE) + VIDEO_FILES if not (folder / n).is_file()]
    if missing:
        raise _fail(folder, f"missing {', '.join(missing)} (a sample needs identity.png, driving.mp4, mask.mp4, "
                            "target.mp4, record.json and optionally pose.mp4 or keypoints.json)")
    record = _read_record(folder)
    try:
        ident = read_image(folder / IDENTITY_FILE)
    except InputError as exc:
        raise _fail(folder, f"{IDENTITY_FILE} is not a readable image ({exc})") from None
    if ident.shape[0] < 2 or ident.shape[1] < 2:
        raise _fail(folder, f"{IDENTITY_FILE} is only {ident.shape[1]}x{ident.shape[0]} pixels")

    names = list(VIDEO_FILES)
    pose_source = None
    if (folder / POSE_VIDEO).is_file():
        names.append(POSE_VIDEO)
        pose_source = "video"
    elif (folder / KEYPOINTS_FILE).is_file():
        pose_source = "keypoints"
    probes = {n: probe_video(folder / n, folder) for n in names}
    counts = {n: c for n, (c, _, _) in probes.items()}
    if pose_source == "keypoints":
        counts[KEYPOINTS_FILE] = _keypoint_frames(folder)
    if len(set(counts.values())) != 1:
        listing = ", ".join(f"{n} {c}" for n, c in counts.items())
        raise _fail(folder, f"frame counts differ ({listing}); all must have the same number of frames")
    frames = counts["driving.mp4"]
    if frames < MIN_FRAMES:
        raise _fail(folder, f"only {frames} frames; at least {MIN_FRAMES} are needed")
    if record["frames"] != frames:
        raise _fail(folder, f"{RECORD_FILE} says {record['frames']} frames but the videos have {frames}")
    sizes = {n: (w, h) for n, (_, w, h) in probes.items()}
    if len(set(sizes.values())) != 1:
        listing = ", ".join(f"{n} {w}x{h}" for n, (w, h) in sizes.items())
        raise _fail(folder, f"frame sizes differ ({listing}); all videos must have the same size")
    width, height = sizes["driving.mp4"]
    return SampleInfo(folder, record["direction"], float(record["fps"]), frames, width, height, pose_source, record)


def scan_dataset(root) -> List[SampleInfo]:
    """Every sample folder directly under ``root`` (sorted by name; hidden folders skipped), validated."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"dataset folder {root} does not exist or is not a folder")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise InputError(f"dataset folder {root} has no sample folders (each sample is a sub-folder with "
                         "identity.png, driving.mp4, mask.mp4, target.mp4, record.json; see training/DATASET.md)")
    return [check_sample(f) for f in folders]


class DreamIDVDataset(Dataset):
    """Samples of ``root`` prepared like the sampler's inputs (see the module docstring for the keys).

    width, height: the area cap of the area resize (SwapSettings.width/height). frames: the window
    length (4n+1, >= 5) or None for each whole clip floored to 4n+1. seed: the window choice is a
    function of (seed, epoch, index); call :meth:`set_epoch` to draw new windows each epoch.
    """

    def __init__(self, root, width: int, height: int, frames: Optional[int] = None, seed: int = 0,
                 samples: Optional[List[SampleInfo]] = None):
        if frames is not None and (frames < MIN_FRAMES or (frames - 1) % TEMPORAL_STRIDE):
            raise InputError(f"window frames must be 4n+1 and at least {MIN_FRAMES} (5, 9, 13, ...), got {frames}")
        self.root = Path(root)
        self.samples = scan_dataset(root) if samples is None else list(samples)
        self.width, self.height, self.frames, self.seed = int(width), int(height), frames, int(seed)
        self.epoch = 0
        if frames is not None:
            for s in self.samples:
                if s.frames < frames:
                    raise _fail(s.path, f"has {s.frames} frames, fewer than the training window of {frames}")
        with_pose = {s.pose_source is not None for s in self.samples}
        if len(with_pose) > 1:
            lacking = [s.name for s in self.samples if s.pose_source is None]
            raise InputError(f"dataset {self.root}: samples {', '.join(lacking[:5])} have no pose.mp4 or keypoints.json "
                             "while others do; give every sample a pose (full model) or none (faster model)")
        self.has_pose = with_pose == {True}

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @staticmethod
    def collate(items: List[Dict]) -> Dict:
        """See :func:`collate` (the trainer uses a dataset's ``collate`` when it has one)."""
        return collate(items)

    def window(self, index: int) -> tuple:
        """(start, length) of the frames ``index`` yields at the current seed and epoch."""
        s = self.samples[index]
        length = self.frames or floor_4n1(s.frames)
        rng = random.Random(f"{self.seed}:{self.epoch}:{index}")
        return rng.randint(0, s.frames - length), length

    def _video(self, s: SampleInfo, name: str, start: int, length: int) -> np.ndarray:
        frames, _ = read_video(s.path / name, max_frames=start + length)
        if len(frames) < start + length:
            raise _fail(s.path, f"{name} decoded to {len(frames)} frames, expected {s.frames}")
        if frames.shape[1:3] != (s.height, s.width):
            raise _fail(s.path, f"{name} frames are {frames.shape[2]}x{frames.shape[1]}, expected {s.width}x{s.height}")
        return frames[start:start + length]

    def _pose(self, s: SampleInfo, driving: np.ndarray, start: int, length: int) -> np.ndarray:
        if s.pose_source == "video":
            return self._video(s, POSE_VIDEO, start, length)
        from dreamidv_core.preprocess.pose.extract import extract_keypoints

        data = json.loads((s.path / KEYPOINTS_FILE).read_text(encoding="utf-8"))[start:start + length]
        try:
            return extract_keypoints(driving, data, what=f"{s.path / KEYPOINTS_FILE}").pose
        except InputError as exc:
            raise _fail(s.path, str(exc)) from None

    def __getitem__(self, index: int) -> Dict:
        s = self.samples[index]
        start, length = self.window(index)
        size = (self.width, self.height)
        try:
            driving = self._video(s, "driving.mp4", start, length)
            item = {
                "video": prepare_frames(driving, length, *size, what=f"{s.path}/driving.mp4").mul_(2).sub_(1),
                "mask": prepare_frames(self._video(s, "mask.mp4", start, length), length, *size,
                                       what=f"{s.path}/mask.mp4"),
                "identity": prepare_reference(read_image(s.path / IDENTITY_FILE), s.width, s.height,
                                              *size).mul_(2).sub_(1),
                "target": prepare_frames(self._video(s, "target.mp4", start, length), length, *size,
                                         what=f"{s.path}/target.mp4").mul_(2).sub_(1),
            }
            if self.has_pose:
                item["pose"] = prepare_frames(self._pose(s, driving, start, length), length, *size,
                                              what=f"{s.path}/pose")
        except InputError as exc:
            msg = str(exc)
            raise (exc if str(s.path) in msg else _fail(s.path, msg)) from None
        item.update(index=index, start=start, direction=s.direction, path=str(s.path), record=s.record)
        return item


def collate(items: List[Dict]) -> Dict:
    """Batch items of equal shapes: tensors stacked on a new first axis ([B, 3, F, H, W]); every other
    key (index, start, direction, path, record) becomes a list. Shapes differ -> InputError naming the samples."""
    out: Dict = {}
    for key in items[0]:
        values = [it[key] for it in items]
        if isinstance(values[0], torch.Tensor):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) > 1:
                listing = ", ".join(f"{it['path']} {list(it[key].shape)}" for it in items)
                raise InputError(f"cannot batch '{key}' of different shapes ({listing}); use batch size 1 or "
                                 "samples of the same aspect ratio and a fixed window length")
            out[key] = torch.stack(values)
        else:
            out[key] = values
    return out


def open_dataset(spec) -> DreamIDVDataset:
    """A dataset from a config entry: a folder path (832x480 area cap, 81-frame windows, seed 0), or a
    dict ``{"root": ..., "width": 832, "height": 480, "frames": 81 or null, "seed": 0}``."""
    if isinstance(spec, (str, Path)):
        spec = {"root": spec}
    if not isinstance(spec, dict) or "root" not in spec:
        raise InputError(f"dataset: expected a folder path or {{'root': folder, 'width', 'height', 'frames', "
                         f"'seed'}}, got {spec!r}")
    unknown = set(spec) - {"root", "width", "height", "frames", "seed"}
    if unknown:
        raise InputError(f"dataset: unknown keys {sorted(unknown)}; allowed: root, width, height, frames, seed")
    return DreamIDVDataset(spec["root"], int(spec.get("width", 832)), int(spec.get("height", 480)),
                           spec.get("frames", 81), int(spec.get("seed", 0)))
