"""The demo's shipped examples: hand-drawn pictures (tools/draw_demo_examples.py, not the world
renderer) with their captions, one per edit kind (colour, shape, background)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "assets" / "demo-examples"


@dataclass(frozen=True)
class Example:
    image: Path
    source: str
    target: str
    engine: str
    blend: str
    kind: str


def load_examples(folder: Path = EXAMPLES_DIR) -> list[Example]:
    records = json.loads((folder / "examples.json").read_text())
    return [Example(**dict(record, image=folder / record["image"])) for record in records]


__all__ = ["EXAMPLES_DIR", "Example", "load_examples"]
