"""The paper's ranking against the step count: `spdinv bench` runs of the same pairs at several step
counts, as one table of means, paired differences against DDIM per step count, and a plot of each
metric against the step count per inversion + engine.

    .venv/bin/python benchmarks/step_count.py 10=out-10 10=out-10-gradient@gradient 20=out-20 50=out-50
        [--out docs/results-world/steps] [--metrics psnr,ssim,gt_psnr,edit_accuracy,noise_error,network_calls,seconds]
        [--by-category gt_psnr,edit_accuracy]

Each argument is STEPS=FOLDER[@LABEL] (a `spdinv bench` output folder or results.csv); several
folders of one step count are merged, the rows of a labelled one renamed "INVERSION (LABEL)" (e.g.
a second SPDInv solver). Means follow the report's rule (`Results.mean`); paired intervals come
from `benchmarks/paired.py`. `--by-category` adds, per step count and metric, the report's table of
means per PIE-Bench category.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from paired import paired_rows  # noqa: E402
from spdinv.bench.report import Results, category_table, load_results, save_figure  # noqa: E402

DEFAULT_METRICS = "psnr,ssim,gt_psnr,edit_accuracy,noise_error,reconstruction_error,network_calls,seconds"
PAIRED_METRICS = ("psnr", "gt_psnr", "edit_accuracy")
LINE_STYLES = {"p2p": "-", "masactrl": "--", "pnp": ":"}


def load_runs(pairs: list[str]) -> dict[int, Results]:
    """STEPS=FOLDER[@LABEL] arguments -> one Results per step count."""
    runs: dict[int, Results] = {}
    for pair in pairs:
        steps, _, source = pair.partition("=")
        folder, _, label = source.partition("@")
        if not steps.isdigit() or not folder:
            raise SystemExit(f"expected STEPS=FOLDER[@LABEL], got {pair!r}")
        results = load_results(folder)
        if label:
            for row in results.rows:
                row["inversion"] = f"{row['inversion']} ({label})"
        if int(steps) in runs:
            merged = runs[int(steps)]
            merged.rows += results.rows
            merged.metrics += [m for m in results.metrics if m not in merged.metrics]
        else:
            runs[int(steps)] = results
    return dict(sorted(runs.items()))


def _format(value: float) -> str:
    if not math.isfinite(value):
        return "–"
    return f"{value:.2e}" if 0 < abs(value) < 1e-2 else f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="STEPS=FOLDER[@LABEL]")
    parser.add_argument("--metrics", default=DEFAULT_METRICS)
    parser.add_argument("--out", default=None, help="folder for the plots (step-count-METRIC.png)")
    parser.add_argument("--by-category", default="", help="metrics to tabulate per category, comma-separated")
    args = parser.parse_args()
    runs = load_runs(args.runs)
    metrics = [m for m in args.metrics.split(",") if any(m in r.metrics for r in runs.values())]

    print("| steps | inversion | engine | images | " + " | ".join(metrics) + " |")
    print("|---:|---|---|---:|" + "---:|" * len(metrics))
    series: dict[tuple[str, str], dict[str, list[tuple[int, float]]]] = {}
    for steps, results in runs.items():
        for method in results.methods:
            means = [results.mean(m, method) for m in metrics]
            images = max(mean.count for mean in means)
            print(f"| {steps} | {method[0]} | {method[1]} | {images} | " + " | ".join(_format(m.value) for m in means)
                  + " |")
            for metric, mean in zip(metrics, means):
                series.setdefault(method, {}).setdefault(metric, []).append((steps, mean.value))

    print("\n| steps | metric | inversion | engine | images | mean difference vs ddim | 95% interval |")
    print("|---:|---|---|---|---:|---:|---:|")
    for steps, results in runs.items():
        for metric in PAIRED_METRICS:
            if metric not in results.metrics:
                continue
            for inversion, engine, n, diff, low, high in paired_rows(results, metric, "ddim"):
                print(f"| {steps} | {metric} | {inversion} | {engine} | {n} | {diff:+.3f} | [{low:+.3f}, {high:+.3f}] |")

    for metric in filter(None, args.by_category.split(",")):
        for steps, results in runs.items():
            if metric in results.metrics:
                print(f"\n**{metric}, {steps} steps, per category**\n")
                print("\n".join(category_table(results, metric)))

    if args.out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for metric in metrics:
            fig, ax = plt.subplots(figsize=(7.5, 3.4))
            inversions = sorted({inversion for inversion, _ in series})
            for (inversion, engine), by_metric in sorted(series.items()):
                points = by_metric[metric]  # colour: the inversion; line style: the engine
                ax.plot([s for s, _ in points], [v for _, v in points], marker="o", label=f"{inversion} + {engine}",
                        color=f"C{inversions.index(inversion)}", linestyle=LINE_STYLES.get(engine, "-."))
            ax.set_xlabel("DDIM steps")
            ax.set_ylabel(metric)
            ax.set_xticks(list(runs))
            ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
            save_figure(fig, out / f"step-count-{metric}.png")
        print(f"\nplots in {out}")


if __name__ == "__main__":
    main()
