"""Cost and quality of every inversion method on the same images, in one run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/inversion_cost.py [--model DIR] [--n-images 4]
        [--steps 50] [--seed 0] [--methods ddim,spdinv,...] [--device cpu|cuda] [--json out.json]

Images are shapes-world scenes (`random_scene(random.Random(seed))`, rendered, captioned) unless
real images are added later. Per method, means over images: wall seconds of `invert()` (no
diagnostics), network calls (a guided eps counts two), gradient calls, peak memory, noise error
(mean fixed-point residual of the trajectory, measured the same way for every method),
reconstruction error (latent MSE of sampling back with the method's own guidance and side
information) and reconstruction PSNR (image space, against the input and against the VAE round
trip decode(z_0)), plus time as a ratio to DDIM's.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import resource
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from PIL import Image

from spdinv.errors import SpdinvError
from spdinv.images import conform_image, psnr, to_tensor
from spdinv.inversion import METHODS, Inversion, invert
from spdinv.inversion.base import fixed_point_residual
from spdinv.model import DiffusionModel, load_model
from spdinv.inversion.reconstruction import reconstruct, reconstruction_error
from spdinv.world.captions import caption
from spdinv.world.render import render
from spdinv.world.scene import random_scene

ALL_METHODS = ("ddim", "spdinv", "null_text", "negative_prompt", "direct", "aidi")
COLUMNS = ("seconds", "network_calls", "gradient_calls", "peak_mib", "noise_error", "latent_mse", "psnr_vae",
           "psnr_input")


@dataclass
class Sample:
    image: Image.Image
    prompt: str


def load_benchmark_model(path: str | None, device: str) -> tuple[DiffusionModel, str]:
    """The model to benchmark and a line saying which it is (the tiny random model as a last resort)."""
    if path is not None:
        model = load_model(path, device=device)
        return model, f"model: {path}"
    try:
        return load_model(device=device), "model: the embedded shapes-world model"
    except SpdinvError as error:
        from spdinv.model import from_pipeline
        from spdinv.testing import tiny_pipeline

        model = from_pipeline(tiny_pipeline(), name="tiny-0", device=device)
        return model, (f"model: the TINY RANDOM test model ({error}); timings are meaningful, "
                       "quality numbers are not")


def world_samples(n: int, seed: int, size: int) -> list[Sample]:
    rng = random.Random(seed)
    samples = []
    for _ in range(n):
        scene = random_scene(rng)
        samples.append(Sample(conform_image(render(scene), size)[0], caption(scene)))
    return samples


def _proc_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def _can_reset_cpu_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def pin_malloc_mmap_threshold(kib: int = 128) -> bool:
    """Make glibc serve every allocation above `kib` with its own mmap, returned to the system on
    free. glibc otherwise raises the threshold as large blocks are freed, so freed tensors stay in
    the resident set and a later call's peak hides below an earlier one."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        return bool(libc.mallopt(-3, kib * 1024))  # -3 = M_MMAP_THRESHOLD
    except (OSError, AttributeError, TypeError):
        return False


