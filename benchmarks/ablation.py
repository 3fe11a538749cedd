"""The paper's SPDInv ablation (K, delta, lr) re-run on the world benchmark, plus the per-timestep
iteration profile and the scale of DDIM's own fixed-point residual.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ablation.py DATA --limit 50 --out ablation \
        [--processes 2] [--configs default,K5,...] [--model DIR]

DATA is a PIE-Bench-format folder (`spdinv world export DATA --n 100 --seed 0`). Each configuration
is one resumable `spdinv bench DATA --inversion spdinv --engine p2p ...` run (DINO and CLIP off)
in OUT/<config>, under torchrun when --processes > 1. One factor changes at a time around the
paper's defaults (K 25, delta 5e-6, lr 1e-3); `relativeF` adds the scale-aware stop (each step must
also cut its residual to F x its first one); `ddim` is plain DDIM inversion, whose per-step residual
shows how large the fixed-point error is on this model; `uncond-source` edits with the source
prompt as the unconditional embedding, as the official P2P script does. Writes OUT/ablation.md, OUT/ablation.json
and OUT/ablation-steps.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

from spdinv.bench.report import load_results, mean, save_figure

PAPER_DELTA = 5e-6
CONFIG_PATTERN = re.compile(r"^(default|ddim|uncond-source|K(\d+)|delta([0-9.e-]+)|lr([0-9.e-]+)|relative([0-9.e-]+))$")
METRICS = "psnr,mse,ssim,gt_psnr,gt_ssim,edit_accuracy,noise_error,reconstruction_error,network_calls,seconds,edit_seconds"


def config_arguments(name: str) -> list[str]:
    """`spdinv bench` arguments for one configuration name."""
    match = CONFIG_PATTERN.match(name)
    if not match:
        raise SystemExit(f"unknown configuration {name!r}: use default, ddim, uncond-source, K<int>, delta<x>, lr<x>, "
                         "relative<x>")
    if name == "ddim":
        return ["--inversion", "ddim"]
    if name == "uncond-source":  # the official P2P script's setting: the source prompt as the unconditional
        return ["--inversion", "spdinv", "--engine-option", "uncond=source"]
    arguments = ["--inversion", "spdinv"]
    for flag, value in zip(("--K", "--delta", "--lr", "--relative-delta"), match.groups()[1:]):
        if value is not None:
            arguments += [flag, value]
    return arguments


def run_config(name: str, args: argparse.Namespace) -> Path:
    out = args.out / name
    bench = ["bench", str(args.data), *config_arguments(name), "--engine", "p2p", "--limit", str(args.limit),
             "--out", str(out), "--metrics", METRICS, "--dino", "none", "--clip", "none", "--quiet"]
    if args.model:
        bench += ["--model", args.model]
    if args.processes > 1:
        launcher = [str(Path(sys.executable).with_name("torchrun")), f"--nproc-per-node={args.processes}", "-m", "spdinv"]
    else:
        launcher = [sys.executable, "-m", "spdinv"]
    print(f"[{name}] {' '.join(launcher[1:] if args.processes > 1 else ['spdinv'])} {' '.join(bench)}", flush=True)
    subprocess.run(launcher + bench, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return out


def step_profile(out: Path) -> dict[int, dict[str, list[float]]]:
    """Per sampling-step index (0 = the first inversion step, nearest the image): iterations and
    the residual before iterating (the DDIM guess's)."""
    profile: dict[int, dict[str, list[float]]] = {}
    for file in sorted((out / "diagnostics").glob("*.json")):
        for step in json.loads(file.read_text())["steps"]:
            bucket = profile.setdefault(int(step["index"]), {"iterations": [], "before": []})
            bucket["iterations"].append(float(step["iterations"]))
            bucket["before"].append(float(step["residual_before"]))
    return dict(sorted(profile.items()))


def summarise(name: str, out: Path) -> dict:
    results = load_results(out)
    method = results.methods[0]
    summary = {"config": name, "edits": len(results.rows)}
    for metric in METRICS.split(","):
        summary[metric] = mean(results.values(metric, method)).value
    profile = step_profile(out)
    residuals = [r for bucket in profile.values() for r in bucket["before"]]
    summary["iterations_per_step"] = [statistics.fmean(b["iterations"]) for b in profile.values()]
    summary["gradient_calls"] = sum(summary["iterations_per_step"])
    summary["median_residual_per_step"] = [statistics.median(b["before"]) for b in profile.values()]
    summary["median_residual"] = statistics.median(residuals) if residuals else math.nan
    summary["share_above_delta"] = sum(r > PAPER_DELTA for r in residuals) / len(residuals) if residuals else math.nan
    return summary


def markdown(summaries: list[dict], command: str) -> str:
    lines = ["# SPDInv ablation on the world benchmark (P2P)", "", f"Command: `{command}`", "",
             "| config | edits | noise error | recon error | bg PSNR | bg SSIM ×10² | edit-region PSNR vs truth | "
             "edit accuracy % | network calls | gradient calls | inversion s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in summaries:
        lines.append(f"| {s['config']} | {s['edits']} | {s['noise_error']:.3g} | {s['reconstruction_error']:.3g} | "
                     f"{s['psnr']:.2f} | {100 * s['ssim']:.2f} | {s['gt_psnr']:.2f} | {100 * s['edit_accuracy']:.1f} | "
                     f"{s['network_calls']:.1f} | {s['gradient_calls']:.1f} | {s['seconds']:.2f} |")
    first = 10
    lines += ["", f"Mean iterations per inversion step (step 0 is nearest the image), steps 0-{first - 1} and the mean "
              f"over the rest:", "",
              "| config | " + " | ".join(str(i) for i in range(first)) + f" | {first}+ |", "|---|" + "---:|" * (first + 1)]
    for s in summaries:
        per_step = s["iterations_per_step"]
        rest = statistics.fmean(per_step[first:]) if len(per_step) > first else math.nan
        lines.append(f"| {s['config']} | " + " | ".join(f"{v:.1f}" for v in per_step[:first]) + f" | {rest:.2f} |")
    lines += ["", "The DDIM guess's own mean squared fixed-point residual (before any iteration):", ""]
    for s in summaries:
        lines.append(f"- {s['config']}: median {s['median_residual']:.2g} over all steps; above the paper's delta "
                     f"5e-6 in {100 * s['share_above_delta']:.1f}% of steps; per-step medians, first 8: "
                     + ", ".join(f"{v:.2g}" for v in s["median_residual_per_step"][:8]))
    return "\n".join(lines) + "\n"


def plot(summaries: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for s in summaries:
        left.plot(s["iterations_per_step"], "o-", ms=3, label=s["config"])
        right.semilogy(s["median_residual_per_step"], "-", label=s["config"])
    right.axhline(PAPER_DELTA, color="k", ls="--", lw=1, label="paper's delta 5e-6")
    left.set(xlabel="inversion step (0 = nearest the image)", ylabel="mean iterations", title="SPDInv iterations per step")
    right.set(xlabel="inversion step", ylabel="median residual of the DDIM guess", title="Fixed-point residual before iterating")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path)
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("ablation"))
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--configs", default="default,K5,K50,delta5e-4,lr5e-3,relative0.1,uncond-source,ddim")
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    for name in names:
        config_arguments(name)  # every name checked before anything runs
    args.out.mkdir(parents=True, exist_ok=True)
    summaries = [summarise(name, run_config(name, args)) for name in names]
    command = "OMP_NUM_THREADS=1 python benchmarks/ablation.py " + " ".join(sys.argv[1:])
    (args.out / "ablation.md").write_text(markdown(summaries, command))
    (args.out / "ablation.json").write_text(json.dumps(summaries, indent=2) + "\n")
    plot(summaries, args.out / "ablation-steps.png")
    print((args.out / "ablation.md").read_text())


if __name__ == "__main__":
    main()
