"""The schedule preview chart: active rank per sampling step, drawn with PIL (no matplotlib).

Pure drawing: takes numbers, returns an ``(1, H, W, 3)`` float image tensor (ComfyUI's IMAGE).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (30, 30, 34)
PLOT_BG = (38, 38, 44)
GRID = (70, 70, 78)
AXIS = (170, 170, 180)
TEXT = (225, 225, 230)
MUTED = (150, 150, 160)
PALETTE = [(90, 170, 255), (255, 150, 70), (120, 210, 120), (230, 100, 160), (200, 200, 90), (160, 130, 255)]


@dataclass
class Series:
    label: str
    ranks: Sequence[int]  # one per step
    max_rank: int


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed bitmap font
        return ImageFont.load_default()


def _nice_ticks(top: int, count: int = 5) -> list[int]:
    if top <= 0:
        return [0]
    step = max(1, int(np.ceil(top / count)))
    for nice in (1, 2, 4, 5, 8, 10, 16, 20, 25, 32, 50, 64, 100, 128, 200, 256, 500, 1000):
        if nice >= step:
            step = nice
            break
    ticks = list(range(0, top + 1, step))
    if ticks[-1] != top:
        ticks.append(top)
    return ticks


def rank_chart(series: Sequence[Series], title: str, subtitle: str = "", width: int = 768, height: int = 432) -> torch.Tensor:
    """Active rank (y) against sampling step (x), one step-line per series."""
    if not series:
        raise ValueError("nothing to chart")
    steps = max(len(s.ranks) for s in series)
    top = max(max(s.max_rank for s in series), 1)

    img = Image.new("RGB", (width, height), BACKGROUND)
    d = ImageDraw.Draw(img)
    f_title, f_text, f_small = _font(18), _font(13), _font(11)

    left, right, top_px, bottom = 56, width - 20, 74, height - 56
    d.text((16, 10), title, fill=TEXT, font=f_title)
    if subtitle:
        d.text((16, 34), subtitle, fill=MUTED, font=f_small)
    d.rectangle([left, top_px, right, bottom], fill=PLOT_BG)

    def y_of(rank: float) -> float:
        return bottom - (bottom - top_px) * (rank / top)

    # x: step i occupies the band [x_of(i), x_of(i + 1)]
    def x_of(i: float) -> float:
        return left + (right - left) * (i / max(steps, 1))

    for tick in _nice_ticks(top):
        y = y_of(tick)
        d.line([left, y, right, y], fill=GRID)
        d.text((left - 8, y), str(tick), fill=MUTED, font=f_small, anchor="rm")
    label_every = max(1, int(np.ceil(steps / 20)))
    for i in range(steps):
        if i % label_every == 0 or i == steps - 1:
            d.text((x_of(i + 0.5), bottom + 6), str(i), fill=MUTED, font=f_small, anchor="mt")
    d.line([left, top_px, left, bottom, right, bottom], fill=AXIS, width=1)
    d.text(((left + right) / 2, bottom + 24), "sampling step  (high noise -> clean)", fill=TEXT, font=f_text, anchor="mt")
    d.text((left, top_px - 4), "active rank", fill=TEXT, font=f_text, anchor="ld")

    for k, s in enumerate(series):
        color = PALETTE[k % len(PALETTE)]
        offset = (k - (len(series) - 1) / 2) * 2.0  # keep overlapping series visible
        pts = []
        for i, r in enumerate(s.ranks):
            y = y_of(r) + offset
            pts += [(x_of(i), y), (x_of(i + 1), y)]
        d.line(pts, fill=color, width=3, joint="curve")
        for i, r in enumerate(s.ranks):
            cx, cy = x_of(i + 0.5), y_of(r) + offset
            d.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=color)
            if steps <= 32 and len(series) == 1:
                d.text((cx, cy - 6), str(r), fill=TEXT, font=f_small, anchor="md")
        # legend, top-left inside the plot
        ly = top_px + 8 + 18 * k
        d.line([left + 10, ly + 7, left + 30, ly + 7], fill=color, width=3)
        d.text((left + 36, ly), s.label, fill=TEXT, font=f_text)

    arr = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(arr).unsqueeze(0)
