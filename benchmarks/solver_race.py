"""A race of fixed-point solvers for SPDInv's inversion step, against DDIM and AIDI, in one process.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/solver_race.py [--n-images 12] [--steps 5,10,20,50]
        [--methods ddim,aidi,gradient,anderson,hybrid,polyak,newton_krylov] [--guidance 1]
        [--dtype float32] [--held-out] [--json out.json]

Images: shapes-world scenes (`random_scene(random.Random(seed))`, as benchmarks/inversion_cost.py
draws them) and, with --held-out, two images drawn here with PIL that the world renderer did not
draw. A method name that is a solver means SPDInv with that solver (`gradient` is the paper's
AdamW, lr 1e-3, K 25); every method stops at the same mean squared residual delta = 5e-6.
--guidance > 1 inverts under classifier-free guidance (the fixed point of the guided eps; each
evaluation then runs two UNet rows but counts as one network call); --dtype bfloat16 runs the
UNet in bf16 (the solvers still iterate in fp32).

Per method and step count: steps converged (final residual < delta), images with every step
converged, the same for the noisiest steps (timestep >= 700), mean and worst final residual,
latent reconstruction MSE, network calls, gradient calls, cost = network + 2 x gradient calls,
and the seconds of the solves (the residual checks of diagnostics are neither timed nor counted).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from spdinv.images import conform_image
from spdinv.inversion import invert
from spdinv.inversion.solvers import SOLVERS
from spdinv.model import DiffusionModel, load_model
from spdinv.world.captions import caption
from spdinv.world.render import render
from spdinv.world.scene import random_scene

DELTA = 5e-6
NOISY_TIMESTEP = 700
COLUMNS = ("converged_steps", "all_converged", "noisy_converged", "noise_error", "worst_residual", "latent_mse",
           "network_calls", "gradient_calls", "cost", "seconds")


@dataclass
class Sample:
    name: str
    image: Image.Image
    prompt: str


class GuidedModel:
    """The model with its eps under classifier-free guidance (against the empty prompt), so that an
    inversion's fixed point is that of the guided noise."""

    def __init__(self, model: DiffusionModel, guidance: float):
        self.model, self.guidance = model, guidance

    def __getattr__(self, name):
        return getattr(self.model, name)

    def eps(self, z, t, embedding, guidance_scale: float = 1.0, uncond_embedding=None):
        return self.model.eps(z, t, embedding, guidance_scale=self.guidance)


def held_out_samples(size: int) -> list[Sample]:
    """Two images the world renderer did not draw (PIL shapes, other proportions and colours)."""
    square = Image.new("RGB", (64, 64), (40, 60, 200))
    ImageDraw.Draw(square).rectangle([16, 16, 47, 47], fill=(255, 120, 200))
    ellipse = Image.new("RGB", (64, 64), (30, 110, 40))
    ImageDraw.Draw(ellipse).ellipse([4, 20, 36, 50], fill=(250, 220, 30))
    return [Sample("held-out square", conform_image(square, size)[0], "a large pink square in the centre on a blue background"),
            Sample("held-out ellipse", conform_image(ellipse, size)[0], "a yellow circle on the left on a green background")]


def world_samples(n: int, seed: int, size: int) -> list[Sample]:
    rng = random.Random(seed)
    scenes = [random_scene(rng) for _ in range(n)]
    return [Sample(f"world {i}", conform_image(render(s), size)[0], caption(s)) for i, s in enumerate(scenes)]


def method_and_options(name: str) -> tuple[str, dict]:
    return ("spdinv", {"solver": name}) if name in SOLVERS else (name, {})


def measure(model, sample: Sample, name: str, steps: int) -> dict:
    method, options = method_and_options(name)
    inversion = invert(model, sample.image, sample.prompt, method, steps, progress=False, **options)
    residuals = [s.residual_after for s in inversion.steps]
    noisy = [s.residual_after for s in inversion.steps if s.timestep >= NOISY_TIMESTEP]
    return {
        "converged_steps": sum(r < DELTA for r in residuals) / len(residuals),
        "all_converged": float(all(r < DELTA for r in residuals)),
        "noisy_converged": sum(r < DELTA for r in noisy) / len(noisy) if noisy else float("nan"),
        "noise_error": inversion.noise_error, "worst_residual": max(residuals),
        "latent_mse": inversion.reconstruction_error,
        "network_calls": inversion.network_calls, "gradient_calls": inversion.gradient_calls,
        "cost": inversion.network_calls + 2 * inversion.gradient_calls, "seconds": inversion.seconds,
        "iterations": [s.iterations for s in inversion.steps], "residuals": residuals,
        "warnings": [s.warning for s in inversion.steps if s.warning],
    }


def summarise(rows: list[dict]) -> dict:
    return {c: statistics.fmean(r[c] for r in rows) for c in COLUMNS}


def table(summary: dict[str, dict[str, dict]]) -> str:
    lines = ["| steps | method | steps converged % | images all converged % | noisiest steps converged % | "
             "mean residual | worst residual | latent MSE | network calls | gradient calls | cost | s / image |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for steps, methods in summary.items():
        for name, s in methods.items():
            lines.append(f"| {steps} | {name} | {100 * s['converged_steps']:.1f} | {100 * s['all_converged']:.0f} | "
                         f"{100 * s['noisy_converged']:.1f} | {s['noise_error']:.2e} | {s['worst_residual']:.2e} | "
                         f"{s['latent_mse']:.2e} | {s['network_calls']:.1f} | {s['gradient_calls']:.1f} | "
                         f"{s['cost']:.1f} | {s['seconds']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--n-images", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", default="5,10,20,50")
    parser.add_argument("--methods", default="ddim,aidi," + ",".join(SOLVERS))
    parser.add_argument("--guidance", type=float, default=1.0)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--held-out", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    model = load_model(args.model, dtype=args.dtype)
    samples = world_samples(args.n_images, args.seed, model.image_size)
    if args.held_out:
        samples += held_out_samples(model.image_size)
    if args.guidance != 1.0:
        model = GuidedModel(model, args.guidance)
    invert(model, samples[0].image, samples[0].prompt, "ddim", 2, diagnose=False, progress=False)  # warm-up
    step_counts = [int(s) for s in args.steps.split(",")]
    per_image: dict = {}
    summary: dict = {}
    for steps in step_counts:
        for name in args.methods.split(","):
            rows = [measure(model, sample, name, steps) for sample in samples]
            per_image.setdefault(str(steps), {})[name] = {s.name: r for s, r in zip(samples, rows)}
            summary.setdefault(steps, {})[name] = summarise(rows)
            print(f"{steps} steps, {name}: {summary[steps][name]['seconds']:.2f} s / image", file=sys.stderr, flush=True)
    print(f"{len(samples)} images ({args.n_images} world, seed {args.seed}{', 2 held-out' if args.held_out else ''}); "
          f"guidance {args.guidance}; UNet {args.dtype}; threads {torch.get_num_threads()}; delta {DELTA}\n")
    print(table(summary))
    if args.json:
        args.json.write_text(json.dumps({"settings": vars(args) | {"json": str(args.json)},
                                         "prompts": {s.name: s.prompt for s in samples},
                                         "summary": summary, "per_image": per_image}, indent=1))


if __name__ == "__main__":
    main()
