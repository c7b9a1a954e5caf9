"""Procedural training samples in the format of training/DATASET.md, for everyone's tests.

A "face" is a filled ellipse whose **identity** is its look (face colour, eye shape and eye colour,
mouth colour) and whose **pose** is where it is and how big it is in each frame (centre x, y and
radius, in pixels). Both are known by construction and stored in ``record.json["synthetic"]``
(see :func:`identity_of`), so tests can measure identity transfer and pose following.

For each sample two identities are drawn: the *driving* identity (the face seen in driving.mp4) and
the *target* identity (the face in identity.png and target.mp4). The driving and target videos share
the background and the per-frame pose; only the face's look differs. That is the swap the model must
learn, whatever the direction (forward: synthetic target; backward: real target, generated driving).

mask.mp4 = the face ellipse (white on black); pose.mp4 = white dots at 68 face keypoints (the layout
of the 68-point face model: jaw, brows, nose, eyes, mouth) on black; or, with ``pose_format=
"keypoints"``, keypoints.json in controlnet_aux's POSE_KEYPOINT format with the same points.

Deterministic: the same arguments give the same pixels and records. About a few ms per sample at the
default 9 frames of 48x64 (most of it is H.264 encoding).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Sequence, Tuple, Union

import cv2
import numpy as np
from PIL import Image

from dreamidv_core.io.state_dict import atomic_write
from dreamidv_core.io.video import write_video

FACE_COLOURS = [(230, 180, 140), (120, 200, 90), (90, 140, 230), (220, 90, 200), (240, 220, 70), (90, 220, 220)]
EYE_SHAPES = ["circle", "square", "bar"]
EYE_COLOURS = [(20, 20, 20), (200, 30, 30), (250, 250, 250)]
N_IDENTITIES = len(FACE_COLOURS) * len(EYE_SHAPES)  # identity k: face colour k // 3, eye shape k % 3


def identity_params(k: int) -> Dict:
    """Look of identity ``k`` (0 <= k < N_IDENTITIES): face colour, eye shape, eye colour (RGB 0..255)."""
    k = int(k) % N_IDENTITIES
    return {"id": k, "identity_colour": list(FACE_COLOURS[k // len(EYE_SHAPES)]),
            "eye_shape": EYE_SHAPES[k % len(EYE_SHAPES)],
            "eye_colour": list(EYE_COLOURS[(k // len(EYE_SHAPES) + k) % len(EYE_COLOURS)])}


def _rotate(points, cx: float, cy: float, roll: float) -> np.ndarray:
    """Points [K, 2] turned by ``roll`` degrees (clockwise on screen, y down) about (cx, cy)."""
    a = math.radians(roll)
    p = np.asarray(points, np.float64) - (cx, cy)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return p @ rot.T + (cx, cy)


def face_keypoints(cx: float, cy: float, r: float, roll: float = 0.0) -> np.ndarray:
    """The 68 face points (x, y in pixels) of a face centred at (cx, cy) with radius r, turned by ``roll``
    degrees in the image plane -> [68, 2]."""
    if roll:
        return _rotate(face_keypoints(cx, cy, r), cx, cy, roll)
    pts = []
    for a in np.linspace(math.pi * 0.05, math.pi * 0.95, 17)[::-1]:  # jaw 0-16 (lower half, left to right)
        pts.append((cx - math.cos(a) * r * 0.8, cy + math.sin(a) * r))
    for side in (-1, 1):  # brows 17-26
        xs = np.linspace(0.15, 0.55, 5) if side > 0 else -np.linspace(0.55, 0.15, 5)
        pts += [(cx + x * r, cy - 0.42 * r) for x in xs]
    pts += [(cx, cy + t * r) for t in np.linspace(-0.25, 0.15, 4)]  # nose bridge 27-30
    pts += [(cx + x * r, cy + 0.22 * r) for x in np.linspace(-0.15, 0.15, 5)]  # nose base 31-35
    for side in (-1, 1):  # eyes 36-47: 6 points around each eye centre
        ex, ey = cx + side * 0.35 * r, cy - 0.2 * r
        pts += [(ex + math.cos(a) * 0.12 * r, ey + math.sin(a) * 0.07 * r) for a in np.linspace(math.pi, -math.pi, 6, endpoint=False)]
    for n, (w, h) in ((12, (0.35, 0.12)), (8, (0.22, 0.05))):  # mouth 48-67: outer 12, inner 8
        pts += [(cx + math.cos(a) * w * r, cy + 0.5 * r + math.sin(a) * h * r)
                for a in np.linspace(math.pi, -math.pi, n, endpoint=False)]
    return np.asarray(pts, np.float64)


def _draw_turned_face(canvas: np.ndarray, look: Dict, cx: float, cy: float, r: float, roll: float) -> None:
    """:func:`draw_face` with the head turned by ``roll`` degrees in the image plane."""
    c = (int(round(cx)), int(round(cy)))
    cv2.ellipse(canvas, c, (max(1, int(round(0.8 * r))), max(1, int(round(r)))), roll, 0, 360,
                tuple(look["identity_colour"]), -1)
    eye = tuple(look["eye_colour"])
    er = max(1.0, 0.14 * r)
    for side in (-1, 1):
        ex, ey = _rotate([[cx + side * 0.35 * r, cy - 0.2 * r]], cx, cy, roll)[0]
        if look["eye_shape"] == "circle":
            cv2.circle(canvas, (int(round(ex)), int(round(ey))), int(round(er)), eye, -1)
            continue
        half = (er, er) if look["eye_shape"] == "square" else (2 * er, max(1.0, er / 2))
        box = cv2.boxPoints(((ex, ey), (2 * half[0], 2 * half[1]), roll))
        cv2.fillConvexPoly(canvas, np.round(box).astype(np.int32), eye)
    mx, my = _rotate([[cx, cy + 0.5 * r]], cx, cy, roll)[0]
    cv2.ellipse(canvas, (int(round(mx)), int(round(my))), (max(1, int(round(0.35 * r))), max(1, int(round(0.1 * r)))),
                roll, 0, 360, (150, 30, 40), -1)


def draw_face(canvas: np.ndarray, look: Dict, cx: float, cy: float, r: float, roll: float = 0.0) -> None:
    """Draw a face of look ``look`` at (cx, cy), radius r (turned by ``roll`` degrees in the image plane)
    onto uint8 RGB ``canvas`` in place."""
    if roll:
        return _draw_turned_face(canvas, look, cx, cy, r, roll)
    c = (int(round(cx)), int(round(cy)))
    cv2.ellipse(canvas, c, (max(1, int(round(0.8 * r))), max(1, int(round(r)))), 0, 0, 360, tuple(look["identity_colour"]), -1)
    eye = tuple(look["eye_colour"])
    er = max(1, int(round(0.14 * r)))
    for side in (-1, 1):
        ex, ey = int(round(cx + side * 0.35 * r)), int(round(cy - 0.2 * r))
        if look["eye_shape"] == "circle":
            cv2.circle(canvas, (ex, ey), er, eye, -1)
        elif look["eye_shape"] == "square":
            cv2.rectangle(canvas, (ex - er, ey - er), (ex + er, ey + er), eye, -1)
        else:
            cv2.rectangle(canvas, (ex - 2 * er, ey - max(1, er // 2)), (ex + 2 * er, ey + max(1, er // 2)), eye, -1)
    mw, mh = max(1, int(round(0.35 * r))), max(1, int(round(0.1 * r)))
    cv2.ellipse(canvas, (c[0], int(round(cy + 0.5 * r))), (mw, mh), 0, 0, 360, (150, 30, 40), -1)


def face_mask(h: int, w: int, cx: float, cy: float, r: float, roll: float = 0.0) -> np.ndarray:
    """uint8 [H, W, 3]: the face ellipse in white on black."""
    m = np.zeros((h, w, 3), np.uint8)
    cv2.ellipse(m, (int(round(cx)), int(round(cy))), (max(1, int(round(0.8 * r))), max(1, int(round(r)))),
                roll, 0, 360, (255, 255, 255), -1)
    return m


OCCLUDER_COLOURS = [(70, 50, 160), (30, 160, 110), (200, 120, 40), (120, 120, 120), (240, 240, 240)]


def occluder_polygons(rng: np.random.Generator, frames: int, poses: List[List[float]]) -> List[List[np.ndarray]]:
    """A test-set occluder (not the training augmentation's shapes): an "arm" (a long rotated rectangle)
    ending in a "fist" (an octagon), sliding across the face -> per frame a list of int32 polygons."""
    cx, cy, r = poses[0]
    angle = float(rng.uniform(0, 180))
    length, thick = float(rng.uniform(1.2, 2.0)) * r, float(rng.uniform(0.25, 0.45)) * r
    start = np.array([cx, cy]) + rng.uniform(-0.3, 0.3, size=2) * r
    move = rng.uniform(-0.5, 0.5, size=2) * r
    out = []
    for i in range(frames):
        t = i / max(1, frames - 1)
        fx, fy = start + t * move + (np.array(poses[i][:2]) - poses[0][:2])
        arm = cv2.boxPoints(((fx + 0.5 * length * math.cos(math.radians(angle)),
                              fy + 0.5 * length * math.sin(math.radians(angle))), (length, thick), angle))
        fist = [(fx + 0.32 * r * math.cos(a), fy + 0.32 * r * math.sin(a)) for a in np.linspace(0, 2 * math.pi, 8,
                                                                                                  endpoint=False)]
        out.append([np.round(arm).astype(np.int32), np.round(np.asarray(fist)).astype(np.int32)])
    return out


def pose_image(h: int, w: int, points: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3]: a white dot at each keypoint on black."""
    img = np.zeros((h, w, 3), np.uint8)
    for x, y in points:
        cv2.circle(img, (int(x), int(y)), 1, (255, 255, 255), -1)
    return img


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    a, b = rng.integers(20, 235, size=(2, 3))
    t = np.linspace(0, 1, w)[None, :, None]
    bg = (a[None, None] * (1 - t) + b[None, None] * t).repeat(h, axis=0)
    return np.ascontiguousarray(bg.astype(np.uint8))


def _poses(rng: np.random.Generator, frames: int, h: int, w: int,
           face_scale: Tuple[float, float] = (0.22, 0.36)) -> List[List[float]]:
    """Per frame [cx, cy, r] in pixels: a straight move with a changing size, kept inside the frame.
    ``face_scale``: the range of the radius as a fraction of the height."""
    r0, r1 = rng.uniform(face_scale[0], face_scale[1], size=2) * h
    out = []
    start = rng.uniform(0.3, 0.7, size=2)
    end = rng.uniform(0.3, 0.7, size=2)
    for i in range(frames):
        t = i / max(1, frames - 1)
        r = r0 + (r1 - r0) * t
        fx, fy = start + (end - start) * t
        cx = min(max(fx * w, 0.8 * r + 1), w - 0.8 * r - 1)
        cy = min(max(fy * h, r + 1), h - r - 1)
        out.append([round(float(cx), 3), round(float(cy), 3), round(float(r), 3)])
    return out


def _hard_chunk(rng: np.random.Generator, poses: List[List[float]], scale: float) -> int:
    """Shrink the face to ``scale`` of its radius in one random VAE temporal chunk (frames 4c-3 .. 4c,
    c >= 1) of ``poses`` in place (a harder pose: fewer face pixels) -> the chunk index (0: none)."""
    chunks = (len(poses) - 1) // 4
    if chunks < 1:
        return 0
    c = int(rng.integers(1, chunks + 1))
    for i in range(4 * c - 3, 4 * c + 1):
        cx, cy, r = poses[i]
        poses[i] = [cx, cy, round(float(max(2.0, r * scale)), 3)]
    return c


def _keypoints_json(points: Sequence[np.ndarray], h: int, w: int) -> list:
    """POSE_KEYPOINT: one frame dict per frame, pixel coordinates, one person with 68 face points, no body."""
    return [{"people": [{"pose_keypoints_2d": [],
                         "face_keypoints_2d": [float(v) for x, y in p for v in (round(x, 3), round(y, 3), 1.0)]}],
             "canvas_width": w, "canvas_height": h} for p in points]


def _write_bytes(path: Path, data: bytes) -> None:
    def write(tmp):
        with open(tmp, "wb") as fh:
            fh.write(data)
    atomic_write(path, write)


def _write_png(path: Path, image: np.ndarray) -> None:
    atomic_write(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))


