"""Concept edit pairs with rendered ground truth, for customised editing (SPDInv with ELITE or textual
inversion): one concept object (shape, colour, material, style) in a source scene, the same object in
a changed context in the target. The object's identity words are replaced by a placeholder word, so
"a large red striped star in the centre on a blue background" becomes "a large S in the centre on a
blue background"; the word's embedding comes from the concept image (an encoder, or textual
inversion on the source image).

Every pair is tagged seen / held-out: whether the concept's attribute combination is one a concept
encoder was trained on (`is_held_out` decides: by default the concept encoder's own held-out
shape x colour pairs, `spdinv.world.concept_encoder.is_held_out`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
from PIL import Image, ImageFilter

from .captions import Phrasing, caption
from .render import render, render_array
from .scene import BACKGROUNDS, POSITIONS, SIDE_POSITIONS, SIZES, Scene, WorldObject, random_object

# the context changes a pair can make, in the order pairs cycle through them
CONCEPT_EDITS = ("background colour", "position", "size", "add object", "background kind")
IDENTITY = ("shape", "colour", "material", "style")  # what the placeholder word stands for

HeldOut = Callable[[WorldObject], bool]


def no_held_out(obj: WorldObject) -> bool:
    return False


def encoder_held_out(obj: WorldObject) -> bool:
    """The concept encoder's held-out attribute combinations."""
    from .concept_encoder import is_held_out

    return is_held_out(obj)


@dataclass(frozen=True)
class ConceptPair:
    """Source and target scenes; the concept is `source.objects[0]` and, with its context changed,
    `target.objects[0]` (same identity, possibly another size or position)."""

    id: str
    source: Scene
    target: Scene
    edit: str  # a CONCEPT_EDITS entry
    phrasing: Phrasing
    held_out: bool
    word: str = "S"

    @property
    def concept(self) -> WorldObject:
        return self.source.objects[0]

    @property
    def split(self) -> str:
        return "held-out" if self.held_out else "seen"

    @property
    def source_prompt(self) -> str:
        return concept_caption(self.source, self.phrasing, self.word)

    @property
    def target_prompt(self) -> str:
        return concept_caption(self.target, self.phrasing, self.word)

    @property
    def blend_words(self) -> str:
        """P2P LocalBlend words: the background for background edits, the placeholder where the
        concept itself moves or grows, none where an object is added (as the world's edit pairs)."""
        if self.edit in ("background colour", "background kind"):
            return "background background"
        if self.edit in ("position", "size"):
            return f"{self.word} {self.word}"
        return ""

    def images(self) -> tuple[Image.Image, Image.Image]:
        return render(self.source), render(self.target)

    def mask(self, dilation: int = 2) -> np.ndarray:
        """uint8 (64, 64): 1 where source and target renders differ, dilated by `dilation` pixels."""
        source, target = render_array(self.source), render_array(self.target)
        changed = (np.abs(source.astype(np.int16) - target.astype(np.int16)).max(axis=2) > 8).astype(np.uint8) * 255
        grown = Image.fromarray(changed).filter(ImageFilter.MaxFilter(2 * dilation + 1))
        return (np.asarray(grown) > 0).astype(np.uint8)


def concept_caption(scene: Scene, phrasing: Phrasing, word: str = "S") -> str:
    """The world caption of a scene whose first object is the concept, named by `word`:
    "a large S in the centre on a blue background"."""
    return caption(scene, phrasing, {0: word})


def _other(rng: random.Random, options, current):
    return rng.choice([o for o in options if o != current])


def change_context(source: Scene, edit: str, rng: random.Random) -> Scene:
    """The source with one context change; the concept keeps shape, colour, material and style."""
    concept = source.objects[0]
    if edit == "background colour":
        return replace(source, background=_other(rng, [b for b in BACKGROUNDS if b != concept.colour], source.background))
    if edit == "background kind":
        return replace(source, background_kind="grid" if source.background_kind == "plain" else "plain")
    if edit == "position":
        return source.with_objects((replace(concept, position=_other(rng, list(POSITIONS), concept.position)),))
    if edit == "size":
        return source.with_objects((replace(concept, size=_other(rng, SIZES, concept.size)),))
    if edit == "add object":
        free = [p for p in SIDE_POSITIONS if p != concept.position]
        added = random_object(rng, rng.choice(free), source.background)
        return source.with_objects((concept, added))
    raise ValueError(f"unknown concept edit {edit!r}; valid: {', '.join(CONCEPT_EDITS)}")


