"""Randomised drawings of world object identities, for training the concept encoder on objects the
world renderer did not draw (domain randomisation; `ConceptEncoderConfig.drawn`, issue 26).

`random_drawing(obj, rng)` draws the identity (shape, colour, material, style) with geometry, proportions,
size, offset, rotation, shade, fill, edges and background of its own: per-shape templates with random
parameters (ellipse aspect, rounded or cut corners, triangle apex, star depth, hexagon phase, three heart
constructions), a stretch along a random axis, per-vertex jitter, a flat, linear-gradient, radial-gradient
or noisy fill around a shade of the colour, stripes or dots at a random angle, period and size for the
world's materials, a stroke of random width for the outlined style and an optional darker or lighter edge
for the filled one, drawn aliased or anti-aliased (supersampled 2-4x, box or Lanczos), on a plain world
background or a random plain colour, then repainted gray as the encoder's input path does
(`on_concept_background`).
"""

from __future__ import annotations

import math
import random

import numpy as np
from PIL import Image, ImageDraw

from .concept_encoder import CONCEPT_BACKGROUND, IMAGE_SIZE, on_concept_background
from .scene import BACKGROUNDS, COLOURS, WorldObject

Points = list[tuple[float, float]]


def _ring(n: int, radius: float, phase: float) -> Points:
    return [(radius * math.cos(phase + 2 * math.pi * k / n), radius * math.sin(phase + 2 * math.pi * k / n))
            for k in range(n)]


def _rounded(corners: Points, rng: random.Random) -> Points:
    """A polygon with each corner cut (chamfered) or rounded by a random share of its edges."""
    cut, steps, out = rng.uniform(0.0, 0.3), rng.choice((1, 4)), []
    for k, corner in enumerate(corners):
        before, after = corners[k - 1], corners[(k + 1) % len(corners)]
        a = tuple(c + cut * (b - c) for c, b in zip(corner, before))
        b = tuple(c + cut * (n - c) for c, n in zip(corner, after))
        # quadratic Bezier from a to b through the corner (steps=1: a straight cut)
        out += [tuple((1 - t) ** 2 * p + 2 * (1 - t) * t * q + t ** 2 * r for p, q, r in zip(a, corner, b))
                for t in np.linspace(0, 1, steps + 1)]
    return out


def _heart(rng: random.Random) -> Points:
    kind = rng.randrange(3)
    if kind == 0:  # the classic sin^3 curve, with random lobe depth
        depth = rng.uniform(3, 7)
        return [(16 * math.sin(t) ** 3 / 16, -(13 * math.cos(t) - depth * math.cos(2 * t) - 2 * math.cos(3 * t)
                                               - math.cos(4 * t) + 2.5) / 16)
                for t in np.linspace(0, 2 * math.pi, 60, endpoint=False)]
    if kind == 1:  # two circular lobes and a point
        lobe, out = rng.uniform(0.45, 0.6), []
        for side in (1, -1):
            cx = side * lobe * 0.9
            angles = np.linspace(-0.15 * math.pi, 1.0 * math.pi, 16) if side == 1 else np.linspace(0, 1.15 * math.pi, 16)
            out += [(cx + lobe * math.cos(a), -0.3 - lobe * math.sin(a)) for a in angles]
        return out + [(0.0, rng.uniform(0.85, 1.05))]
    # a polar heart r = 1 - sin(t), turned point down
    return [(0.62 * (1 - math.sin(t)) * math.cos(t), -0.62 * (1 - math.sin(t)) * math.sin(t) - 0.45 + 0.2)
            for t in np.linspace(0, 2 * math.pi, 60, endpoint=False)]


def _template(shape: str, rng: random.Random) -> Points:
    """The shape's outline in unit coordinates (about [-1, 1]), its proportions drawn at random."""
    if shape == "circle":
        aspect = rng.uniform(0.8, 1.25)
        return [(aspect * x, y / aspect) for x, y in _ring(40, 1.0, 0.0)]
    if shape == "square":
        h, aspect = rng.uniform(0.75, 0.9), rng.uniform(0.8, 1.25)
        corners = [(-h * aspect, -h / aspect), (h * aspect, -h / aspect), (h * aspect, h / aspect), (-h * aspect, h / aspect)]
        return _rounded(corners, rng) if rng.random() < 0.4 else corners
    if shape == "triangle":
        apex, base = rng.uniform(-0.4, 0.4), rng.uniform(0.7, 0.9)
        corners = [(apex, -1.0), (rng.uniform(0.8, 1.05), base), (-rng.uniform(0.8, 1.05), base)]
        return _rounded(corners, rng) if rng.random() < 0.25 else corners
    if shape == "hexagon":
        return _ring(6, rng.uniform(0.85, 1.0), rng.choice((0.0, math.pi / 6)) + rng.uniform(-0.2, 0.2))
    if shape == "star":
        outer, inner = _ring(5, 1.05, -math.pi / 2), _ring(5, rng.uniform(0.3, 0.62), -math.pi / 2 + math.pi / 5)
        return [p for pair in zip(outer, inner) for p in pair]
    if shape == "heart":
        return _heart(rng)
    raise ValueError(f"no drawing for shape {shape!r}")


