"""Customised editing on the world (the SPDInv paper's third application): concept edit pairs with rendered
ground truth, each edited by ELITE-style generation from random noise and by inversion + P2P, with the
concept word from the concept encoder or from textual inversion; then a markdown table of means per
method, split seen / held-out, and paired 95% bootstrap intervals against the same concept's
random-noise baseline and against its DDIM + P2P.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/customisation.py --out custom-out --pairs 40 \\
        [--methods elite-noise,elite+spdinv,ti+ddim,...] [--seed 0] [--steps 50] [--learn-steps 150] \\
        [--save-images --grid grid.png] [--report-only]

Resumable: rerun the same command (or with more methods) and finished rows are kept.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from paired import bootstrap  # noqa: E402
from spdinv.bench.customisation import METHODS, CustomisationOptions, run_customisation  # noqa: E402
from spdinv.bench.report import Results, load_results  # noqa: E402
from spdinv.textual_inversion import LearnOptions  # noqa: E402

# (metric, title, scale): the paper's columns first (unavailable ones print as –), then the world's
TABLE = (("structure_distance", "structure ×10³", 1e3), ("psnr", "PSNR", 1), ("lpips", "LPIPS ×10³", 1e3),
         ("mse", "MSE ×10⁴", 1e4), ("ssim", "SSIM ×10²", 1e2), ("clip_whole", "CLIP", 1),
         ("gt_psnr", "gt_psnr", 1), ("edit_accuracy", "edit acc. %", 100), ("concept_fidelity", "concept %", 100),
         ("concept_shape", "shape %", 100), ("concept_colour", "colour %", 100),
         ("concept_material", "material %", 100), ("concept_style", "style %", 100),
         ("edit_seconds", "edit s", 1), ("concept_seconds", "concept s", 1))
BY_EDIT = ("psnr", "gt_psnr", "edit_accuracy", "concept_fidelity")
PAIRED = ("psnr", "ssim", "gt_psnr", "edit_accuracy", "concept_fidelity")
SPLITS = (("all", None), ("seen", 0.0), ("held-out", 1.0))


def subset(results: Results, held_out: float | None) -> Results:
    rows = [r for r in results.rows if held_out is None or float(r.get("held_out") or "nan") == held_out]
    return Results(rows, results.metrics, results.settings)


def baselines(method: str) -> list[str]:
    """The same concept source's random-noise baseline and its DDIM + P2P (none for the baseline itself)."""
    if method.endswith("-noise"):
        return []
    prefix = method.split("+")[0]
    return [b for b in (f"{prefix}-noise", f"{prefix}+ddim") if b != method]


def paired(results: Results, metric: str, method: str, baseline: str) -> tuple[int, float, float, float]:
    value = {(r["id"], r["inversion"]): float(r.get(metric) or "nan") for r in results.rows}
    diffs = np.array([value[(i, m)] - value[(i, baseline)] for (i, m) in value
                      if m == method and (i, baseline) in value
                      and math.isfinite(value[(i, m)]) and math.isfinite(value[(i, baseline)])])
    return (len(diffs), *bootstrap(diffs))


def _format(value: float, scale: float) -> str:
    return "–" if not math.isfinite(value) else f"{value * scale:.3g}" if abs(value * scale) < 10 else f"{value * scale:.1f}"


def ordered_methods(results: Results) -> list[tuple[str, str]]:
    """(method, engine) in METHODS order (each concept source's baseline first), others after."""
    present = results.methods
    known = [(m, METHODS[m].engine) for m in METHODS if (m, METHODS[m].engine) in present]
    return known + [m for m in present if m not in known]


