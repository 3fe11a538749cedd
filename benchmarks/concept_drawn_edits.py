"""Customised editing of images the world renderer did not draw (numbers go to docs/model-card.md,
"Concept encoder"; issue 26).

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/concept_drawn_edits.py [--n 24] [--steps 50] \
        [--encoder PATH] [--families hand,test] [--shape-reader shipped] [--rows "reader S (the edited image)"] \
        [--kinds background,position,size] [--cross-replace 0.8] [--self-replace 0.6] [--json out.json]

For `--n` plain filled objects per family (seeded draws over every shape x colour), an object is drawn twice
with the same geometry and shade: on the world's gray, the concept encoder's convention, and on a plain
background B, the image edited. Families: `hand` = `spdinv.testing.hand_drawn_object`, `test` = this folder's
`concept_test_drawings.test_drawing` (code none of the project's drawing code shares: other proportions,
gradients, outlines, anti-aliasing). The edit changes the background: "a large S in the centre on a B
background" -> "... on a B2 background" (B, B2 world backgrounds, neither gray nor the object's colour),
SPDInv (`anderson`) + P2P without LocalBlend, `--steps` DDIM steps, guidance 7.5. `--kinds` adds other edits of
the same drawings (background stays B): `position` "in the centre" -> "on the left/right/top/bottom" (a seeded
side per object), `size` "a large S" -> "a small S". Rows:
- encoder S from the edited image itself (what `spdinv edit --concept-encoder` does without `--concept-image`);
- encoder S from the gray drawing;
- the object's words instead of S ("a large red star ..."): the reference;
- with `--shape-reader`: reader S from the edited image (`spdinv.world.shape_reader.read_concept`, what
  `spdinv edit --concept-encoder` does with its default shape reader; issue 26).
`--rows` picks the rows run (the words always).
Per edit: the object's IoU with the source (object = pixels more than 40 per channel from the background:
the known B in the source, the median of the 2-pixel border in the edit), its colour (the palette colour
nearest the mean of the edit's object pixels, and the attribute classifier's reading), the classifier's
shape and new background (B2). The classifier also reads the drawings themselves, as a check of the judge.
Position and size edits move or shrink the object, so their `iou` is the shape kept: the IoU of the edit's and
the source's object masks each put in the shape reader's canonical frame (`shape_reader.canonical`), and
`edit happened` says the edit was made: the object's centroid moved >= MOVED_PX toward the target side, or its
area fell below SHRUNK_AREA of the source's (always 1 for background edits: see the judge's background).
The JSON holds results[family][kind][row].
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from spdinv.editing import edit
from spdinv.images import to_tensor
from spdinv.model import load_model
from spdinv.testing import hand_drawn_object
from spdinv.world.classifier import load_classifier, read_single_object
from spdinv.world.concept_encoder import CONCEPT_BACKGROUND, identities, load_concept_encoder
from spdinv.world.concept_training import encoder_from_checkpoint
from spdinv.world.captions import POSITION_PHRASES
from spdinv.world.scene import BACKGROUNDS, COLOURS, POSITIONS, SIDE_POSITIONS
from spdinv.world.shape_reader import GRAY, canonical, load_shape_reader, read_concept

sys.path.insert(0, str(Path(__file__).resolve().parent))
from concept_test_drawings import test_drawing  # noqa: E402

WORD = "S"
FAMILIES = {"hand": hand_drawn_object, "test": test_drawing}
PALETTE = np.array(list(COLOURS.values()))
KINDS = ("background", "position", "size")
MOVED_PX = 8.0  # a position edit happened: the centroid moved >= this toward the target side (the world's 17)
SHRUNK_AREA = 0.6  # a size edit happened: object area / source area below this (the world's small/large: 0.31)


def object_mask(pixels: np.ndarray, background: np.ndarray | None = None) -> np.ndarray:
    """(64, 64) bool: pixels more than 40 per channel from the background (given, or the border's median)."""
    if background is None:
        ring = np.concatenate([pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3), pixels[:, :2].reshape(-1, 3),
                               pixels[:, -2:].reshape(-1, 3)])
        background = np.median(ring, axis=0)
    return np.abs(pixels.astype(int) - background).max(axis=2) > 40


