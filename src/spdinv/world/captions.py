"""Caption grammar of the shapes world: varied phrasing, word order and synonyms.

A `Phrasing` fixes every free choice, so a source scene and its edited target get captions that
differ only in the edited words (what Prompt-to-Prompt needs).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .scene import BACKGROUNDS, COLOURS, MATERIALS, POSITIONS, SHAPES, SIZES, Scene, WorldObject

POSITION_PHRASES = {
    "left": ("on the left", "at the left", "to the left"),
    "right": ("on the right", "at the right", "to the right"),
    "top": ("at the top", "on the top", "near the top"),
    "bottom": ("at the bottom", "on the bottom", "near the bottom"),
    "centre": ("in the centre", "in the middle", "at the center"),
}
SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
MATERIAL_WORDS = {"plain": ("",), "striped": ("striped",), "dotted": ("dotted",)}
TEMPLATES = (
    "{objects} on a {background} background",
    "a {background} background with {objects}",
    "{objects} , {background} background",
    "a picture of {objects} on a {background} background",
)
OBJECT_ORDERS = ("size-colour", "colour-size")


@dataclass(frozen=True)
class Phrasing:
    """Every free choice of a caption; `Phrasing.random(rng)` draws one."""

    template: int = 0
    position_variant: int = 0
    size_variant: int = 0
    object_order: str = "size-colour"

    @classmethod
    def random(cls, rng: random.Random) -> "Phrasing":
        return cls(
            template=rng.randrange(len(TEMPLATES)),
            position_variant=rng.randrange(3),
            size_variant=rng.randrange(2),
            object_order=rng.choice(OBJECT_ORDERS),
        )


def describe_object(obj: WorldObject, phrasing: Phrasing = Phrasing()) -> str:
    size = SIZE_WORDS[obj.size][phrasing.size_variant]
    words = [size, obj.colour] if phrasing.object_order == "size-colour" else [obj.colour, size]
    if obj.style == "outlined":
        words.insert(0, "outlined")
    words.append(MATERIAL_WORDS[obj.material][0])
    words.append(obj.shape)
    words.append(POSITION_PHRASES[obj.position][phrasing.position_variant])
    article = "an" if words[0][0] in "aeiou" else "a"
    return " ".join([article] + [w for w in words if w])


def describe_placeholder(obj: WorldObject, word: str, phrasing: Phrasing = Phrasing()) -> str:
    """An object whose identity (colour, material, style, shape) a concept word stands for; size
    and position stay words: 'a large S on the left'."""
    size = SIZE_WORDS[obj.size][phrasing.size_variant]
    return f"a {size} {word} {POSITION_PHRASES[obj.position][phrasing.position_variant]}"


def background_phrase(scene: Scene) -> str:
    return scene.background if scene.background_kind == "plain" else f"{scene.background} grid"


def caption(scene: Scene, phrasing: Phrasing = Phrasing(), placeholders: dict[int, str] | None = None) -> str:
    """The caption of a scene under one phrasing, e.g. 'a large red star on the left on a blue background';
    `placeholders` (object index -> concept word) describe those objects by the word instead
    (`describe_placeholder`)."""
    placeholders = placeholders or {}
    objects = " and ".join(describe_placeholder(o, placeholders[i], phrasing) if i in placeholders
                           else describe_object(o, phrasing) for i, o in enumerate(scene.objects))
    return TEMPLATES[phrasing.template].format(objects=objects, background=background_phrase(scene))


def vocabulary() -> list[str]:
    """Every word any caption can contain (the tokenizer gives each its own token)."""
    words: set[str] = set()
    for group in (SHAPES, COLOURS, BACKGROUNDS, SIZES, MATERIALS):
        words.update(group)
    for phrases in (POSITION_PHRASES.values(), SIZE_WORDS.values(), MATERIAL_WORDS.values()):
        for variants in phrases:
            for phrase in variants:
                words.update(phrase.split())
    for template in TEMPLATES:
        words.update(w for w in template.replace("{objects}", "").replace("{background}", "").split())
    words.update(("a", "an", "and", "with", "outlined", "filled", "grid", "background", "of", "picture"))
    words.update(str(p) for p in POSITIONS)
    # words the CLI's users commonly try; they get whole tokens even though training rarely sees them
    words.update(("photo", "image", "the", "on", "in", "at", "one", "two", "three", "shape", "object"))
    return sorted(w for w in words if w and w.isalpha())