def _placed(points: Points, rng: random.Random, scale: int) -> Points:
    """Stretched along a random axis, rotated, sized, moved and jittered, in canvas pixels."""
    r = rng.uniform(8.5, 16.5) * scale
    cx, cy = (32 + rng.uniform(-6, 6)) * scale, (32 + rng.uniform(-6, 6)) * scale
    axis, stretch, turn = rng.uniform(0, math.pi), rng.uniform(1.0, 1.35), math.radians(rng.uniform(-45, 45))
    jitter = rng.uniform(0, 0.08)
    out = []
    for x, y in points:
        u, v = x * math.cos(axis) + y * math.sin(axis), -x * math.sin(axis) + y * math.cos(axis)
        x, y = u * stretch * math.cos(axis) - v * math.sin(axis), u * stretch * math.sin(axis) + v * math.cos(axis)
        x, y = x + rng.uniform(-jitter, jitter), y + rng.uniform(-jitter, jitter)
        out.append((cx + r * (x * math.cos(turn) - y * math.sin(turn)), cy + r * (x * math.sin(turn) + y * math.cos(turn))))
    return out


def _fill(rgb: tuple[int, int, int], size: int, rng: random.Random) -> np.ndarray:
    """(size, size, 3) float pixels: a shade of `rgb`, flat, with a linear or radial ramp, or noisy."""
    base = np.array(rgb, float) + [rng.uniform(-30, 30) for _ in range(3)]
    kind = rng.choice(("flat", "flat", "linear", "radial", "noise"))
    if kind == "flat":
        return np.broadcast_to(base, (size, size, 3)).copy()
    y, x = np.mgrid[0:size, 0:size].astype(float) / size - 0.5
    if kind == "noise":
        seed = rng.randrange(2 ** 31)
        return base + np.random.default_rng(seed).normal(0, rng.uniform(4, 15), (size, size, 1))
    if kind == "linear":
        angle = rng.uniform(0, 2 * math.pi)
        ramp = x * math.cos(angle) + y * math.sin(angle)
    else:
        ramp = np.hypot(x - rng.uniform(-0.2, 0.2), y - rng.uniform(-0.2, 0.2)) - 0.2
    return base + rng.uniform(40, 110) * ramp[..., None]


def _material(pixels: np.ndarray, material: str, rgb: tuple[int, int, int], rng: random.Random) -> np.ndarray:
    """Stripes or dots of the world's accent (lighter for dark colours, darker for light ones) over the fill."""
    if material == "plain":
        return pixels
    accent = np.array([c + (255 - c) * 0.75 for c in rgb] if sum(rgb) < 600 else [c * 0.4 for c in rgb])
    accent = accent + rng.uniform(-25, 25)
    size = pixels.shape[0]
    y, x = np.mgrid[0:size, 0:size].astype(float)
    period = rng.uniform(6, 10)
    if material == "striped":
        angle = math.radians(rng.choice((45, -45, 0, 90)) + rng.uniform(-15, 15))
        phase = (x * math.cos(angle) + y * math.sin(angle)) / period
        on = (phase - np.floor(phase)) < rng.uniform(0.35, 0.6)
    else:
        offset = rng.uniform(0, period)
        dx, dy = (x + offset) % period - period / 2, (y + offset) % period - period / 2
        on = np.hypot(dx, dy) < rng.uniform(1.5, 2.8)
    return np.where(on[..., None], accent, pixels)


def _background(obj: WorldObject, rng: random.Random) -> tuple[int, int, int]:
    """The concept gray, another plain world background (not the object's colour) or a random colour far
    from the object's."""
    if rng.random() < 0.25:
        return BACKGROUNDS[CONCEPT_BACKGROUND]
    if rng.random() < 0.5:
        return BACKGROUNDS[rng.choice([b for b in BACKGROUNDS if b != obj.colour])]
    while True:
        colour = tuple(rng.randrange(256) for _ in range(3))
        if max(abs(a - b) for a, b in zip(colour, COLOURS[obj.colour])) > 90:
            return colour


def random_drawing(obj: WorldObject, rng: random.Random) -> Image.Image:
    """One randomised 64x64 drawing of `obj`'s identity, on the concept gray (module docstring)."""
    rgb = COLOURS[obj.colour]
    scale = rng.choice((1, 1, 2, 3, 4))
    size = IMAGE_SIZE * scale
    outline = _placed(_template(obj.shape, rng), rng, scale)
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    if obj.style == "outlined":
        draw.line(outline + outline[:1], fill=255, width=max(1, round(rng.uniform(1.5, 4) * scale)), joint="curve")
    else:
        draw.polygon(outline, fill=255)
    # the fill at 64x64, enlarged to the canvas: only the shape's edge needs the supersampling
    pixels = _material(_fill(rgb, IMAGE_SIZE, rng), obj.material, rgb, rng)
    fill = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).resize((size, size), Image.NEAREST)
    image = Image.new("RGB", (size, size), _background(obj, rng))
    image.paste(fill, (0, 0), mask)
    if obj.style == "filled" and rng.random() < 0.3:  # a darker or lighter edge
        edge = tuple(int(np.clip(c * rng.uniform(0.4, 1.5), 0, 255)) for c in rgb)
        ImageDraw.Draw(image).line(outline + outline[:1], fill=edge, width=max(1, round(rng.uniform(0.8, 2) * scale)))
    if scale > 1:
        image = image.resize((IMAGE_SIZE, IMAGE_SIZE), rng.choice((Image.BOX, Image.LANCZOS, Image.BILINEAR)))
    return on_concept_background(image)
