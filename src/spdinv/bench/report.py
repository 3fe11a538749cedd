"""`spdinv report RESULTS`: the benchmark CSV as the paper's tables (its scales: structure x10^3,
LPIPS x10^3, MSE x10^4, SSIM x10^2), a per-category breakdown, and PNG charts.

Means rule (MEANS_RULE): the metrics computed on the same pair of images are averaged over the same
rows: background preservation (psnr, lpips, mse, ssim: both images x (1 - mask)) over the rows where
all of them are finite, likewise the edit-region truth metrics (gt_psnr, gt_ssim); every other metric
over the rows where it is finite. A metric no row of the method measured (an unavailable evaluation
model) is not counted. NaN marks "does not apply" (the mask covers the whole frame, no ground truth, a
failed edit) and PSNR is +inf where the two backgrounds are identical, so such a row leaves the MSE,
SSIM and LPIPS means too; how many rows each mean left out is said under the table.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SpdinvError, first_line
from ..outputs import check_output_dir, staged_output
from .datasets import CATEGORY_NAMES
from .results import ERROR_COLUMN, KEY_COLUMNS, RESULTS_FILE


@dataclass(frozen=True)
class Column:
    metric: str
    title: str
    scale: float = 1.0
    higher_is_better: bool = True
    digits: int = 2  # decimals; 0 = significant-figure (scientific) format


PAPER_COLUMNS = (  # the paper's (and PIE-Bench's) table, in its order and scales
    Column("structure_distance", "Structure distance ×10³ ↓", 1e3, False),
    Column("psnr", "PSNR ↑"),
    Column("lpips", "LPIPS ×10³ ↓", 1e3, False),
    Column("mse", "MSE ×10⁴ ↓", 1e4, False),
    Column("ssim", "SSIM ×10² ↑", 1e2),
    Column("clip_whole", "CLIP whole ↑"),
    Column("clip_edited", "CLIP edited ↑"),
)
GROUND_TRUTH_COLUMNS = (
    Column("gt_psnr", "Edit-region PSNR vs truth ↑"),
    Column("gt_ssim", "Edit-region SSIM vs truth ×10² ↑", 1e2),
    Column("edit_accuracy", "Edit accuracy % ↑", 1e2, digits=1),
)
COST_COLUMNS = (
    Column("noise_error", "Noise error ↓", higher_is_better=False, digits=0),
    Column("reconstruction_error", "Reconstruction error ↓", higher_is_better=False, digits=0),
    Column("network_calls", "Network calls ↓", higher_is_better=False, digits=0),
    Column("diagnostic_calls", "Diagnostic calls", higher_is_better=False, digits=0),
    Column("edit_calls", "Edit calls", higher_is_better=False, digits=0),
    Column("seconds", "Inversion s ↓", higher_is_better=False),
    Column("edit_seconds", "Edit s ↓", higher_is_better=False),
)
# metrics computed from the same pair of images: averaged over the same rows
SAME_ROWS = (("psnr", "lpips", "mse", "ssim"), ("gt_psnr", "gt_ssim"))
MEANS_RULE = ("Means: PSNR, LPIPS, MSE and SSIM (both images × (1 − mask)) are averaged over the same rows, those "
              "where all four are finite (identical backgrounds, PSNR +∞, leave all four); likewise the two "
              "edit-region truth metrics; every other metric over the rows where it is finite.")
CATEGORY_METRICS = ("structure_distance", "psnr", "clip_whole", "edit_accuracy")
ALL_COLUMNS = {c.metric: c for c in PAPER_COLUMNS + GROUND_TRUTH_COLUMNS + COST_COLUMNS}


@dataclass
class Mean:
    value: float = math.nan
    count: int = 0
    left_out: int = 0  # rows whose value was NaN or infinite


@dataclass
class Results:
    rows: list[dict[str, str]]
    metrics: list[str]
    settings: dict = field(default_factory=dict)

    @property
    def methods(self) -> list[tuple[str, str]]:
        """(inversion, engine) pairs, grouped by engine, in order of first appearance."""
        seen = list(dict.fromkeys((r["inversion"], r["engine"]) for r in self.rows))
        engines = list(dict.fromkeys(e for _, e in seen))
        return [m for engine in engines for m in seen if m[1] == engine]

    @property
    def categories(self) -> list[str]:
        return sorted({r["category"] for r in self.rows}, key=lambda c: (len(c), c))

    def values(self, metric: str, method: tuple[str, str], category: str | None = None) -> list[float]:
        return [_number(r.get(metric, "")) for r in self._rows(method, category)]

    def mean(self, metric: str, method: tuple[str, str], category: str | None = None) -> Mean:
        """The mean under MEANS_RULE: rows where any measured metric of `metric`'s group is not finite
        count as left out."""
        rows = self._rows(method, category)
        group = next((g for g in SAME_ROWS if metric in g), (metric,))
        measured = [m for m in group if m in self.metrics
                    and any(math.isfinite(_number(r.get(m, ""))) for r in self._rows(method))]
        kept = [_number(r.get(metric, "")) for r in rows
                if all(math.isfinite(_number(r.get(m, ""))) for m in measured or [metric])]
        stat = mean(kept)
        return Mean(stat.value, stat.count, len(rows) - stat.count)

    def _rows(self, method: tuple[str, str], category: str | None = None) -> list[dict[str, str]]:
        return [r for r in self.rows
                if (r["inversion"], r["engine"]) == method and (category is None or r["category"] == category)]


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def mean(values: list[float]) -> Mean:
    finite = [v for v in values if math.isfinite(v)]
    return Mean(sum(finite) / len(finite) if finite else math.nan, len(finite), len(values) - len(finite))


def load_results(path: str | Path) -> Results:
    """A results.csv, or a bench output folder holding one (and its run.json)."""
    path = Path(path)
    csv_path = path / RESULTS_FILE if path.is_dir() else path
    if not csv_path.is_file():
        raise SpdinvError(f"no results at {path} (expected {RESULTS_FILE} or a bench output folder)")
    try:
        with csv_path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            header = reader.fieldnames or []
            if not set(KEY_COLUMNS) <= set(header):
                shown = ", ".join(header)[:120]
                raise SpdinvError(f"{csv_path} is not a spdinv bench results file (columns {shown})")
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as error:
        raise SpdinvError(f"{csv_path} is not a spdinv bench results file (not CSV text: {first_line(error)[:80]})") \
            from None
    if not rows:
        raise SpdinvError(f"{csv_path} has no rows")
    settings_path = csv_path.parent / "run.json"
    try:
        settings = json.loads(settings_path.read_text()) if settings_path.is_file() else {}
    except (UnicodeDecodeError, ValueError) as error:
        raise SpdinvError(f"{settings_path} is not the run.json spdinv wrote ({first_line(error)[:80]})") from None
    metrics = [c for c in header if c not in KEY_COLUMNS and c != ERROR_COLUMN]
    return Results(rows, metrics, settings)


# ---------------------------------------------------------------- markdown


def format_mean(stat: Mean, column: Column) -> str:
    if math.isnan(stat.value):
        return "–"
    value = stat.value * column.scale
    return f"{value:.3g}" if column.digits == 0 else f"{value:.{column.digits}f}"


def method_table(results: Results, columns: tuple[Column, ...]) -> list[str]:
    """One row per inversion + engine, the best of each engine's group in bold."""
    columns = tuple(c for c in columns if c.metric in results.metrics)
    if not columns or all(math.isnan(results.mean(c.metric, m).value) for c in columns for m in results.methods):
        return []
    stats = {(m, c.metric): results.mean(c.metric, m) for m in results.methods for c in columns}
    lines = ["| Inversion | Engine | n | " + " | ".join(c.title for c in columns) + " |",
             "|---|---|---:|" + "---:|" * len(columns)]
    for method in results.methods:
        group = [m for m in results.methods if m[1] == method[1]]
        cells = []
        for column in columns:
            stat = stats[(method, column.metric)]
            text = format_mean(stat, column)
            best = _best(column, [stats[(m, column.metric)].value for m in group])
            cells.append(f"**{text}**" if len(group) > 1 and stat.value == best else text)
        count = len(results.values(columns[0].metric, method))
        lines.append(f"| {method[0]} | {method[1]} | {count} | " + " | ".join(cells) + " |")
    return lines + _left_out_notes(results, columns)


