"""Background edits with blend words that name the background (issue 27 C7), on images the world
renderer did not draw and on the world benchmark's background pairs.

    OMP_NUM_THREADS=1 python benchmarks/background_blend.py [--drawn 24] [--seed 27] [--world world-bg]
        [--limit 16 (0: all)] [--skip 0] [--steps 50] [--inversion ddim] [--configs none,before,after,max] [--json out.json]

Drawn: one PIL-drawn object (`spdinv.testing.hand_drawn_object`: a random shape and colour of the world's,
its own size, place, rotation, outline and shade) on a plain background whose colour is a shade of one of
the world's backgrounds (each channel moved by up to 20, so off the palette); "a large C S in the centre on
a B background" -> "... on a B2 background". World: the category-8 pairs of a `spdinv world export` folder
(`--world`), with the dataset's blend words ("background background") and with the words that differ.
Each image is inverted once; the edit is SPDInv's P2P with each LocalBlend setting:

- none: no blend words;
- before: the differing words with `blend_norm range` on every row (the behaviour before the fix);
- after: the same words, default settings (rows whose words name the background use P2P's max scaling);
- max: the same words, `blend_norm max` everywhere.

Scored by the shipped attribute classifier: right = the target scene read in full (background and the
object's shape, colour, size, material, style at its place); also background right and object kept
separately, and the LocalBlend mask's coverage.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

import torch

import spdinv.editing.p2p as p2p
from spdinv.bench.datasets import load_dataset
from spdinv.bench.metrics import scene_from_dict
from spdinv.editing import edit
from spdinv.images import conform_image
from spdinv.inversion import invert
from spdinv.model import load_model
from spdinv.testing import hand_drawn_object
from spdinv.world.classifier import compare, load_classifier, read_scenes
from spdinv.world.scene import BACKGROUNDS, COLOURS, SHAPES, Scene, WorldObject

CONFIGS = ("none", "before", "after", "max")


def differing_words(source: str, target: str) -> str:
    """'SOURCE_WORD TARGET_WORD': the first word pair that differs (what the demo used to suggest)."""
    pairs = [(a, b) for a, b in zip(source.split(), target.split()) if a != b]
    return " ".join(pairs[0]) if pairs else ""


def edit_once(model, inversion, source: str, target: str, blend: str, config: str, steps: int):
    options = {} if config == "none" else {"blend": blend}
    if config == "max":
        options["blend_norm"] = "max"
    patch = mock.patch.object(p2p, "names_background", lambda prompt, word: False) if config == "before" \
        else nullcontext()
    torch.manual_seed(0)
    with patch:
        return edit(model, None, source, target, inversion, "p2p", num_steps=steps, **options)


def score(classifier, result, scene: Scene) -> dict:
    reading = read_scenes(classifier, result.edited)[0]
    agree = compare(reading, scene)
    kept = all(agree[k] for k in ("shape", "colour", "size", "material", "style", "count"))
    coverage = float("nan") if result.mask is None else float(result.mask.mean())
    return {"right": float(agree["all"]), "background": float(agree["background"]), "object_kept": float(kept),
            "coverage": coverage}


def shade(rgb: tuple[int, int, int], rng: random.Random, spread: int = 20) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + rng.randint(-spread, spread))) for c in rgb)


def drawn_cases(n: int, seed: int = 27) -> list[tuple]:
    rng = random.Random(seed)
    cases = []
    for _ in range(n):
        shape, background = rng.choice(SHAPES), rng.choice(list(BACKGROUNDS))
        colour = rng.choice([c for c in COLOURS if c != background])
        new = rng.choice([b for b in BACKGROUNDS if b not in (background, colour)])
        image = hand_drawn_object(shape, COLOURS[colour], shade(BACKGROUNDS[background], rng), rng)
        source = f"a large {colour} {shape} in the centre on a {background} background"
        target = f"a large {colour} {shape} in the centre on a {new} background"
        truth = Scene((WorldObject(shape, colour, "centre"),), new)
        cases.append((f"drawn-{len(cases)}", image, source, target, [differing_words(source, target)], truth))
    return cases


def world_cases(folder: Path, limit: int, skip: int = 0) -> list[tuple]:
    items = [item for item in load_dataset(folder).items if item.category == "8"][skip:skip + limit if limit else None]
    cases = []
    for item in items:
        truth = scene_from_dict(item.ground_truth.target_scene)
        words = [w for w in (differing_words(item.source_prompt, item.target_prompt),
                             " ".join(item.blend_words)) if w]
        cases.append((item.id, item.load_image(), item.source_prompt, item.target_prompt, words, truth))
    return cases


def run(model, classifier, cases, steps: int, method: str, configs: tuple[str, ...], log: Path | None) -> list[dict]:
    rows = []
    for case_id, image, source, target, blends, truth in cases:
        inversion = invert(model, conform_image(image, model.image_size)[0], source, method, steps, progress=False)
        for blend in blends:
            for config in configs:
                if config == "none" and blend != blends[0]:
                    continue
                result = edit_once(model, inversion, source, target, blend, config, steps)
                rows.append({"id": case_id, "blend": "" if config == "none" else blend, "config": config,
                             **score(classifier, result, truth)})
                print(json.dumps(rows[-1]), flush=True)
                if log:
                    with log.open("a") as out:
                        out.write(json.dumps(rows[-1]) + "\n")
    return rows


def table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}\n\n| LocalBlend | blend words | n | right | background right | object kept | mask coverage % |")
    print("|---|---|---:|---:|---:|---:|---:|")
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        kind = "none" if row["config"] == "none" else ("dataset's" if row["blend"] == "background background"
                                                       else "differing")
        groups.setdefault((row["config"], kind), []).append(row)
    for (config, kind), rs in groups.items():
        coverage = [r["coverage"] for r in rs if r["coverage"] == r["coverage"]]
        cover = f"{100 * statistics.fmean(coverage):.1f}" if coverage else "-"
        print(f"| {config} | {kind} | {len(rs)} | {sum(r['right'] for r in rs):.0f} | "
              f"{sum(r['background'] for r in rs):.0f} | {sum(r['object_kept'] for r in rs):.0f} | {cover} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drawn", type=int, default=24)
    parser.add_argument("--world", type=Path, default=None)
    parser.add_argument("--limit", type=int, default=16)
    parser.add_argument("--skip", type=int, default=0, help="world pairs to skip first (to split a run)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--inversion", default="ddim")
    parser.add_argument("--seed", type=int, default=27, help="of the drawn images")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="LocalBlend settings to run, of " + ", ".join(CONFIGS))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--log", type=Path, default=None, help="append every row to this JSON-lines file as it is made")
    args = parser.parse_args(argv)
    configs = tuple(args.configs.split(","))
    torch.set_num_threads(1)
    model, classifier = load_model(), load_classifier()
    drawn = run(model, classifier, drawn_cases(args.drawn, args.seed), args.steps, args.inversion, configs, args.log)
    world = run(model, classifier, world_cases(args.world, args.limit, args.skip), args.steps, args.inversion, configs,
                args.log) if args.world else []
    table(f"Drawn background edits ({args.drawn} images, {args.inversion} inversion + P2P, {args.steps} steps)", drawn)
    if world:
        table(f"World background pairs ({args.world}, {args.inversion} inversion + P2P, {args.steps} steps)", world)
    if args.json:
        args.json.write_text(json.dumps({"drawn": drawn, "world": world}, indent=1))


if __name__ == "__main__":
    main()
