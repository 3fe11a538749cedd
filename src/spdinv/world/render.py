"""Deterministic anti-aliased rendering of shapes-world scenes (drawn at 4x, box-filtered down)."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageChops, ImageDraw
from scipy.ndimage import minimum_filter

from .scene import BACKGROUNDS, COLOURS, POSITIONS, SIZE_RADIUS, Scene, WorldObject

IMAGE_SIZE = 64
SUPERSAMPLE = 4
_CANVAS = IMAGE_SIZE * SUPERSAMPLE


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    def ring(n: int, radius: float, phase: float) -> list[tuple[float, float]]:
        return [
            (cx + radius * math.cos(phase + 2 * math.pi * k / n), cy + radius * math.sin(phase + 2 * math.pi * k / n))
            for k in range(n)
        ]

    if shape == "square":
        h = 0.86 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [
            (x, y + 0.18 * r) for x, y in ring(3, 1.12 * r, -math.pi / 2)
        ]
    if shape == "hexagon":
        return ring(6, r, 0.0)
    if shape == "star":
        outer, inner = ring(5, 1.1 * r, -math.pi / 2), ring(5, 0.47 * r, -math.pi / 2 + math.pi / 5)
        return [p for pair in zip(outer, inner) for p in pair]
    if shape == "heart":
        points = []
        for k in range(72):
            t = 2 * math.pi * k / 72
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            points.append((cx + r * x / 15.5, cy - r * (y + 2.5) / 15.5))
        return points
    raise ValueError(f"no polygon for shape {shape!r}")


def _shape_mask(obj: WorldObject) -> Image.Image:
    s = SUPERSAMPLE
    cx, cy = (c * s for c in POSITIONS[obj.position])
    r = SIZE_RADIUS[obj.size] * s
    mask = Image.new("L", (_CANVAS, _CANVAS), 0)
    draw = ImageDraw.Draw(mask)
    if obj.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        draw.polygon(_polygon(obj.shape, cx, cy, r), fill=255)
    if obj.style == "outlined":
        # erosion by a square kernel (what PIL's MinFilter computes, separably and much faster)
        inner = minimum_filter(np.asarray(mask), size=2 * int(2.5 * s) + 1, mode="nearest")
        mask = ImageChops.subtract(mask, Image.fromarray(inner))
    return mask


def _shade(rgb: tuple[int, int, int], towards: int, amount: float) -> tuple[int, int, int]:
    return tuple(int(round(c + (towards - c) * amount)) for c in rgb)


def _object_fill(obj: WorldObject) -> Image.Image:
    """The object's colour with its material pattern, over the whole canvas."""
    colour = COLOURS[obj.colour]
    fill = Image.new("RGB", (_CANVAS, _CANVAS), colour)
    if obj.material == "plain":
        return fill
    accent = _shade(colour, 255, 0.75) if sum(colour) < 600 else _shade(colour, 0, 0.6)
    draw = ImageDraw.Draw(fill)
    s = SUPERSAMPLE
    if obj.material == "striped":
        period, width = 8 * s, 4 * s
        for offset in range(-_CANVAS, _CANVAS, period):
            draw.polygon(
                [(offset, 0), (offset + width, 0), (offset + width + _CANVAS, _CANVAS), (offset + _CANVAS, _CANVAS)],
                fill=accent,
            )
    else:  # dotted
        period, radius = 8 * s, 2.2 * s
        for y in range(period // 2, _CANVAS, period):
            for x in range(period // 2, _CANVAS, period):
                draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=accent)
    return fill


def _background(scene: Scene) -> Image.Image:
    colour = BACKGROUNDS[scene.background]
    canvas = Image.new("RGB", (_CANVAS, _CANVAS), colour)
    if scene.background_kind == "grid":
        line = _shade(colour, 0, 0.35) if sum(colour) > 200 else _shade(colour, 255, 0.35)
        draw = ImageDraw.Draw(canvas)
        step, width = 12 * SUPERSAMPLE, 2 * SUPERSAMPLE
        for k in range(step // 2, _CANVAS, step):
            draw.rectangle([k - width // 2, 0, k + width // 2 - 1, _CANVAS], fill=line)
            draw.rectangle([0, k - width // 2, _CANVAS, k + width // 2 - 1], fill=line)
    return canvas


def render(scene: Scene) -> Image.Image:
    """Render a scene to a 64x64 RGB PIL image."""
    canvas = _background(scene)
    for obj in scene.objects:
        canvas.paste(_object_fill(obj), (0, 0), _shape_mask(obj))
    return canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX)


def render_array(scene: Scene) -> np.ndarray:
    """Render a scene to a uint8 array of shape (64, 64, 3)."""
    return np.asarray(render(scene), dtype=np.uint8)