def render_synthetic_sample(frames: int = 9, size: Tuple[int, int] = (48, 64), seed: int = 0,
                            identity: int = None, driving_identity: int = None,
                            face_scale: Tuple[float, float] = (0.22, 0.36), hard_chunk: float = 0.0,
                            hard_scale: float = 0.5, background: str = "gradient",
                            roll: Tuple[float, float] = (0.0, 0.0), target_roll_offset: float = 0.0,
                            occluder: bool = False) -> Tuple[Dict, Dict]:
    """The pixels of one sample, in memory -> (arrays, synthetic). arrays: ``driving``, ``target``, ``mask``,
    ``pose`` uint8 [F, H, W, 3], ``identity`` uint8 [H, W, 3], ``points`` (per frame [68, 2] keypoints), and
    with ``occluder`` ``occluder`` bool [F, H, W]; synthetic: the record's ``"synthetic"`` entry. Arguments
    as :func:`write_synthetic_sample`."""
    if background not in ("gradient", "grey"):
        raise ValueError(f"background must be 'gradient' or 'grey', got {background!r}")
    h, w = size
    rng = np.random.default_rng(seed)
    tgt = int(rng.integers(N_IDENTITIES)) if identity is None else int(identity) % N_IDENTITIES
    drv = int(rng.integers(N_IDENTITIES - 1)) if driving_identity is None else int(driving_identity) % N_IDENTITIES
    if driving_identity is None and drv >= tgt:
        drv += 1  # never the target identity
    look, drv_look = identity_params(tgt), identity_params(drv)
    bg = _background(rng, h, w)
    if background == "grey":
        bg = np.full_like(bg, int(bg[0, 0, 0]))
    poses = _poses(rng, frames, h, w, face_scale)
    hard = _hard_chunk(rng, poses, hard_scale) if hard_chunk > 0 and rng.random() < hard_chunk else 0
    rolls = [0.0] * frames
    if tuple(roll) != (0.0, 0.0):  # drawn after everything else: the other draws stay as they were
        r0, r1 = (float(v) for v in rng.uniform(roll[0], roll[1], size=2))
        rolls = [round(r0 + (r1 - r0) * i / max(1, frames - 1), 3) for i in range(frames)]
    occluders = occluder_polygons(rng, frames, poses) if occluder else None
    occ_colour = OCCLUDER_COLOURS[int(rng.integers(len(OCCLUDER_COLOURS)))] if occluder else None

    driving = np.empty((frames, h, w, 3), np.uint8)
    target = np.empty_like(driving)
    mask = np.empty_like(driving)
    pose = np.empty_like(driving)
    occ_mask = np.zeros((frames, h, w), bool)
    points = []
    for i, (cx, cy, r) in enumerate(poses):
        driving[i] = bg
        draw_face(driving[i], drv_look, cx, cy, r, rolls[i])
        target[i] = bg
        draw_face(target[i], look, cx, cy, r, rolls[i] + target_roll_offset)
        mask[i] = face_mask(h, w, cx, cy, r, rolls[i])
        points.append(face_keypoints(cx, cy, r, rolls[i]))
        pose[i] = pose_image(h, w, points[-1])
        if occluders is not None:
            m = np.zeros((h, w), np.uint8)
            for poly in occluders[i]:
                cv2.fillConvexPoly(m, poly, 1)
            occ_mask[i] = m > 0
            driving[i][occ_mask[i]] = occ_colour
            target[i][occ_mask[i]] = occ_colour

    ident = np.full((h, w, 3), 255, np.uint8)  # the identity photo: frontal, centred, on white
    draw_face(ident, look, w / 2, h / 2, 0.4 * h)
    arrays = {"driving": driving, "target": target, "mask": mask, "pose": pose, "identity": ident, "points": points}
    synthetic = {"identity": look, "driving_identity": drv_look, "poses": poses,
                 "pose_layout": "per frame [cx, cy, radius] in pixels of the driving frame",
                 "size": [h, w]}
    if hard_chunk > 0:
        synthetic["hard_chunk"] = hard
    if any(rolls):
        synthetic["rolls"] = rolls
    if occluders is not None:
        arrays["occluder"] = occ_mask
        synthetic["occluder_colour"] = list(occ_colour)
    return arrays, synthetic


