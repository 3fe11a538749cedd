"""Wall time of one `spdinv edit` on the embedded model, model load included, SPDInv + P2P vs
DDIM + P2P, measured in one run (fresh processes, no inversion cache), alternating the two.

    .venv/bin/python benchmarks/edit_time.py [--repeats 3] [--threads 2] [--model DIR]

Prints each run's seconds, the medians, and their ratio (the issue's target: SPDInv + P2P <= 10 s
and <= 1.5x DDIM + P2P; the paper's GPU figure is 2.3x).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = "a large red circle in the centre on a white background"
TARGET = "a large blue circle in the centre on a white background"


def one_edit(inversion: str, out: Path, threads: int, model: str | None) -> float:
    command = [sys.executable, "-m", "spdinv", "edit", str(ROOT / "examples" / "red-circle.png"), "--source", SOURCE,
               "--target", TARGET, "--inversion", inversion, "--engine", "p2p", "--blend", "circle circle",
               "--no-cache", "--quiet", "--out", str(out)]
    if model:
        command += ["--model", model]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    times: dict[str, list[float]] = {"ddim": [], "spdinv": []}
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats):
            for method in times:
                seconds = one_edit(method, Path(scratch) / f"{method}-{repeat}", args.threads, args.model)
                times[method].append(seconds)
                print(f"{method:7s} + p2p run {repeat + 1}: {seconds:.2f} s", flush=True)
    ddim, spd = statistics.median(times["ddim"]), statistics.median(times["spdinv"])
    print(f"\n| edit (model load included) | median s | runs |\n|---|---:|---|")
    print(f"| DDIM + P2P | {ddim:.2f} | {', '.join(f'{t:.2f}' for t in times['ddim'])} |")
    print(f"| SPDInv + P2P | {spd:.2f} | {', '.join(f'{t:.2f}' for t in times['spdinv'])} |")
    print(f"\nSPDInv / DDIM = {spd / ddim:.2f}x ({args.threads} threads)")


if __name__ == "__main__":
    main()
