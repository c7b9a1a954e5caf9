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
``kind`` ("video"/"still"), ``path`` (the sample folder, str) and ``record`` (record.json as a dict).
``pose`` is absent when the dataset has no pose for any sample (the faster model). F = ``frames`` (a 4n+1
window), or the whole clip floored to 4n+1 when ``frames`` is None; a clip longer than F gives a random
window, the same for the same (seed, epoch, index).

**Still samples** (image-video hybrid training, after VividFace, arXiv:2412.11279): a sample folder with
``driving.png``/``mask.png``/``target.png`` (and ``pose.png`` or a one-frame ``keypoints.json``) instead of
videos is a one-frame clip, F = 1. The VAE and the DiT take it as it is: a 4n+1 clip with n = 0 encodes to
one latent frame (the Wan VAE's first, stand-alone latent frame), the PoseGuider's two stride-2 temporal
convolutions map 1 frame to 1, and the DiT sees one latent frame of tokens. Stills and videos never share a
micro-batch (their F differ): :meth:`DreamIDVDataset.unit_keys` makes each micro-batch all-still or
all-video, a share ``still_ratio`` of them still (exactly, over any run of micro-batches).

**Keys**: ``dataset[i]`` is sample ``i`` at the dataset's current epoch (:meth:`set_epoch`); the trainer
passes ``dataset[(i, epoch)]`` so windows, occluders and still/video mixing change with the epoch in
DataLoader workers too. **Occlusion** (``occlusion=``, :mod:`training.augment`) and the **latent cache**
(``latent_cache=``, :mod:`training.latent_cache`: a cached item holds ``latents`` instead of the video,
mask and target pixels) are both options of the dataset.
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
STILL_FILES = ("driving.png", "mask.png", "target.png")  # a still sample: one-frame images instead of videos
POSE_IMAGE = "pose.png"
KINDS = ("video", "still")


@dataclass
class SampleInfo:
    """One validated sample folder."""
    path: Path
    direction: str  # "forward" | "backward"
    fps: float
    frames: int  # frames in every video of the sample
    width: int  # driving frame size (every video has it)
    height: int
    pose_source: Optional[str]  # "video" (pose.mp4 / pose.png), "keypoints" (keypoints.json) or None
    record: Dict = field(repr=False)
    kind: str = "video"  # "video" or "still" (one-frame images, F = 1)

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


def _read_record(folder: Path, still: bool = False) -> Dict:
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
    if still:  # a still: fps is meaningless and frames, when given, must be 1
        record.setdefault("fps", 1.0)
        record.setdefault("frames", 1)
        if record["frames"] != 1:
            raise _fail(folder, f"{RECORD_FILE}: a still sample (driving.png) has 'frames' 1, got {record['frames']!r}")
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


def _check_still(folder: Path) -> SampleInfo:
    """A still sample: identity.png, driving.png, mask.png, target.png, record.json and optionally
    pose.png or a one-frame keypoints.json, all images of one size."""
    missing = [n for n in (IDENTITY_FILE, RECORD_FILE) + STILL_FILES if not (folder / n).is_file()]
    if missing:
        raise _fail(folder, f"missing {', '.join(missing)} (a still sample needs identity.png, driving.png, "
                            "mask.png, target.png, record.json and optionally pose.png or keypoints.json)")
    clashing = [n for n in VIDEO_FILES if (folder / n).is_file()]
    if clashing:
        raise _fail(folder, f"has both still images (driving.png) and videos ({', '.join(clashing)}); keep one kind")
    record = _read_record(folder, still=True)
    names = [IDENTITY_FILE] + list(STILL_FILES)
    pose_source = None
    if (folder / POSE_IMAGE).is_file():
        names.append(POSE_IMAGE)
        pose_source = "video"
    elif (folder / KEYPOINTS_FILE).is_file():
        pose_source = "keypoints"
        if _keypoint_frames(folder) != 1:
            raise _fail(folder, f"{KEYPOINTS_FILE} of a still sample must hold exactly one frame")
    sizes = {}
    for n in names:
        try:
            img = read_image(folder / n)
        except InputError as exc:
            raise _fail(folder, f"{n} is not a readable image ({exc})") from None
        sizes[n] = (img.shape[1], img.shape[0])
    if sizes[IDENTITY_FILE][0] < 2 or sizes[IDENTITY_FILE][1] < 2:
        raise _fail(folder, f"{IDENTITY_FILE} is only {sizes[IDENTITY_FILE][0]}x{sizes[IDENTITY_FILE][1]} pixels")
    frame_sizes = {n: wh for n, wh in sizes.items() if n != IDENTITY_FILE}
    if len(set(frame_sizes.values())) != 1:
        listing = ", ".join(f"{n} {w}x{h}" for n, (w, h) in frame_sizes.items())
        raise _fail(folder, f"image sizes differ ({listing}); driving, mask, target and pose must have one size")
    width, height = frame_sizes["driving.png"]
    return SampleInfo(folder, record["direction"], float(record["fps"]), 1, width, height, pose_source, record,
                      kind="still")


def check_sample(folder) -> SampleInfo:
    """Validate one sample folder (a video sample, or a still one when it holds driving.png) -> SampleInfo;
    InputError naming the folder and the problem."""
    folder = Path(folder)
    if (folder / STILL_FILES[0]).is_file():
        return _check_still(folder)
    missing = [n for n in (IDENTITY_FILE, RECORD_FILE) + VIDEO_FILES if not (folder / n).is_file()]
    if missing:
        raise _fail(folder, f"missing {', '.join(missing)} (a sample needs identity.png, driving.mp4, mask.mp4, "
                            "target.mp4, record.json and optionally pose.mp4 or keypoints.json; a still sample "
                            "driving.png, mask.png, target.png instead of the videos)")
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
    length (4n+1, >= 5) or None for each whole clip floored to 4n+1 (still samples are always 1 frame).
    seed: the window choice is a function of (seed, epoch, index); call :meth:`set_epoch` (or index with
    ``(index, epoch)``) to draw new windows each epoch. still_ratio: share of the micro-batches made of still
    samples (:meth:`unit_keys`; None: the folder's share of stills). occlusion: an
    :class:`training.augment.OcclusionAugmentation` (None: off). latent_cache: a
    :class:`training.latent_cache.LatentCache` (None: off).
    """

    def __init__(self, root, width: int, height: int, frames: Optional[int] = None, seed: int = 0,
                 samples: Optional[List[SampleInfo]] = None, still_ratio: Optional[float] = None,
                 occlusion=None, latent_cache=None):
        if frames is not None and (frames < MIN_FRAMES or (frames - 1) % TEMPORAL_STRIDE):
            raise InputError(f"window frames must be 4n+1 and at least {MIN_FRAMES} (5, 9, 13, ...), got {frames}")
        self.root = Path(root)
        self.samples = scan_dataset(root) if samples is None else list(samples)
        self.width, self.height, self.frames, self.seed = int(width), int(height), frames, int(seed)
        self.epoch = 0
        if frames is not None:
            for s in self.samples:
                if s.kind == "video" and s.frames < frames:
                    raise _fail(s.path, f"has {s.frames} frames, fewer than the training window of {frames}")
        with_pose = {s.pose_source is not None for s in self.samples}
        if len(with_pose) > 1:
            lacking = [s.name for s in self.samples if s.pose_source is None]
            raise InputError(f"dataset {self.root}: samples {', '.join(lacking[:5])} have no pose.mp4 or keypoints.json "
                             "while others do; give every sample a pose (full model) or none (faster model)")
        self.has_pose = with_pose == {True}
        self.video_indices = [i for i, s in enumerate(self.samples) if s.kind == "video"]
        self.still_indices = [i for i, s in enumerate(self.samples) if s.kind == "still"]
        self.still_ratio = self._check_ratio(still_ratio)
        self.occlusion = occlusion if occlusion is not None and occlusion.enabled else None
        self.latent_cache = latent_cache

    def _check_ratio(self, ratio: Optional[float]) -> float:
        n_still, n = len(self.still_indices), len(self.samples)
        if ratio is None:
            return n_still / n if n else 0.0
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) <= 1.0:
            raise InputError(f"still_ratio must be a number in [0, 1] (or None: the folder's share), got {ratio!r}")
        ratio = float(ratio)
        if ratio > 0 and not n_still:
            raise InputError(f"dataset {self.root}: still_ratio is {ratio} but it has no still samples (folders with "
                             "driving.png, mask.png, target.png: see training/DATASET.md)")
        if ratio < 1 and not self.video_indices:
            raise InputError(f"dataset {self.root}: still_ratio is {ratio} but it has only still samples; use 1.0")
        return ratio

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @staticmethod
    def collate(items: List[Dict]) -> Dict:
        """See :func:`collate` (the trainer uses a dataset's ``collate`` when it has one)."""
        return collate(items)

    # ------------------------------------------------------------------------------------ which samples
    def unit_keys(self, seed: int, unit: int, batch_size: int, shuffle: bool = True) -> List[tuple]:
        """Keys ``(index, epoch)`` of micro-batch number ``unit`` of a run (the trainer's protocol, see
        :func:`training.trainer.unit_keys`). Micro-batch ``unit`` is all-still when
        ``floor((unit + 1) r + phi) > floor(unit r + phi)`` (r = ``still_ratio``, phi in [0, 1) from ``seed``),
        else all-video, so any run of micro-batches has the share r of stills up to one. Each kind walks
        its own seeded per-epoch permutations (the videos of a video-only dataset exactly as
        :func:`training.trainer.sample_indices` would)."""
        from .trainer import derive_seed, sample_indices

        r = self.still_ratio
        phase = (derive_seed(seed, "still-phase") % 10 ** 9) / 10 ** 9 if 0 < r < 1 else 0.0
        stills_before = math.floor(unit * r + phase)
        is_still = math.floor((unit + 1) * r + phase) > stills_before
        pool = self.still_indices if is_still else self.video_indices
        position = stills_before if is_still else unit - stills_before
        kind_seed = derive_seed(seed, "stills") % (2 ** 62) if is_still else seed
        n = len(pool)
        first = position * batch_size
        picks = sample_indices(n, kind_seed, first, batch_size, shuffle)
        return [(pool[i], (first + k) // n) for k, i in enumerate(picks)]

    def window(self, index: int, epoch: Optional[int] = None) -> tuple:
        """(start, length) of the frames ``index`` yields at the current seed and epoch (or ``epoch``)."""
        s = self.samples[index]
        if s.kind == "still":
            return 0, 1
        length = self.frames or floor_4n1(s.frames)
        rng = random.Random(f"{self.seed}:{self.epoch if epoch is None else int(epoch)}:{index}")
        return rng.randint(0, s.frames - length), length

    # ------------------------------------------------------------------------------------ reading
    def _video(self, s: SampleInfo, name: str, start: int, length: int) -> np.ndarray:
        if s.kind == "still":
            frames = read_image(s.path / name.replace(".mp4", ".png"))[None]
        else:
            frames, _ = read_video(s.path / name, max_frames=start + length)
        if len(frames) < start + length:
            raise _fail(s.path, f"{name} decoded to {len(frames)} frames, expected {s.frames}")
        if frames.shape[1:3] != (s.height, s.width):
            raise _fail(s.path, f"{name} frames are {frames.shape[2]}x{frames.shape[1]}, expected {s.width}x{s.height}")
        return frames[start:start + length]

    def _pose(self, s: SampleInfo, driving, start: int, length: int) -> np.ndarray:
        if s.pose_source == "video":
            return self._video(s, POSE_VIDEO, start, length)
        from dreamidv_core.preprocess.pose.extract import extract_keypoints

        data = json.loads((s.path / KEYPOINTS_FILE).read_text(encoding="utf-8"))[start:start + length]
        try:
            return extract_keypoints(driving, data, what=f"{s.path / KEYPOINTS_FILE}").pose
        except InputError as exc:
            raise _fail(s.path, str(exc)) from None

    def _files(self, s: SampleInfo) -> List[Path]:
        """The files the cached latents are made from (identity, driving, mask, target)."""
        names = STILL_FILES if s.kind == "still" else VIDEO_FILES
        return [s.path / IDENTITY_FILE] + [s.path / n for n in names]

    def _cache_lookup(self, s: SampleInfo, start: int, length: int):
        """-> (key, latents or None, stat signatures of the files) for the latent cache."""
        from .latent_cache import stat_signature

        files = self._files(s)
        signatures = {str(f): stat_signature(f) for f in files}
        key = self.latent_cache.key(files, start=start, length=length, width=self.width, height=self.height)
        return key, self.latent_cache.load(key), signatures

    def _prepare(self, frames, length: int, what: str, signed: bool) -> torch.Tensor:
        out = prepare_frames(frames, length, self.width, self.height, what=what)
        return out.mul_(2).sub_(1) if signed else out

    def __getitem__(self, key) -> Dict:
        index, epoch = (int(key[0]), int(key[1])) if isinstance(key, tuple) else (int(key), self.epoch)
        s = self.samples[index]
        start, length = self.window(index, epoch)
        occluder = self.occlusion.draw(epoch, index) if self.occlusion is not None else None
        cache_key = cached = signatures = None
        if self.latent_cache is not None and occluder is None:
            cache_key, cached, signatures = self._cache_lookup(s, start, length)
        try:
            item = {"identity": prepare_reference(read_image(s.path / IDENTITY_FILE), s.width, s.height,
                                                  self.width, self.height).mul_(2).sub_(1)}
            driving = None
            ext = ".png" if s.kind == "still" else ".mp4"
            if cached is None:
                driving = self._video(s, "driving.mp4", start, length)
                item["video"] = self._prepare(driving, length, f"{s.path}/driving{ext}", True)
                item["mask"] = self._prepare(self._video(s, "mask.mp4", start, length), length,
                                             f"{s.path}/mask{ext}", False)
                item["target"] = self._prepare(self._video(s, "target.mp4", start, length), length,
                                               f"{s.path}/target{ext}", True)
            if self.has_pose:
                frames = driving if driving is not None else _Blank(length, s.height, s.width)
                item["pose"] = self._prepare(self._pose(s, frames, start, length), length, f"{s.path}/pose", False)
        except InputError as exc:
            msg = str(exc)
            raise (exc if str(s.path) in msg else _fail(s.path, msg)) from None
        if cached is not None:
            item["latents"] = cached
        elif cache_key is not None:
            from .latent_cache import still_unchanged

            # a file rewritten while it was read: do not cache what may mix two versions
            item["cache_key"] = cache_key if still_unchanged(signatures) else None
        if occluder is not None:
            self.occlusion(item, occluder)
        item.update(index=index, start=start, direction=s.direction, kind=s.kind, path=str(s.path), record=s.record)
        return item


class _Blank:
    """Stands in for the driving frames where only their count and size matter (drawing keypoints)."""

    def __init__(self, count: int, height: int, width: int):
        self.count, self.shape = count, (count, height, width, 3)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i):
        return np.zeros(self.shape[1:], np.uint8)


def collate(items: List[Dict]) -> Dict:
    """Batch items of equal shapes: tensors stacked on a new first axis ([B, 3, F, H, W]); every other
    key (index, start, direction, path, record) becomes a list. Shapes differ -> InputError naming the samples.
    A key that only some items have (pixels of the items not served from the latent cache, ``latents`` of
    those that are, ``occluder``) becomes a list with None for the others."""
    out: Dict = {}
    keys = list(items[0]) + [k for it in items[1:] for k in it if k not in items[0]]
    for key in dict.fromkeys(keys):
        values = [it.get(key) for it in items]
        if any(v is None for v in values) and any(isinstance(v, torch.Tensor) for v in values):
            out[key] = values
            continue
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


DATA_OPTION_KEYS = ("still_ratio", "occlusion", "occlusion_scale", "latent_cache")
DATASET_KEYS = ("root", "width", "height", "frames", "seed") + DATA_OPTION_KEYS


@dataclass
class DataOptions:
    """The dataset options of the training recipes (config ``[dataset]`` keys, node inputs):
    still_ratio: share of still micro-batches (None: the folder's share); occlusion: probability of an
    occluder per sample (0 = off); occlusion_scale: its size range; latent_cache: a folder for the
    on-disk latent cache (None = off)."""

    still_ratio: Optional[float] = None
    occlusion: float = 0.0
    occlusion_scale: tuple = (0.3, 0.7)
    latent_cache: Optional[str] = None

    @classmethod
    def from_spec(cls, spec: Dict) -> "DataOptions":
        scale = spec.get("occlusion_scale", (0.3, 0.7))
        if not isinstance(scale, (list, tuple)) or len(scale) != 2:
            raise InputError(f"dataset.occlusion_scale: expected [low, high], got {scale!r}")
        cache = spec.get("latent_cache")
        if cache is not None and not (isinstance(cache, str) and cache.strip()):
            raise InputError(f"dataset.latent_cache: expected a folder path, got {cache!r}")
        return cls(spec.get("still_ratio"), spec.get("occlusion", 0.0), tuple(scale), cache or None)

    def build(self, seed: int, vae=None) -> Dict:
        """Keyword arguments of :class:`DreamIDVDataset` (the latent cache needs the VAE to fingerprint)."""
        from .augment import OcclusionAugmentation

        occ = OcclusionAugmentation(self.occlusion, self.occlusion_scale, seed=seed)
        cache = None
        if self.latent_cache:
            if vae is None:
                raise InputError("dataset.latent_cache needs the training VAE")
            from .latent_cache import LatentCache
            cache = LatentCache.for_vae(self.latent_cache, vae)
        return {"still_ratio": self.still_ratio, "occlusion": occ if occ.enabled else None, "latent_cache": cache}


def open_dataset(spec, vae=None) -> DreamIDVDataset:
    """A dataset from a config entry: a folder path (832x480 area cap, 81-frame windows, seed 0), or a
    dict ``{"root": ..., "width": 832, "height": 480, "frames": 81 or null, "seed": 0}`` plus the
    :class:`DataOptions` keys (still_ratio, occlusion, occlusion_scale, latent_cache; the cache needs ``vae``)."""
    if isinstance(spec, (str, Path)):
        spec = {"root": spec}
    if not isinstance(spec, dict) or "root" not in spec:
        raise InputError(f"dataset: expected a folder path or {{'root': folder, 'width', 'height', 'frames', "
                         f"'seed'}}, got {spec!r}")
    unknown = set(spec) - set(DATASET_KEYS)
    if unknown:
        raise InputError(f"dataset: unknown keys {sorted(unknown)}; allowed: {', '.join(DATASET_KEYS)}")
    seed = int(spec.get("seed", 0))
    return DreamIDVDataset(spec["root"], int(spec.get("width", 832)), int(spec.get("height", 480)),
                           spec.get("frames", 81), seed, **DataOptions.from_spec(spec).build(seed, vae))
