"""Wall time of one `spdinv edit` on the embedded model, model load included, SPDInv + P2P (one
run per --solvers entry) vs DDIM + P2P, measured in one run (fresh processes, no inversion
cache), alternating them.

    .venv/bin/python benchmarks/edit_time.py [--repeats 3] [--threads 2] [--model DIR] [--steps 50]
        [--solvers gradient,anderson]

Prints each run's seconds (wall, and the child process's CPU time, which other processes on a
shared machine move far less), the medians, and their ratios to DDIM + P2P (targets: SPDInv + P2P
<= 10 s and <= 1.5x with the paper's solver, <= 1.2x with the recommended one; the paper's GPU
figure is 2.3x), and where the time goes by the medians of
each run's config.json timings: start-up (interpreter, the imports the argument parser needs, exit:
the wall time outside the command's own clock), model load (the remaining imports and the weights),
inversion, edit (P2P sampling and decoding) and the rest (image checks, outputs).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = "a large red circle in the centre on a white background"
TARGET = "a large blue circle in the centre on a white background"


def _children_cpu() -> float:
    """User + system CPU seconds of the finished child processes: unlike wall time, barely moved by
    other processes competing for the cores."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def one_edit(inversion: list[str], out: Path, threads: int, model: str | None, steps: int) -> dict[str, float]:
    command = [sys.executable, "-m", "spdinv", "edit", str(ROOT / "examples" / "red-circle.png"), "--source", SOURCE,
               "--target", TARGET, "--inversion", *inversion, "--engine", "p2p", "--blend", "circle circle",
               "--steps", str(steps), "--no-cache", "--quiet", "--out", str(out)]
    if model:
        command += ["--model", model]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    cpu_before = _children_cpu()
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    cpu = _children_cpu() - cpu_before
    timings = json.loads((out / "config.json").read_text())
    own, run = timings["timings"], timings["runs"][0]["timings"]
    return {"wall": wall, "cpu": cpu, "start-up": wall - own["total"], "model load": own["model_load"], "inversion": run["invert"],
            "edit": run["edit"], "rest": own["total"] - own["model_load"] - run["invert"] - run["edit"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default=None)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--solvers", default="gradient", help="SPDInv solvers to time, comma-separated")
    args = parser.parse_args()
    variants = {"DDIM + P2P": ["ddim"]}
    variants |= {f"SPDInv ({solver}) + P2P": ["spdinv", "--solver", solver] for solver in args.solvers.split(",")}
    runs: dict[str, list[dict[str, float]]] = {label: [] for label in variants}
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats):
            for i, (label, inversion) in enumerate(variants.items()):
                parts = one_edit(inversion, Path(scratch) / f"{i}-{repeat}", args.threads, args.model, args.steps)
                runs[label].append(parts)
                print(f"{label} run {repeat + 1}: {parts['wall']:.2f} s", flush=True)
    walls = {label: [parts["wall"] for parts in done] for label, done in runs.items()}
    ddim = statistics.median(walls["DDIM + P2P"])
    print(f"\n{args.steps} steps, {args.threads} threads\n\n| edit (model load included) | median s | x DDIM + P2P | runs |"
          f"\n|---|---:|---:|---|")
    for label, times in walls.items():
        median = statistics.median(times)
        print(f"| {label} | {median:.2f} | {median / ddim:.2f} | {', '.join(f'{t:.2f}' for t in times)} |")
    cpus = {label: [parts["cpu"] for parts in done] for label, done in runs.items()}
    ddim_cpu = statistics.median(cpus["DDIM + P2P"])
    print("\n| edit (model load included) | median CPU s | x DDIM + P2P | runs |\n|---|---:|---:|---|")
    for label, times in cpus.items():
        median = statistics.median(times)
        print(f"| {label} | {median:.2f} | {median / ddim_cpu:.2f} | {', '.join(f'{t:.2f}' for t in times)} |")
    names = [name for name in runs["DDIM + P2P"][0] if name not in ("wall", "cpu")]
    print(f"\n| median s | {' | '.join(names)} |\n|---|{'---:|' * len(names)}")
    for label, done in runs.items():
        medians = [statistics.median(parts[name] for parts in done) for name in names]
        print(f"| {label} | {' | '.join(f'{m:.2f}' for m in medians)} |")


if __name__ == "__main__":
    main()
