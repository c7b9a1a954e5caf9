"""Synthetic multi-person clips with known ground truth, for the target tracking tests and benchmark.

A scene is a few people (coloured, textured face squares with a person-specific landmark layout) moving on
a plain background, with a depth order (who hides whom), optional occluders and shot cuts. Each frame
yields what a face detector would report: the faces that are at most ``HIDDEN`` covered, their boxes and
landmarks with a little detector noise, as tracking detections (payload: the person's name) and as
POSE_KEYPOINT frames (68 face points per person), plus the painted frames for an embedder to look at.

Scenarios (:func:`scenario`): ``crossing`` (two people walk past each other and swap sides, the one
behind hidden while they overlap), ``occlusion`` (the left person hidden by a passing board for 8
frames), ``cut`` (a hard cut after which both reappear on the other side, the other person where the
first one was, at a similar size).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from dreamidv_core.preprocess.tracking import Detection

HIDDEN = 0.4  # a face covered by more than this fraction is not detected
FACE_POINTS = 68
COLOURS = {"A": (215, 70, 60), "B": (60, 80, 215), "C": (70, 200, 80)}


@dataclass
class Person:
    """name; path: per frame (cx, cy, size) or None when out of the shot; depth: smaller is in front."""

    name: str
    path: List[Optional[Tuple[float, float, float]]]
    depth: int


@dataclass
class Scene:
    frames: np.ndarray  # uint8 [F, H, W, 3]
    detections: List[List[Detection]]  # per frame, payload = person name
    keypoints: List[dict]  # POSE_KEYPOINT per frame (pixel coordinates)
    visible: List[Dict[str, np.ndarray]]  # per frame: name -> the box (x0, y0, x1, y1) of each detected face
    cuts: List[int] = field(default_factory=list)
    name: str = ""


def face_layout(name: str) -> np.ndarray:
    """[68, 2] landmark offsets in face sizes around the face centre, a person-specific shape."""
    t = np.linspace(0, 2 * np.pi, FACE_POINTS, endpoint=False)
    k = {"A": 0.0, "B": 0.9, "C": 1.7}[name]
    r = 0.42 + 0.05 * np.sin(3 * t + k)
    return np.stack([r * np.cos(t) * (0.85 + 0.1 * k / 1.7), r * np.sin(t)], 1)


def _box(cx: float, cy: float, size: float) -> np.ndarray:
    return np.array([cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2])


def _overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of box a covered by box b."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return w * h / max((a[2] - a[0]) * (a[3] - a[1]), 1e-9)


def _paint(frame: np.ndarray, box: np.ndarray, colour, seed: int) -> None:
    h, w = frame.shape[:2]
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if x1 <= x0 or y1 <= y0:
        return
    tex = np.random.default_rng(seed).integers(-25, 26, size=(4, 4, 3))
    ys = (np.arange(y1 - y0) * 4 // (y1 - y0))
    xs = (np.arange(x1 - x0) * 4 // (x1 - x0))
    frame[y0:y1, x0:x1] = np.clip(np.array(colour)[None, None] + tex[ys][:, xs], 0, 255)


def render(people: Sequence[Person], count: int, height: int = 96, width: int = 160,
           occluders: Sequence[Tuple[int, int, np.ndarray]] = (), backgrounds: Sequence[Tuple[int, int]] = ((0, 90),),
           noise: float = 0.6, seed: int = 0, name: str = "") -> Scene:
    """The scene's frames and detections. occluders: (first frame, last frame, box) drawn in front of
    everyone; backgrounds: (first frame, grey level) per shot (a change of level is a hard cut)."""
    rng = np.random.default_rng(seed)
    frames = np.zeros((count, height, width, 3), np.uint8)
    detections, keypoints, visible = [], [], []
    starts = [b[0] for b in backgrounds]
    for f in range(count):
        level = backgrounds[int(np.searchsorted(starts, f, side="right")) - 1][1]
        frames[f] = level
        boxes = {p.name: _box(*p.path[f]) for p in people if p.path[f] is not None}
        for p in sorted(people, key=lambda p: -p.depth):  # back to front
            if p.name in boxes:
                _paint(frames[f], boxes[p.name], COLOURS[p.name], seed=ord(p.name))
        blocks = [box for a, b, box in occluders if a <= f <= b]
        for box in blocks:
            x0, y0, x1, y1 = (int(round(v)) for v in box)
            frames[f, max(y0, 0):y1, max(x0, 0):x1] = 140
        dets, kp_people, seen = [], [], {}
        for p in people:
            if p.name not in boxes:
                continue
            box = boxes[p.name]
            cover = [boxes[q.name] for q in people if q.name in boxes and q.depth < p.depth] + blocks
            if any(_overlap(box, c) > HIDDEN for c in cover) or box[0] < 0 or box[2] > width:
                continue
            cx, cy, size = p.path[f]
            pts = np.array([cx, cy]) + face_layout(p.name) * size + rng.normal(0, noise, (FACE_POINTS, 2))
            det = Detection.from_points(pts, payload=p.name)
            dets.append(det)
            seen[p.name] = det.box
            face = np.concatenate([pts, np.ones((FACE_POINTS, 1))], 1).reshape(-1).tolist()
            kp_people.append({"pose_keypoints_2d": [0.0] * 54, "face_keypoints_2d": face})
        order = rng.permutation(len(dets))  # a detector's order means nothing
        detections.append([dets[i] for i in order])
        keypoints.append({"people": [kp_people[i] for i in order], "canvas_width": width, "canvas_height": height})
        visible.append(seen)
    cuts = [b[0] for b in backgrounds[1:]]
    return Scene(frames, detections, keypoints, visible, cuts, name)


def _line(a: Tuple[float, float, float], b: Tuple[float, float, float], count: int) -> list:
    return [tuple(np.array(a) + (np.array(b) - np.array(a)) * i / max(count - 1, 1)) for i in range(count)]


def scenario(kind: str, count: int = 40, seed: int = 0) -> Scene:
    """One of ``crossing``, ``occlusion``, ``cut`` (see the module doc); person A is the left one at the
    start (target index 0), B the right one (index 1)."""
    if kind == "crossing":
        a = Person("A", _line((30, 46, 30), (130, 50, 30), count), depth=0)
        b = Person("B", _line((130, 52, 28), (30, 48, 28), count), depth=1)
        return render([a, b], count, seed=seed, name=kind)
    if kind == "occlusion":
        a = Person("A", _line((45, 48, 30), (62, 46, 30), count), depth=1)
        b = Person("B", _line((118, 50, 28), (114, 50, 28), count), depth=1)
        board = (15, 22, np.array([30, 20, 80, 80]))
        return render([a, b], count, occluders=[board], seed=seed, name=kind)
    if kind == "cut":
        half = count // 2
        a = Person("A", _line((42, 48, 30), (46, 48, 30), half) + _line((118, 46, 32), (114, 46, 32), count - half), 1)
        b = Person("B", _line((118, 50, 28), (116, 50, 28), half) + _line((44, 50, 30), (46, 50, 30), count - half), 1)
        return render([a, b], count, backgrounds=((0, 90), (half, 30)), seed=seed, name=kind)
    raise ValueError(f"unknown scenario {kind!r}")


def colour_embedder(image: np.ndarray, box: np.ndarray) -> Optional[np.ndarray]:
    """A deterministic stand-in for ArcFace: the mean colour of the box's central half, centred on grey
    (faces of one person agree, of two people differ; the background contributes little)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    cx0, cx1 = int(x0 + (x1 - x0) / 4), int(np.ceil(x1 - (x1 - x0) / 4))
    cy0, cy1 = int(y0 + (y1 - y0) / 4), int(np.ceil(y1 - (y1 - y0) / 4))
    patch = image[max(cy0, 0):cy1, max(cx0, 0):cx1].reshape(-1, 3).astype(np.float64)
    if not len(patch):
        return None
    v = patch.mean(0) - 128.0
    return v / max(np.linalg.norm(v), 1e-9)