def memory_kind(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated growth during the call"
    if _can_reset_cpu_peak():
        return ("CPU: peak resident-set growth during the call (VmHWM reset via /proc/self/clear_refs; glibc mmap "
                "threshold pinned at 128 KiB, so smaller tensors are only partly seen)")
    return "CPU: growth of the process's lifetime RSS high-water mark (getrusage; 0 = below an earlier peak)"


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict]:
    """Yields a dict whose 'mib' is set, on exit, to the peak memory growth during the block."""
    out = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        yield out
        torch.cuda.synchronize(device)
        out["mib"] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
    elif _can_reset_cpu_peak():
        before = _proc_kib("VmRSS")
        yield out
        out["mib"] = (_proc_kib("VmHWM") - before) / 1024
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        yield out
        out["mib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024


@torch.no_grad()
def trajectory_noise_error(model: DiffusionModel, inversion: Inversion) -> float:
    """Mean over steps of ||f(z_k) - z_k||^2 / n, f with the source prompt at guidance 1."""
    trajectory, schedule = inversion.trajectory, inversion.schedule
    residuals = [fixed_point_residual(model, schedule, k, trajectory[k - 1 : k], trajectory[k : k + 1],
                                      inversion.prompt_embedding) for k in range(1, schedule.num_steps + 1)]
    return sum(residuals) / len(residuals)


def measure(model: DiffusionModel, method: str, sample: Sample, steps: int, seed: int) -> dict:
    """One method on one image: cost of the inversion, then its quality (not timed)."""
    with peak_memory(model.device) as memory:
        start = time.perf_counter()
        inversion = invert(model, sample.image, sample.prompt, method, steps, seed=seed, diagnose=False,
                           progress=False)
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        seconds = time.perf_counter() - start
    recon = reconstruct(model, inversion, to_tensor(sample.image))
    return {
        "seconds": seconds, "network_calls": inversion.network_calls, "gradient_calls": inversion.gradient_calls,
        "peak_mib": memory["mib"], "noise_error": trajectory_noise_error(model, inversion),
        "latent_mse": reconstruction_error(model, inversion),
        "psnr_vae": psnr(recon.image, model.decode(inversion.z_0)), "psnr_input": recon.psnr,
    }


def summarise(rows: list[dict]) -> dict:
    return {column: statistics.fmean(row[column] for row in rows) for column in COLUMNS}


def markdown_table(summary: dict[str, dict]) -> str:
    ddim_seconds = summary.get("ddim", {}).get("seconds")
    lines = ["| method | s / image | x DDIM | network calls | gradient calls | peak MiB | noise error | "
             "recon latent MSE | recon PSNR vs VAE (dB) | recon PSNR vs input (dB) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for method, s in summary.items():
        ratio = f"{s['seconds'] / ddim_seconds:.1f}" if ddim_seconds else "-"
        lines.append(f"| {method} | {s['seconds']:.3f} | {ratio} | {s['network_calls']:.0f} | "
                     f"{s['gradient_calls']:.0f} | {s['peak_mib']:.1f} | {s['noise_error']:.3e} | "
                     f"{s['latent_mse']:.3e} | {s['psnr_vae']:.2f} | {s['psnr_input']:.2f} |")
    return "\n".join(lines)


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise SystemExit(f"unknown method(s) {', '.join(unknown) or '(none)'}; valid: {', '.join(METHODS)}")
    return methods


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="diffusers SD folder (default: the embedded model)")
    parser.add_argument("--n-images", type=int, default=4)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default=",".join(ALL_METHODS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    methods = parse_methods(args.methods)
    if not args.device.startswith("cuda"):
        pin_malloc_mmap_threshold()
    model, model_line = load_benchmark_model(args.model, args.device)
    samples = world_samples(args.n_images, args.seed, model.image_size)
    invert(model, samples[0].image, samples[0].prompt, "ddim", 2, diagnose=False, progress=False)  # warm-up
    summary, per_image = {}, {}
    for method in methods:
        per_image[method] = [measure(model, method, sample, args.steps, args.seed) for sample in samples]
        summary[method] = summarise(per_image[method])
        print(f"{method}: done ({summary[method]['seconds']:.2f} s / image)", file=sys.stderr, flush=True)
    memory = memory_kind(model.device)
    print(f"{model_line}; device {model.device}; threads {torch.get_num_threads()}; {args.n_images} shapes-world "
          f"images (seed {args.seed}), {args.steps} DDIM steps, default options per method")
    print(f"peak memory: {memory}; PSNR vs VAE compares with decode(z_0), vs input with the image itself\n")
    print(markdown_table(summary))
    if args.json:
        args.json.write_text(json.dumps({
            "model": model_line, "device": str(model.device), "steps": args.steps, "seed": args.seed,
            "n_images": args.n_images, "memory": memory, "prompts": [s.prompt for s in samples],
            "summary": summary, "per_image": per_image,
        }, indent=2))


if __name__ == "__main__":
    main()
