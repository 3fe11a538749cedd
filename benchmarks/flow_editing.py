"""Editing on rectified flow: every flow inversion x engine, plus FlowEdit, on world edit pairs and the
flow world model, at several step counts; means, per-category tables, an example grid and paired
bootstrap intervals against the plain inversion (`ddim`) under the same engine (FlowEdit, engine
`none`, against `ddim + none`) and against FlowEdit.

    OMP_NUM_THREADS=1 .venv/bin/python -m spdinv world export --n 100 pairs
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/flow_editing.py pairs --model shapes-world-flow \
        --steps 15 --per-category 2 --out flow-editing [--inversions ddim,spdinv] [--engines p2p,masactrl,rf_edit,none]
        [--peers rf_solver,fireflow,uni_inv] [--limit N]

`--per-category N` keeps the first N pairs of each editing category (a subset folder OUT/pairs that
links to the export's images, round robin), so a small or partial run still covers every kind of edit.
Each step count is three resumable `spdinv bench` runs under OUT/steps-N/, with `--save-images`:
`inversions` (the main inversions x engines), `flowedit` (x none: it takes engine `none` only), then
`peers` (the other flow inversions x engines; last, as the least needed for the paper's question), and with
`--paper-engines p2p,none` a run `paper` of SPDInv at the paper code's settings (`--solver gradient
--stop-rule official`), reported as `spdinv-paper` and paired against the default SPDInv; OUT/steps-N/all merges them into one results.csv and
`spdinv report` writes its report there (per-category tables, examples.png). OUT/report.md (also
printed) holds the means and the paired intervals. Costs are counted, not timed: `network_calls`
(the inversion's) and `edit_calls` (every network row the edit evaluated); `edit_seconds` ratios only
compare rows of one run. Rerun the same command to resume, `--report-only` to only merge and report.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from paired import paired_rows  # noqa: E402
from spdinv.bench.report import Results, load_results, write_report  # noqa: E402
from spdinv.bench.results import RESULTS_FILE, part_paths, read_rows, row_key  # noqa: E402

METRICS = "psnr,ssim,gt_psnr,edit_accuracy,noise_error,network_calls,edit_calls,seconds,edit_seconds"
TABLE_METRICS = ("psnr", "gt_psnr", "edit_accuracy", "network_calls", "edit_calls", "edit_seconds")
PAIRED_METRICS = ("psnr", "gt_psnr", "edit_accuracy")


def per_category_subset(data: Path, per_category: int, out: Path) -> Path:
    """A PIE-Bench folder with the first `per_category` pairs of each category, in round-robin
    order, linking the export's images."""
    mapping = json.loads((data / "mapping_file.json").read_text())
    by_category: dict[str, list[str]] = {}
    for item_id, entry in mapping.items():
        by_category.setdefault(str(entry["editing_type_id"]), []).append(item_id)
    # round robin (the first of every category, then the second, ...): a partial run covers every kind
    order = [ids[rank] for rank in range(per_category) for ids in by_category.values() if rank < len(ids)]
    kept = {item_id: mapping[item_id] for item_id in order}
    out.mkdir(parents=True, exist_ok=True)
    for folder in ("annotation_images", "target_images"):
        link = out / folder
        if not link.exists() and (data / folder).exists():
            link.symlink_to((data / folder).resolve())
    (out / "mapping_file.json").write_text(json.dumps(kept, indent=1))
    return out


# SPDInv as the paper's code runs it (the fidelity issue's settings): gradient descent (AdamW, lr 1e-3, K 25),
# update-then-check; a run of its own, its rows relabelled so they pair with the default SPDInv's
PAPER_RUN, PAPER_LABEL, PAPER_FLAGS = "paper", "spdinv-paper", ["--solver", "gradient", "--stop-rule", "official"]


def bench(data: Path, out: Path, model: str, steps: int, inversions: str, engines: str, limit: int | None,
          flags: list[str] = ()) -> None:
    """One resumable `spdinv bench` run (same interpreter, one thread), edits saved for the grid."""
    command = [sys.executable, "-m", "spdinv", "bench", str(data), "--model", model, "--steps", str(steps),
               "--inversion", inversions, "--engine", engines, "--out", str(out), "--metrics", METRICS,
               "--save-images", "--quiet", *flags] + (["--limit", str(limit)] if limit else [])
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    subprocess.run(command, check=True, env=environment)


def run_files(folder: Path) -> list[Path]:
    """A bench folder's results.csv and its part files (rows of a run that was stopped)."""
    return [p for p in [folder / RESULTS_FILE, *part_paths(folder)] if p.is_file()]


def relabel(folder: Path, name: str) -> str:
    """A row's inversion, an image folder's or a diagnostics file's name as the merge shows it: the
    paper-settings run's SPDInv is `spdinv-paper`."""
    if folder.name != PAPER_RUN:
        return name
    return name.replace("spdinv+", f"{PAPER_LABEL}+").replace("__spdinv__", f"__{PAPER_LABEL}__") \
        if name != "spdinv" else PAPER_LABEL