def print_tables(results: Results) -> None:
    methods = [m for m, _ in ordered_methods(results)]
    columns = [c for c in TABLE if c[0] in results.metrics]
    print("| split | method | pairs | " + " | ".join(title for _, title, _ in columns) + " |")
    print("|---|---|---:|" + "---:|" * len(columns))
    for split, held_out in SPLITS:
        part = subset(results, held_out)
        for method, engine in ordered_methods(part):
            means = [part.mean(metric, (method, engine)) for metric, _, _ in columns]
            pairs = len(part._rows((method, engine)))
            print(f"| {split} | {method} | {pairs} | " + " | ".join(_format(m.value, s) for m, (_, _, s) in
                                                                    zip(means, columns)) + " |")
    print("\nBy edit (all pairs): " + ", ".join(BY_EDIT) + " (accuracy and fidelity in %)\n")
    print("| edit | method | pairs | " + " | ".join(BY_EDIT) + " |")
    print("|---|---|---:|" + "---:|" * len(BY_EDIT))
    for edit in dict.fromkeys(r["category"] for r in results.rows):
        for method, engine in ordered_methods(results):
            means = [results.mean(metric, (method, engine), edit) for metric in BY_EDIT]
            pairs = len(results._rows((method, engine), edit))
            print(f"| {edit} | {method} | {pairs} | " + " | ".join(
                _format(m.value, 100 if metric in ("edit_accuracy", "concept_fidelity") else 1)
                for m, metric in zip(means, BY_EDIT)) + " |")
    print("\nPaired differences (method − baseline, same pairs; 95% bootstrap interval over pairs):\n")
    print("| split | metric | method | baseline | pairs | mean difference | 95% interval |")
    print("|---|---|---|---|---:|---:|---:|")
    for split, held_out in SPLITS:
        part = subset(results, held_out)
        for metric in PAIRED:
            for method in methods:
                for baseline in baselines(method):
                    if baseline not in methods:
                        continue
                    n, diff, low, high = paired(part, metric, method, baseline)
                    if n:
                        print(f"| {split} | {metric} | {method} | {baseline} | {n} | {diff:+.3f} | "
                              f"[{low:+.3f}, {high:+.3f}] |")


def save_grid(out: Path, results: Results, pairs: int, seed: int, path: Path) -> None:
    """The first `pairs` pairs as rows: source, rendered truth, then each method's saved edit (blank
    where none was saved), 2x nearest-neighbour upscaled."""
    from PIL import Image, ImageDraw

    from spdinv.world.concept_edits import concept_pairs

    methods = [m for m, _ in ordered_methods(results)]
    cell, label = 64, 12
    grid = Image.new("RGB", (cell * (2 + len(methods)), label + cell * pairs), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for column, title in enumerate(["source", "truth", *methods]):
        draw.text((column * cell + 2, 0), title[:11], fill=(0, 0, 0))
    for row, pair in enumerate(concept_pairs(pairs, seed)):
        y = label + row * cell
        for column, image in enumerate(pair.images()):
            grid.paste(image, (column * cell, y))
        for column, method in enumerate(methods, start=2):
            saved = out / "images" / method / f"{pair.id}.png"
            if saved.is_file():
                grid.paste(Image.open(saved).convert("RGB"), (column * cell, y))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.resize((grid.width * 2, grid.height * 2), Image.NEAREST).quantize(256).save(path, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("custom-out"))
    parser.add_argument("--methods", default="elite-noise,elite+ddim,elite+spdinv,ti-noise,ti+ddim,ti+spdinv,ti+aidi,"
                                             "ti+spdinv-anderson",
                        help=f"comma-separated, of: {', '.join(METHODS)}")
    parser.add_argument("--pairs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--learn-steps", type=int, default=150, help="textual inversion steps")
    parser.add_argument("--held-out", default="encoder", help="held-out concepts: 'encoder' or a held_out_rule spec")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--save-images", action="store_true", help="keep every edit as OUT/images/METHOD/ID.png")
    parser.add_argument("--grid", type=Path, default=None,
                        help="also save a picture of the first --grid-pairs pairs and every method's edit (needs --save-images)")
    parser.add_argument("--grid-pairs", type=int, default=10)
    parser.add_argument("--report-only", action="store_true", help="print the tables of --out without running")
    args = parser.parse_args()
    if not args.report_only:
        import torch

        torch.set_num_threads(args.threads)
        options = CustomisationOptions(out=args.out, methods=args.methods.split(","), pairs=args.pairs, seed=args.seed,
                                       steps=args.steps, held_out=args.held_out,
                                       learn=LearnOptions(steps=args.learn_steps, seed=args.seed),
                                       save_images=args.save_images)
        run_customisation(options)
    results = load_results(args.out)
    print_tables(results)
    if args.grid:
        save_grid(args.out, results, min(args.grid_pairs, args.pairs), args.seed, args.grid)


if __name__ == "__main__":
    main()
