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

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from spdinv.images import to_tensor
from spdinv.testing import hand_drawn_object
from spdinv.world.concept_drawing import random_drawing
from spdinv.world.concept_encoder import (BACKGROUNDS, CONCEPT_BACKGROUND, concept_image, identities, is_held_out,
                                          load_concept_encoder, on_concept_background)
from spdinv.world.scene import COLOURS, SHAPES

sys.path.insert(0, str(Path(__file__).resolve().parent))
from concept_test_drawings import test_drawing  # noqa: E402

GRAY = np.array(BACKGROUNDS[CONCEPT_BACKGROUND])


def canonical(image: Image.Image, side: float = 26.0) -> Image.Image:
    """The object (pixels more than 24 per channel from gray, after the repaint) scaled to `side` px on its
    bounding box's long side and centred on gray."""
    image = on_concept_background(image)
    mask = np.abs(np.asarray(image).astype(int) - GRAY).max(2) > 24
    if not mask.any():
        return image
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    scale = side / max(x1 - x0, y1 - y0)
    w, h = max(1, round((x1 - x0) * scale)), max(1, round((y1 - y0) * scale))
    out = Image.new("RGB", (64, 64), tuple(int(c) for c in GRAY))
    out.paste(image.crop((x0, y0, x1, y1)).resize((w, h), Image.LANCZOS), (32 - w // 2, 32 - h // 2))
    return out


def cnn() -> nn.Module:
    def block(cin: int, cout: int, stride: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU())

    return nn.Sequential(block(3, 32, 2), block(32, 64, 2), block(64, 64, 1), block(64, 128, 2), block(128, 128, 1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, len(SHAPES)))


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
