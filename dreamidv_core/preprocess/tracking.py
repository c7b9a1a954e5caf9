"""Who to swap: every face of a clip tracked through it, and the one target person chosen once for the clip.

Pure numpy; the detector and the (optional) ArcFace embedder are the caller's.

    people = track_people(detections, embed)                   # identities, left to right at first appearance
    target = track_target(detections, TargetSpec("index", 1), embed)

``detections``: one list per frame of :class:`Detection` (a face box in pixels, its landmarks when the
source has them, and the source's own face object as ``payload``).

1. **Tracklets** (frame to frame): a tracklet's box is predicted at constant velocity; a detection
   continues it when the boxes overlap (IoU) or the centres are close for the face's size, the size is
   similar and, one frame apart, the landmark layout is continuous (same shape relative to the centre).
   Assignment is greedy by affinity. When two tracklets could take each other's detections almost as
   well (two faces passing each other), both end there: which is which is decided by step 2, with more
   evidence than one frame. A tracklet survives ``max_lost`` undetected frames (motion prediction).
2. **Re-identification** (tracklet to tracklet, offline): a tracklet that ended is linked to one that
   starts later when their ArcFace embeddings agree (``embed`` given: a few detections per tracklet are
   embedded) or, without ArcFace (or for a profile ArcFace cannot judge), when position, size and motion
   carry over the gap (an occlusion). After a cut a person who reappears elsewhere is only recognised by
   ArcFace. Links are made best first; a person is a chain of tracklets that never overlap in time.
3. **Target**: ``largest`` (largest face over the clip: mean face area over all frames, 0 where the
   person is not visible, so a face seen once up close does not beat the main subject), ``index``
   (people numbered left to right at their first appearance; people arriving within ``SETTLE_FRAMES``
   frames of each other are one group ordered by x, later arrivals follow) or ``similar`` (highest
   ArcFace cosine similarity to a photo, at least ``min_similarity``).
4. Per frame: the target's detection; gaps of at most ``bridge`` frames (a missed detection) take the
   nearest detection **of the target** (the earlier one on ties); longer gaps are absent frames: the
   caller passes them through unchanged (empty mask and pose), never with another person's face.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import InputError
from .identity_bundle import cosine

TARGET_MODES = ("largest", "index", "similar")
SETTLE_FRAMES = 5  # people first seen within this many frames of each other are numbered left to right

Embed = Callable[[int, "Detection"], Optional[np.ndarray]]  # (frame index, detection) -> ArcFace vector or None


@dataclass
class Detection:
    """One face in one frame. box: float [4] (x0, y0, x1, y1) pixels; points: float [K, 2] landmark pixels
    (NaN where missing) or None; payload: the source's own face object, handed back untouched."""

    box: np.ndarray
    points: Optional[np.ndarray] = None
    score: float = 1.0
    payload: Any = None

    def __post_init__(self):
        self.box = np.asarray(self.box, np.float64).reshape(4)
        b = self.box
        self.centre = np.array([(b[0] + b[2]) / 2, (b[1] + b[3]) / 2])  # [2] pixels
        self.size = max(1.0, math.sqrt(max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])))  # sqrt(w * h), >= 1 px
        self._layout = None

    def layout(self) -> Optional[np.ndarray]:
        """Landmarks relative to the box centre [K, 2] (NaN where missing), computed once."""
        if self._layout is None and self.points is not None:
            self._layout = np.asarray(self.points, np.float64) - self.centre
        return self._layout

    @property
    def area(self) -> float:
        return self.size ** 2

    @classmethod
    def from_points(cls, points: np.ndarray, payload: Any = None, score: float = 1.0) -> Optional["Detection"]:
        """A detection whose box bounds the finite points [K, 2]; None with fewer than 4 of them or no area."""
        pts = np.asarray(points, np.float64)
        ok = np.isfinite(pts).all(1)
        if ok.sum() < 4:
            return None
        lo, hi = pts[ok].min(0), pts[ok].max(0)
        if (hi - lo).min() <= 0:
            return None
        return cls(np.concatenate([lo, hi]), pts, score, payload)


