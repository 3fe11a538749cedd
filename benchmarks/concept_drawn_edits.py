"""Customised editing of images the world renderer did not draw (numbers go to docs/model-card.md,
"Concept encoder").

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/concept_drawn_edits.py [--n 24] [--steps 50]

For `--n` plain filled objects (seeded draws over every shape x colour), PIL draws the object
(`spdinv.testing.hand_drawn_object`: its own geometry, size, offset, rotation and shade) twice: on the
world's gray, the concept encoder's convention, and on a plain background B, the image edited. The
edit changes the background: "a large S in the centre on a B background" -> "... on a B2 background"
(B, B2 world backgrounds, neither the object's colour), P2P without LocalBlend (a background change
is the whole frame; LocalBlend on "blue black" or "background" keeps the old background here), `--steps`
DDIM steps, guidance 7.5. Rows:
- encoder S from the gray drawing, SPDInv (`anderson`) + P2P and DDIM + P2P;
- encoder S from the edited image itself (what `spdinv edit --concept-encoder` does without
  `--concept-image`), SPDInv (`anderson`) + P2P;
- the object's words instead of S ("a large red star ..."), SPDInv (`anderson`) + P2P: the reference.
The attribute classifier reads each edit: the object's shape and colour at the centre (or the only object
read), the background (B2), and all three. It also reads the drawings themselves, as a check of the judge
on drawn shapes.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from spdinv.editing import edit
from spdinv.images import to_tensor
from spdinv.model import load_model
from spdinv.testing import hand_drawn_object
from spdinv.world.classifier import load_classifier, read_scenes
from spdinv.world.concept_encoder import CONCEPT_BACKGROUND, identities, load_concept_encoder
from spdinv.world.scene import BACKGROUNDS, COLOURS

WORD = "S"


def read(classifier, pixels: torch.Tensor, shape: str, colour: str, background: str) -> dict[str, bool]:
    """What the classifier reads of one image (1, 3, 64, 64) in [-1, 1], against the truth."""
    reading = read_scenes(classifier, pixels)[0]
    found = reading.objects.get("centre")
    if found is None and len(reading.objects) == 1:
        found = next(iter(reading.objects.values()))
    flags = {"shape": found is not None and found["shape"] == shape,
             "colour": found is not None and found["colour"] == colour,
             "background": reading.background == background}
    flags["all"] = all(flags.values())
    return flags


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=24)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--encoder", default=None, help="concept encoder .safetensors (default: the shipped one)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.time()
    model, classifier, encoder = load_model(), load_classifier(), load_concept_encoder(args.encoder)
    rng = random.Random(args.seed)
    filled = [o for o in identities() if o.material == "plain" and o.style == "filled"]
    rows: dict[str, list[dict[str, bool]]] = {}

    def add(name: str, flags: dict[str, bool]) -> None:
        rows.setdefault(name, []).append(flags)

    for _ in range(args.n):
        obj = rng.choice(filled)
        source_bg, target_bg = rng.sample([b for b in BACKGROUNDS if b not in (obj.colour, CONCEPT_BACKGROUND)], 2)
        drawing = random.Random(rng.random())  # the same geometry and shade on both backgrounds
        state = drawing.getstate()
        on_gray = hand_drawn_object(obj.shape, COLOURS[obj.colour], BACKGROUNDS[CONCEPT_BACKGROUND], drawing)
        drawing.setstate(state)
        image = hand_drawn_object(obj.shape, COLOURS[obj.colour], BACKGROUNDS[source_bg], drawing)
        add("judge reads the drawing", read(classifier, to_tensor(image), obj.shape, obj.colour, source_bg))
        source = f"a large {WORD} in the centre on a {source_bg} background"
        target = f"a large {WORD} in the centre on a {target_bg} background"
        words = f"{obj.colour} {obj.shape}"
        from_gray = encoder.encode(on_gray, WORD)
        cases = {
            "encoder S (gray drawing), SPDInv anderson + P2P": (from_gray, "spdinv", source, target),
            "encoder S (gray drawing), DDIM + P2P": (from_gray, "ddim", source, target),
            "encoder S (the edited image), SPDInv anderson + P2P": (encoder.encode(image, WORD), "spdinv", source,
                                                                    target),
            "object's words, SPDInv anderson + P2P": (None, "spdinv", source.replace(WORD, words),
                                                      target.replace(WORD, words)),
        }
        for name, (concept, inversion, source_prompt, target_prompt) in cases.items():
            concept_model = model if concept is None else model.with_concept(concept)
            options = {"solver": "anderson"} if inversion == "spdinv" else {}
            result = edit(concept_model, image, source_prompt, target_prompt, inversion=inversion, engine="p2p",
                          num_steps=args.steps, seed=args.seed, **options)
            add(name, read(classifier, result.edited.float().cpu(), obj.shape, obj.colour, target_bg))
    summary = {name: {k: round(100 * sum(f[k] for f in flags) / len(flags), 1) for k in flags[0]} | {"n": len(flags)}
               for name, flags in rows.items()}
    for name, numbers in summary.items():
        print(f"{name}: {numbers}")
    print(f"{time.time() - started:.0f} s")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "percent": summary}, handle, indent=2)


if __name__ == "__main__":
    main()
