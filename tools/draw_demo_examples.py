"""Draw the web demo's example images by hand (PIL strokes with a wobble, paper grain and a
photo's JPEG softness, at 192x192): pictures the shapes-world renderer did not draw, which the
demo crops and resizes like the CLI does. Run once; the PNGs and examples.json are committed.

    python tools/draw_demo_examples.py
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

OUT = Path(__file__).resolve().parent.parent / "src" / "spdinv" / "assets" / "demo-examples"
SIZE = 192


def _wobbly(points: list[tuple[float, float]], rng: np.random.Generator, amount: float) -> list[tuple[float, float]]:
    return [(x + rng.normal(0, amount), y + rng.normal(0, amount)) for x, y in points]


def _ellipse(cx: float, cy: float, r: float, n: int = 48) -> list[tuple[float, float]]:
    return [(cx + r * math.cos(2 * math.pi * k / n), cy + 0.96 * r * math.sin(2 * math.pi * k / n)) for k in range(n)]


def _square(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    h = 0.8 * r
    return [(cx - h, cy - h), (cx + h, cy - h * 1.03), (cx + h * 1.02, cy + h), (cx - h * 0.98, cy + h)]


def draw(shape: str, colour: tuple[int, int, int], background: tuple[int, int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    canvas = Image.new("RGB", (SIZE, SIZE), background)
    pen = ImageDraw.Draw(canvas)
    if shape == "circle":
        outline = _ellipse(SIZE / 2 + 2, SIZE / 2 - 1, 0.2 * SIZE)
    else:
        outline = _square(SIZE / 2 - 1, SIZE / 2 + 2, 0.2 * SIZE)
    pen.polygon(_wobbly(outline, rng, 0.8), fill=colour)
    grain = rng.normal(0, 5, (SIZE, SIZE, 1))
    array = np.clip(np.asarray(canvas.filter(ImageFilter.GaussianBlur(1.2)), dtype=np.float64) + grain, 0, 255)
    buffer = io.BytesIO()
    Image.fromarray(array.astype(np.uint8)).save(buffer, "JPEG", quality=80)
    return Image.open(buffer).convert("RGB")


EXAMPLES = [
    # (file, drawing, source, target, engine, blend, kind)
    ("drawn-red-circle.png", ("circle", (215, 45, 40), (246, 244, 240), 1),
     "a large red circle in the centre on a white background", "a large blue circle in the centre on a white background",
     "p2p", "circle circle", "colour"),
    ("drawn-red-circle-shape.png", ("circle", (225, 50, 45), (242, 242, 246), 2),
     "a large red circle in the centre on a white background", "a large red square in the centre on a white background",
     "masactrl", "", "shape"),
    ("drawn-green-square.png", ("square", (45, 165, 65), (244, 244, 244), 3),
     "a large green square in the centre on a white background", "a large green square in the centre on a black background",
     "p2p", "", "background"),
]


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    records = []
    for name, (shape, colour, background, seed), source, target, engine, blend, kind in EXAMPLES:
        draw(shape, colour, background, seed).save(OUT / name, optimize=True)
        records.append({"image": name, "source": source, "target": target, "engine": engine, "blend": blend,
                        "kind": kind})
    (OUT / "examples.json").write_text(json.dumps(records, indent=1) + "\n")


if __name__ == "__main__":
    main()
