"""What the inversion leaves for the edit at 10, 20 and 50 steps: how far sampling the source prompt
back from z_T drifts from the image at guidance 1 (the inversion's own setting) and at the edit's
guidance 7.5, and how much of the image z_T itself carries.

    spdinv world export world100 --n 100 --seed 0
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/guided_drift.py world100 [--limit 30] [--steps 10,20,50]
        [--methods ddim,aidi,spdinv] [--json out.json]

Per image, step count and inversion (SPDInv with `--solver anderson`): the reconstruction's PSNR
against the image at guidance 1 and 7.5, whether the attribute classifier reads the 7.5
reconstruction as the source scene, and two statistics of z_T: its standard deviation and the
correlation of neighbouring latent cells (0 for white Gaussian noise; the more of the image's
layout z_T carries, the higher). Means over images are printed as a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from spdinv.bench.datasets import load_dataset
from spdinv.bench.metrics import load_judge
from spdinv.images import conform_image, to_pil, to_tensor
from spdinv.inversion import invert
from spdinv.inversion.reconstruction import reconstruct
from spdinv.model import load_model

METHOD_OPTIONS = {"spdinv": {"solver": "anderson"}}


def neighbour_correlation(z: torch.Tensor) -> float:
    """Mean correlation of horizontally and vertically adjacent cells of each channel of z (1, C, H, W)."""
    z = z[0].float()
    z = (z - z.mean(dim=(1, 2), keepdim=True)) / z.std(dim=(1, 2), keepdim=True)
    return float(((z[:, 1:, :] * z[:, :-1, :]).mean() + (z[:, :, 1:] * z[:, :, :-1]).mean()) / 2)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--limit", type=int, default=30)
    parser.add_argument("--steps", default="10,20,50")
    parser.add_argument("--methods", default="ddim,aidi,spdinv")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    model, judge = load_model(), load_judge(None)
    items = load_dataset(args.data).items[: args.limit]
    rows = []
    for item in items:
        image = conform_image(item.load_image(), model.image_size)[0]
        source = to_tensor(image)
        for steps in map(int, args.steps.split(",")):
            for method in args.methods.split(","):
                inversion = invert(model, image, item.source_prompt, method, steps, progress=False, diagnose=False,
                                   **METHOD_OPTIONS.get(method, {}))
                plain = reconstruct(model, inversion, source, guidance_scale=1.0)
                guided = reconstruct(model, inversion, source, guidance_scale=args.guidance)
                rows.append({"id": item.id, "steps": steps, "method": method, "psnr_guidance_1": plain.psnr,
                             "psnr_guided": guided.psnr,
                             "reads_as_source": float(judge(to_pil(guided.image)[0], item.ground_truth.source_scene)),
                             "z_T_std": float(inversion.z_T.float().std()),
                             "z_T_neighbour_correlation": neighbour_correlation(inversion.z_T)})
    keys = ("psnr_guidance_1", "psnr_guided", "reads_as_source", "z_T_std", "z_T_neighbour_correlation")
    print(f"{len(items)} world images; reconstruction of the source prompt from z_T\n")
    print(f"| steps | inversion | PSNR at guidance 1 | PSNR at guidance {args.guidance:g} | read as the source scene "
          f"at {args.guidance:g} | z_T std | z_T neighbour correlation |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for steps in map(int, args.steps.split(",")):
        for method in args.methods.split(","):
            chosen = [r for r in rows if r["steps"] == steps and r["method"] == method]
            means = [statistics.fmean(r[k] for r in chosen) for k in keys]
            print(f"| {steps} | {method} | {means[0]:.2f} | {means[1]:.2f} | {100 * means[2]:.0f}% | {means[3]:.3f} | "
                  f"{means[4]:.3f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