@dataclass
class TrackingSettings:
    """Thresholds of the tracker (defaults suit 24-60 fps footage)."""

    max_lost: int = 8  # frames a tracklet may miss and still be continued by motion prediction
    min_iou: float = 0.3  # predicted box vs detection overlap that continues a tracklet ...
    max_shift: float = 0.35  # ... or centre distance (in face sizes) one frame after the last detection
    max_shape_change: float = 0.5  # landmark layout change (in face sizes) allowed from one frame to the next
    ambiguity_margin: float = 0.15  # swapping two tracklets' detections scores within this: both end there
    reid_similarity: float = 0.5  # ArcFace cosine that re-identifies a person after a gap or a cut
    reject_similarity: float = 0.25  # below this, position and motion never link two tracklets
    motion_gap: int = 50  # frames over which position, size and motion alone may re-identify
    embed_samples: int = 3  # detections embedded per tracklet (largest ones, spread over time)


@dataclass
class TargetSpec:
    """Which person to swap. mode: 'largest' | 'index' | 'similar'; index: for 'index' (0 = leftmost at
    first appearance); photo_embedding: the photo's ArcFace embedding for 'similar'; min_similarity: the
    least cosine similarity 'similar' accepts; bridge: gaps of at most this many frames are bridged with
    the target's nearest detection."""

    mode: str = "largest"
    index: int = 0
    photo_embedding: Optional[np.ndarray] = None
    min_similarity: float = 0.3
    bridge: int = 3

    def check(self) -> None:
        if self.mode not in TARGET_MODES:
            raise InputError(f"target must be one of {', '.join(TARGET_MODES)}, got {self.mode!r}")
        if self.mode == "index" and self.index < 0:
            raise InputError(f"target_index must be 0 or more (0 = leftmost person), got {self.index}")
        if self.mode == "similar" and self.photo_embedding is None:
            raise InputError("target 'similar' needs a photo of the person (target_photo) and ArcFace to compare "
                             "faces (an insightface model pack)")
        if self.bridge < 0:
            raise InputError(f"bridge_frames must be 0 or more, got {self.bridge}")


@dataclass
class Tracklet:
    frames: List[int] = field(default_factory=list)
    dets: List[Detection] = field(default_factory=list)
    embedding: Optional[np.ndarray] = None

    @property
    def start(self) -> int:
        return self.frames[0]

    @property
    def end(self) -> int:
        return self.frames[-1]

    def velocity(self, at_end: bool = True, span: int = 4) -> Optional[np.ndarray]:
        """Centre velocity (px per frame) over the last (or first) ``span`` detections; None with one detection."""
        if len(self.frames) < 2:
            return None
        if at_end:  # asked for every detection of every frame while tracking: once per length
            key = (len(self.frames), span)
            if getattr(self, "_velocity", (None,))[0] != key:
                self._velocity = (key, self._fit_velocity(True, span))
            return self._velocity[1]
        return self._fit_velocity(False, span)

    def _fit_velocity(self, at_end: bool, span: int) -> np.ndarray:
        idx = range(max(0, len(self.frames) - span), len(self.frames)) if at_end else range(min(span, len(self.frames)))
        f = np.array([self.frames[i] for i in idx], np.float64)
        c = np.array([self.dets[i].centre for i in idx])
        f0 = f - f.mean()
        return (f0[:, None] * (c - c.mean(0))).sum(0) / max((f0 ** 2).sum(), 1e-9)

    def predict(self, frame: int) -> np.ndarray:
        """The box expected at ``frame`` (after the end): last box moved at the end velocity."""
        last = self.dets[-1].box
        v = self.velocity()
        if v is None:
            return last.copy()
        shift = v * (frame - self.end)
        return last + np.concatenate([shift, shift])


@dataclass
class Person:
    """One identity: a chain of tracklets that never overlap in time."""

    tracklets: List[Tracklet]
    number: int = -1  # left to right at first appearance, set by :func:`track_people`
    extra: Dict[int, Detection] = field(default_factory=dict)  # placed by fill_gaps_by_interpolation

    def detections(self) -> Dict[int, Detection]:
        """frame -> detection, in frame order."""
        own = {f: d for t in self.tracklets for f, d in zip(t.frames, t.dets)}
        own.update(self.extra)
        return dict(sorted(own.items()))

    @property
    def frames(self) -> List[int]:
        return list(self.detections())

    @property
    def first(self) -> Tuple[int, Detection]:
        return next(iter(self.detections().items()))

    @property
    def embedding(self) -> Optional[np.ndarray]:
        embs = [t.embedding for t in self.tracklets if t.embedding is not None]
        return _unit(np.mean(embs, 0)) if embs else None

    def clip_area(self, frame_count: int) -> float:
        """Mean face area over all ``frame_count`` frames (0 where the person is not visible)."""
        return sum(d.area for d in self.detections().values()) / max(1, frame_count)


