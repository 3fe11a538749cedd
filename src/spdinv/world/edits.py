"""Edit pairs with exact ground truth: a source scene, the same scene with one edit applied, the
captions of both under one phrasing, and the mask of pixels the edit changes.

Categories follow PIE-Bench's `editing_type_id`.
"""

from __future__ import annotations

import difflib
import random
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageFilter

from .captions import Phrasing, caption
from .render import render_array
from .scene import (BACKGROUNDS, COLOURS, MATERIALS, POSITIONS, SHAPES, SIDE_POSITIONS, SIZES, Scene, WorldObject,
                    random_object, random_scene)

CATEGORIES = {
    "0": "random",
    "1": "change object",
    "2": "add object",
    "3": "delete object",
    "4": "change content",
    "5": "change pose",
    "6": "change colour",
    "7": "change material",
    "8": "change background",
    "9": "change style",
}
# PIE-Bench's 700 images per category, the mix `export` reproduces at any size
PIE_BENCH_COUNTS = {"0": 140, "1": 80, "2": 80, "3": 80, "4": 40, "5": 40, "6": 40, "7": 40, "8": 80, "9": 80}


class EditNotApplicable(Exception):
    """This scene admits no edit of the requested kind (e.g. adding to a full scene)."""


@dataclass(frozen=True)
class EditPair:
    source: Scene
    target: Scene
    phrasing: Phrasing
    editing_type_id: str
    instruction: str
    blended_word: str

    @property
    def source_prompt(self) -> str:
        return caption(self.source, self.phrasing)

    @property
    def target_prompt(self) -> str:
        return caption(self.target, self.phrasing)

    @property
    def editing_prompt(self) -> str:
        """The target prompt with the edited words in [ ] (PIE-Bench markup)."""
        return bracket_changes(self.source_prompt, self.target_prompt)

    def images(self) -> tuple[np.ndarray, np.ndarray]:
        return render_array(self.source), render_array(self.target)

    def mask(self, dilation: int = 2) -> np.ndarray:
        """uint8 (64, 64): 1 where the edit changes a pixel, dilated by `dilation` pixels."""
        source, target = self.images()
        changed = (np.abs(source.astype(np.int16) - target.astype(np.int16)).max(axis=2) > 8).astype(np.uint8) * 255
        grown = Image.fromarray(changed).filter(ImageFilter.MaxFilter(2 * dilation + 1))
        return (np.asarray(grown) > 0).astype(np.uint8)


def blend_words(source: Scene, target: Scene) -> str:
    """PIE-Bench's blended_word, "source_word target_word": the nouns of the first object the edit
    changes, "background background" for a background-only edit, "" when objects come or go."""
    if len(source.objects) != len(target.objects):
        return ""
    for old, new in zip(source.objects, target.objects):
        if old != new:
            return f"{old.shape} {new.shape}"
    return "background background"


def bracket_changes(source: str, target: str) -> str:
    src, tgt = source.split(), target.split()
    out = []
    for op, _, _, j1, j2 in difflib.SequenceMatcher(a=src, b=tgt, autojunk=False).get_opcodes():
        words = tgt[j1:j2]
        if op == "equal":
            out.extend(words)
        elif words:
            out.append("[" + " ".join(words) + "]")
    return " ".join(out)


def _pick(rng: random.Random, options, exclude=()):
    options = [o for o in options if o not in exclude]
    if not options:
        raise EditNotApplicable("no alternative value")
    return rng.choice(options)


def _replace_object(scene: Scene, index: int, obj: WorldObject) -> Scene:
    objects = list(scene.objects)
    objects[index] = obj
    return scene.with_objects(tuple(objects))


def _change_object(scene, rng):
    i = rng.randrange(len(scene.objects))
    old = scene.objects[i]
    new = replace(old, shape=_pick(rng, SHAPES, (old.shape,)))
    return _replace_object(scene, i, new), f"change the {old.shape} to {_article(new.shape)} {new.shape}"


def _add_object(scene, rng):
    if len(scene.objects) == 3:
        raise EditNotApplicable("scene is full")
    if scene.objects[0].position == "centre":
        raise EditNotApplicable("a centred object leaves no free side")
    free = [p for p in SIDE_POSITIONS if p not in {o.position for o in scene.objects}]
    obj = random_object(rng, rng.choice(free), scene.background)
    return scene.with_objects(scene.objects + (obj,)), f"add {_article(obj.colour)} {obj.colour} {obj.shape} {_where(obj)}"


def _delete_object(scene, rng):
    if len(scene.objects) == 1:
        raise EditNotApplicable("one object left")
    i = rng.randrange(len(scene.objects))
    gone = scene.objects[i]
    return scene.with_objects(scene.objects[:i] + scene.objects[i + 1:]), f"remove the {gone.colour} {gone.shape}"


