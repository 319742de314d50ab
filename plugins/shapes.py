"""The embedded ``shapes`` dataset: small generated pictures of geometric shapes.

Image ``i`` is a pure function of ``(seed, i, image_size, kinds)``: nothing is stored, every
image is drawn on demand with ``PIL.ImageDraw`` (well under a millisecond at 64 px). Its
label is ``i % num_classes`` (balanced classes); the kinds are, in order, circle, triangle,
square, ring, cross, star, pentagon, ellipse, crescent, arrow (``--classes 5`` = the first
five).

Each picture: a background of random hue, a few faint lines and mild per-pixel noise
(clutter that does not hide the shape), and one filled shape of random size (about 40-75 %
of the side), position (kept inside the central part that an eval centre crop keeps),
rotation and hue, whose luminance differs from the background's by at least
:data:`MIN_CONTRAST` (a shape never melts into the background).

Pillow is imported inside the functions (plugin modules stay cheap to import).
"""

from __future__ import annotations

import colorsys
import math
import random
from typing import Any

KINDS: tuple[str, ...] = (
    "circle", "triangle", "square", "ring", "cross",
    "star", "pentagon", "ellipse", "crescent", "arrow",
)

MIN_CONTRAST = 80  # minimum |luma(shape) - luma(background)| on a 0-255 scale
NOISE = 10  # per-pixel noise amplitude (+-), 0-255 scale
SUPERSAMPLE = 2  # draw at 2x and downscale: smooth edges


def _luma(rgb: tuple[int, int, int]) -> float:
    r, g, b = rgb
    return 0.299 * r + 0.587 * g + 0.114 * b


def _hls(h: float, lightness: float, s: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hls_to_rgb(h, lightness, s)
    return (round(r * 255), round(g * 255), round(b * 255))


def _colours(rng: random.Random) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(background, shape) colours of random hues with guaranteed luminance contrast."""
    dark_bg = rng.random() < 0.5
    bg = _hls(rng.random(), rng.uniform(0.08, 0.3) if dark_bg else rng.uniform(0.7, 0.92),
              rng.uniform(0.0, 0.6))
    for _ in range(8):
        fg = _hls(rng.random(), rng.uniform(0.6, 0.9) if dark_bg else rng.uniform(0.1, 0.4),
                  rng.uniform(0.4, 1.0))
        if abs(_luma(fg) - _luma(bg)) >= MIN_CONTRAST:
            return bg, fg
    return bg, ((255, 255, 255) if dark_bg else (0, 0, 0))


def _shift(rgb: tuple[int, int, int], delta: int) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + delta)) for c in rgb)  # type: ignore[return-value]


def _regular(n: int, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    return [(cx + r * math.cos(rot + 2 * math.pi * k / n),
             cy + r * math.sin(rot + 2 * math.pi * k / n)) for k in range(n)]


def _rotated(points: list[tuple[float, float]], cx: float, cy: float, r: float,
             rot: float) -> list[tuple[float, float]]:
    c, s = math.cos(rot), math.sin(rot)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in points]


_CROSS = [(-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3), (0.3, 1),
          (-0.3, 1), (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3)]
_ARROW = [(-1, -0.22), (0.15, -0.22), (0.15, -0.6), (1, 0), (0.15, 0.6), (0.15, 0.22),
          (-1, 0.22)]


def _crescent(n: int = 20) -> list[tuple[float, float]]:
    """Unit crescent: the unit disc minus a disc of radius ``ir`` centred ``(ox, 0)``;
    outer arc through the left from horn to horn, back along the inner circle's left arc."""
    ox, ir = 0.45, 0.85
    hx = (1 + ox * ox - ir * ir) / (2 * ox)  # the horns: where the two circles meet
    hy = math.sqrt(1 - hx * hx)
    a0 = math.atan2(hy, hx)
    outer = [(math.cos(a), math.sin(a)) for a in
             (a0 + (2 * math.pi - 2 * a0) * k / n for k in range(n + 1))]
    t0 = math.atan2(-hy, hx - ox)
    span = 2 * math.pi - 2 * abs(t0)
    inner = [(ox + ir * math.cos(t), ir * math.sin(t)) for t in
             (t0 - span * k / n for k in range(1, n))]
    return outer + inner


_CRESCENT = _crescent()


def draw_shape(draw: Any, kind: str, cx: float, cy: float, r: float, rot: float,
               fill: tuple[int, int, int]) -> None:
    """Draw one shape of bounding radius ``r`` centred on ``(cx, cy)``."""
    if kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif kind == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fill,
                     width=max(2, round(r * 0.32)))
    elif kind == "triangle":
        draw.polygon(_regular(3, cx, cy, r, rot), fill=fill)
    elif kind == "square":
        draw.polygon(_regular(4, cx, cy, r, rot), fill=fill)
    elif kind == "pentagon":
        draw.polygon(_regular(5, cx, cy, r, rot), fill=fill)
    elif kind == "star":
        pts = []
        for k in range(10):
            rr = r if k % 2 == 0 else r * 0.42
            a = rot + math.pi * k / 5
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        draw.polygon(pts, fill=fill)
    elif kind == "cross":
        draw.polygon(_rotated(_CROSS, cx, cy, r * 0.8, rot), fill=fill)
    elif kind == "ellipse":
        pts = [(math.cos(2 * math.pi * k / 32), 0.5 * math.sin(2 * math.pi * k / 32))
               for k in range(32)]
        draw.polygon(_rotated(pts, cx, cy, r, rot), fill=fill)
    elif kind == "crescent":
        draw.polygon(_rotated(_CRESCENT, cx, cy, r, rot), fill=fill)
    elif kind == "arrow":
        draw.polygon(_rotated(_ARROW, cx, cy, r, rot), fill=fill)
    else:
        raise ValueError(f"unknown shape kind {kind!r}")


