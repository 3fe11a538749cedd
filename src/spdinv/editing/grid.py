"""A labelled side-by-side grid (one row per inversion x engine) drawn with PIL."""

from __future__ import annotations

import math
import textwrap

from PIL import Image, ImageDraw, ImageFont

PAD = 8
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
EMPTY = (235, 235, 235)
FRAME = (190, 190, 190)


def _font(size: int = 14) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _cell_size(images: list[Image.Image]) -> tuple[int, int]:
    """(width, height) of a cell, at the images' own aspect ratio: small images are enlarged by a
    whole factor (nearest neighbour keeps them crisp), large ones shrunk to 320 px on the long side."""
    width, height = max(image.size[0] for image in images), max(image.size[1] for image in images)
    long = max(width, height)
    if long < 192:
        factor = math.ceil(192 / long)
        return width * factor, height * factor
    scale = min(long, 320) / long
    return max(1, round(width * scale)), max(1, round(height * scale))


def _fit(image: Image.Image, cell: tuple[int, int]) -> Image.Image:
    if image.size == cell:
        return image
    upscale = all(c % s == 0 and c >= s for c, s in zip(cell, image.size))
    return image.resize(cell, Image.NEAREST if upscale else Image.LANCZOS)


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    chars = max(8, int(width / max(1.0, draw.textlength("n", font=font))))
    lines = []
    for part in text.splitlines() or [""]:
        lines += textwrap.wrap(part, chars) or [""]
    return lines


def labelled_grid(rows: list[tuple[str, list[Image.Image | None]]], columns: list[str],
                  title: list[str] = ()) -> Image.Image:
    """rows: (label, one image or None per column); columns: their titles; title: lines on top."""
    images = [image for _, cells in rows for image in cells if image is not None]
    (cell, cell_height), font = _cell_size(images), _font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_height = int(sum(probe.textbbox((0, 0), "Ag", font=font)[1::2]) * 0.8) + 4
    label_width = min(240, max(90, max(int(probe.textlength(label, font=font)) for label, _ in rows) + 2 * PAD))
    width = label_width + len(columns) * (cell + PAD) + PAD
    title_lines = [line for text in title for line in _wrap(probe, text, font, width - 2 * PAD)]
    top = PAD + len(title_lines) * line_height + (PAD if title_lines else 0)
    header = line_height + PAD // 2
    height = top + header + len(rows) * (cell_height + PAD) + PAD
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for n, line in enumerate(title_lines):
        draw.text((PAD, PAD + n * line_height), line, fill=INK, font=font)
    for c, name in enumerate(columns):
        x = label_width + c * (cell + PAD)
        draw.text((x + (cell - draw.textlength(name, font=font)) / 2, top), name, fill=INK, font=font)
    for r, (label, cells) in enumerate(rows):
        y = top + header + r * (cell_height + PAD)
        lines = _wrap(draw, label, font, label_width - PAD)
        for n, line in enumerate(lines):
            draw.text((PAD, y + (cell_height - len(lines) * line_height) / 2 + n * line_height), line, fill=INK,
                      font=font)
        for c, image in enumerate(cells):
            x = label_width + c * (cell + PAD)
            if image is None:
                draw.rectangle([x, y, x + cell - 1, y + cell_height - 1], fill=EMPTY)
            else:
                canvas.paste(_fit(image.convert("RGB"), (cell, cell_height)), (x, y))
            draw.rectangle([x - 1, y - 1, x + cell, y + cell_height], outline=FRAME)
    return canvas
