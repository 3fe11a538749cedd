"""Inversion on a rectified-flow model: SPDInv's solvers against plain (Euler) inversion and the
published flow inversions (RF-Solver, FireFlow, Uni-Inv), and whether the implicit step has one root.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/flow_inversion.py --model shapes-world-flow
        [--n-world 4] [--n-drawn 2] [--steps 4,8,15,28] [--methods ddim,rf_solver,fireflow,uni_inv,anderson,...]
        [--root-steps 8] [--root-images 2] [--json out.json]

Images: shapes-world scenes (`random_scene(random.Random(seed))`, rendered, captioned) and objects
drawn here with PIL (`testing.hand_drawn_object`: own geometry, shades and jitter; not the world
renderer's), each inverted under its caption at guidance 1. A method name that is an SPDInv solver
means `spdinv --solver NAME` at its defaults (delta 5e-6); NAME@DELTA sets its delta. Per method and step count, means over
images: the mean final fixed-point residual of the implicit Euler step, the % of steps whose
residual is below delta (SPDInv's stop), the network calls of the inversion, of its reconstruction
(the method's own sampler: Euler, RF-Solver's or FireFlow's) and their sum, gradient calls (JVPs /
backward passes), and the reconstruction PSNR against the input image (image space, [0, 1]) and
against the VAE round trip decode(z_0) (what the inversion alone loses).

Roots: on `--root-images` images at `--root-steps` steps, the first, middle and last inversion steps
(from the trajectory of the recommended solver; `--root-steps 4,8` for several step counts) are solved again from several starting points (the
explicit guess, z_{k-1}, the guess plus Gaussian noise of 0.5 and 2 times the latent's RMS, and pure
noise) with Anderson (K 80, delta 1e-10); converged roots (residual < 1e-8) are compared by RMS
distance (distinct when > 1e-2, a hundred times the distance a residual of 1e-8 can explain).
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from PIL import Image

from spdinv.images import conform_image, psnr, to_tensor
from spdinv.inversion import METHODS, Inversion, image_latent, make_options
from spdinv.inversion.base import fixed_point_map
from spdinv.inversion.reconstruction import reconstruct
from spdinv.inversion.solvers import SOLVERS
from spdinv.inversion.spdinv import SPDInvOptions, solve_fixed_point
from spdinv.model import DiffusionModel, load_model
from spdinv.testing import hand_drawn_object
from spdinv.world.captions import caption
from spdinv.world.render import render
from spdinv.world.scene import BACKGROUNDS, COLOURS, SHAPES, random_scene

RECOMMENDED = "anderson"
ROOT_TOLERANCE, DISTINCT = 1e-8, 1e-2
COLUMNS = ("noise_error", "converged", "calls", "sampling_calls", "total_calls", "gradient_calls", "psnr", "psnr_vae")


@dataclass
class Sample:
    name: str
    image: Image.Image
    prompt: str


def world_samples(n: int, seed: int, size: int) -> list[Sample]:
    rng = random.Random(seed)
    scenes = [random_scene(rng) for _ in range(n)]
    return [Sample(f"world {i}", conform_image(render(s), size)[0], caption(s)) for i, s in enumerate(scenes)]


def drawn_samples(n: int, seed: int, size: int) -> list[Sample]:
    """Objects drawn with PIL, large and centred, on a plain background of another colour."""
    rng = random.Random(seed + 1000)
    samples = []
    for i in range(n):
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        background = rng.choice([b for b in BACKGROUNDS if b != colour])
        image = hand_drawn_object(shape, COLOURS[colour], BACKGROUNDS[background], rng)
        samples.append(Sample(f"drawn {i}", conform_image(image, size)[0],
                              f"a large {colour} {shape} in the centre on a {background} background"))
    return samples


def method_and_options(name: str) -> tuple[str, dict]:
    """`anderson` = spdinv --solver anderson; `anderson@1e-8` the same with delta 1e-8; else a method."""
    solver, _, delta = name.partition("@")
    if solver not in SOLVERS:
        return name, {}
    return "spdinv", {"solver": solver, **({"delta": float(delta)} if delta else {})}


def run_method(model: DiffusionModel, sample: Sample, name: str, steps: int) -> Inversion:
    """`invert()` without its latent reconstruction error (the PSNR below samples back once)."""
    method, options = method_and_options(name)
    torch.manual_seed(0)
    opts = make_options(method, **options)
    z0 = image_latent(model, sample.image)
    return METHODS[method].function(model, z0, model.encode_prompt(sample.prompt),
                                    model.schedule(steps, tuple(z0.shape[-2:])), opts, diagnose=True, progress=False)


def sampling_calls(inversion: Inversion) -> int:
    """Network calls of sampling the inversion back: Euler 1 a step, RF-Solver 2, FireFlow N + 1."""
    n = inversion.schedule.num_steps
    return {"rf_solver": 2 * n, "fireflow": n + 1}.get(inversion.method, n)


def measure(model: DiffusionModel, sample: Sample, name: str, steps: int) -> tuple[dict, Inversion]:
    inversion = run_method(model, sample, name, steps)
    delta = SPDInvOptions().delta  # the default stop, for every method (a method's own delta may be tighter)
    residuals = [s.residual_after for s in inversion.steps]
    recon = reconstruct(model, inversion, to_tensor(sample.image))
    round_trip = model.decode(inversion.z_0)
    row = {"psnr_vae": psnr(recon.image, round_trip), "noise_error": inversion.noise_error, "converged": sum(r < delta for r in residuals) / len(residuals),
           "calls": inversion.network_calls, "sampling_calls": sampling_calls(inversion),
           "gradient_calls": inversion.gradient_calls, "psnr": recon.psnr, "residuals": residuals,
           "calls_per_step": [s.network_calls for s in inversion.steps]}
    row["total_calls"] = row["calls"] + row["sampling_calls"]
    return row, inversion


def starting_points(guess: Tensor, z_prev: Tensor, seed: int) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    rms = float(guess.pow(2).mean().sqrt())
    noise = [torch.randn(guess.shape, generator=generator).to(guess) for _ in range(3)]
    return {"guess": guess, "z_prev": z_prev, "guess+0.5 rms": guess + 0.5 * rms * noise[0],
            "guess+2 rms": guess + 2 * rms * noise[1], "noise": rms * noise[2]}


def roots_of_step(model: DiffusionModel, inversion: Inversion, k: int) -> dict:
    """Solve step k again from several starts; the converged roots' largest pairwise RMS distance."""
    schedule, z_prev = inversion.schedule, inversion.trajectory[k - 1 : k]
    f = fixed_point_map(model, schedule, k, z_prev, inversion.prompt_embedding)
    with torch.no_grad():
        guess = schedule.inverse_step(k, z_prev, model.eps(z_prev, schedule.guess_timestep(k), inversion.prompt_embedding))
    options = SPDInvOptions(solver="anderson", K=80, delta=1e-10)
    found = {}
    for start, point in starting_points(guess, z_prev, seed=k).items():
        result = solve_fixed_point(f, point, options)
        found[start] = (result.latent, result.residual_after)
    converged = {s: z for s, (z, r) in found.items() if r < ROOT_TOLERANCE}
    distances = [float((a - b).pow(2).mean().sqrt()) for a, b in itertools.combinations(converged.values(), 2)]
    return {"residuals": {s: r for s, (_, r) in found.items()}, "converged": sorted(converged),
            "max_distance": max(distances, default=0.0),
            "distinct": len(distinct_roots(list(converged.values())))}