@dataclass
class TargetTrack:
    """The target through the clip. detections: per frame the target's detection (bridged frames hold a
    copy of the nearest one) or None where the target is absent; people: everyone found, numbered left to
    right at first appearance; target: the chosen one's number; similarities: cosine to the photo per
    person ('similar'); reid: how people were re-identified."""

    detections: List[Optional[Detection]]
    filled: List[int]
    absent: List[int]
    people: List[Person]
    target: int
    mode: str
    similarities: Optional[List[float]] = None
    reid: str = "position and size"
    cuts: List[int] = field(default_factory=list)

    @property
    def present(self) -> List[bool]:
        return [d is not None for d in self.detections]

    def describe(self) -> str:
        """One line for a node's info output: people, the choice, bridged and absent frames, the track."""
        n = len(self.detections)
        people = "; ".join(_describe_person(p, self.similarities) for p in self.people)
        how = {"largest": "largest face over the clip", "index": f"index {self.target}",
               "similar": "most similar to the photo"}[self.mode]
        seen = n - len(self.absent) - len(self.filled)
        parts = [f"{len(self.people)} {'person' if len(self.people) == 1 else 'people'} found "
                 f"(re-identified by {self.reid}): {people}",
                 f"target: person {self.target} ({how})",
                 f"target detected in {seen} of {n} frames"]
        if self.filled:
            parts.append(f"bridged {len(self.filled)} frames from the target's neighbours: {_ranges(self.filled)}")
        if self.absent:
            parts.append(f"target absent in {len(self.absent)} frames (passed through unchanged: empty mask and "
                         f"pose): {_ranges(self.absent)}")
        if self.cuts:
            parts.append(f"shot cuts before frames {_ranges(self.cuts)}")
        parts.append("track: " + _describe_track(self.detections))
        return "; ".join(parts)