def random_concept(rng: random.Random, background: str, position: str,
                   wanted: Callable[[WorldObject], bool] = lambda obj: True) -> WorldObject:
    """A random object (the world's attribute distribution) that `wanted` accepts."""
    for _ in range(10_000):
        obj = random_object(rng, position, background)
        if wanted(obj):
            return obj
    raise ValueError("no concept object satisfies the held-out split at this background")


def make_concept_pair(rng: random.Random, edit: str, held_out: bool, is_held_out: HeldOut, index: int,
                      word: str = "S") -> ConceptPair:
    """One pair: a single-object source scene (the concept on a side for 'add object') and its
    context change; the concept drawn from the seen or held-out combinations as asked."""
    for _ in range(100):
        background = rng.choice(list(BACKGROUNDS))
        kind = "grid" if rng.random() < 0.25 else "plain"
        position = rng.choice(SIDE_POSITIONS if edit == "add object" else list(POSITIONS))
        try:
            concept = random_concept(rng, background, position, lambda obj: is_held_out(obj) == held_out)
        except ValueError:
            continue
        source = Scene(objects=(concept,), background=background, background_kind=kind)
        target = change_context(source, edit, rng)
        pair = ConceptPair(f"{index:03d}", source, target, edit, Phrasing.random(rng), held_out, word)
        if pair.source_prompt != pair.target_prompt and pair.mask().any():
            return pair
    raise ValueError(f"no {edit!r} pair found for the {'held-out' if held_out else 'seen'} split")


def concept_pairs(n: int, seed: int = 0, is_held_out: HeldOut = encoder_held_out, word: str = "S") -> list[ConceptPair]:
    """n pairs, deterministic from `seed`: edits cycle through CONCEPT_EDITS, and whole cycles
    alternate between seen and held-out concepts (all seen when `is_held_out` accepts nothing), so
    both splits hold every edit about equally often."""
    if n < 1:
        raise ValueError("n must be at least 1")
    rng = random.Random(seed)
    pairs = []
    for index in range(n):
        edit = CONCEPT_EDITS[index % len(CONCEPT_EDITS)]
        held_out = is_held_out is not no_held_out and (index // len(CONCEPT_EDITS)) % 2 == 1
        pairs.append(make_concept_pair(rng, edit, held_out, is_held_out, index, word))
    return pairs


def held_out_rule(spec: str) -> HeldOut:
    """A held-out set from text: alternatives separated by ',', each a conjunction of
    ATTRIBUTE=VALUE joined by '+', e.g. "shape=star+colour=purple,material=dotted+shape=heart".
    An empty spec holds nothing out; "encoder" is the concept encoder's set."""
    from .scene import COLOURS, MATERIALS, SHAPES, STYLES

    allowed = {"shape": SHAPES, "colour": tuple(COLOURS), "material": MATERIALS, "style": STYLES}
    if spec.strip() == "encoder":
        return encoder_held_out
    alternatives = []
    for alternative in filter(None, (a.strip() for a in spec.split(","))):
        conditions = []
        for condition in alternative.split("+"):
            attribute, _, value = condition.strip().partition("=")
            if attribute not in allowed or value not in allowed[attribute]:
                raise ValueError(f"bad held-out condition {condition!r}: expected ATTRIBUTE=VALUE with ATTRIBUTE one of "
                                 f"{', '.join(allowed)} and a value of the world")
            conditions.append((attribute, value))
        alternatives.append(tuple(conditions))
    if not alternatives:
        return no_held_out

    def is_held_out(obj: WorldObject) -> bool:
        return any(all(getattr(obj, a) == v for a, v in conditions) for conditions in alternatives)

    return is_held_out