def canonical_mask(mask: np.ndarray) -> np.ndarray:
    """(64, 64) bool: a mask put in the shape reader's canonical frame (`shape_reader.canonical`: bounding box
    scaled to 26 px on its long side, centred), drawn white on gray and thresholded half-way back."""
    pixels = np.where(mask[..., None], 255, GRAY).astype(np.uint8)
    return np.abs(np.asarray(canonical(Image.fromarray(pixels))).astype(int) - GRAY).max(axis=2) > 63


def centroid(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean(), ys.mean()])


def change(kind: str, mask: np.ndarray, source_mask: np.ndarray, side: str) -> dict[str, float]:
    """What the edit changed: position: 'moved (px)', the centroid's shift toward `side`, and 'edit happened'
    when >= MOVED_PX; size: 'area ratio', object area / the source's, happened when < SHRUNK_AREA;
    background: nothing here (the judge's 'background' says whether it happened)."""
    if kind == "background":
        return {}
    if kind == "position":
        direction = np.subtract(POSITIONS[side], POSITIONS["centre"]) / 17.0  # unit vector toward the side
        moved = float((centroid(mask) - centroid(source_mask)) @ direction) if mask.any() else 0.0
        return {"moved (px)": moved, "edit happened": float(moved >= MOVED_PX)}
    ratio = float(mask.sum() / source_mask.sum())
    return {"area ratio": ratio, "edit happened": float(mask.any() and ratio < SHRUNK_AREA)}


