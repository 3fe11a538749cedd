"""Throughput of `spdinv bench` with N processes against 1, on the same job list.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_scaling.py [--processes 2] [--n-images 8]
        [--steps 10] [--model DIR] [--inversion spdinv] [--engine p2p] [--work DIR]

Exports a shapes-world PIE-Bench folder, then times `spdinv bench` once as one process and once
under `torchrun --nproc-per-node N` (each process single-threaded, evaluation models off), each
into a fresh output folder, then once more as one process with N threads (what a user gets without
torchrun), and checks that the two merged CSVs agree outside the timing columns.
Wall time includes each process's start-up (imports, model load): the cost a user pays.
Default model: a tiny random SD pipeline saved to the work folder (use --model for a real one).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(command: list[str], threads: int = 1) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def deterministic_part(path: Path) -> list[str]:
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    keep = [i for i, name in enumerate(header) if name not in ("seconds", "edit_seconds")]
    return [",".join(line.split(",")[i] for i in keep) for line in lines]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--n-images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--model", default=None)
    parser.add_argument("--inversion", default="spdinv")
    parser.add_argument("--engine", default="p2p")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="spdinv-scaling-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data"
    if not (data / "mapping_file.json").exists():
        from spdinv.world.dataset import export

        export(data, args.n_images, seed=0)
    model = args.model
    if model is None:
        from spdinv.testing import tiny_pipeline

        model = str(work / "tiny-model")
        if not Path(model, "model_index.json").exists():
            tiny_pipeline().save_pretrained(model)

    bench = ["bench", str(data), "--inversion", args.inversion, "--engine", args.engine, "--model", model,
             "--steps", str(args.steps), "--dino", "none", "--clip", "none", "--quiet", "--no-diagnostics"]
    outs = {1: work / "out-1", args.processes: work / f"out-{args.processes}", "threaded": work / "out-1-threaded"}
    for out in outs.values():
        shutil.rmtree(out, ignore_errors=True)
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    one = timed([sys.executable, "-m", "spdinv", *bench, "--out", str(outs[1])])
    many = timed([torchrun, f"--nproc-per-node={args.processes}", "-m", "spdinv", *bench,
                  "--out", str(outs[args.processes])])
    # the single process a user gets by default: one process using as many threads as there are processes
    threaded = timed([sys.executable, "-m", "spdinv", *bench, "--out", str(outs["threaded"])], threads=args.processes)
    same = deterministic_part(outs[1] / "results.csv") == deterministic_part(outs[args.processes] / "results.csv")
    rows = len((outs[1] / "results.csv").read_text().splitlines()) - 1
    result = {"rows": rows, "seconds_1": round(one, 2), f"seconds_{args.processes}": round(many, 2),
              "speedup": round(one / many, 3), f"seconds_1_process_{args.processes}_threads": round(threaded, 2),
              "speedup_vs_threaded": round(threaded / many, 3), "csv_identical_outside_timings": same,
              "cpus": os.cpu_count(), "load_average": os.getloadavg()}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
