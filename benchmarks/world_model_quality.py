"""Quality gates of the embedded shapes-world model (numbers go to docs/model-card.md).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/world_model_quality.py [--model DIR] [--json out.json]
        [--parts classifier,vae,generation,inversion] [--device cuda]

Measures on scenes that are not in the training set (seed 0's 20000 scenes are excluded):
attribute-classifier accuracy, VAE reconstruction PSNR, generation accuracy (50 DDIM steps,
guidance 7.5, stock diffusers StableDiffusionPipeline) for one- and two-object captions (shape,
colour, shape bound to its colour, background, object count: wherever the objects are; and
`position`: everything right at the captioned positions), and
DDIM / SPDInv inversion + reconstruction PSNR.

A StableDiffusion3Pipeline folder (`--model shapes-world-flow` or its path) is measured the same way with
the stock StableDiffusion3Pipeline at its defaults (28 flow-matching Euler steps, guidance 7.0).
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import time
from pathlib import Path

import numpy as np
import torch

import spdinv
from spdinv.images import arrays_to_tensor, psnr, to_tensor
from spdinv.inversion import invert
from spdinv.model import load_model
from spdinv.inversion.reconstruction import reconstruct
from spdinv.world.captions import Phrasing, caption
from spdinv.world.classifier import compare, compare_unplaced, load_classifier, read_scenes
from spdinv.world.render import render, render_array
from spdinv.world.scene import random_scene
from spdinv.world.train import TrainConfig

ASSETS = Path(spdinv.__file__).resolve().parent / "assets"


@functools.cache
def training_scenes() -> frozenset:
    """The scenes the embedded model was trained on (TrainConfig's seed and count)."""
    config = TrainConfig()
    rng = random.Random(config.seed)
    return frozenset(random_scene(rng) for _ in range(config.n_scenes))


def held_out_scenes(n: int, seed: int, n_objects: int | None = None):
    training = training_scenes()
    rng = random.Random(seed)
    scenes = []
    while len(scenes) < n:
        scene = random_scene(rng, n_objects)
        if scene not in training:
            scenes.append(scene)
    return scenes


def accuracy(flags: list[dict], keys) -> dict[str, float]:
    return {k: float(np.mean([f[k] for f in flags])) for k in keys}


def classifier_accuracy(classifier, n: int) -> dict:
    scenes = held_out_scenes(n, seed=101)
    images = arrays_to_tensor(np.stack([render_array(s) for s in scenes]))
    flags = [compare(r, s) for r, s in zip(read_scenes(classifier, images), scenes)]
    return accuracy(flags, ("shape", "colour", "size", "material", "style", "background", "background_kind", "count", "all"))


def vae_psnr(model, n: int) -> float:
    scenes = held_out_scenes(n, seed=102)
    images = arrays_to_tensor(np.stack([render_array(s) for s in scenes]))
    images = images.to(model.device)
    values = [psnr(model.decode(model.encode_image(x[None])), x[None]) for x in images]
    return float(np.mean(values))


def is_flow_model(folder) -> bool:
    """A StableDiffusion3Pipeline folder (shapes-world-flow) rather than a StableDiffusionPipeline one."""
    index = json.loads((Path(folder) / "model_index.json").read_text())
    return index["_class_name"] == "StableDiffusion3Pipeline"


def stock_pipeline(folder, device: str):
    """The stock diffusers pipeline of the folder and its sampling settings (each pipeline's defaults for
    SD3: 28 steps, guidance 7.0; the UNet model's measured setting: 50 DDIM steps, guidance 7.5)."""
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline

    if is_flow_model(folder):  # T5 absent: SD3's documented way to load without it
        pipe = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None,
                                                        local_files_only=True)
        settings = {"num_inference_steps": 28, "guidance_scale": 7.0}
    else:
        pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
        settings = {"num_inference_steps": 50, "guidance_scale": 7.5}
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device), settings


def generation_accuracy(folder, classifier, n: int, n_objects: int, batch: int = 25, device: str = "cpu",
                        guidance: float | None = None) -> dict:
    pipe, settings = stock_pipeline(folder, device)
    if guidance is not None:
        settings["guidance_scale"] = guidance
    scenes = held_out_scenes(n, seed=200 + n_objects, n_objects=n_objects)
    rng = random.Random(7)
    prompts = [caption(s, Phrasing.random(rng)) for s in scenes]
    flags = []
    generator = torch.Generator().manual_seed(1234)
    for i in range(0, n, batch):
        out = pipe(prompts[i:i + batch], **settings, generator=generator, output_type="pt").images
        readings = read_scenes(classifier, out.cpu() * 2 - 1)
        flags += [compare_unplaced(r, s) for r, s in zip(readings, scenes[i:i + batch])]
    return accuracy(flags, ("shape", "colour", "bound", "background", "count", "position"))


def inversion_psnr(model, n: int, methods=("ddim", "spdinv")) -> dict:
    scenes = held_out_scenes(n, seed=103)
    out = {}
    for method in methods:
        values, seconds = [], []
        for scene in scenes:
            start = time.perf_counter()
            image = render(scene)
            inv = invert(model, image, caption(scene), method, 50, progress=False)
            seconds.append(time.perf_counter() - start)
            values.append(reconstruct(model, inv, to_tensor(image).to(model.device)).psnr)
        out[method] = {"psnr": float(np.mean(values)), "min_psnr": float(np.min(values)), "seconds": float(np.mean(seconds))}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--n-classifier", type=int, default=2000)
    parser.add_argument("--n-vae", type=int, default=200)
    parser.add_argument("--n-generate", type=int, default=200)
    parser.add_argument("--objects", default="1,2", help="generation: the object counts of the captions")
    parser.add_argument("--guidance", type=float, default=None, help="generation: instead of the pipeline's default")
    parser.add_argument("--n-invert", type=int, default=8)
    parser.add_argument("--json", default=None)
    parser.add_argument("--parts", default="classifier,vae,generation,inversion", help="which measurements to run")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    classifier = load_classifier()
    if parts <= {"classifier", "generation"}:  # no spdinv model needed: any stock folder, SD or SD3
        folder = Path(args.model) if args.model and Path(args.model).is_dir() else ASSETS / (args.model or "shapes-world")
        model = argparse.Namespace(name=str(folder))
    else:
        model = load_model(args.model, device=args.device)
    results = {}
    if "classifier" in parts:
        results["classifier_accuracy"] = classifier_accuracy(classifier, args.n_classifier)
        print("classifier", results["classifier_accuracy"], flush=True)
    if "vae" in parts:
        results["vae_psnr"] = vae_psnr(model, args.n_vae)
        print("vae psnr", results["vae_psnr"], flush=True)
    if "generation" in parts:
        for k in map(int, args.objects.split(",")):
            results[f"generation_{k}_object"] = generation_accuracy(model.name, classifier, args.n_generate, k,
                                                                    device=args.device, guidance=args.guidance)
            print(f"generation {k}-object", results[f"generation_{k}_object"], flush=True)
    if "inversion" in parts:
        results["inversion"] = inversion_psnr(model, args.n_invert)
        print("inversion", results["inversion"], flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
