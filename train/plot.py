"""A loss-curve PNG drawn with Pillow (no plotting dependency): raw loss per step in light
grey, an exponential moving average on top, log-scaled y axis."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw


def smooth(values: list[float], alpha: float = 0.05) -> list[float]:
    out: list[float] = []
    for v in values:
        out.append(v if not out else (1 - alpha) * out[-1] + alpha * v)
    return out


def plot_loss(losses: list[float], path: Path, title: str = "training loss",
              size: tuple[int, int] = (900, 520)) -> None:
    w, h = size
    left, right, top, bottom = 70, 20, 40, 50
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    ys = [max(v, 1e-4) for v in losses]
    lo = 10 ** math.floor(math.log10(min(ys)))
    hi = 10 ** math.ceil(math.log10(max(ys)))
    n = max(1, len(ys) - 1)

    def xy(i: int, v: float) -> tuple[float, float]:
        fy = (math.log10(max(v, lo)) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))
        return left + (w - left - right) * i / n, top + (h - top - bottom) * (1 - fy)

    d.rectangle((left, top, w - right, h - bottom), outline="black")
    decade = lo
    while decade <= hi * 1.001:
        y = xy(0, decade)[1]
        d.line((left, y, w - right, y), fill=(225, 225, 225))
        d.text((8, y - 6), f"{decade:g}", fill="black")
        decade *= 10
    for k in range(6):
        i = round(n * k / 5)
        x = xy(i, lo)[0]
        d.line((x, h - bottom, x, h - bottom + 5), fill="black")
        d.text((x - 10, h - bottom + 8), str(i), fill="black")
    d.line([xy(i, v) for i, v in enumerate(ys)], fill=(190, 190, 190), width=1)
    d.line([xy(i, v) for i, v in enumerate(smooth(ys))], fill=(200, 40, 40), width=2)
    d.text((left, 12), f"{title}  (grey: per step, red: EMA; log scale)", fill="black")
    d.text((w // 2 - 15, h - 22), "step", fill="black")
    img.save(path)