def merge(folders: list[Path], out: Path) -> Results:
    """One bench-like folder from several runs (finished or stopped): results.csv (the union of
    columns and of complete rows), the first run's run.json, and links to every run's saved images
    and diagnostics (for `spdinv report`)."""
    header = list(dict.fromkeys(c for folder in folders for path in run_files(folder) for c in _header(path)))
    rows: dict[tuple, dict] = {}
    for folder in folders:
        for row in (row for path in run_files(folder) for row in read_rows(path, _header(path))):
            row = {**row, "inversion": relabel(folder, row["inversion"])}
            rows.setdefault(row_key(row), row)
    out.mkdir(parents=True, exist_ok=True)
    with (out / RESULTS_FILE).open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, header, restval="")
        writer.writeheader()
        writer.writerows(rows.values())
    settings = json.loads((folders[0] / "run.json").read_text())
    (out / "run.json").write_text(json.dumps(settings, indent=1))
    for name in ("images", "diagnostics"):
        (out / name).mkdir(exist_ok=True)
        for folder in folders:
            for entry in (folder / name).glob("*") if (folder / name).is_dir() else []:
                link = out / name / relabel(folder, entry.name)
                if not link.exists():
                    link.symlink_to(entry.resolve())
    return load_results(out)


def _header(path: Path) -> list[str]:
    with path.open(newline="", encoding="utf-8") as handle:
        return next(csv.reader(handle))


def _format(value: float) -> str:
    if not math.isfinite(value):
        return "–"
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def paired_lines(results: Results, metric: str, baseline: str) -> list[str]:
    lines = ["", f"{metric}: method - {baseline} (mean [95% bootstrap interval], n pairs)", ""]
    for inversion, engine, n, mean, low, high in paired_rows(results, metric, baseline):
        baseline_engine = "none" if "flowedit" in (baseline, inversion) else engine  # FlowEdit: engine none only
        lines.append(f"- {inversion} + {engine} vs {baseline} + {baseline_engine}: {_format(mean)} "
                     f"[{_format(low)}, {_format(high)}], n={n}")
    return lines


def against_flowedit(results: Results) -> Results:
    """The rows with FlowEdit's as every engine's baseline (paired_rows pairs by engine)."""
    flowedit = [r for r in results.rows if r["inversion"] == "flowedit"]
    engines = {r["engine"] for r in results.rows}
    rows = [r for r in results.rows if r["inversion"] != "flowedit"]
    rows += [{**r, "engine": engine} for r in flowedit for engine in engines]
    return Results(rows, results.metrics, results.settings)


def report(results: Results, steps: int) -> list[str]:
    """Means per inversion + engine, then paired differences against ddim under the same engine and
    against FlowEdit."""
    pairs = len({r["id"] for r in results.rows})
    lines = [f"### {steps} steps ({pairs} pairs)", "", "| inversion + engine | " + " | ".join(TABLE_METRICS) + " |",
             "| --- |" + " --- |" * len(TABLE_METRICS)]
    for inversion, engine in results.methods:
        means = [_format(results.mean(metric, (inversion, engine)).value) for metric in TABLE_METRICS]
        lines.append(f"| {inversion} + {engine} | " + " | ".join(means) + " |")
    for metric in PAIRED_METRICS:
        lines += paired_lines(results, metric, "ddim")
    if any(r["inversion"] == "flowedit" for r in results.rows):
        for metric in PAIRED_METRICS:
            lines += paired_lines(against_flowedit(results), metric, "flowedit")
    if any(r["inversion"] == PAPER_LABEL for r in results.rows):
        spdinv_rows = Results([r for r in results.rows if r["inversion"] in ("spdinv", PAPER_LABEL)],
                              results.metrics, results.settings)
        for metric in PAIRED_METRICS + ("network_calls",):
            lines += paired_lines(spdinv_rows, metric, "spdinv")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, help="a `spdinv world export` folder")
    parser.add_argument("--model", default="shapes-world-flow")
    parser.add_argument("--steps", type=int, nargs="+", default=[15, 8])
    parser.add_argument("--per-category", type=int, default=None, help="the first N pairs of each category")
    parser.add_argument("--limit", type=int, default=None, help="pairs per run (the first N)")
    parser.add_argument("--inversions", default="ddim,spdinv", help="the main run's inversions")
    parser.add_argument("--peers", default="rf_solver,fireflow,uni_inv",
                        help="the other flow inversions, a third run after the main one and FlowEdit ('' for none)")
    parser.add_argument("--engines", default="p2p,masactrl,rf_edit,none")
    parser.add_argument("--paper-engines", default="",
                        help="engines of a run of SPDInv at the paper's settings (gradient, official stop rule), "
                             f"reported as {PAPER_LABEL}; '' (default) for none")
    parser.add_argument("--out", type=Path, default=Path("flow-editing"))
    parser.add_argument("--report-only", action="store_true", help="only merge and report what the runs hold")
    args = parser.parse_args()
    data = per_category_subset(args.data, args.per_category, args.out / "pairs") if args.per_category else args.data
    lines = ["## Editing on rectified flow", ""]
    for steps in args.steps:
        runs = {"inversions": (args.inversions, args.engines), "flowedit": ("flowedit", "none")}
        if args.paper_engines:
            runs[PAPER_RUN] = ("spdinv", args.paper_engines)
        if args.peers:
            runs["peers"] = (args.peers, args.engines)
        folders = [args.out / f"steps-{steps}" / name for name in runs]
        for folder, (inversions, engines) in zip(folders, runs.values()):
            if not args.report_only:
                bench(data, folder, args.model, steps, inversions, engines, args.limit,
                      PAPER_FLAGS if folder.name == PAPER_RUN else [])
        done = [f for f in folders if run_files(f)]
        if not done:
            continue
        merged = merge(done, args.out / f"steps-{steps}" / "all")
        write_report(args.out / f"steps-{steps}" / "all")
        lines += report(merged, steps)
    text = "\n".join(lines)
    (args.out / "report.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
