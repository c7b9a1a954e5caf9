#!/usr/bin/env python3
"""The pack's face analysis (dreamidv_core.preprocess.face_analysis: onnxruntime + numpy) against insightface's
FaceAnalysis on the same model files: largest differences of boxes, keypoints, scores and embeddings, and
the time per image of both.

Model files: the tests' random-weight stand-ins of the antelopev2 and buffalo_l packs (tests/onnx_models.py,
real signatures), or a real insightface folder with ``--insightface DIR`` (holding models/<pack>/) and
``--images`` photos. Needs onnxruntime, insightface (for the comparison) and, for the stand-ins, onnx.

    .venv/bin/python benchmarks/face_parity.py
    .venv/bin/python benchmarks/face_parity.py --insightface ~/ComfyUI/models/insightface --images a.jpg b.jpg
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = str(Path(__file__).resolve().parent.parent)
sys.path.insert(0, ROOT)

from dreamidv_core.preprocess.face_analysis import FaceAnalyzer  # noqa: E402


def test_scenes():
    from tests import onnx_models as om

    scenes = []
    for h, w, faces in [(320, 320, [(30, 12, 100, 2), (10, 10, 60, 1), (20, 30, 40, 3)]),
                        (240, 320, [(8, 6, 50, 4), (30, 20, 80, 5)]), (160, 200, [(5, 5, 30, 4), (15, 10, 50, 5)]),
                        (320, 200, [(12, 20, 70, 6)]), (320, 320, [(1, 1, 90, 7), (38, 37, 60, 8)])]:
        img = om.blank(h, w)
        om.paint_faces(img, faces)
        scenes.append(img)
    return scenes


def compare(folder: Path, images, det_size: int, repeats: int) -> dict:
    from insightface.app import FaceAnalysis

    app = FaceAnalysis(name=str(folder), root=str(folder.parent.parent), allowed_modules=["detection", "recognition"],
                       providers=["CPUExecutionProvider"])
    app.prepare(ctx_id=-1, det_thresh=0.5, det_size=(det_size, det_size))
    ours = FaceAnalyzer(folder, "CPU", det_size=det_size)
    worst = dict(bbox=0.0, kps=0.0, score=0.0, embedding=0.0, cosine=0.0)
    faces = mismatched = 0
    t_theirs = t_ours = 0.0
    for image in images:
        bgr = np.ascontiguousarray(image[..., ::-1])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            t0 = time.perf_counter()
            for _ in range(repeats):
                theirs = app.get(bgr)
            t_theirs += (time.perf_counter() - t0) / repeats
        t0 = time.perf_counter()
        for _ in range(repeats):
            mine = ours.detect(image)
        t_ours += (time.perf_counter() - t0) / repeats
        if len(theirs) != len(mine):
            mismatched += 1
            continue
        for a, b in zip(theirs, mine):
            faces += 1
            worst["bbox"] = max(worst["bbox"], float(np.abs(a.bbox - b.bbox).max()))
            worst["kps"] = max(worst["kps"], float(np.abs(a.kps - b.kps).max()))
            worst["score"] = max(worst["score"], abs(float(a.det_score) - b.score))
            worst["embedding"] = max(worst["embedding"], float(np.abs(a.embedding - b.embedding).max()))
            cos = float(a.normed_embedding @ b.normed_embedding)
            worst["cosine"] = max(worst["cosine"], 1.0 - cos)
    return dict(images=len(images), faces=faces, count_mismatches=mismatched, worst=worst,
                ms_insightface=1000 * t_theirs / len(images), ms_ours=1000 * t_ours / len(images), info=ours.info)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--insightface", help="an insightface folder holding models/<pack>/ (default: test stand-ins)")
    ap.add_argument("--packs", nargs="+", default=["buffalo_l", "antelopev2"])
    ap.add_argument("--images", nargs="*", help="photos (default: the tests' face markers)")
    ap.add_argument("--det-size", type=int, default=320)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    if a.insightface:
        root = Path(a.insightface)
    else:
        from tests import onnx_models as om

        root = Path(tempfile.mkdtemp(prefix="face_parity_"))
        for i, pack in enumerate(a.packs):
            om.build_pack(root, pack, seed=3 + i)
    if a.images:
        from PIL import Image

        images = [np.asarray(Image.open(p).convert("RGB")) for p in a.images]
    else:
        images = test_scenes()
    ok = True
    for pack in a.packs:
        r = compare(root / "models" / pack, images, a.det_size, a.repeats)
        w = r["worst"]
        print(f"{pack}: {r['images']} images, {r['faces']} faces compared, face-count mismatches {r['count_mismatches']}")
        print(f"  max |diff|: bbox {w['bbox']:.3g} px, keypoints {w['kps']:.3g} px, score {w['score']:.3g}, "
              f"embedding {w['embedding']:.3g}; max 1 - cosine {w['cosine']:.3g}")
        print(f"  time per image: insightface {r['ms_insightface']:.1f} ms, ours {r['ms_ours']:.1f} ms ({r['info']})")
        ok &= r["count_mismatches"] == 0 and max(w.values()) <= 1e-4
    print("parity within 1e-4:", "yes" if ok else "NO")
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    sys.exit(main())