def _best(column: Column, values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.nan
    return max(finite) if column.higher_is_better else min(finite)


def _left_out_notes(results: Results, columns: tuple[Column, ...]) -> list[str]:
    notes, unmeasured = [], []
    for column in columns:
        stats = [results.mean(column.metric, m) for m in results.methods]
        left = sum(s.left_out for s in stats)
        if not any(s.count for s in stats):
            unmeasured.append(column.metric)
        elif left:
            why = "identical backgrounds give PSNR +inf; " if any(column.metric in g for g in SAME_ROWS) else ""
            notes.append(f"{column.metric}: {left} row(s) left out of the means ({why}NaN: does not apply)")
    if unmeasured:
        notes.append(f"not measured (evaluation model unavailable, or no ground truth): {', '.join(unmeasured)}")
    return ["", *(f"- {n}" for n in notes)] if notes else []


def category_table(results: Results, metric: str) -> list[str]:
    column = ALL_COLUMNS.get(metric, Column(metric, metric))
    categories = results.categories
    lines = ["| Inversion | Engine | " + " | ".join(f"{c} {CATEGORY_NAMES.get(c, '')}".strip() for c in categories) + " |",
             "|---|---|" + "---:|" * len(categories)]
    for method in results.methods:
        cells = [format_mean(results.mean(metric, method, c), column) for c in categories]
        lines.append(f"| {method[0]} | {method[1]} | " + " | ".join(cells) + " |")
    return lines


def markdown(results: Results, plots: list[Path] | None = None, base: Path | None = None) -> str:
    lines = ["# Benchmark results", ""]
    lines += _settings_lines(results.settings, results)
    for title, columns in (("Editing quality (PIE-Bench metrics, the paper's layout and scales)", PAPER_COLUMNS),
                           ("Against the ground truth (world benchmark)", GROUND_TRUTH_COLUMNS),
                           ("Inversion cost", COST_COLUMNS)):
        table = method_table(results, columns)
        if table:
            lines += [f"## {title}", "", *table, ""]
    breakdown = [m for m in CATEGORY_METRICS if m in results.metrics and any(
        math.isfinite(v) for method in results.methods for v in results.values(m, method))]
    if breakdown:
        lines += ["## Per category", ""]
        for metric in breakdown:
            lines += [f"### {ALL_COLUMNS[metric].title}", "", *category_table(results, metric), ""]
    failures = [r for r in results.rows if r.get(ERROR_COLUMN)]
    if failures:
        lines += ["## Failed edits", ""] + [f"- {r['id']} {r['inversion']}+{r['engine']}: {r[ERROR_COLUMN]}"
                                             for r in failures] + [""]
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.relative_to(base) if base else p})" for p in plots] + [""]
    return "\n".join(lines)


