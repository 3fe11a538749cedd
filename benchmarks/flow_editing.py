"""Editing on rectified flow: every flow inversion x engine, plus FlowEdit, on world edit pairs and the
flow world model, at several step counts; means and paired bootstrap intervals against the plain
inversion (`ddim`) under the same engine (FlowEdit, engine `none`, against `ddim + none`).

    OMP_NUM_THREADS=1 .venv/bin/python -m spdinv world export --n 100 pairs
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/flow_editing.py pairs --model shapes-world-flow \
        --steps 8 15 --limit 12 --out flow-editing [--inversions ddim,spdinv,rf_solver,fireflow,uni_inv]
        [--engines p2p,masactrl,rf_edit,none]

Each step count is two resumable `spdinv bench` runs (inversions x engines, and flowedit x none,
which takes engine `none` only) under OUT/steps-N/; the report (OUT/report.md, also printed) merges
them. Costs are counted, not timed: `network_calls` (the inversion's) and `edit_calls` (every network
row the edit evaluated); `edit_seconds` ratios only compare rows of one run.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from paired import paired_rows  # noqa: E402
from spdinv.bench.report import Results, load_results  # noqa: E402

METRICS = "psnr,ssim,gt_psnr,edit_accuracy,noise_error,network_calls,edit_calls,seconds,edit_seconds"
TABLE_METRICS = ("psnr", "gt_psnr", "edit_accuracy", "network_calls", "edit_calls", "edit_seconds")
PAIRED_METRICS = ("psnr", "gt_psnr", "edit_accuracy")


def bench(data: Path, out: Path, model: str, steps: int, inversions: str, engines: str, limit: int) -> None:
    """One resumable `spdinv bench` run (same interpreter, one thread)."""
    command = [sys.executable, "-m", "spdinv", "bench", str(data), "--model", model, "--steps", str(steps),
               "--inversion", inversions, "--engine", engines, "--limit", str(limit), "--out", str(out),
               "--metrics", METRICS, "--quiet"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    subprocess.run(command, check=True, env=environment)


def merged(folders: list[Path]) -> Results:
    results = load_results(folders[0])
    for folder in folders[1:]:
        more = load_results(folder)
        results.rows += more.rows
        results.metrics += [m for m in more.metrics if m not in results.metrics]
    return results


def _format(value: float) -> str:
    if not math.isfinite(value):
        return "–"
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def report(results: Results, steps: int) -> list[str]:
    """Means per inversion + engine, then paired differences against ddim under the same engine."""
    pairs = len({r["id"] for r in results.rows})
    lines = [f"### {steps} steps ({pairs} pairs)", "", "| inversion + engine | " + " | ".join(TABLE_METRICS) + " |",
             "| --- |" + " --- |" * len(TABLE_METRICS)]
    for inversion, engine in results.methods:
        means = [_format(results.mean(metric, (inversion, engine)).value) for metric in TABLE_METRICS]
        lines.append(f"| {inversion} + {engine} | " + " | ".join(means) + " |")
    for metric in PAIRED_METRICS:
        lines += ["", f"{metric}: method - ddim, same engine (mean [95% bootstrap interval], n pairs)", ""]
        for inversion, engine, n, mean, low, high in paired_rows(results, metric, "ddim"):
            engine_of_baseline = "none" if inversion == "flowedit" else engine
            lines.append(f"- {inversion} + {engine} vs ddim + {engine_of_baseline}: {_format(mean)} "
                         f"[{_format(low)}, {_format(high)}], n={n}")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, help="a `spdinv world export` folder")
    parser.add_argument("--model", default="shapes-world-flow")
    parser.add_argument("--steps", type=int, nargs="+", default=[8, 15])
    parser.add_argument("--limit", type=int, default=12, help="pairs per run (the first N)")
    parser.add_argument("--inversions", default="ddim,spdinv,rf_solver,fireflow,uni_inv")
    parser.add_argument("--engines", default="p2p,masactrl,rf_edit,none")
    parser.add_argument("--out", type=Path, default=Path("flow-editing"))
    parser.add_argument("--report-only", action="store_true", help="only merge and report what the runs hold")
    args = parser.parse_args()
    lines = ["## Editing on rectified flow", ""]
    for steps in args.steps:
        folders = [args.out / f"steps-{steps}" / "inversions", args.out / f"steps-{steps}" / "flowedit"]
        if not args.report_only:
            bench(args.data, folders[0], args.model, steps, args.inversions, args.engines, args.limit)
            bench(args.data, folders[1], args.model, steps, "flowedit", "none", args.limit)
        lines += report(merged([f for f in folders if (f / "results.csv").exists()]), steps)
    text = "\n".join(lines)
    (args.out / "report.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