def synthetic_items(n_samples: int, frames: int = 9, size: Tuple[int, int] = (48, 64), seed: int = 0,
                    **options) -> List[Dict]:
    """The samples :func:`write_synthetic_dataset` would write (same seeds, same pixels before H.264), as
    training items without files: ``video``/``target`` [3, F, H, W] in [-1, 1], ``mask``/``pose`` [3, F, H, W]
    in [0, 1], ``identity`` [3, 1, H, W] in [-1, 1], ``index``, ``record`` ({"synthetic": ...}) - the layout
    of :class:`training.dataset.DreamIDVDataset` when H, W are multiples of 16 (no resize, no letterbox)."""
    import torch

    if size[0] % 16 or size[1] % 16:
        raise ValueError(f"synthetic_items needs a size in multiples of 16 (no resize), got {size}")

    def t(a, signed):  # uint8 [F, H, W, 3] -> float [3, F, H, W]
        x = torch.from_numpy(np.ascontiguousarray(a)).float().div(255).permute(3, 0, 1, 2).contiguous()
        return x.mul(2).sub(1) if signed else x

    items = []
    for i in range(n_samples):
        arrays, syn = render_synthetic_sample(frames, size, seed * 100003 + i, **options)
        items.append({"video": t(arrays["driving"], True), "target": t(arrays["target"], True),
                      "mask": t(arrays["mask"], False), "pose": t(arrays["pose"], False),
                      "identity": t(arrays["identity"][None], True), "index": i, "record": {"synthetic": syn}})
        if "occluder" in arrays:
            items[-1]["occluder"] = torch.from_numpy(arrays["occluder"]).float()
    return items