# ----------------------------------------------------------------------------- small geometry helpers
def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.float64).reshape(-1)
    return v / max(float(np.linalg.norm(v)), 1e-12)


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boxes (x0, y0, x1, y1)."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _shape_change(a: Detection, b: Detection) -> Optional[float]:
    """Median change of the landmark layout around the box centre, in face sizes (None without landmarks)."""
    la, lb = a.layout(), b.layout()
    if la is None or lb is None or la.shape != lb.shape:
        return None
    dist = np.hypot(*(la - lb).T)
    dist = dist[np.isfinite(dist)]
    if len(dist) < 3:
        return None
    return float(np.partition(dist, len(dist) // 2)[len(dist) // 2]) / max(a.size, b.size)


def _ranges(frames: Sequence[int], limit: int = 12) -> str:
    """[3, 4, 5, 9] -> '3-5, 9' (at most ``limit`` ranges, then '...')."""
    spans, start = [], None
    for i, f in enumerate(frames):
        if start is None:
            start = f
        if i + 1 == len(frames) or frames[i + 1] != f + 1:
            spans.append(f"{start}-{f}" if f > start else f"{start}")
            start = None
    return ", ".join(spans[:limit]) + (", ..." if len(spans) > limit else "")


def _fmt_box(box: np.ndarray) -> str:
    return "(" + ", ".join(str(int(round(v))) for v in box) + ")"


def _describe_person(p: Person, sims: Optional[List[float]]) -> str:
    frames = p.frames
    f0, d0 = p.first
    text = (f"#{p.number}: {len(frames)} frames from {f0}, first at x={d0.centre[0]:.0f} px, "
            f"face {np.median([d.size for d in p.detections().values()]):.0f} px")
    if sims is not None:
        text += f", similarity {sims[p.number]:.2f}"
    return text


def _describe_track(dets: Sequence[Optional[Detection]], limit: int = 8) -> str:
    """Runs of frames where the target is present, each with its first and last box (x0, y0, x1, y1)."""
    runs, start = [], None
    for i, d in enumerate(dets):
        if d is not None and start is None:
            start = i
        if start is not None and (i + 1 == len(dets) or dets[i + 1] is None):
            runs.append(f"frames {start}-{i} {_fmt_box(dets[start].box)} -> {_fmt_box(dets[i].box)}")
            start = None
    if not runs:
        return "none"
    return ", ".join(runs[:limit]) + (f", ... ({len(runs)} runs)" if len(runs) > limit else "")


# ----------------------------------------------------------------------------- 1. tracklets
def _affinity(t: Tracklet, d: Detection, frame: int, s: TrackingSettings) -> Optional[float]:
    """How well ``d`` continues ``t`` at ``frame`` (higher is better), or None when it cannot."""
    gap = frame - t.end
    last = t.dets[-1]
    pred = t.predict(frame)
    iou = box_iou(pred, d.box)
    shift = float(np.linalg.norm(d.centre - (pred[:2] + pred[2:]) / 2)) / last.size
    ratio = d.size / last.size
    tolerance = 1.25 + 0.05 * gap
    if not 1 / tolerance <= ratio <= tolerance:
        return None
    if iou < s.min_iou and shift > s.max_shift + 0.05 * (gap - 1):
        return None
    change = _shape_change(last, d) if gap == 1 else None
    if change is not None and change > s.max_shape_change:
        return None
    return iou + (1.0 - min(shift, 1.0)) - (change or 0.0) - 0.1 * (gap - 1)


def build_tracklets(detections: Sequence[Sequence[Detection]], settings: TrackingSettings = TrackingSettings(),
                    cuts: Sequence[int] = ()) -> Tuple[List[Tracklet], Dict[int, List[Detection]]]:
    """Per-frame detections -> (tracklets by start, ambiguous detections per frame).

    A detection two tracklets could take almost equally well (see :func:`_ambiguous`) is given to neither:
    both coast on their motion and :func:`fill_gaps_by_interpolation` places it later, between the
    tracklets' detections on both sides, which is far stronger evidence than one frame's prediction.
    ``cuts``: frames that start a new shot; every tracklet ends before them."""
    s = settings
    cuts = set(cuts)
    done: List[Tracklet] = []
    active: List[Tracklet] = []
    held: Dict[int, List[Detection]] = {}
    for f, dets in enumerate(detections):
        keep = []
        for t in active:
            (keep if f - t.end <= s.max_lost + 1 and f not in cuts else done).append(t)
        active = keep
        aff = {(ti, di): a for ti, t in enumerate(active) for di, d in enumerate(dets)
               if (a := _affinity(t, d, f, s)) is not None}
        pairs: Dict[int, int] = {}  # tracklet -> detection
        for (ti, di), _ in sorted(aff.items(), key=lambda kv: -kv[1]):
            if ti not in pairs and di not in pairs.values():
                pairs[ti] = di
        unsure = _ambiguous(pairs, aff, s.ambiguity_margin)
        for ti, di in pairs.items():
            if ti in unsure:
                held.setdefault(f, []).append(dets[di])
            else:
                active[ti].frames.append(f)
                active[ti].dets.append(dets[di])
        for di, d in enumerate(dets):
            if di not in pairs.values():
                active.append(Tracklet([f], [d]))
    done.extend(active)
    return sorted(done, key=lambda t: (t.start, t.dets[0].centre[0])), held


def _ambiguous(pairs: Dict[int, int], aff: Dict[Tuple[int, int], float], margin: float) -> set:
    """Matched tracklets whose detection is not clearly theirs: another matched tracklet could take it, and
    they its, for a total affinity within ``margin`` of the chosen pairing (two faces passing each other),
    or a tracklet left without a detection in this frame (a face hidden behind the other) fits it within
    ``margin``."""
    unsure = set()
    for ti, di in pairs.items():
        for tj in {t for (t, d) in aff if d == di and t != ti}:
            dj = pairs.get(tj)
            if dj is None:
                if aff[(tj, di)] >= aff[(ti, di)] - margin:
                    unsure.add(ti)
            elif (ti, dj) in aff and aff[(tj, di)] + aff[(ti, dj)] >= aff[(ti, di)] + aff[(tj, dj)] - margin:
                unsure.update((ti, tj))
    return unsure


def fill_gaps_by_interpolation(people: Sequence["Person"], held: Dict[int, List[Detection]],
                               settings: TrackingSettings = TrackingSettings(), cuts: Sequence[int] = (),
                               embed: Optional[Embed] = None) -> List[Tuple[int, Detection]]:
    """Place held (ambiguous) detections into the people's gaps. At frame f inside a gap of person P the
    expected box is interpolated between P's detections before and after the gap; a detection may go to P
    when its centre is within ``max_shift`` + 0.15 face sizes of it at a similar size. The cost adds the
    change of landmark layout from P's neighbouring detection, 0.1 per frame of P's gap beyond this one (a
    person missing longer is more likely the one hidden) and, with ``embed``, the ArcFace distance to P;
    assignment is best first. A detection two people fit within 0.1 of each other (faces exactly on
    top of each other, nothing to tell them apart) is dropped: the frame is absent for both rather than
    possibly another person's face. Returns the detections no one could take, with their frames."""
    left = []
    owns = [p.detections() for p in people]
    seen = [sorted(own) for own in owns]
    for f in sorted(held):
        expected = []
        for pi, own in enumerate(owns):
            k = bisect.bisect_left(seen[pi], f)
            if f in own or k == 0 or k == len(seen[pi]):
                continue
            before, after = seen[pi][k - 1], seen[pi][k]
            if after - before - 1 > settings.max_lost + 1 or _shot(before, cuts) != _shot(after, cuts):
                continue
            t = (f - before) / (after - before)
            near = own[before] if f - before <= after - f else own[after]
            expected.append((pi, own[before].box * (1 - t) + own[after].box * t, near, after - before - 2))
        cands: Dict[int, List[Tuple[float, int]]] = {}
        for di, d in enumerate(held[f]):
            emb = embed(f, d) if embed is not None and expected else None
            for pi, box, near, longer in expected:
                size = math.sqrt(max(1.0, (box[2] - box[0]) * (box[3] - box[1])))
                shift = float(np.linalg.norm(d.centre - (box[:2] + box[2:]) / 2)) / size
                if shift > settings.max_shift + 0.15 or not 1 / 1.3 <= d.size / size <= 1.3:
                    continue
                cost = shift + (_shape_change(near, d) or 0.0) + 0.1 * longer  # a longer gap: more likely hidden
                if emb is not None and people[pi].embedding is not None:
                    cost += 2.0 * (1.0 - cosine(emb, people[pi].embedding))
                cands.setdefault(di, []).append((cost, pi))
        order = sorted((c, pi, di) for di, cs in cands.items() for c, pi in cs)
        taken_p, taken_d = set(), set()
        for cost, pi, di in order:
            if pi in taken_p or di in taken_d:
                continue
            rivals = [c for c, pj in cands[di] if pj != pi and pj not in taken_p]
            taken_d.add(di)
            if rivals and min(rivals) < cost + 0.1:
                continue  # indistinguishable: nobody's
            people[pi].extra[f] = owns[pi][f] = held[f][di]
            bisect.insort(seen[pi], f)
            taken_p.add(pi)
        left += [(f, d) for di, d in enumerate(held[f]) if di not in taken_d]
    return left


# ----------------------------------------------------------------------------- 2. re-identification
def _embed_tracklets(tracklets: Sequence[Tracklet], embed: Optional[Embed], samples: int) -> bool:
    """Each tracklet's embedding: the normalised mean of up to ``samples`` of its largest detections spread
    over time. Returns whether any embedding was made."""
    if embed is None:
        return False
    made = False
    for t in tracklets:
        order = np.argsort([-d.area for d in t.dets], kind="stable")
        if len(t.dets) > samples:  # the largest of each of ``samples`` equal time slices
            slices = np.array_split(np.arange(len(t.dets)), samples)
            order = [int(sl[np.argmax([t.dets[i].area for i in sl])]) for sl in slices]
        vecs = [v for i in list(order)[:samples] if (v := embed(t.frames[int(i)], t.dets[int(i)])) is not None]
        if vecs:
            t.embedding = _unit(np.mean([_unit(v) for v in vecs], 0))
            made = True
    return made


def _motion_link(a: Tracklet, b: Tracklet, s: TrackingSettings, cut: bool = False) -> Optional[float]:
    """How well ``b`` continues ``a`` by position, size and motion over the gap (higher is better) or None.
    Across a ``cut`` motion means nothing: position and size only."""
    gap = b.start - a.end
    if gap > s.motion_gap:
        return None
    da, db = a.dets[-1], b.dets[0]
    ratio = db.size / da.size
    tolerance = 1.3 + 0.02 * gap
    if not 1 / tolerance <= ratio <= tolerance:
        return None
    va, vb = (None, None) if cut else (a.velocity(True), b.velocity(False))
    reach = min(gap, 10)  # extrapolate motion over at most 10 frames
    fwd = np.linalg.norm(da.centre + (va if va is not None else 0) * reach - db.centre) / da.size
    back = np.linalg.norm(db.centre - (vb if vb is not None else 0) * reach - da.centre) / db.size
    dist = min(fwd, back)
    if dist > min(0.5 + 0.1 * gap, 2.0):
        return None
    turn = 0.0
    if va is not None and vb is not None:
        turn = float(np.linalg.norm(va - vb)) / max(da.size, db.size)
        if turn > 0.15:
            return None
    return 1.0 - dist / 2.0 - turn - 0.005 * gap


def link_tracklets(tracklets: Sequence[Tracklet], settings: TrackingSettings = TrackingSettings(),
                   cuts: Sequence[int] = ()) -> List[Person]:
    """Chains of tracklets (people), linked best first by ArcFace similarity and/or motion continuity."""
    s = settings
    cuts = np.array(sorted(cuts), np.int64)
    links = []
    for i, a in enumerate(tracklets):
        for j, b in enumerate(tracklets):
            if b.start <= a.end:
                continue
            sim = cosine(a.embedding, b.embedding) if a.embedding is not None and b.embedding is not None else None
            cut = bool(((cuts > a.end) & (cuts <= b.start)).any())
            motion = _motion_link(a, b, s, cut)
            if sim is not None and sim >= s.reid_similarity:
                links.append((2.0 + sim + (motion or 0.0), i, j))
            elif motion is not None and (sim is None or sim >= s.reject_similarity):
                links.append((motion + (sim or 0.0), i, j))
    succ: Dict[int, int] = {}
    pred: Dict[int, int] = {}
    for _, i, j in sorted(links, key=lambda x: -x[0]):
        if i not in succ and j not in pred:
            succ[i], pred[j] = j, i
    people = []
    for i in range(len(tracklets)):
        if i in pred:
            continue
        chain = [i]
        while chain[-1] in succ:
            chain.append(succ[chain[-1]])
        people.append(Person([tracklets[k] for k in chain]))
    return people


def number_people(people: List[Person]) -> List[Person]:
    """People numbered left to right at first appearance: sorted by first frame, people first seen within
    ``SETTLE_FRAMES`` frames of a group's first one ordered by their x then."""
    by_time = sorted(people, key=lambda p: (p.first[0], p.first[1].centre[0]))
    ordered, group = [], []
    for p in by_time:
        if group and p.first[0] - group[0].first[0] > SETTLE_FRAMES:
            ordered += sorted(group, key=lambda q: q.first[1].centre[0])
            group = []
        group.append(p)
    ordered += sorted(group, key=lambda q: q.first[1].centre[0])
    for k, p in enumerate(ordered):
        p.number = k
    return ordered


def track_people(detections: Sequence[Sequence[Detection]], embed: Optional[Embed] = None,
                 settings: TrackingSettings = TrackingSettings(), cuts: Sequence[int] = ()) -> Tuple[List[Person], bool]:
    """Per-frame detections -> (people numbered left to right at first appearance, whether ArcFace was used).
    ``cuts``: frames that start a new shot (:func:`scene_cuts`)."""
    tracklets, held = build_tracklets(detections, settings, cuts)
    embedded = _embed_tracklets(tracklets, embed, settings.embed_samples)
    people = link_tracklets(tracklets, settings, cuts)
    left = fill_gaps_by_interpolation(people, held, settings, cuts, embed if embedded else None)
    if left:  # detections no gap could take: people of their own
        alone = [[] for _ in detections]
        for f, d in left:
            alone[f].append(d)
        rest, _ = build_tracklets(alone, settings, cuts)
        _embed_tracklets(rest, embed, settings.embed_samples)
        people = list(people) + link_tracklets(rest, settings, cuts)
    return number_people(people), embedded


# ----------------------------------------------------------------------------- shot cuts
def frame_signature(image: np.ndarray, side: int = 16) -> np.ndarray:
    """uint8 [H, W, C] -> float32 [side, side] grey thumbnail (block means) for :func:`scene_cuts`."""
    grey = np.asarray(image, np.float32).mean(-1) if image.ndim == 3 else np.asarray(image, np.float32)
    h, w = grey.shape
    ys = np.linspace(0, h, side + 1).astype(int)
    xs = np.linspace(0, w, side + 1).astype(int)
    rows = np.add.reduceat(grey, ys[:-1], axis=0) / np.diff(ys)[:, None]
    return (np.add.reduceat(rows, xs[:-1], axis=1) / np.diff(xs)[None]).astype(np.float32)


def scene_cuts(signatures: Sequence[np.ndarray], threshold: float = 30.0, ratio: float = 4.0) -> List[int]:
    """Frames that start a new shot: the mean absolute change of the grey thumbnail from the previous frame
    exceeds ``threshold`` (0..255) and ``ratio`` times the median change of the 10 frames before, and neither
    frame i nor frame i - 1 is a single odd frame between two alike (a flash is no cut)."""
    change = lambda a, b: float(np.abs(signatures[a] - signatures[b]).mean())
    cuts, diffs = [], []
    for i in range(1, len(signatures)):
        d = change(i, i - 1)
        recent = np.median(diffs[-10:]) if diffs else 0.0
        flash = i + 1 < len(signatures) and change(i + 1, i - 1) <= threshold  # frame i is the odd one
        back = i >= 2 and change(i, i - 2) <= threshold  # frame i - 1 was the odd one
        if d > threshold and d > ratio * recent and not flash and not back:
            cuts.append(i)
        diffs.append(d)
    return cuts


# ----------------------------------------------------------------------------- 3. + 4. the target
def choose_target(people: Sequence[Person], spec: TargetSpec, frame_count: int,
                  what: str = "frames") -> Tuple[int, Optional[List[float]]]:
    """The target's number among ``people`` (numbered) -> (number, similarities for 'similar')."""
    spec.check()
    if not people:
        raise InputError(f"{what}: no face found in any of the {frame_count} frames; use a clip where the face is "
                         "visible (frontal, not too small) or another pose source")
    listing = "; ".join(_describe_person(p, None) for p in people)
    if spec.mode == "largest":
        return int(np.argmax([p.clip_area(frame_count) for p in people])), None
    if spec.mode == "index":
        if spec.index >= len(people):
            raise InputError(f"target_index {spec.index} is out of range: {len(people)} "
                             f"{'person was' if len(people) == 1 else 'people were'} found in the clip, numbered "
                             f"0 to {len(people) - 1} left to right at first appearance ({listing})")
        return spec.index, None
    embs = [p.embedding for p in people]
    if all(e is None for e in embs):
        raise InputError(f"target 'similar': no face of the clip could be compared with the photo (ArcFace found "
                         f"no face in the tracked boxes of the {len(people)} people)")
    sims = [cosine(e, spec.photo_embedding) if e is not None else -1.0 for e in embs]
    best = int(np.argmax(sims))
    if sims[best] < spec.min_similarity:
        scores = ", ".join(f"#{k}: {v:.2f}" for k, v in enumerate(sims))
        raise InputError(f"target_photo: no person in the clip is similar enough to the photo (best: person {best} "
                         f"with ArcFace similarity {sims[best]:.2f} < min_similarity {spec.min_similarity:.2f}; "
                         f"all: {scores}). Use a clearer photo of the person, or lower min_similarity")
    return best, sims


def _shot(frame: int, cuts: Sequence[int]) -> int:
    """Which shot ``frame`` belongs to: the number of cuts at or before it."""
    return int(np.searchsorted(np.asarray(sorted(cuts), np.int64), frame, side="right"))


def _covers(box: np.ndarray, other: np.ndarray) -> bool:
    """Whether ``other`` covers a good part of ``box`` (IoU over 0.2, or over a third of ``box``)."""
    w = max(0.0, min(box[2], other[2]) - max(box[0], other[0]))
    h = max(0.0, min(box[3], other[3]) - max(box[1], other[1]))
    return box_iou(box, other) > 0.2 or w * h > (box[2] - box[0]) * (box[3] - box[1]) / 3


def target_detections(person: Person, frame_count: int, bridge: int, cuts: Sequence[int] = (),
                      others: Optional[Dict[int, List[np.ndarray]]] = None
                      ) -> Tuple[List[Optional[Detection]], List[int], List[int]]:
    """Per frame the person's detection; gaps of at most ``bridge`` frames (also at the clip's ends and at
    shot cuts) take the nearest detection of the person in the same shot (earlier on ties), unless another
    person's face (``others``: frame -> boxes) is there (the target is behind them: never swap that face).
    -> (detections, bridged frames, absent frames)."""
    others = others or {}
    own = person.detections()
    seen = np.array(sorted(own))
    bounds = [0] + sorted(cuts) + [frame_count]
    out: List[Optional[Detection]] = [own.get(i) for i in range(frame_count)]
    filled, absent = [], []
    for i in range(frame_count):
        if out[i] is not None:
            continue
        shot = _shot(i, cuts)
        lo, hi = bounds[shot], bounds[shot + 1]  # this shot's frames [lo, hi)
        k = int(np.searchsorted(seen, i))
        before = int(seen[k - 1]) if k > 0 and seen[k - 1] >= lo else None
        after = int(seen[k]) if k < len(seen) and seen[k] < hi else None
        gap = (after if after is not None else hi) - (before if before is not None else lo - 1) - 1
        if gap > bridge or (before is None and after is None):
            absent.append(i)
            continue
        near = min((f for f in (before, after) if f is not None), key=lambda f: (abs(f - i), f))
        expected = own[near].box
        if before is not None and after is not None:  # where the target should be now
            t = (i - before) / (after - before)
            expected = own[before].box * (1 - t) + own[after].box * t
        if any(_covers(expected, box) for box in others.get(i, ())):
            absent.append(i)
            continue
        out[i] = own[near]
        filled.append(i)
    return out, filled, absent


def track_target(detections: Sequence[Sequence[Detection]], spec: TargetSpec = TargetSpec(),
                 embed: Optional[Embed] = None, settings: TrackingSettings = TrackingSettings(),
                 what: str = "frames", cuts: Sequence[int] = ()) -> TargetTrack:
    """The whole step: track everyone, choose the target once for the clip, its detection per frame."""
    spec.check()
    people, embedded = track_people(detections, embed, settings, cuts)
    number, sims = choose_target(people, spec, len(detections), what)
    own = people[number].detections()
    others = {f: [d.box for d in dets if d is not own.get(f)] for f, dets in enumerate(detections)}
    dets, filled, absent = target_detections(people[number], len(detections), spec.bridge, cuts, others)
    return TargetTrack(dets, filled, absent, people, number, spec.mode, sims,
                       "ArcFace, position and motion" if embedded else "position, size and motion", list(cuts))


# ----------------------------------------------------------------------------- ArcFace embedder
def analyzer_embedder(analyzer, context: float = 0.5) -> Callable[[np.ndarray, np.ndarray], Optional[np.ndarray]]:
    """``embed(image uint8 [H, W, 3], box [4]) -> unit ArcFace vector or None`` from a face analyzer with
    ``faces(image)`` or ``detect(image)`` returning faces with ``bbox`` (x0, y0, x1, y1) and ``embedding``.

    The analyzer runs on the box grown by ``context`` face sizes on each side; the face whose box overlaps
    the asked box most (IoU at least 0.3) is the one embedded.
    """
    find = getattr(analyzer, "faces", None) or getattr(analyzer, "detect")

    def embed(image: np.ndarray, box: np.ndarray) -> Optional[np.ndarray]:
        h, w = image.shape[:2]
        x0, y0, x1, y1 = (float(v) for v in box)
        grow = context * max(x1 - x0, y1 - y0)
        cx0, cy0 = max(0, int(math.floor(x0 - grow))), max(0, int(math.floor(y0 - grow)))
        cx1, cy1 = min(w, int(math.ceil(x1 + grow))), min(h, int(math.ceil(y1 + grow)))
        if cx1 - cx0 < 8 or cy1 - cy0 < 8:
            return None
        crop = np.ascontiguousarray(image[cy0:cy1, cx0:cx1])
        local = np.array([x0 - cx0, y0 - cy0, x1 - cx0, y1 - cy0])
        best, best_iou = None, 0.3
        for face in find(crop) or []:
            emb = getattr(face, "embedding", None)
            if emb is None:
                continue
            iou = box_iou(np.asarray(face.bbox[:4], np.float64), local)
            if iou >= best_iou:
                best, best_iou = emb, iou
        return None if best is None else _unit(best)

    return embed


def analyzer_photo_embedding(analyzer, photo: np.ndarray) -> np.ndarray:
    """The unit ArcFace embedding of the largest face of ``photo`` (uint8 [H, W, 3]) found by ``analyzer``
    (as for :func:`analyzer_embedder`); a clear error when the photo shows no face."""
    find = getattr(analyzer, "faces", None) or getattr(analyzer, "detect")
    faces = [f for f in (find(np.ascontiguousarray(photo)) or []) if getattr(f, "embedding", None) is not None]
    if not faces:
        h, w = photo.shape[:2]
        raise InputError(f"target_photo: no face found in the {w}x{h} photo; use a photo where the person's face "
                         "is clearly visible")
    best = max(faces, key=lambda f: (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]))
    return _unit(best.embedding)


def frame_embedder(frames, embed_face: Callable[[np.ndarray, np.ndarray], Optional[np.ndarray]],
                   frame_at: Callable) -> Embed:
    """``embed(frame index, detection)`` for :func:`track_target` from an ``embed_face(image, box)``:
    reads frame i through ``frame_at(frames, i)`` only when asked."""
    return lambda i, det: embed_face(frame_at(frames, i), det.box)
