"""Occlusion augmentation for training (after VividFace, Shao et al. 2024, arXiv:2412.11279, "occlusion
augmentation" of its AIDT triplets): an occluder (a hand- or object-like textured shape) is composited in
front of the face, **in the driving frames and in the supervision frames at the same place**, while the face
mask stays as it was. The model then sees a face region that holds something which is not the face, in the
input, and must output it again in front of the new face: it learns to keep occluders.

What is ours (VividFace pastes real hand/object images; the paper gives no generator): the occluders are
procedural and need no asset files. Each is drawn from a signed-distance shape in its own (u, v) frame:

* ``hand``: a palm (ellipse) with four fingers and a thumb (capsules);
* ``blob``: an ellipse; ``bar``: a long capsule (a microphone, a pen, a glass' edge);
* ``box``: a rounded rectangle (a phone, a card, a cup);
* ``polygon``: a convex polygon of 3..7 sides (an intersection of half-planes);

filled with a texture in the same (u, v) frame, so it moves with the shape: flat colour with noise, stripes,
checks or a two-colour gradient. Size: ``scale`` (a fraction of the longer side of the face's bounding box
in the mask, union over frames); position: a random point of the face box's central area (so it overlaps
the face); motion: a straight drift of up to ``max_drift`` face sizes over the clip plus a rotation of up to
``max_turn`` radians; edges anti-aliased over one pixel.

Whether a sample is occluded, and how, is a function of (seed, epoch, index) only: the same in every
DataLoader worker, in a resumed run, and under any number of processes. Validation never uses it (the
trainer's held-out datasets are built without it). The pose video is left as it was (at inference the pose
comes from a landmarker that usually still finds an occluded face).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from dreamidv_core.errors import InputError

SHAPES = ("hand", "blob", "bar", "box", "polygon")
TEXTURES = ("noise", "stripes", "checks", "gradient")


@dataclass
class OcclusionAugmentation:
    """probability: share of the samples that get an occluder (0 = off); scale: occluder size range (a
    fraction of the face box's longer side); max_drift: the most the occluder moves over a clip (in face
    sizes); max_turn: the most it turns (radians); seed: mixed into every decision."""

    probability: float = 0.0
    scale: Tuple[float, float] = (0.3, 0.7)
    max_drift: float = 0.5
    max_turn: float = 0.6
    seed: int = 0

    def __post_init__(self):
        p = self.probability
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= float(p) <= 1.0:
            raise InputError(f"occlusion probability must be a number in [0, 1], got {p!r}")
        lo, hi = (float(v) for v in self.scale)
        if not 0.0 < lo <= hi <= 2.0:
            raise InputError(f"occlusion scale must be (low, high) with 0 < low <= high <= 2, got {self.scale!r}")
        self.probability, self.scale = float(p), (lo, hi)

    @property
    def enabled(self) -> bool:
        return self.probability > 0.0

    def draw(self, epoch: int, index: int) -> Optional[int]:
        """-> the occluder's seed when sample ``index`` is occluded in ``epoch``, else None."""
        if not self.enabled:
            return None
        rng = random.Random(f"occlusion:{self.seed}:{epoch}:{index}")
        return rng.getrandbits(62) if rng.random() < self.probability else None

    def __call__(self, item: Dict, occluder_seed: int) -> Dict:
        """Composite one occluder into ``item["video"]`` and ``item["target"]`` ([3, F, H, W] in [-1, 1], in
        place) where ``item["mask"]`` ([3, F, H, W] in [0, 1]) shows the face; the mask is not changed.
        Adds ``item["occluder"]`` = its coverage [F, H, W] in [0, 1]. A sample whose mask is empty is
        returned unchanged."""
        box = face_box(item["mask"])
        if box is None:
            return item
        f, h, w = item["video"].shape[1:]
        rgb, alpha = render_occluder(f, h, w, box, occluder_seed, self.scale, self.max_drift, self.max_turn)
        for key in ("video", "target"):
            if item[key].shape[1:] != (f, h, w):
                raise InputError(f"occlusion: '{key}' is {list(item[key].shape)}, the driving video {[3, f, h, w]}")
            item[key].mul_(1 - alpha).add_(alpha * (rgb * 2 - 1))
        item["occluder"] = alpha[0]
        return item