def _settings_lines(settings: dict, results: Results) -> list[str]:
    lines = [f"{len(results.rows)} rows: {len({r['id'] for r in results.rows})} images × "
             f"{len(results.methods)} inversion+engine pairs."]
    if settings:
        commands = settings.get("commands", [settings.get("command", [])])
        lines += [""] + [f"- command: `{' '.join(command) or '?'}`" for command in commands]
        lines += [f"- model: {settings.get('model')}, steps {settings.get('steps')}, "
                  f"seed {settings.get('seed')}, dtype {settings.get('dtype')}, processes {settings.get('world_size', 1)}"]
        if settings.get("machine"):
            lines.append("- machine: " + ", ".join(f"{k} {v}" for k, v in settings["machine"].items() if v))
        lines += _protocol_lines(settings)
    return lines + ["", MEANS_RULE, ""]


def _protocol_lines(settings: dict) -> list[str]:
    """The scoring protocol and the evaluator's fixed variants, as run.json recorded them."""
    if not settings.get("protocol"):
        return ["- protocol: not recorded (a run from before protocols were recorded: edits scored lossless)"]
    variants = settings.get("evaluator", {})
    lines = [f"- protocol: {settings['protocol']} ({variants.get('protocol', '')}); structure-distance resize "
             f"{settings.get('structure_resize')}"]
    lines += [f"- {name.replace('_', ' ')}: {text}" for name, text in variants.items() if name != "protocol"]
    return lines


# ---------------------------------------------------------------- plots