def render(kind: str, seed: int, index: int, size: int = 64) -> Any:
    """The RGB ``PIL.Image`` of ``kind`` for sample ``index`` of a dataset seeded ``seed``."""
    from PIL import Image, ImageChops, ImageDraw

    rng = random.Random(f"tk-shapes:{seed}:{index}")
    bg, fg = _colours(rng)
    s = size * SUPERSAMPLE
    img = Image.new("RGB", (s, s), bg)
    draw = ImageDraw.Draw(img)
    # clutter: a few faint lines, close to the background's colour
    for _ in range(rng.randint(2, 4)):
        delta = rng.choice((-1, 1)) * rng.randint(12, 28)
        draw.line((rng.uniform(0, s), rng.uniform(0, s), rng.uniform(0, s), rng.uniform(0, s)),
                  fill=_shift(bg, delta), width=SUPERSAMPLE)
    # the shape: bounding radius 20-37 % of the side, kept inside the central 84 %
    r = rng.uniform(0.20, 0.37) * s
    margin = 0.08 * s + r
    cx = rng.uniform(margin, s - margin) if s - 2 * margin > 0 else s / 2
    cy = rng.uniform(margin, s - margin) if s - 2 * margin > 0 else s / 2
    draw_shape(draw, kind, cx, cy, r, rng.uniform(0, 2 * math.pi), fg)
    if SUPERSAMPLE > 1:
        img = img.reduce(SUPERSAMPLE)
    # mild noise: +-NOISE per channel, from the same seeded generator
    lut = [max(0, min(255, 128 + round((v - 128) * NOISE / 128))) for v in range(256)] * 3
    noise = Image.frombytes("RGB", (size, size), rng.randbytes(size * size * 3)).point(lut)
    return ImageChops.add(img, noise, 1.0, -128)


class ShapesGenerator:
    """Picklable ``make(i) -> (PIL image, label)`` for
    :class:`toolkit.data.datasets.IndexedDataset`."""

    def __init__(self, num_classes: int, image_size: int, seed: int):
        self.kinds = KINDS[:num_classes]
        self.image_size = image_size
        self.seed = seed

    def label(self, index: int) -> int:
        return index % len(self.kinds)

    def __call__(self, index: int) -> tuple[Any, int]:
        label = self.label(index)
        return render(self.kinds[label], self.seed, index, self.image_size), label
