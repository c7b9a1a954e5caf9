"""Pictures of the evaluation (:mod:`dreamidv_core.eval.benchmark`) drawn with PIL only (no matplotlib):
per-clip curves, the aggregate table and a side-by-side comparison. Every function returns uint8 [H, W, 3]."""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import numpy as np

from .identity_report import AXIS, BACKGROUND, CURVE, GRID, MEAN, PlotFrame, plot_similarity

BETTER = (44, 160, 44)
WORSE = (214, 39, 40)
BAR_A = (31, 119, 180)
BAR_B = (255, 127, 14)
ROW_HEIGHT = 16


def _canvas(width: int, height: int):
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (width, height), BACKGROUND)
    return img, ImageDraw.Draw(img), ImageFont.load_default()


def line_chart(values: Sequence[Optional[float]], title: str, width: int = 640, height: int = 200,
               lo: Optional[float] = None, hi: Optional[float] = None) -> np.ndarray:
    """A per-frame series (None/NaN = not measured) with its mean; the y range is [lo, hi] or the data's."""
    v = np.array([np.nan if x is None else float(x) for x in values], np.float64)
    finite = np.isfinite(v)
    img, d, font = _canvas(width, height)
    if finite.any():
        a, b = float(v[finite].min()), float(v[finite].max())
        lo = a if lo is None else lo
        hi = b if hi is None else hi
        if hi - lo < 1e-9:
            lo, hi = lo - 0.5, hi + 0.5
    else:
        lo, hi = (0.0 if lo is None else lo), (1.0 if hi is None else hi)
    g = PlotFrame(left=52, top=20, right=width - 12, bottom=height - 20, lo=lo, hi=hi, n=int(v.size))
    for k in range(5):
        y = lo + (hi - lo) * k / 4
        d.line([(g.left, g.y(y)), (g.right, g.y(y))], fill=GRID)
        d.text((4, g.y(y) - 6), f"{y:.3g}", fill=AXIS, font=font)
    d.rectangle([g.left, g.top, g.right, g.bottom], outline=AXIS)
    if finite.any():
        mean = float(v[finite].mean())
        d.line([(g.left + 1, g.y(mean)), (g.right - 1, g.y(mean))], fill=MEAN)
        for i in range(v.size - 1):
            if finite[i] and finite[i + 1]:
                d.line([(g.x(i), g.y(v[i])), (g.x(i + 1), g.y(v[i + 1]))], fill=CURVE, width=2)
        for i in np.flatnonzero(finite):
            d.rectangle([g.x(i) - 1, g.y(v[i]) - 1, g.x(i) + 1, g.y(v[i]) + 1], fill=CURVE)
        title = f"{title}  mean {mean:.4g}"
    else:
        title = f"{title}: not measured"
    d.text((g.left, 4), title, fill=AXIS, font=font)
    return np.asarray(img, np.uint8).copy()


def clip_panel(clip: dict, width: int = 640) -> np.ndarray:
    """One clip (:meth:`ClipResult.as_dict`): identity similarity, pose error, expression error and
    background PSNR per frame, stacked."""
    s = clip["series"]
    sims = np.array([np.nan if x is None else x for x in s["similarity"]], np.float64)
    parts = [plot_similarity(sims, width, 240),
             line_chart(s["pose_error"], "head-pose error (deg)", width, lo=0.0),
             line_chart(s["expression_error"], "expression error", width, lo=0.0),
             line_chart(s["bg_psnr"], "background PSNR (dB)", width)]
    header = _header(f"{clip['name']}: {clip['frames']} frames, mask {clip.get('mask_source') or 'none'}", width)
    return np.concatenate([header] + parts, axis=0)


def _header(text: str, width: int) -> np.ndarray:
    img, d, font = _canvas(width, 20)
    d.text((6, 4), text, fill=AXIS, font=font)
    return np.asarray(img, np.uint8).copy()


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    return f"{v:.4g}" if math.isfinite(v) else "-"


def table_image(rows: List[List[str]], title: str, widths: Sequence[int], colours: Optional[List] = None) -> np.ndarray:
    """A text table (first row = header) as an image; ``colours[r]`` optionally tints row r's last cell."""
    width = sum(widths) + 12
    height = 28 + ROW_HEIGHT * len(rows)
    img, d, font = _canvas(width, height)
    d.text((6, 4), title, fill=AXIS, font=font)
    for r, row in enumerate(rows):
        y = 22 + ROW_HEIGHT * r
        if r == 0:
            d.line([(6, y + ROW_HEIGHT - 2), (width - 6, y + ROW_HEIGHT - 2)], fill=AXIS)
        elif r % 2 == 0:
            d.rectangle([6, y, width - 6, y + ROW_HEIGHT - 2], fill=(245, 245, 245))
        x = 6
        for c, (text, w) in enumerate(zip(row, widths)):
            fill = AXIS
            if colours and c == len(row) - 1 and colours[r] is not None:
                fill = colours[r]
            d.text((x, y + 2), text, fill=fill, font=font)
            x += w
    return np.asarray(img, np.uint8).copy()


def summary_table(doc: dict) -> np.ndarray:
    """The aggregate numbers of a results document: metric, mean, min, max, clips measured."""
    rows = [["metric", "mean", "min", "max", "clips"]]
    for m in doc["metrics"]:
        a = doc["aggregate"][m["key"]]
        if a["clips"]:
            arrow = {"higher": " (+)", "lower": " (-)"}.get(m["better"], "")
            rows.append([m["label"] + arrow, _cell(a["mean"]), _cell(a["min"]), _cell(a["max"]), str(a["clips"])])
    title = f"evaluation of {len(doc['clips'])} clip(s); (+) higher is better, (-) lower is better"
    return table_image(rows, title, (200, 90, 90, 90, 50))


def comparison_chart(cmp: dict) -> np.ndarray:
    """Two result sets side by side: per metric both means, the difference and the better one (green if B
    is better, red if worse), plus a bar pair scaled to the larger absolute value."""
    la, lb = cmp["labels"]
    rows = [["metric", la, lb, f"{lb} - {la}", "better"]]
    colours: List = [None]
    bars = []
    for r in cmp["metrics"]:
        if r[la] is None:
            continue
        rows.append([r["label"], _cell(r[la]), _cell(r[lb]), _cell(r["delta"]), r["winner"] or "-"])
        colours.append(BETTER if r["winner"] == lb else WORSE if r["winner"] == la else None)
        bars.append((r[la], r[lb]))
    table = table_image(rows, f"{la} vs {lb} over {len(cmp['clips'])} common clip(s)", (190, 90, 90, 90, 70), colours)
    h = table.shape[0]
    img, d, _ = _canvas(160, h)
    for k, (a, b) in enumerate(bars, start=1):
        y = 22 + ROW_HEIGHT * k
        scale = max(abs(a), abs(b), 1e-12)
        for j, (v, colour) in enumerate(((a, BAR_A), (b, BAR_B))):
            length = int(round(140 * abs(v) / scale))
            d.rectangle([8, y + 2 + 6 * j, 8 + max(length, 1), y + 6 + 6 * j], fill=colour)
    return np.concatenate([table, np.asarray(img, np.uint8)], axis=1)
