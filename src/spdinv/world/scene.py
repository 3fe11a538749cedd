"""The shapes world: a scene is a background plus 1-3 objects, each at its own position."""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

SHAPES = ("circle", "square", "triangle", "star", "heart", "hexagon")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
    "pink": (245, 130, 190),
    "cyan": (40, 200, 210),
}
BACKGROUNDS = {
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "brown": (120, 80, 50),
    "blue": (110, 150, 230),
    "green": (120, 190, 110),
}
BACKGROUND_KINDS = ("plain", "grid")
SIZES = ("small", "large")
MATERIALS = ("plain", "striped", "dotted")
STYLES = ("filled", "outlined")
# Object centres on the 64x64 canvas. The centre is only used by single-object scenes so
# that large objects never overlap.
POSITIONS = {
    "left": (15, 32),
    "right": (49, 32),
    "top": (32, 15),
    "bottom": (32, 49),
    "centre": (32, 32),
}
SIDE_POSITIONS = ("left", "right", "top", "bottom")
SIZE_RADIUS = {"small": 7.0, "large": 12.5}


@dataclass(frozen=True)
class WorldObject:
    shape: str
    colour: str
    position: str
    size: str = "large"
    material: str = "plain"
    style: str = "filled"

    def __post_init__(self) -> None:
        _check("shape", self.shape, SHAPES)
        _check("colour", self.colour, COLOURS)
        _check("position", self.position, POSITIONS)
        _check("size", self.size, SIZES)
        _check("material", self.material, MATERIALS)
        _check("style", self.style, STYLES)
        if self.style == "outlined" and self.material != "plain":
            raise ValueError("an outlined object has no material (use material='plain')")


@dataclass(frozen=True)
class Scene:
    objects: tuple[WorldObject, ...]
    background: str = "white"
    background_kind: str = "plain"

    def __post_init__(self) -> None:
        _check("background", self.background, BACKGROUNDS)
        _check("background kind", self.background_kind, BACKGROUND_KINDS)
        if not 1 <= len(self.objects) <= 3:
            raise ValueError(f"a scene holds 1 to 3 objects, got {len(self.objects)}")
        positions = [o.position for o in self.objects]
        if len(set(positions)) != len(positions):
            raise ValueError(f"two objects share a position: {positions}")
        if "centre" in positions and len(positions) > 1:
            raise ValueError("the centre position is only for single-object scenes")
        for obj in self.objects:
            if obj.colour == self.background:
                raise ValueError(f"a {obj.colour} object on a {self.background} background is invisible")

    def with_objects(self, objects: tuple[WorldObject, ...]) -> "Scene":
        return replace(self, objects=tuple(objects))


def _check(what: str, value: str, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(allowed)}")


def random_object(rng: random.Random, position: str, background: str) -> WorldObject:
    colour = rng.choice([c for c in COLOURS if c != background])
    style = "outlined" if rng.random() < 0.15 else "filled"
    material = "plain" if style == "outlined" else rng.choice(MATERIALS)
    return WorldObject(
        shape=rng.choice(SHAPES),
        colour=colour,
        position=position,
        size=rng.choice(SIZES),
        material=material,
        style=style,
    )


def random_scene(rng: random.Random, n_objects: int | None = None) -> Scene:
    """A scene drawn uniformly over the world's attributes (one object in 40% of scenes)."""
    if n_objects is None:
        n_objects = rng.choices((1, 2, 3), weights=(0.4, 0.35, 0.25))[0]
    background = rng.choice(list(BACKGROUNDS))
    kind = "grid" if rng.random() < 0.25 else "plain"
    if n_objects == 1:
        positions = [rng.choice(list(POSITIONS))]
    else:
        positions = rng.sample(SIDE_POSITIONS, n_objects)
    objects = tuple(random_object(rng, p, background) for p in positions)
    return Scene(objects=objects, background=background, background_kind=kind)
