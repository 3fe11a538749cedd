"""Train the shape reader (`spdinv.world.shape_reader`, issue 26) and log its accuracy as it trains.

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/train_shape_reader.py --steps 4000 \
        --out runs/shape-reader/reader.safetensors > runs/shape-reader/log.txt

Each step: 48 fresh drawings of training identities by the randomised training drawer
(`spdinv.world.concept_drawing.random_drawing`, a new draw every step, so no drawing is seen twice) and 16
world concept renders of training identities, all in the canonical frame (`shape_reader.canonical`);
shape cross-entropy, AdamW (learning rate `--learning-rate` after 100 warm-up steps, cosine to 0, weight
decay 0.01). Never trained on: the held-out shape x colour pairs' renders, `spdinv.testing.hand_drawn_object`
and `concept_test_drawings.test_drawing` (code none of the project's drawing code shares). Every
`--every` steps: percent right on 500 validation drawings (the training drawer, other seed), the 32 held-out
renders, and `--n` objects of each test family on gray; and a checkpoint at `--out` (float16 safetensors).
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from spdinv.images import to_tensor
from spdinv.testing import hand_drawn_object
from spdinv.world.concept_drawing import random_drawing
from spdinv.world.concept_encoder import concept_image, identities, is_held_out
from spdinv.world.scene import COLOURS, SHAPES
from spdinv.world.shape_reader import GRAY, ShapeReader, canonical, save_shape_reader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from concept_test_drawings import test_drawing  # noqa: E402

Checks = dict[str, tuple[Tensor, Tensor]]


def framed(images) -> Tensor:
    return torch.cat([to_tensor(canonical(image)) for image in images])


def test_families(n: int, rng: random.Random) -> Checks:
    """`hand_drawn_object` and the test family, n objects each (shape and colour drawn), on gray."""
    picks = [(rng.choice(SHAPES), rng.choice(list(COLOURS))) for _ in range(n)]
    truth = torch.tensor([SHAPES.index(s) for s, _ in picks])
    gray = tuple(int(c) for c in GRAY)
    return {"hand_drawn_object": (framed(hand_drawn_object(s, COLOURS[c], gray, rng) for s, c in picks), truth),
            "test family": (framed(test_drawing(s, COLOURS[c], gray, rng) for s, c in picks), truth)}


def checks(n: int) -> Checks:
    rng = random.Random(1)
    train = [o for o in identities() if not is_held_out(o)]
    held = [o for o in identities() if is_held_out(o)]
    validation = [rng.choice(train) for _ in range(500)]
    return {"validation drawings": (framed(random_drawing(o, rng) for o in validation),
                                    torch.tensor([SHAPES.index(o.shape) for o in validation])),
            "held-out renders": (framed(concept_image(o) for o in held), torch.tensor([SHAPES.index(o.shape) for o in held])),
            **test_families(n, random.Random(2))}


@torch.no_grad()
def accuracy(reader: ShapeReader, checks_: Checks) -> dict[str, float]:
    reader.eval()
    right = {name: round(100 * float((reader(x).argmax(1) == y).float().mean()), 1) for name, (x, y) in checks_.items()}
    reader.train()
    return right


def learning_rate(step: int, steps: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--n", type=int, default=192, help="objects of each test family measured")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rng = random.Random(0)
    train = [o for o in identities() if not is_held_out(o)]
    renders, render_labels = framed(concept_image(o) for o in train), torch.tensor([SHAPES.index(o.shape) for o in train])
    checks_ = checks(args.n)
    reader = ShapeReader()
    optimizer = torch.optim.AdamW(reader.parameters(), lr=args.learning_rate, weight_decay=0.01)
    started = time.process_time()
    for step in range(args.steps):
        drawn = [rng.choice(train) for _ in range(48)]
        rendered = torch.randint(0, len(train), (16,))
        pixels = torch.cat([framed(random_drawing(o, rng) for o in drawn), renders[rendered]])
        target = torch.cat([torch.tensor([SHAPES.index(o.shape) for o in drawn]), render_labels[rendered]])
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.learning_rate)
        loss = F.cross_entropy(reader(pixels), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if (step + 1) % args.every == 0 or step + 1 == args.steps:
            right = accuracy(reader, checks_)
            save_shape_reader(reader, args.out, {"step": step + 1, "accuracy": right, "learning_rate": args.learning_rate,
                                                 "steps": args.steps})
            print(step + 1, f"loss {loss.item():.3f}", right, f"{time.process_time() - started:.0f} CPU s", flush=True)


if __name__ == "__main__":
    main()