def write_synthetic_sample(folder, frames: int = 9, size: Tuple[int, int] = (48, 64), seed: int = 0,
                           direction: str = "forward", identity: int = None, driving_identity: int = None,
                           pose_format: str = "video", fps: float = 24.0, **options) -> Dict:
    """Write one sample folder; returns its record. size = (height, width). ``identity`` /
    ``driving_identity``: identity indices (drawn from ``seed`` when None; always different).

    ``options`` for learnability studies (without them: the original samples, pixel for pixel):
    ``face_scale`` (low, high): the face radius range as a fraction of the height (default 0.22, 0.36);
    ``hard_chunk``: the probability that one VAE temporal chunk (frames 4c-3 .. 4c) shows the face shrunk
    to ``hard_scale`` (default 0.5) of its radius (a harder pose; recorded as ``synthetic["hard_chunk"]``,
    0 for none); ``background``: "gradient" (a random colour gradient) or "grey" (a flat grey level).
    """
    if direction not in ("forward", "backward"):
        raise ValueError(f"direction must be 'forward' or 'backward', got {direction!r}")
    if pose_format not in ("video", "keypoints"):
        raise ValueError(f"pose_format must be 'video' or 'keypoints', got {pose_format!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    h, w = size
    arrays, synthetic = render_synthetic_sample(frames, size, seed, identity, driving_identity, **options)
    _write_png(folder / "identity.png", arrays["identity"])
    write_video(folder / "driving.mp4", arrays["driving"], fps)
    write_video(folder / "mask.mp4", arrays["mask"], fps)
    if pose_format == "video":
        write_video(folder / "pose.mp4", arrays["pose"], fps)
    else:
        _write_bytes(folder / "keypoints.json", json.dumps(_keypoints_json(arrays["points"], h, w)).encode())
    write_video(folder / "target.mp4", arrays["target"], fps)
    record = {
        "version": 1,
        "direction": direction,
        "fps": fps,
        "frames": frames,
        "identity_similarity": {"identity_target": 1.0, "identity_driving": 0.0},
        "source": {"generator": "tests/synthetic_data.py", "seed": seed},
        "synthetic": synthetic,
    }
    _write_bytes(folder / "record.json", json.dumps(record, indent=1).encode())
    return record


def write_still_sample(folder, size: Tuple[int, int] = (48, 64), seed: int = 0, direction: str = "forward",
                       pose_format: str = "video", **options) -> Dict:
    """Write one **still** sample (training/DATASET.md: driving.png, mask.png, target.png, pose.png or a
    one-frame keypoints.json, identity.png, record.json): frame 0 of :func:`render_synthetic_sample`."""
    if direction not in ("forward", "backward"):
        raise ValueError(f"direction must be 'forward' or 'backward', got {direction!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    h, w = size
    arrays, synthetic = render_synthetic_sample(1, size, seed, **options)
    _write_png(folder / "identity.png", arrays["identity"])
    for name in ("driving", "mask", "target"):
        _write_png(folder / f"{name}.png", arrays[name][0])
    if pose_format == "video":
        _write_png(folder / "pose.png", arrays["pose"][0])
    else:
        _write_bytes(folder / "keypoints.json", json.dumps(_keypoints_json(arrays["points"], h, w)).encode())
    record = {"version": 1, "direction": direction, "frames": 1,
              "source": {"generator": "tests/synthetic_data.py", "seed": seed, "kind": "still"},
              "synthetic": synthetic}
    _write_bytes(folder / "record.json", json.dumps(record, indent=1).encode())
    return record


def write_synthetic_dataset(root, n_samples: int, frames: int = 9, size: Tuple[int, int] = (48, 64), seed: int = 0,
                            direction: str = "forward", pose_format: str = "video", fps: float = 24.0,
                            stills: int = 0, **options) -> List[Path]:
    """Write ``n_samples`` sample folders ``root/sample_000`` ... (and ``stills`` still samples
    ``root/still_000`` ...) -> their paths. ``direction``: "forward", "backward" or "mixed" (alternating,
    forward first). size = (height, width). ``options``: the learnability options of
    :func:`write_synthetic_sample` (face_scale, hard_chunk, hard_scale, background, roll, occluder)."""
    if direction not in ("forward", "backward", "mixed"):
        raise ValueError(f"direction must be 'forward', 'backward' or 'mixed', got {direction!r}")
    root = Path(root)
    paths = []
    for i in range(n_samples):
        d = direction if direction != "mixed" else ("forward", "backward")[i % 2]
        p = root / f"sample_{i:03d}"
        write_synthetic_sample(p, frames=frames, size=size, seed=seed * 100003 + i, direction=d,
                               pose_format=pose_format, fps=fps, **options)
        paths.append(p)
    for i in range(stills):
        d = direction if direction != "mixed" else ("forward", "backward")[i % 2]
        p = root / f"still_{i:03d}"
        write_still_sample(p, size=size, seed=seed * 100003 + 50000 + i, direction=d, pose_format=pose_format,
                           **options)
        paths.append(p)
    return paths


def identity_of(sample: Union[str, Path, Dict, object]) -> Dict:
    """The construction metadata of a synthetic sample: ``{"identity": {...}, "driving_identity": {...},
    "poses": [[cx, cy, r], ...], ...}``. ``sample``: a sample folder, a record dict, or anything with a
    ``record`` (training.dataset.SampleInfo) or ``path`` attribute."""
    if isinstance(sample, dict):
        record = sample.get("record", sample)
    elif hasattr(sample, "record"):
        record = sample.record
    else:
        folder = Path(getattr(sample, "path", sample))
        record = json.loads((folder / "record.json").read_text())
    if "synthetic" not in record:
        raise KeyError("not a synthetic sample: its record.json has no 'synthetic' entry")
    return record["synthetic"]
