"""Is an object's shape in the concept encoder's features for images the world renderer did not draw?
(issue 26; numbers go to docs/model-card.md, "Concept encoder").

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/concept_shape_probe.py [--encoder PATH] [--n 96]

Linear probes (multinomial logistic regression, features standardised, L2 1e-3, LBFGS) from the encoder's
w0, all its words, and each ViT feature level (CLS and patch mean) to the object's shape, fitted on the
concept images of the training identities (world renders), tested on the held-out identities' renders and
on `--n` drawn objects of two families on the concept gray: `spdinv.testing.hand_drawn_object` and the
benchmark's own `concept_test_drawings.test_drawing`, the latter also drawn on another plain background and
passed through the encode path (`conform_image`, `on_concept_background`); and the encoder's own training
drawer (`spdinv.world.concept_drawing.random_drawing`, in-distribution for a `--drawn` run). Also: nearest world identity of
each drawing's w0 (cosine, over the 192 renders) has the right shape; the attribute classifier (the judge)
reads each drawing's shape; and the pixels the repaint leaves neither gray nor within 60 of the object's
colour (anti-aliased edges keep a halo of the old background).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch

from spdinv.images import conform_image, to_tensor
from spdinv.testing import hand_drawn_object
from spdinv.world.classifier import load_classifier, read_scenes, single_object
from spdinv.world.concept_encoder import (CONCEPT_BACKGROUND, IMAGE_SIZE, concept_image, identities, is_held_out,
                                          load_concept_encoder, on_concept_background)
from spdinv.world.concept_training import encoder_from_checkpoint
from spdinv.world.scene import BACKGROUNDS, COLOURS, SHAPES, WorldObject

sys.path.insert(0, str(Path(__file__).resolve().parent))
from concept_test_drawings import test_drawing  # noqa: E402


def features(encoder, images) -> dict[str, torch.Tensor]:
    """Per image: w0, all words, and each feature level pooled (CLS, patch mean)."""
    pixels = torch.cat([to_tensor(image) for image in images])
    with torch.no_grad():
        levels = encoder.features(pixels)
        words = encoder.mapper(levels)
    out = {"w0": words[:, 0], "all words": words.flatten(1)}
    names = ["last hidden state"] + [f"layer {k}" for k in encoder.config.feature_layers]
    for name, level in zip(names, levels):
        out[name] = torch.cat([level[:, 0], level[:, 1:].mean(1)], dim=1)
    return out


def fit_probe(x: torch.Tensor, y: torch.Tensor, classes: int):
    mean, std = x.mean(0), x.std(0) + 1e-6
    linear = torch.nn.Linear(x.shape[1], classes)
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear((x - mean) / std), y) + 1e-3 * linear.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return lambda z: linear((z - mean) / std).argmax(1)


def drawn_sets(n: int, seed: int) -> dict[str, tuple[list, list[str]]]:
    """Drawings of plain filled objects: (images, shapes) per family and background."""
    rng = random.Random(seed)
    gray = BACKGROUNDS[CONCEPT_BACKGROUND]
    picks = [(rng.choice(SHAPES), rng.choice(list(COLOURS))) for _ in range(n)]
    sets = {"hand_drawn_object on gray": [hand_drawn_object(s, COLOURS[c], gray, rng) for s, c in picks],
            "test family on gray": [test_drawing(s, COLOURS[c], gray, rng) for s, c in picks]}
    repainted, halos = [], []
    for shape, colour in picks:
        background = rng.choice([b for b in BACKGROUNDS if b != CONCEPT_BACKGROUND])
        image = on_concept_background(conform_image(test_drawing(shape, COLOURS[colour], BACKGROUNDS[background],
                                                                 rng), IMAGE_SIZE)[0])
        pixels = np.asarray(image).astype(int)
        stray = ~(np.abs(pixels - gray).max(2) <= 2) & ~(np.abs(pixels - COLOURS[colour]).max(2) <= 60)
        halos.append(int(stray.sum()))
        repainted.append(image)
    sets["test family on another background, repainted"] = repainted
    from spdinv.world.concept_drawing import random_drawing  # the training drawer: in-distribution for --drawn runs

    sets["training drawer"] = [random_drawing(WorldObject(s, c, "centre"), rng) for s, c in picks]
    return {name: (images, [s for s, _ in picks]) for name, images in sets.items()} | {"halo": halos}


def judge_shape(classifier, images, shapes) -> float:
    readings = read_scenes(classifier, torch.cat([to_tensor(i) for i in images]))
    right = 0
    for reading, shape in zip(readings, shapes):
        found = single_object(reading)
        right += found is not None and found["shape"] == shape
    return right / len(shapes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default=None, help=".safetensors (default: the shipped one) or checkpoint.pt")
    parser.add_argument("--n", type=int, default=96, help="drawn objects per family")
    parser.add_argument("--canonical", action="store_true",
                        help="every image (training renders included) first put in the canonical frame of "
                             "concept_shape_learnability.canonical (object's box scaled to 26 px and centred)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    encoder = (encoder_from_checkpoint(args.encoder) if args.encoder and args.encoder.endswith(".pt")
               else load_concept_encoder(args.encoder))
    everything = identities()
    train = [o for o in everything if not is_held_out(o)]
    held = [o for o in everything if is_held_out(o)]
    sets = {"held-out renders": ([concept_image(o) for o in held], [o.shape for o in held])}
    drawn = drawn_sets(args.n, args.seed)
    halos = drawn.pop("halo")
    sets.update(drawn)
    train_images, all_images = [concept_image(o) for o in train], [concept_image(o) for o in everything]
    labels = torch.tensor([SHAPES.index(o.shape) for o in train])
    if args.canonical:
        from concept_shape_learnability import canonical

        sets = {name: ([canonical(i) for i in images], shapes) for name, (images, shapes) in sets.items()}
        train_images, all_images = [canonical(i) for i in train_images], [canonical(i) for i in all_images]
    train_features = features(encoder, train_images)
    all_w0 = features(encoder, all_images)["w0"]
    results: dict = {"probe": {}, "nearest identity by w0": {}, "judge reads the input": {}}
    for level, x in train_features.items():
        probe = fit_probe(x, labels, len(SHAPES))
        results["probe"][level] = {"training renders": round(100 * float((probe(x) == labels).float().mean()), 1)}
        for name, (images, shapes) in sets.items():
            truth = torch.tensor([SHAPES.index(s) for s in shapes])
            predicted = probe(features(encoder, images)[level])
            results["probe"][level][name] = round(100 * float((predicted == truth).float().mean()), 1)
    unit = torch.nn.functional.normalize(all_w0, dim=1)
    for name, (images, shapes) in sets.items():
        w0 = torch.nn.functional.normalize(features(encoder, images)["w0"], dim=1)
        nearest = (w0 @ unit.T).argmax(1)
        if name == "held-out renders":  # itself excluded: nearest other identity
            nearest = (w0 @ unit.T - 2 * torch.stack([(unit @ v).ge(0.9999) for v in w0]).float()).argmax(1)
        results["nearest identity by w0"][name] = round(
            100 * sum(everything[int(k)].shape == s for k, s in zip(nearest, shapes)) / len(shapes), 1)
        results["judge reads the input"][name] = round(100 * judge_shape(load_classifier(), images, shapes), 1)
    results["repaint: stray pixels per image (mean, max)"] = [round(float(np.mean(halos)), 1), int(max(halos))]
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