def _change_content(scene, rng):
    i = rng.randrange(len(scene.objects))
    old = scene.objects[i]
    new = replace(old, shape=_pick(rng, SHAPES, (old.shape,)),
                  colour=_pick(rng, COLOURS, (old.colour, scene.background)))
    return (_replace_object(scene, i, new), f"replace the {old.colour} {old.shape} with {_article(new.colour)} {new.colour} {new.shape}")


def _change_pose(scene, rng):
    i = rng.randrange(len(scene.objects))
    old = scene.objects[i]
    if rng.random() < 0.5:
        new = replace(old, size=_pick(rng, SIZES, (old.size,)))
        return _replace_object(scene, i, new), f"make the {old.shape} {new.size}"
    taken = {o.position for o in scene.objects}
    allowed = list(POSITIONS) if len(scene.objects) == 1 else SIDE_POSITIONS
    new = replace(old, position=_pick(rng, allowed, taken))
    return _replace_object(scene, i, new), f"move the {old.shape} {_where(new)}"


def _change_colour(scene, rng):
    i = rng.randrange(len(scene.objects))
    old = scene.objects[i]
    new = replace(old, colour=_pick(rng, COLOURS, (old.colour, scene.background)))
    return _replace_object(scene, i, new), f"make the {old.shape} {new.colour}"


def _change_material(scene, rng):
    filled = [i for i, o in enumerate(scene.objects) if o.style == "filled"]
    if not filled:
        raise EditNotApplicable("only outlined objects")
    i = rng.choice(filled)
    old = scene.objects[i]
    new = replace(old, material=_pick(rng, MATERIALS, (old.material,)))
    what = "plain" if new.material == "plain" else new.material
    return _replace_object(scene, i, new), f"make the {old.shape} {what}"


def _change_background(scene, rng):
    colours = {o.colour for o in scene.objects}
    if rng.random() < 0.3:
        kind = "plain" if scene.background_kind == "grid" else "grid"
        return replace(scene, background_kind=kind), f"make the background {kind}"
    new = _pick(rng, BACKGROUNDS, colours | {scene.background})
    return replace(scene, background=new), f"make the background {new}"


def _change_style(scene, rng):
    i = rng.randrange(len(scene.objects))
    old = scene.objects[i]
    style = "filled" if old.style == "outlined" else "outlined"
    new = replace(old, style=style, material="plain")
    return _replace_object(scene, i, new), f"make the {old.shape} {style}"


EDITS = {"1": _change_object, "2": _add_object, "3": _delete_object, "4": _change_content, "5": _change_pose,
         "6": _change_colour, "7": _change_material, "8": _change_background, "9": _change_style}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _where(obj: WorldObject) -> str:
    return {"centre": "to the centre", "left": "to the left", "right": "to the right", "top": "to the top",
            "bottom": "to the bottom"}[obj.position]


def _random_edit(scene, rng):
    """Two or three edits of different kinds applied one after another."""
    kinds = rng.sample(["1", "5", "6", "7", "8", "9"], rng.choice((2, 3)))
    instructions = []
    for kind in kinds:
        try:
            scene, instruction = EDITS[kind](scene, rng)
        except EditNotApplicable:
            continue
        instructions.append(instruction)
    if len(instructions) < 2:
        raise EditNotApplicable("fewer than two edits applied")
    return scene, " and ".join(instructions)


def make_edit(rng: random.Random, editing_type_id: str, max_tries: int = 50) -> EditPair:
    """A random scene and an edit of the given category (retrying scenes the edit does not fit)."""
    if editing_type_id not in CATEGORIES:
        raise ValueError(f"unknown editing_type_id {editing_type_id!r}; valid: {', '.join(CATEGORIES)}")
    edit_fn = _random_edit if editing_type_id == "0" else EDITS[editing_type_id]
    for _ in range(max_tries):
        source = random_scene(rng)
        try:
            target, instruction = edit_fn(source, rng)
        except (EditNotApplicable, ValueError):
            continue
        if target == source:
            continue
        pair = EditPair(source, target, Phrasing.random(rng), editing_type_id, instruction, blend_words(source, target))
        if pair.source_prompt == pair.target_prompt or not pair.mask().any():
            continue  # invisible edit
        return pair
    raise RuntimeError(f"no edit of type {editing_type_id} found in {max_tries} scenes")


def category_counts(n: int) -> dict[str, int]:
    """Split n edits over the categories in PIE-Bench's proportions (largest remainder)."""
    total = sum(PIE_BENCH_COUNTS.values())
    exact = {k: n * v / total for k, v in PIE_BENCH_COUNTS.items()}
    counts = {k: int(v) for k, v in exact.items()}
    for k in sorted(exact, key=lambda k: exact[k] - counts[k], reverse=True)[: n - sum(counts.values())]:
        counts[k] += 1
    return counts