def distinct_roots(roots: list[Tensor]) -> list[Tensor]:
    kept: list[Tensor] = []
    for root in roots:
        if all(float((root - other).pow(2).mean().sqrt()) > DISTINCT for other in kept):
            kept.append(root)
    return kept


def race_table(summary: dict) -> str:
    lines = ["| steps | images | method | mean residual | steps meeting delta % | inversion calls | sampling calls | "
             "total calls | gradient calls | PSNR vs input (dB) | PSNR vs VAE round trip (dB) |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (steps, group, name), s in summary.items():
        lines.append(f"| {steps} | {group} | {name} | {s['noise_error']:.2e} | {100 * s['converged']:.1f} | "
                     f"{s['calls']:.1f} | {s['sampling_calls']:.1f} | {s['total_calls']:.1f} | "
                     f"{s['gradient_calls']:.1f} | {s['psnr']:.2f} | {s['psnr_vae']:.2f} |")
    return "\n".join(lines)


def frontier_table(summary: dict, group: str) -> str:
    """Per method, per step count: total network calls (inversion + reconstruction) -> PSNR vs the
    input / vs the VAE round trip; the frontier of reconstruction against calls."""
    steps = sorted({s for s, g, _ in summary if g == group})
    names = list(dict.fromkeys(n for _, g, n in summary if g == group))
    lines = [f"| {group} images: method | " + " | ".join(f"{n} steps: calls, dB input / round trip" for n in steps) + " |",
             "|---|" + "---:|" * len(steps)]
    for name in names:
        cells = [summary.get((n, group, name)) for n in steps]
        lines.append(f"| {name} | " + " | ".join("" if c is None else f"{c['total_calls']:.0f}: {c['psnr']:.2f} / "
                                                 f"{c['psnr_vae']:.1f}" for c in cells) + " |")
    return "\n".join(lines)


def root_table(roots: dict) -> str:
    lines = ["| image | steps | step k | starts converged (of 5) | distinct roots | largest distance between roots |",
             "|---|---:|---:|---:|---:|---:|"]
    for (image, steps, k), r in roots.items():
        lines.append(f"| {image} | {steps} | {k} | {len(r['converged'])} | {r['distinct']} | {r['max_distance']:.2e} |")
    return "\n".join(lines)


def run_race(model, samples, methods, step_counts) -> tuple[dict, dict, dict]:
    summary, per_image, trajectories = {}, {}, {}
    for steps in step_counts:
        for name in methods:
            rows = {}
            for sample in samples:
                rows[sample.name], inversion = measure(model, sample, name, steps)
                if name == RECOMMENDED:
                    trajectories[(sample.name, steps)] = inversion
            per_image[f"{steps} {name}"] = rows
            for group in ("world", "drawn"):
                chosen = [r for image, r in rows.items() if image.startswith(group)]
                if chosen:
                    summary[(steps, group, name)] = {c: statistics.fmean(r[c] for r in chosen) for c in COLUMNS}
            print(f"{steps} steps, {name}: done", file=sys.stderr, flush=True)
    return summary, per_image, trajectories


def run_roots(model, samples, trajectories, steps: int, n_images: int) -> dict:
    roots = {}
    for sample in [s for s in samples if s.name.startswith("world")][:1] + [s for s in samples if s.name.startswith("drawn")][: n_images - 1]:
        inversion = trajectories.get((sample.name, steps))
        if inversion is None:
            inversion = run_method(model, sample, RECOMMENDED, steps)
        for k in sorted({1, (steps + 1) // 2, steps}):
            roots[(sample.name, steps, k)] = roots_of_step(model, inversion, k)
            print(f"roots: {sample.name} {steps} steps, step {k}: {roots[(sample.name, steps, k)]['distinct']} distinct",
                  file=sys.stderr, flush=True)
    return roots


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--n-world", type=int, default=4)
    parser.add_argument("--n-drawn", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", default="4,8,15,28")
    parser.add_argument("--methods", default="ddim,uni_inv,fireflow,rf_solver,anderson,hybrid,gradient")
    parser.add_argument("--root-steps", default="8", help="step counts whose first, middle and last steps are re-solved")
    parser.add_argument("--root-images", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model = load_model(args.model)
    samples = (world_samples(args.n_world, args.seed, model.image_size)
               + drawn_samples(args.n_drawn, args.seed, model.image_size))
    step_counts = [int(s) for s in args.steps.split(",")]
    summary, per_image, trajectories = run_race(model, samples, args.methods.split(","), step_counts)
    roots = {}
    for steps in [int(s) for s in args.root_steps.split(",")] if args.root_images else []:
        roots |= run_roots(model, samples, trajectories, steps, args.root_images)
    print(f"model {args.model}; {args.n_world} world + {args.n_drawn} drawn images (seed {args.seed}); guidance 1; "
          f"delta {SPDInvOptions().delta}; threads {torch.get_num_threads()}\n")
    print(race_table(summary))
    for group in ("world", "drawn"):
        print()
        print(frontier_table(summary, group))
    print()
    print(root_table(roots))
    if args.json:
        args.json.write_text(json.dumps({
            "settings": vars(args) | {"json": str(args.json)}, "prompts": {s.name: s.prompt for s in samples},
            "summary": {" ".join(map(str, key)): value for key, value in summary.items()}, "per_image": per_image,
            "roots": {f"{image} {steps} steps, step {k}": value for (image, steps, k), value in roots.items()}}, indent=1))


if __name__ == "__main__":
    main()
