"""Who and where: target tracking and face-crop figures (prints them; not a test).

1. The real shared clip (``a_girl.mp4``, 1920x1242; skipped with a message when absent), pose and mask by the
   MediaPipe face landmarker with target tracking:
   * the face's height in model pixels, whole frame vs face crop (median over the frames), at the area;
   * tokens per latent frame in both modes and the DiT time per sampling step (two guidance evaluations)
     of a mid-size random model on a few latent frames of each mode's grid (benchmarks/bench_dit.py's
     child process, so each measurement runs alone);
   * the crop window's jitter: RMS of the second difference of its corners (px), unsmoothed vs smoothed;
   * the same clip scaled by 0.35 into 3840x2160 frames (a ~110 px face): found by MediaPipe with tiles
     (small_faces 3), tracked, and the same figures;
   * real detections of two people: the clip and its mirror image side by side (the mirror 20 frames
     later, half size: faces too small for MediaPipe's whole-frame view, found with small_faces 1),
     target index 0 and 1: the share of frames whose mask lies on that side.
2. Synthetic two-person clips with ground truth (tests/synthetic_people.py): crossing, occlusion, hard cut,
   with and without ArcFace (a colour stand-in), each person as the target: frames on the target out of
   frames it is visible, frames on someone else, identity switches; and 60 random crossings.

    python benchmarks/bench_face_crop.py
    python benchmarks/bench_face_crop.py --video clip.mp4 --landmarker face_landmarker.task --frames 40
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

SHARED = Path("/work/shared/assets")
if not SHARED.is_dir():
    SHARED = Path(ROOT).parent / "shared" / "assets"


def dit_step(grid: str, dim: int, layers: int, threads: int) -> dict:
    """bench_dit.py's child: one identity-guided step (reuse mode) of a random DiT on latent grid FxHxW."""
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_dit.py"), "--child", "--grid", grid, "--mode",
           "reuse", "--dtype", "fp32", "--dim", str(dim), "--layers", str(layers), "--repeats", "1",
           "--threads", str(threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    return json.loads(out)


def face_heights(track, count: int) -> np.ndarray:
    """Per frame the target's face box height (source px), NaN where absent."""
    out = np.full(count, np.nan)
    for i, det in enumerate(track.detections):
        if det is not None:
            out[i] = det.box[3] - det.box[1]
    return out


def geometry(face_h: np.ndarray, mask, size, area, frames: int, label: str, margin: float):
    """Print face height in model px, tokens, jitter for whole frame vs face crop; return both plans."""
    from dreamidv_core.pipelines.plan import ClipPlan, face_crop_plan
    from dreamidv_core.preprocess import face_crop as fc

    w, h = size
    whole = ClipPlan.build(w, h, frames, None, *area)
    crop = face_crop_plan(mask, w, h, frames, None, *area, margin=margin)
    whole_scale = whole.size[0] / whole.crop.height
    crop_scale = np.array([crop.size[0] / b[3] for b in crop.track.boxes])
    ok = np.isfinite(face_h)
    print(f"\n[{label}] {w}x{h}, {frames} frames, area {area[0]}x{area[1]}, crop margin {margin:g}")
    print(f"  face height, source px (median)      : {np.median(face_h[ok]):7.1f}")
    print(f"  face height in model px, whole frame : {np.median(face_h[ok] * whole_scale):7.1f}   "
          f"(model frames {whole.size[1]}x{whole.size[0]})")
    print(f"  face height in model px, face crop   : {np.median(face_h[ok] * crop_scale[ok]):7.1f}   "
          f"(model frames {crop.size[1]}x{crop.size[0]}, windows {np.median([b[3] for b in crop.track.boxes]):.0f} px "
          f"high)")
    print(f"  tokens per latent frame              : whole {whole.tokens_per_latent_frame}, crop "
          f"{crop.tokens_per_latent_frame}")
    return whole, crop


def real_clip(args) -> None:
    import torch

    from dreamidv_core.io.video import read_video
    from dreamidv_core.pipelines.plan import face_crop_plan
    from dreamidv_core.preprocess import face_crop as fc
    from dreamidv_core.preprocess.pose.extract import extract_mediapipe
    from dreamidv_core.preprocess.pose.mediapipe_face import FaceLandmarker
    from dreamidv_core.preprocess.tracking import TargetSpec

    video, landmarker = Path(args.video), Path(args.landmarker)
    if not video.is_file() or not landmarker.is_file():
        print(f"\n[real clip] skipped: {video} or {landmarker} is absent")
        return
    try:
        import mediapipe  # noqa: F401
    except ImportError:
        print("\n[real clip] skipped: the 'mediapipe' package is not installed")
        return
    frames, fps = read_video(video, max_frames=args.frames)
    count, h, w = frames.shape[:3]
    t0 = time.perf_counter()
    with FaceLandmarker(str(landmarker), num_faces=6) as lm:
        res = extract_mediapipe(frames, lm, target=TargetSpec("largest"))
    took = time.perf_counter() - t0
    print(f"\n[real clip] {video.name}: {count} frames {w}x{h} at {fps:g} fps; MediaPipe + tracking "
          f"{took / count * 1000:.0f} ms/frame")
    print("  " + res.info[:400] + (" ..." if len(res.info) > 400 else ""))
    mask = torch.from_numpy(res.mask)
    face_h = face_heights(res.track, count)
    whole, crop = geometry(face_h, mask, (w, h), tuple(args.area), count, "real clip", args.margin)
    raw = face_crop_plan(mask, w, h, count, None, *args.area, margin=args.margin, smoothing=0)
    print(f"  crop window jitter, RMS 2nd difference of the corners: unsmoothed "
          f"{fc.box_jitter(np.array(raw.track.boxes)):.2f} px, smoothed (sigma {fc.DEFAULT_SMOOTHING:g} frames) "
          f"{fc.box_jitter(np.array(crop.track.boxes)):.2f} px (source px; windows "
          f"{np.median([b[3] for b in crop.track.boxes]):.0f} px high)")
    t0 = time.perf_counter()
    src = torch.from_numpy(frames[:9]).float() / 255
    crops = fc.prepare_crops(frames, crop.track, 0, 9, crop.size, "video").permute(1, 2, 3, 0)
    t1 = time.perf_counter()
    crop.paste_back(src, crops)
    t2 = time.perf_counter()
    print(f"  crop {1000 * (t1 - t0) / 9:.0f} ms/frame, paste back {1000 * (t2 - t1) / 9:.0f} ms/frame (CPU)")

    _small_faces_4k(frames, landmarker, args)

    if not args.no_dit:
        print(f"\n[DiT time per step] random model dim {args.dim}, {args.layers} blocks, fp32, {args.threads} threads, "
              f"{args.latent_frames} latent frames + the reference frame; one step = 2 evaluations")
        for label, plan in (("whole frame", whole), ("face crop", crop)):
            _, lh, lw = plan.latent_grid
            r = dit_step(f"{args.latent_frames}x{lh}x{lw}", args.dim, args.layers, args.threads)
            print(f"  {label:>11}: grid {args.latent_frames}x{lh}x{lw}, {r['tokens']} tokens, "
                  f"{r['sec_per_step']:.2f} s/step")

    _two_copies(frames, landmarker)


class _BoxMasks:
    """A lazy mask clip [F, H, W]: frame i is 1 inside boxes[i] (what mask_face_boxes reads back)."""

    def __init__(self, boxes: np.ndarray, size):
        self.boxes, (self.w, self.h) = boxes, size

    def __len__(self):
        return len(self.boxes)

    def __getitem__(self, sl):
        out = np.zeros((len(range(*sl.indices(len(self)))), self.h, self.w), np.uint8)
        for j, i in enumerate(range(*sl.indices(len(self)))):
            if np.isfinite(self.boxes[i]).all():
                x0, y0, x1, y1 = (int(round(v)) for v in self.boxes[i])
                out[j, y0:y1, x0:x1] = 255
        return out


class _InBigFrame:
    """A lazy clip: each frame of ``frames`` scaled by ``k`` and placed at (x, y) in a grey width x height frame."""

    def __init__(self, frames: np.ndarray, size, k: float, at):
        import cv2

        self.frames, (self.w, self.h), self.at = frames, size, at
        self.small = [None] * len(frames)
        self.size = (int(frames.shape[2] * k), int(frames.shape[1] * k))
        self._resize = lambda f: cv2.resize(f, self.size, interpolation=cv2.INTER_AREA)

    def __len__(self):
        return len(self.frames)

    def __getitem__(self, sl):
        idx = range(*sl.indices(len(self)))
        out = np.full((len(idx), self.h, self.w, 3), 60, np.uint8)
        for j, i in enumerate(idx):
            x, y = self.at
            out[j, y:y + self.size[1], x:x + self.size[0]] = self._resize(self.frames[i])
        return out


def _small_faces_4k(frames: np.ndarray, landmarker: Path, args) -> None:
    """The clip scaled by 0.35 into a 3840x2160 frame: MediaPipe with tiles (small_faces 3) finds and tracks the
    face; face height in model pixels whole frame vs crop, tokens, jitter."""
    from dreamidv_core.preprocess import face_crop as fc
    from dreamidv_core.preprocess.pose.extract import face_detection, frame_at, mediapipe_faces
    from dreamidv_core.preprocess.pose.mediapipe_face import FaceLandmarker
    from dreamidv_core.preprocess.tracking import TargetSpec, track_target

    count = min(len(frames), args.frames_4k)
    clip = _InBigFrame(frames[:count], (3840, 2160), 0.35, (1500, 900))
    detections, t0 = [], time.perf_counter()
    with FaceLandmarker(str(landmarker), num_faces=6, tile_levels=3) as lm:
        for i in range(count):
            img = frame_at(clip, i, "4K clip")
            prev = detections[-1] if detections else []
            detections.append([d for f in mediapipe_faces(lm, img, i, prev) if (d := face_detection(f, 3840, 2160))])
    took = (time.perf_counter() - t0) / count
    track = track_target(detections, TargetSpec("largest"))
    boxes = np.array([d.box if d is not None else [np.nan] * 4 for d in track.detections])
    print(f"\n[4K, small face] the clip scaled by 0.35 into 3840x2160 frames, {count} frames: MediaPipe with "
          f"small_faces 3 found the face in {len(count_found := [d for d in detections if d])} of {count} frames "
          f"({took:.2f} s/frame: tiles searched every 12 frames, the face followed in between)")
    if not count_found:
        return
    _, crop = geometry(boxes[:, 3] - boxes[:, 1], _BoxMasks(boxes, (3840, 2160)), (3840, 2160), tuple(args.area),
                       count, "4K, small face", args.margin)
    print(f"  crop window jitter (smoothed): {fc.box_jitter(np.array(crop.track.boxes)):.2f} px")


def _two_copies(frames: np.ndarray, landmarker: Path) -> None:
    """Real MediaPipe detections of two people: the clip (left) and its mirror image 20 frames later (right)."""
    import cv2

    from dreamidv_core.preprocess.pose.extract import extract_mediapipe
    from dreamidv_core.preprocess.pose.mediapipe_face import FaceLandmarker
    from dreamidv_core.preprocess.tracking import TargetSpec

    count, h, w = frames.shape[:3]
    half = (w // 2, h // 2)
    n = count - 20
    pair = np.zeros((n, h // 2, w, 3), np.uint8)
    for i in range(n):
        pair[i, :, :half[0]] = cv2.resize(frames[i], half, interpolation=cv2.INTER_AREA)
        pair[i, :, half[0]:] = cv2.resize(frames[i + 20], half, interpolation=cv2.INTER_AREA)[:, ::-1]
    print(f"\n[real detections, two people] the clip and its mirror side by side, {n} frames {w}x{h // 2}")
    with FaceLandmarker(str(landmarker), num_faces=6, tile_levels=1) as lm:  # faces < 1/4 of the long side
        for index, side in ((0, "left"), (1, "right")):
            res = extract_mediapipe(pair, lm, target=TargetSpec("index", index))
            on = sum(1 for i in range(n) if res.mask[i].any()
                     and ((np.nonzero(res.mask[i])[1].mean() < w / 2) == (side == "left")))
            shown = sum(1 for i in range(n) if res.mask[i].any())
            print(f"  target index {index}: mask on the {side} person in {on} of {shown} frames with a mask; "
                  f"{len(res.track.people)} people found; absent {len(res.absent)}, bridged {len(res.filled)}")


def synthetic() -> None:
    import synthetic_people as sp
    from dreamidv_core.preprocess import tracking as T

    print("\n[synthetic two-person clips] 160x96, ground truth known; on = frames on the target / frames it is "
          "visible; wrong = frames on someone else")
    print(f"  {'clip':<10} {'re-id':<14} {'target':<7} {'on':>7} {'wrong':>6} {'switches':>9} {'absent':>7}")
    for kind in ("crossing", "occlusion", "cut"):
        scene = sp.scenario(kind)
        cuts = T.scene_cuts([T.frame_signature(f) for f in scene.frames])
        for reid, embed in (("ArcFace*", lambda i, d, s=scene: sp.colour_embedder(s.frames[i], d.box)),
                            ("position/size", None)):
            for index, person in ((0, "A"), (1, "B")):
                tt = T.track_target(scene.detections, T.TargetSpec("index", index), embed, cuts=cuts)
                a = sp.target_accuracy(scene, tt.detections, person)
                print(f"  {kind:<10} {reid:<14} {person:<7} {a['on_target']:>3}/{a['visible']:<3} {a['wrong']:>6} "
                      f"{a['switches']:>9} {len(tt.absent):>7}")
    print("  * ArcFace stand-in: the colour of the face (deterministic); cut clip: shot cut found at "
          f"{T.scene_cuts([T.frame_signature(f) for f in sp.scenario('cut').frames])}")
    rng = np.random.default_rng(0)
    stats = {False: [0, 0, 0, 0], True: [0, 0, 0, 0]}  # visible, on, wrong, switches
    for seed in range(60):
        n = int(rng.integers(20, 50))
        size, y = rng.uniform(22, 36), rng.uniform(35, 60)
        a = sp.Person("A", [tuple(p) for p in np.linspace((25, y, size), (135, y, size), n)], depth=0)
        b = sp.Person("B", [tuple(p) for p in np.linspace((135, y + 2, size), (25, y + 2, size), n)], depth=1)
        scene = sp.render([a, b], n, seed=seed, noise=rng.uniform(0.3, 2.0))
        for emb in (False, True):
            embed = (lambda i, d, s=scene: sp.colour_embedder(s.frames[i], d.box)) if emb else None
            for index, person in ((0, "A"), (1, "B")):
                acc = sp.target_accuracy(scene, T.track_target(scene.detections, T.TargetSpec("index", index),
                                                               embed).detections, person)
                st = stats[emb]
                st[0] += acc["visible"]
                st[1] += acc["on_target"]
                st[2] += acc["wrong"]
                st[3] += acc["switches"]
    for emb, (vis, on, wrong, sw) in stats.items():
        print(f"  60 random crossings (same size, same height, noise 0.3-2 px), {'ArcFace*' if emb else 'no ArcFace'}: "
              f"on target {on}/{vis} visible frames ({100 * on / vis:.2f} %), wrong {wrong}, switches {sw}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--video", default=str(SHARED / "a_girl.mp4"))
    ap.add_argument("--landmarker", default=str(SHARED / "face_landmarker_v2_with_blendshapes.task"))
    ap.add_argument("--frames", type=int, default=77, help="frames of the real clip used")
    ap.add_argument("--frames-4k", type=int, default=25, help="frames of the 4K small-face test")
    ap.add_argument("--area", type=int, nargs=2, default=(832, 480), metavar=("W", "H"))
    ap.add_argument("--margin", type=float, default=1.0, help="face-crop margin (face sizes on each side)")
    ap.add_argument("--dim", type=int, default=256, help="random DiT width for the step timing")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--latent-frames", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--no-dit", action="store_true", help="skip the DiT step timing")
    args = ap.parse_args()
    real_clip(args)
    synthetic()


if __name__ == "__main__":
    main()
