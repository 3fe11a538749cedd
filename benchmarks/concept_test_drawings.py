"""A family of test objects drawn by code that is neither the world renderer's, nor
`spdinv.testing.hand_drawn_object`, nor the concept encoder's training drawer
(`spdinv.world.concept_drawing`): for measuring the concept encoder on images none of the project's
own drawing code made (issue 26).

What it does differently: other proportions (a stretch of up to 1.3x along a random axis, squares with
rounded corners, triangles with a random apex, hearts from two Bezier curves), sizes (radius 9-16 px)
and offsets (up to 5 px), rotations up to 35 degrees, a radial or linear gradient of the colour or a flat
fill, a darker outline stroke or none, drawn at 3x and downsampled with Lanczos (anti-aliased) or at 1x
(aliased).
"""

from __future__ import annotations

import math
import random

import numpy as np
from PIL import Image, ImageDraw

SIDE = 64


def _bezier(p0, p1, p2, p3, n: int = 24) -> list[tuple[float, float]]:
    out = []
    for k in range(n + 1):
        t = k / n
        a, b, c, d = (1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t ** 2, t ** 3
        out.append((a * p0[0] + b * p1[0] + c * p2[0] + d * p3[0], a * p0[1] + b * p1[1] + c * p2[1] + d * p3[1]))
    return out


def _outline(shape: str, rng: random.Random) -> list[tuple[float, float]]:
    """The shape's boundary in unit coordinates (about [-1, 1]), before stretch and rotation."""
    if shape == "circle":
        return [(math.cos(2 * math.pi * k / 48), math.sin(2 * math.pi * k / 48)) for k in range(48)]
    if shape == "square":  # rounded corners
        corner, h, pts = rng.uniform(0.05, 0.3), 0.82, []
        for cx, cy, start in ((h, h, 0), (-h, h, 90), (-h, -h, 180), (h, -h, 270)):
            ox, oy = cx - math.copysign(corner, cx), cy - math.copysign(corner, cy)
            pts += [(ox + corner * math.cos(math.radians(start + a)), oy + corner * math.sin(math.radians(start + a)))
                    for a in range(0, 91, 15)]
        return pts
    if shape == "triangle":
        apex = rng.uniform(-0.35, 0.35)
        return [(apex, -1.0), (0.95, 0.8), (-0.95, 0.8)]
    if shape == "hexagon":
        phase = rng.choice((0.0, math.pi / 6))
        return [(math.cos(phase + math.pi * k / 3), math.sin(phase + math.pi * k / 3)) for k in range(6)]
    if shape == "star":
        inner, pts = rng.uniform(0.35, 0.6), []
        for k in range(10):
            radius = 1.05 if k % 2 == 0 else inner
            angle = -math.pi / 2 + math.pi * k / 5
            pts.append((radius * math.cos(angle), radius * math.sin(angle)))
        return pts
    if shape == "heart":
        top, bottom = (0.0, -0.45), (0.0, 1.0)
        right = _bezier(top, (0.35, -1.25), (1.45, -0.35), bottom)
        left = _bezier(bottom, (-1.45, -0.35), (-0.35, -1.25), top)
        return right + left[1:]
    raise ValueError(f"no test drawing for shape {shape!r}")


def _fill(rgb: tuple[int, int, int], rng: random.Random, size: int, box: tuple[float, float, float]) -> Image.Image:
    """Flat, linear or radial gradient of `rgb` (up to 45 per channel lighter/darker across the object)."""
    kind = rng.choice(("flat", "linear", "radial"))
    base = np.array(rgb, dtype=np.float64) + np.array([rng.randint(-12, 12) for _ in range(3)])
    if kind == "flat":
        pixels = np.broadcast_to(base, (size, size, 3))
    else:
        y, x = np.mgrid[0:size, 0:size].astype(np.float64)
        cx, cy, r = box
        if kind == "linear":
            angle = rng.uniform(0, 2 * math.pi)
            t = ((x - cx) * math.cos(angle) + (y - cy) * math.sin(angle)) / r
        else:
            t = np.hypot(x - cx - 0.3 * r, y - cy - 0.3 * r) / r - 0.5
        pixels = base + rng.uniform(20, 45) * np.clip(t, -1, 1)[..., None]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def test_drawing(shape: str, rgb: tuple[int, int, int], background: tuple[int, int, int],
                 rng: random.Random) -> Image.Image:
    """One object of the test family on a 64x64 plain `background` (see the module docstring)."""
    scale = rng.choice((1, 3))  # 3: drawn large and downsampled (anti-aliased); 1: aliased
    size = SIDE * scale
    r = rng.uniform(9, 16) * scale
    cx, cy = (32 + rng.uniform(-5, 5)) * scale, (32 + rng.uniform(-5, 5)) * scale
    turn, axis, stretch = math.radians(rng.uniform(-35, 35)), rng.uniform(0, math.pi), rng.uniform(1.0, 1.3)

    def place(x: float, y: float) -> tuple[float, float]:
        # stretch along `axis`, then rotate, scale and move
        u, v = x * math.cos(axis) + y * math.sin(axis), -x * math.sin(axis) + y * math.cos(axis)
        x, y = (u * stretch) * math.cos(axis) - v * math.sin(axis), (u * stretch) * math.sin(axis) + v * math.cos(axis)
        return cx + r * (x * math.cos(turn) - y * math.sin(turn)), cy + r * (x * math.sin(turn) + y * math.cos(turn))

    polygon = [place(x, y) for x, y in _outline(shape, rng)]
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).polygon(polygon, fill=255)
    image = Image.new("RGB", (size, size), background)
    image.paste(_fill(rgb, rng, size, (cx, cy, r)), (0, 0), mask)
    if rng.random() < 0.5:  # a darker outline stroke
        stroke = tuple(int(c * rng.uniform(0.4, 0.7)) for c in rgb)
        ImageDraw.Draw(image).line(polygon + polygon[:1], fill=stroke, width=max(1, round(rng.uniform(1, 2) * scale)),
                                   joint="curve")
    return image if scale == 1 else image.resize((SIDE, SIDE), Image.LANCZOS)