def bar_charts(results: Results, folder: Path) -> list[Path]:
    """One bar chart per metric that has data: the mean per inversion + engine, paper scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    labels = [f"{inv}\n{eng}" for inv, eng in results.methods]
    for metric in results.metrics:
        column = ALL_COLUMNS.get(metric, Column(metric, metric))
        means = [results.mean(metric, m).value * column.scale for m in results.methods]
        if all(math.isnan(v) for v in means):
            continue
        fig, axis = plt.subplots(figsize=(max(4.0, 0.9 * len(labels) + 1.5), 3.6))
        axis.bar(range(len(labels)), [0 if math.isnan(v) else v for v in means], color="tab:blue")
        axis.set_xticks(range(len(labels)), labels, fontsize=8)
        axis.set_title(column.title)
        axis.grid(axis="y", alpha=0.3)
        paths.append(save_figure(fig, folder / f"{metric}.png"))
    return paths


def save_figure(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def step_profiles(diagnostics: Path, folder: Path) -> list[Path]:
    """Per-timestep mean iterations and mean residual (before / after) of each inversion method,
    from the diagnostics the runner saved."""
    files = sorted(diagnostics.glob("*.json")) if diagnostics.is_dir() else []
    if not files:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sums: dict[str, dict[int, list[list[float]]]] = defaultdict(lambda: defaultdict(lambda: [[], [], []]))
    for file in files:
        data = json.loads(file.read_text())
        for step in data.get("steps", []):
            bucket = sums[data.get("inversion", data.get("method", "?"))][int(step["timestep"])]
            bucket[0].append(float(step.get("iterations", 0)))
            bucket[1].append(float(step.get("residual_before", math.nan)))
            bucket[2].append(float(step.get("residual_after", math.nan)))
    paths = []
    for name, (index, ylabel, log) in {"steps-iterations": (0, "mean iterations", False),
                                       "steps-residuals": (2, "mean squared residual after", True)}.items():
        fig, axis = plt.subplots(figsize=(7, 4))
        for method, per_step in sums.items():
            timesteps = sorted(per_step)
            values = [mean(per_step[t][index]).value for t in timesteps]
            if log:
                axis.semilogy(timesteps, [max(v, 1e-12) for v in values], "o-", ms=3, label=method)
                before = [mean(per_step[t][1]).value for t in timesteps]
                axis.semilogy(timesteps, [max(v, 1e-12) for v in before], ":", alpha=0.6, label=f"{method} (before)")
            else:
                axis.plot(timesteps, values, "o-", ms=3, label=method)
        axis.set_xlabel("timestep t (inversion runs left to right)")
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
        paths.append(save_figure(fig, folder / f"{name}.png"))
    return paths


def example_grid(results: Results, folder: Path, out: Path) -> list[Path]:
    """With --save-images: the first image of each category, one row each: source, ground-truth
    target (if any), then every inversion + engine's edit."""
    from PIL import Image

    from ..editing.grid import labelled_grid
    from .datasets import load_dataset

    from .protocol import saved_name

    images = folder / "images"
    protocol = results.settings.get("protocol") or "lossless"
    data = results.settings.get("data")
    if not images.is_dir() or not data or not Path(data).is_dir():
        return []
    firsts = {}
    for item in load_dataset(data).items:
        firsts.setdefault(item.category, item)
    methods = [m for m in results.methods if (images / f"{m[0]}+{m[1]}").is_dir()]
    rows = []
    for category in sorted(firsts, key=int):
        item = firsts[category]
        edits = [images / f"{inv}+{eng}" / saved_name(item.image_path, protocol) for inv, eng in methods]
        cells = [item.load_image(), item.load_target()] + [Image.open(p) if p.is_file() else None for p in edits]
        rows.append((f"{category} {item.category_name}: {item.editing_prompt}", cells))
    if not rows:
        return []
    columns = ["source", "target"] + [f"{inv}+{eng}" for inv, eng in methods]
    path = out / "examples.png"
    labelled_grid(rows, columns).save(path)
    return [path]


def write_report(results_path: str | Path, out: str | Path | None = None) -> Path:
    """report.md plus plots/ in `out` (default: a report/ folder beside the results)."""
    results = load_results(results_path)
    source = Path(results_path)
    folder = source if source.is_dir() else source.parent
    out = check_output_dir(Path(out) if out else folder / "report", "report")
    with staged_output(out) as stage:  # all-or-nothing; a full disk or a file in the way is one line
        plots_folder = stage / "plots"
        plots_folder.mkdir()
        plots = (example_grid(results, folder, plots_folder) + bar_charts(results, plots_folder)
                 + step_profiles(folder / "diagnostics", plots_folder))
        (stage / "report.md").write_text(markdown(results, plots, base=stage))
    return out / "report.md"
