"""How fast can an image network learn the shape of drawn objects from the concept encoder's randomised
training drawings (issue 26)? Numbers go to docs/model-card.md, "Concept encoder".

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/concept_shape_learnability.py --net vit --steps 200
    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/concept_shape_learnability.py --net cnn --canonical \
        --steps 1500

A pool of 4,000 drawings of training identities (`spdinv.world.concept_drawing.random_drawing`; 3,500 to train,
500 to validate), and 96 objects of each test family (`spdinv.testing.hand_drawn_object` and
`concept_test_drawings.test_drawing`, never trained on). Shape classification with cross-entropy, AdamW:
- `--net vit`: the shipped concept encoder's ViT (all of it trained) and a new linear head on its last
  features (CLS and patch mean), batches of 64 drawings, learning rate 5e-4;
- `--net cnn`: a small CNN from scratch (3x3 convolutions with strides 2, 2, 1, 2, 1, widths 32-128, GroupNorm,
  SiLU, global average pooling; 0.28 M parameters), batches of 48 drawings and 16 world renders of training
  identities, learning rate 2e-3.
`--canonical`: every image is first put in a canonical frame (`canonical`: the plain background repainted gray,
the object's bounding box scaled to 26 px on its long side and centred). Accuracy every 50 steps: the
validation drawings, the held-out identities' renders, and the two test families.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from spdinv.images import to_tensor
from spdinv.testing import hand_drawn_object
from spdinv.world.concept_drawing import random_drawing
from spdinv.world.concept_encoder import concept_image, identities, is_held_out, load_concept_encoder
from spdinv.world.scene import COLOURS, SHAPES
from spdinv.world.shape_reader import GRAY, ShapeReader, canonical

sys.path.insert(0, str(Path(__file__).resolve().parent))
from concept_test_drawings import test_drawing  # noqa: E402

def cnn() -> nn.Module:
    """The shipped shape reader's network (`spdinv.world.shape_reader.ShapeReader`), untrained."""
    return ShapeReader()


def vit() -> tuple[nn.Module, list]:
    encoder = load_concept_encoder().requires_grad_(True)
    head = nn.Linear(2 * encoder.config.width, len(SHAPES))

    class Reader(nn.Module):
        def forward(self, pixels):
            last = encoder.features(pixels)[0]
            return head(torch.cat([last[:, 0], last[:, 1:].mean(1)], 1))

    return Reader(), [*encoder.vision.parameters(), *head.parameters()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--net", choices=("vit", "cnn"), required=True)
    parser.add_argument("--canonical", action="store_true")
    parser.add_argument("--steps", type=int, default=600)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    frame = canonical if args.canonical else (lambda image: image)
    rng = random.Random(0)
    train = [o for o in identities() if not is_held_out(o)]
    held = [o for o in identities() if is_held_out(o)]
    started = time.process_time()
    pool_objects = [rng.choice(train) for _ in range(4000)]
    pool = torch.cat([to_tensor(frame(random_drawing(o, rng))) for o in pool_objects])
    labels = torch.tensor([SHAPES.index(o.shape) for o in pool_objects])
    renders = torch.cat([to_tensor(frame(concept_image(o))) for o in train])
    render_labels = torch.tensor([SHAPES.index(o.shape) for o in train])
    checks = {"held-out renders": (torch.cat([to_tensor(frame(concept_image(o))) for o in held]),
                                   torch.tensor([SHAPES.index(o.shape) for o in held]))}
    picks = [(rng.choice(SHAPES), rng.choice(list(COLOURS))) for _ in range(96)]
    truth = torch.tensor([SHAPES.index(s) for s, _ in picks])
    gray = tuple(int(c) for c in GRAY)
    checks["hand_drawn_object"] = (torch.cat([to_tensor(frame(hand_drawn_object(s, COLOURS[c], gray, rng)))
                                              for s, c in picks]), truth)
    checks["test family"] = (torch.cat([to_tensor(frame(test_drawing(s, COLOURS[c], gray, rng))) for s, c in picks]),
                             truth)
    checks = {"validation drawings": (pool[3500:], labels[3500:]), **checks}
    net, parameters = (vit() if args.net == "vit" else (lambda n: (n, list(n.parameters())))(cnn()))
    optimizer = torch.optim.AdamW(parameters, lr=5e-4 if args.net == "vit" else 2e-3, weight_decay=0.01)
    for step in range(args.steps):
        if args.net == "vit":
            index = torch.randint(0, 3500, (64,))
            pixels, target = pool[index], labels[index]
        else:
            index, rendered = torch.randint(0, 3500, (48,)), torch.randint(0, len(train), (16,))
            pixels, target = torch.cat([pool[index], renders[rendered]]), torch.cat([labels[index], render_labels[rendered]])
        loss = F.cross_entropy(net(pixels), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if (step + 1) % 50 == 0:
            with torch.no_grad():
                right = {name: round(100 * float((net(x).argmax(1) == y).float().mean()), 1) for name, (x, y) in checks.items()}
            print(step + 1, f"loss {float(loss):.3f}", right, f"{time.process_time() - started:.0f} CPU s", flush=True)


if __name__ == "__main__":
    main()