def measure(classifier, edited: torch.Tensor, source_mask: np.ndarray, shape: str, colour: str,
            background: str, kind: str = "background", side: str = "left") -> dict[str, float]:
    """One edit (1, 3, 64, 64) in [-1, 1] against the source object's mask and the truth. `iou`: in place
    for background edits, of the two masks in the canonical frame (the shape kept) for position and size."""
    pixels = ((edited[0].permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().numpy().astype(np.uint8)
    mask = object_mask(pixels)
    ours, theirs = (mask, source_mask) if kind == "background" else (canonical_mask(mask), canonical_mask(source_mask))
    union = (ours | theirs).sum()
    mean = pixels[mask].mean(axis=0) if mask.any() else np.zeros(3)
    found, background_read = read_single_object(classifier, edited)
    return {"iou": float((ours & theirs).sum() / union) if union else 0.0,
            "colour (pixels)": float(mask.any() and list(COLOURS)[int(np.abs(PALETTE - mean).sum(1).argmin())] == colour),
            "colour (judge)": float(found is not None and found["colour"] == colour),
            "shape (judge)": float(found is not None and found["shape"] == shape),
            "background (judge)": float(background_read == background)} | change(kind, mask, source_mask, side)


def drawings(family: str, obj, source_bg: str, rng: random.Random):
    """The object drawn on gray and on `source_bg` with the same draws."""
    draw = FAMILIES[family]
    drawing = random.Random(rng.random())
    state = drawing.getstate()
    on_gray = draw(obj.shape, COLOURS[obj.colour], BACKGROUNDS[CONCEPT_BACKGROUND], drawing)
    drawing.setstate(state)
    return on_gray, draw(obj.shape, COLOURS[obj.colour], BACKGROUNDS[source_bg], drawing)


def p2p_options(args) -> dict[str, float]:
    """--cross-replace / --self-replace when given (else P2P's defaults, 0.8 / 0.6)."""
    return {k: v for k, v in (("cross_replace", args.cross_replace), ("self_replace", args.self_replace))
            if v is not None}


def prompts(kind: str, source_bg: str, target_bg: str, side: str) -> tuple[str, str]:
    """The edit's source and target prompts with the word S (the object's words replace it for the reference)."""
    source = f"a large {WORD} in the centre on a {source_bg} background"
    targets = {"background": source.replace(f"on a {source_bg}", f"on a {target_bg}"),
               "position": source.replace("in the centre", POSITION_PHRASES[side][0]),
               "size": source.replace("a large", "a small")}
    return source, targets[kind]


def run_family(family: str, args, model, classifier, encoder, reader) -> dict[str, dict[str, list[dict[str, float]]]]:
    """{kind: {row: per-edit measures}} for `args.n` objects of one family."""
    rng = random.Random(f"{args.seed} {family}")
    sides = random.Random(f"{args.seed} {family} sides")  # apart, so background-only runs draw as before
    filled = [o for o in identities() if o.material == "plain" and o.style == "filled"]
    rows: dict[str, dict[str, list[dict[str, float]]]] = {kind: {} for kind in args.kinds.split(",")}
    for _ in range(args.n):
        obj = rng.choice(filled)
        source_bg, target_bg = rng.sample([b for b in BACKGROUNDS if b not in (obj.colour, CONCEPT_BACKGROUND)], 2)
        side = sides.choice(SIDE_POSITIONS)
        on_gray, image = drawings(family, obj, source_bg, rng)
        source_mask = object_mask(np.asarray(image), np.array(BACKGROUNDS[source_bg]))
        words = f"{obj.colour} {obj.shape}"
        cases = {"encoder S (the edited image)": lambda: encoder.encode(image, WORD),
                 "encoder S (gray drawing)": lambda: encoder.encode(on_gray, WORD),
                 "reader S (the edited image)": lambda: read_concept(encoder, reader, image, WORD),
                 "object's words": lambda: None}
        concepts = {name: make() for name, make in cases.items()
                    if name in args.rows.split(";") or name == "object's words"}
        for kind, kind_rows in rows.items():
            kind_rows.setdefault("judge reads the drawing", []).append(
                measure(classifier, to_tensor(image), source_mask, obj.shape, obj.colour, source_bg))
            source, target = prompts(kind, source_bg, target_bg, side)
            for name, concept in concepts.items():
                source_prompt, target_prompt = ((source, target) if concept is not None else
                                                (source.replace(WORD, words), target.replace(WORD, words)))
                concept_model = model if concept is None else model.with_concept(concept)
                result = edit(concept_model, image, source_prompt, target_prompt, inversion="spdinv", engine="p2p",
                              num_steps=args.steps, seed=args.seed, solver="anderson", **p2p_options(args))
                kind_rows.setdefault(name, []).append(measure(
                    classifier, result.edited.float().cpu(), source_mask, obj.shape, obj.colour,
                    target_bg if kind == "background" else source_bg, kind, side))
    return rows


def summarise(rows: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    unscaled = ("iou", "moved (px)", "area ratio")  # means as they are; the rest are flags, in percent
    summary = {name: {k: round((1 if k in unscaled else 100) * sum(f[k] for f in flags) / len(flags),
                               3 if k in unscaled else 1) for k in flags[0]} | {"n": len(flags)}
               for name, flags in rows.items()}
    words = summary["object's words"]["iou"]
    for name in set(summary) - {"object's words", "judge reads the drawing"}:
        summary[name]["iou / words' iou"] = round(summary[name]["iou"] / words, 3) if words else None
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=24, help="objects per family")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--encoder", default=None, help=".safetensors (default: the shipped one) or checkpoint.pt")
    parser.add_argument("--families", default="hand,test", help="comma-separated: hand, test")
    parser.add_argument("--shape-reader", default=None,
                        help="also the row 'reader S (the edited image)': a shape reader .safetensors, or 'shipped'")
    parser.add_argument("--rows", default="encoder S (the edited image);encoder S (gray drawing);reader S (the edited image)",
                        help="which S rows to run (';'-separated; the words always run)")
    parser.add_argument("--kinds", default="background",
                        help="comma-separated edits: background, position (centre -> a side), size (large -> small)")
    parser.add_argument("--cross-replace", type=float, default=None, help="P2P's (default 0.8)")
    parser.add_argument("--self-replace", type=float, default=None, help="P2P's (default 0.6)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    reader = None if args.shape_reader is None else load_shape_reader(
        None if args.shape_reader == "shipped" else args.shape_reader)
    if reader is None:
        args.rows = args.rows.replace("reader S (the edited image)", "")
    torch.set_num_threads(1)
    started = time.time()
    model, classifier = load_model(), load_classifier()
    encoder = (encoder_from_checkpoint(args.encoder) if args.encoder and args.encoder.endswith(".pt")
               else load_concept_encoder(args.encoder))
    results = {}
    for family in args.families.split(","):
        rows = run_family(family, args, model, classifier, encoder, reader)
        results[family] = {kind: summarise(kind_rows) for kind, kind_rows in rows.items()}
        for kind, summary in results[family].items():
            for name, numbers in summary.items():
                print(f"{family} / {kind} / {name}: {numbers}", flush=True)
    print(f"{time.time() - started:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
