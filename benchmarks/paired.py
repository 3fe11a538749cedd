"""Paired differences against a baseline inversion, per engine, with bootstrap 95% intervals: is a
gap in the report's means larger than the spread over images?

    .venv/bin/python benchmarks/paired.py RESULTS [--baseline ddim] [--metrics psnr,gt_psnr,edit_accuracy]
        [--resamples 10000] [--seed 0]

RESULTS is a `spdinv bench` output folder or results.csv. For every engine and every other
inversion, the mean over images of (method - baseline) on the images where both values are finite,
and a percentile bootstrap interval over images.
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from spdinv.bench.report import load_results


def paired_rows(results, metric: str, baseline: str) -> list[tuple[str, str, int, float, float, float]]:
    value = {(r["id"], r["inversion"], r["engine"]): float(r[metric] or "nan") for r in results.rows}
    rows = []
    for inversion, engine in results.methods:
        if inversion == baseline:
            continue
        ids = [i for (i, inv, eng) in value if inv == inversion and eng == engine and (i, baseline, engine) in value]
        pairs = [(value[(i, inversion, engine)], value[(i, baseline, engine)]) for i in ids]
        diffs = np.array([a - b for a, b in pairs if math.isfinite(a) and math.isfinite(b)])
        rows.append((inversion, engine, len(diffs), *bootstrap(diffs)))
    return rows


def bootstrap(diffs: np.ndarray, resamples: int = 10000, seed: int = 0) -> tuple[float, float, float]:
    if len(diffs) == 0:
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, len(diffs), (resamples, len(diffs)))].mean(axis=1)
    return float(diffs.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results")
    parser.add_argument("--baseline", default="ddim")
    parser.add_argument("--metrics", default="psnr,gt_psnr,edit_accuracy")
    args = parser.parse_args()
    results = load_results(args.results)
    print(f"| metric | inversion | engine | images | mean difference vs {args.baseline} | 95% interval |")
    print("|---|---|---|---:|---:|---:|")
    for metric in args.metrics.split(","):
        for inversion, engine, n, diff, low, high in paired_rows(results, metric, args.baseline):
            print(f"| {metric} | {inversion} | {engine} | {n} | {diff:+.3f} | [{low:+.3f}, {high:+.3f}] |")


if __name__ == "__main__":
    main()