def face_box(mask: torch.Tensor) -> Optional[Tuple[float, float, float, float]]:
    """mask [C, F, H, W] in [0, 1] -> (cx, cy, width, height) in pixels of the union over frames of the
    pixels above 0.5, or None when there are none."""
    on = (mask[0] > 0.5).any(dim=0)  # [H, W]
    if not bool(on.any()):
        return None
    ys = torch.nonzero(on.any(dim=1)).flatten()
    xs = torch.nonzero(on.any(dim=0)).flatten()
    x0, x1, y0, y1 = float(xs[0]), float(xs[-1]) + 1, float(ys[0]), float(ys[-1]) + 1
    return (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0


# ---------------------------------------------------------------------------------------- signed distances
def _capsule(u, v, ax, ay, bx, by, r):
    """Distance to the segment (a, b) minus r (negative inside)."""
    px, py, dx, dy = u - ax, v - ay, bx - ax, by - ay
    t = ((px * dx + py * dy) / max(dx * dx + dy * dy, 1e-9)).clamp(0, 1)
    return torch.hypot(px - t * dx, py - t * dy) - r


def _ellipse(u, v, a, b):
    """Approximate signed distance to the ellipse u^2/a^2 + v^2/b^2 = 1 (exact on the axes)."""
    k = torch.hypot(u / a, v / b)
    return (k - 1) * min(a, b)


def _shape_sdf(kind: str, u: torch.Tensor, v: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Signed distance (unit-size shape, about [-1, 1]^2) of a shape of ``kind`` with parameters from ``g``."""
    rnd = lambda lo, hi: lo + (hi - lo) * float(torch.rand((), generator=g))  # noqa: E731
    if kind == "blob":
        return _ellipse(u, v, rnd(0.6, 1.0), rnd(0.35, 0.8))
    if kind == "bar":
        return _capsule(u, v, -1.0, 0.0, 1.0, 0.0, rnd(0.12, 0.3))
    if kind == "box":
        hw, hh, r = rnd(0.4, 0.9), rnd(0.3, 0.8), rnd(0.05, 0.25)
        qx, qy = u.abs() - hw + r, v.abs() - hh + r
        outside = torch.hypot(qx.clamp(min=0), qy.clamp(min=0))
        return outside + torch.minimum(torch.maximum(qx, qy), torch.zeros_like(qx)) - r
    if kind == "polygon":
        sides = int(torch.randint(3, 8, (), generator=g))
        base = rnd(0, 2 * math.pi)
        d = None
        for i in range(sides):
            a = base + 2 * math.pi * i / sides + rnd(-0.3, 0.3)
            di = u * math.cos(a) + v * math.sin(a) - rnd(0.45, 0.8)
            d = di if d is None else torch.maximum(d, di)
        return d
    # hand: palm + four fingers + thumb, fingers pointing to -v
    palm = _ellipse(u, v - 0.25, 0.5, 0.45)
    d = palm
    spread = rnd(0.0, 0.25)
    for i, x in enumerate((-0.36, -0.12, 0.12, 0.36)):
        length = (0.55, 0.7, 0.65, 0.5)[i] * rnd(0.85, 1.15)
        tip_x = x * (1 + spread)
        d = torch.minimum(d, _capsule(u, v, x, -0.05, tip_x, -0.05 - length, 0.11))
    d = torch.minimum(d, _capsule(u, v, 0.45, 0.35, 0.85, -0.05, 0.12))  # thumb
    return d


def _texture(kind: str, u: torch.Tensor, v: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """[3, *u.shape] colours in [0, 1] of a texture of ``kind`` in the shape's own frame."""
    c1 = torch.rand(3, generator=g)
    c2 = torch.rand(3, generator=g)
    shape = (3,) + tuple(u.shape)
    if kind == "stripes":
        freq, angle = 3 + 6 * float(torch.rand((), generator=g)), float(torch.rand((), generator=g)) * math.pi
        t = (torch.sin((u * math.cos(angle) + v * math.sin(angle)) * freq * math.pi) > 0).float()
    elif kind == "checks":
        freq = 2 + int(torch.randint(0, 5, (), generator=g))
        t = ((torch.floor((u + 2) * freq) + torch.floor((v + 2) * freq)) % 2).float()
    elif kind == "gradient":
        t = ((u + v) / 4 + 0.5).clamp(0, 1)
    else:
        t = torch.zeros_like(u)
    out = c1.view(3, *[1] * u.dim()) * (1 - t) + c2.view(3, *[1] * u.dim()) * t
    # grain fixed to the shape's frame (a hash of 1/16-unit cells), so it moves with the occluder
    cells = torch.floor(u * 16) * 12.9898 + torch.floor(v * 16) * 78.233
    grain = torch.frac(torch.sin(cells) * 43758.5453) * 0.12 - 0.06
    return (out.expand(shape) + grain).clamp(0, 1)


def render_occluder(frames: int, height: int, width: int, box: Tuple[float, float, float, float], seed: int,
                    scale: Tuple[float, float] = (0.3, 0.7), max_drift: float = 0.5,
                    max_turn: float = 0.6) -> Tuple[torch.Tensor, torch.Tensor]:
    """One moving occluder over a face box (cx, cy, w, h in pixels) -> (rgb [3, F, H, W] in [0, 1],
    alpha [1, F, H, W] in [0, 1]); the same ``seed`` gives the same occluder."""
    g = torch.Generator().manual_seed(int(seed))
    rnd = lambda lo, hi: lo + (hi - lo) * float(torch.rand((), generator=g))  # noqa: E731
    kind = SHAPES[int(torch.randint(len(SHAPES), (), generator=g))]
    texture = TEXTURES[int(torch.randint(len(TEXTURES), (), generator=g))]
    cx, cy, bw, bh = box
    size = max(bw, bh) * rnd(*scale) / 2  # pixels per shape unit
    x0, y0 = cx + rnd(-0.35, 0.35) * bw, cy + rnd(-0.35, 0.35) * bh
    drift = rnd(0, max_drift) * max(bw, bh)
    heading = rnd(0, 2 * math.pi)
    angle0, turn = rnd(0, 2 * math.pi), rnd(-max_turn, max_turn)
    aspect = rnd(0.8, 1.25)
    ys = torch.arange(height, dtype=torch.float32).view(height, 1).expand(height, width)
    xs = torch.arange(width, dtype=torch.float32).view(1, width).expand(height, width)
    rgb = torch.empty(3, frames, height, width)
    alpha = torch.empty(1, frames, height, width)
    state = g.get_state()
    for t in range(frames):
        s = t / max(frames - 1, 1)
        px, py = x0 + s * drift * math.cos(heading), y0 + s * drift * math.sin(heading)
        a = angle0 + s * turn
        dx, dy = xs - px, ys - py
        u = (dx * math.cos(a) + dy * math.sin(a)) / (size * aspect)
        v = (-dx * math.sin(a) + dy * math.cos(a)) / (size / aspect)
        g.set_state(state)  # the same shape and texture parameters in every frame
        sdf = _shape_sdf(kind, u, v, g) * size  # in pixels
        alpha[0, t] = (0.5 - sdf).clamp(0, 1)
        rgb[:, t] = _texture(texture, u, v, g)
    return rgb, alpha
