"""What identity the shape reader's concept stands for (issue 26; numbers go to docs/model-card.md): no
generation, only which identity's render w0 `spdinv.world.shape_reader.read_identity` picks.

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/concept_reader_identity.py [--reader PATH] \
        [--n 192] [--json out.json]

Inputs: every identity's world concept render (192; the held-out shape x colour pairs' 32 apart), and `--n`
plain filled objects of each test family (`spdinv.testing.hand_drawn_object`, and this folder's
`concept_test_drawings.test_drawing`, code none of the project's drawing code shares), drawn on gray and, with
the same draws, on another plain world background (through the encode path's repaint). Per input, percent
right: the reader's shape, and the shape / colour / whole identity of the identity read, against the same
read with the encoder alone (the identity whose render's w0 is nearest to the image's w0). For renders also:
percent of inputs whose read concept equals the encoder's own w0 of the input (max abs difference < 1e-5: the
read identity is the input's, so the word is the same).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

from spdinv.world.concept_encoder import BACKGROUNDS, CONCEPT_BACKGROUND, concept_image, identities, is_held_out, \
    load_concept_encoder
from spdinv.world.scene import COLOURS
from spdinv.world.shape_reader import identity_words, load_shape_reader, read_identity
from spdinv.testing import hand_drawn_object

sys.path.insert(0, str(Path(__file__).resolve().parent))
from concept_test_drawings import test_drawing  # noqa: E402


def nearest_identity(encoder, image):
    objects, words = identity_words(encoder)
    seen = encoder.encode(image).vectors[0]
    return objects[int(torch.nn.functional.cosine_similarity(words, seen[None], dim=1).argmax())]


def score(encoder, reader, cases) -> dict[str, float]:
    """cases: (image, true identity) -> percent right per measure."""
    flags = []
    for image, truth in cases:
        read, word = read_identity(encoder, reader, image)
        alone = nearest_identity(encoder, image)
        flags.append({"reader shape": reader.read(image) == truth.shape, "read identity: shape": read.shape == truth.shape,
                      "read identity: colour": read.colour == truth.colour, "read identity: all": read == truth,
                      "encoder alone: shape": alone.shape == truth.shape, "encoder alone: colour": alone.colour == truth.colour,
                      "same word as the encoder's": float((word - encoder.encode(image).vectors[0]).abs().max()) < 1e-5})
    return {k: round(100 * sum(f[k] for f in flags) / len(flags), 1) for k in flags[0]} | {"n": len(flags)}


def drawn_cases(draw, n: int, rng: random.Random):
    """(on gray, on another plain background) cases of `n` plain filled identities drawn by `draw`."""
    filled = [o for o in identities() if o.material == "plain" and o.style == "filled"]
    gray, other = [], []
    for _ in range(n):
        obj = rng.choice(filled)
        background = rng.choice([b for b in BACKGROUNDS if b not in (obj.colour, CONCEPT_BACKGROUND)])
        drawing = random.Random(rng.random())
        state = drawing.getstate()
        gray.append((draw(obj.shape, COLOURS[obj.colour], BACKGROUNDS[CONCEPT_BACKGROUND], drawing), obj))
        drawing.setstate(state)
        other.append((draw(obj.shape, COLOURS[obj.colour], BACKGROUNDS[background], drawing), obj))
    return gray, other


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reader", default=None, help="shape reader .safetensors (default: the shipped one)")
    parser.add_argument("--n", type=int, default=192, help="objects per test family")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    encoder, reader = load_concept_encoder(), load_shape_reader(args.reader)
    everything = identities()
    results = {"renders (seen)": score(encoder, reader, [(concept_image(o), o) for o in everything if not is_held_out(o)]),
               "renders (held-out)": score(encoder, reader, [(concept_image(o), o) for o in everything if is_held_out(o)])}
    for family, draw in (("hand_drawn_object", hand_drawn_object), ("test family", test_drawing)):
        gray, other = drawn_cases(draw, args.n, random.Random(f"reader identity {family}"))
        results[f"{family} on gray"] = score(encoder, reader, gray)
        results[f"{family} on another background"] = score(encoder, reader, other)
    for name, numbers in results.items():
        print(f"{name}: {numbers}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
