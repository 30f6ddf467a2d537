"""loss_curve.png from metrics.jsonl, with whatever plotting library is installed.

matplotlib when present; otherwise Pillow (installed with MindSpore) draws a plain chart;
with neither, nothing is written and the caller is told how to get one. Never a hard
dependency, never a failed run because of a plot.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
from typing import List, Optional, Tuple

HOW_TO_GET_ONE = "pip install matplotlib (or pillow) to get loss_curve.png"


def read_curves(metrics_path: str) -> Tuple[List[Tuple[int, float]], List[Tuple[int, float]]]:
    """([(step, train loss)], [(step, eval loss)]) from metrics.jsonl, finite values only."""
    train, ev = [], []
    with open(metrics_path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("kind") == "train" and _finite(rec.get("loss")):
                train.append((int(rec["step"]), float(rec["loss"])))
            elif rec.get("kind") == "eval" and _finite(rec.get("eval_loss")):
                ev.append((int(rec["step"]), float(rec["eval_loss"])))
    return train, ev


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def plot_loss_curve(metrics_path: str, png_path: Optional[str] = None) -> Tuple[Optional[str], str]:
    """Write the curve next to metrics.jsonl -> (png path or None, how it was drawn / why not)."""
    png_path = png_path or os.path.join(os.path.dirname(os.path.abspath(metrics_path)), "loss_curve.png")
    train, ev = read_curves(metrics_path)
    if not train and not ev:
        return None, "no finite losses in metrics.jsonl"
    tmp = f"{png_path}.tmp-{os.getpid()}.png"
    try:
        if importlib.util.find_spec("matplotlib") is not None:
            _matplotlib(train, ev, tmp)
            how = "matplotlib"
        elif importlib.util.find_spec("PIL") is not None:
            _pillow(train, ev, tmp)
            how = "pillow"
        else:
            return None, HOW_TO_GET_ONE
        os.replace(tmp, png_path)
        return png_path, how
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _matplotlib(train, ev, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss")
    if ev:
        ax.plot(*zip(*ev), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def _pillow(train, ev, path, size=(800, 450)) -> None:
    from PIL import Image, ImageDraw
    W, H = size
    left, right, top, bottom = 70, 20, 20, 45
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    pts = train + ev
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-3)
    pad = 0.05 * (y1 - y0)
    y0, y1 = y0 - pad, y1 + pad

    def xy(step, loss):
        return (left + (step - x0) / (x1 - x0) * (W - left - right),
                top + (y1 - loss) / (y1 - y0) * (H - top - bottom))

    d.rectangle([left, top, W - right, H - bottom], outline="black")
    for i in range(5):                                  # y ticks
        v = y0 + (y1 - y0) * i / 4
        _, py = xy(x0, v)
        d.line([left - 4, py, left, py], fill="black")
        d.text((5, py - 6), f"{v:.3f}", fill="black")
    for s in sorted({int(round(x0 + (x1 - x0) * i / 4)) for i in range(5)}):   # integer steps
        px, _ = xy(s, y0)
        d.line([px, H - bottom, px, H - bottom + 4], fill="black")
        d.text((px - 10, H - bottom + 8), str(s), fill="black")
    d.text((W // 2 - 10, H - 18), "step", fill="black")
    for series, color in ((train, (31, 119, 180)), (ev, (255, 127, 14))):
        if len(series) > 1:
            d.line([xy(*p) for p in series], fill=color, width=2)
        for p in series if series is ev else series[-1:]:
            px, py = xy(*p)
            d.ellipse([px - 3, py - 3, px + 3, py + 3], fill=color)
    d.text((W - right - 160, top + 6), "train loss", fill=(31, 119, 180))
    if ev:
        d.text((W - right - 160, top + 20), "eval loss", fill=(255, 127, 14))
    img.save(path, format="PNG")