def photo_of(name: str, size: int = 48) -> np.ndarray:
    """A 'photo' of person ``name``: their face square on grey."""
    img = np.full((size * 2, size * 2, 3), 128, np.uint8)
    _paint(img, _box(size, size, size), COLOURS[name], seed=ord(name))
    return img


def target_accuracy(scene: Scene, detections: Sequence[Optional[Detection]], person: str) -> dict:
    """How a per-frame target track compares with the truth: frames where ``person`` is visible, of those
    the frames where the track is on them (``on_target``), frames where it is on someone else (``wrong``),
    visible frames the track misses, and identity switches (changes of the person tracked)."""
    visible = [f for f, seen in enumerate(scene.visible) if person in seen]
    on, wrong, tracked = 0, 0, []
    for f, det in enumerate(detections):
        if det is None:
            continue
        who = _who(scene, f, det)
        tracked.append(who)
        if who == person and person in scene.visible[f]:
            on += 1
        elif who != person:
            wrong += 1
    switches = sum(1 for x, y in zip(tracked, tracked[1:]) if x != y)
    return {"visible": len(visible), "on_target": on, "wrong": wrong, "missed": len(visible) - on,
            "switches": switches}


def _who(scene: Scene, f: int, det: Detection) -> str:
    """Whose face a detection is: its payload, or (bridged copies from other frames) the nearest visible box."""
    seen = scene.visible[f]
    if det.payload in seen or not seen:
        return det.payload
    return min(seen, key=lambda n: np.linalg.norm(seen[n][:2] - det.box[:2]))


def mask_accuracy(scene: Scene, masks: np.ndarray, person: str) -> dict:
    """Masks [F, H, W] against the truth: frames where the person is visible and the mask's centre lies in
    their box (and not in another's), frames where it lies on someone else, frames with a mask where the
    person is not visible."""
    on, wrong, spurious = 0, 0, 0
    for f, seen in enumerate(scene.visible):
        ys, xs = np.nonzero(masks[f] > 0.5)
        if not len(xs):
            continue
        c = np.array([xs.mean() + 0.5, ys.mean() + 0.5])
        inside = [n for n, b in seen.items() if b[0] <= c[0] <= b[2] and b[1] <= c[1] <= b[3]]
        if person in seen and inside == [person]:
            on += 1
        elif inside and person not in inside:
            wrong += 1
        elif person not in seen:
            spurious += 1
    visible = sum(1 for seen in scene.visible if person in seen)
    return {"visible": visible, "on_target": on, "wrong": wrong, "spurious": spurious}
