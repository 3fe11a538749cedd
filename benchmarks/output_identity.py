"""Byte-for-byte check that a refactor changed no output: run a fixed set of `spdinv edit` runs
(several inversions and engines, a preset, LocalBlend, a non-square drawn image, the flow model),
one `spdinv invert`, one `spdinv bench` on two exported world pairs and one web-demo request
(compare mode), all on the shipped models with few steps, and write the SHA-256 of every PNG and
JSON/CSV output (timing fields, durations and temporary paths removed) to a file.

    OMP_NUM_THREADS=1 python benchmarks/output_identity.py benchmarks/output_identity.sha256
    OMP_NUM_THREADS=1 python benchmarks/output_identity.py /tmp/after.sha256
    diff benchmarks/output_identity.sha256 /tmp/after.sha256

Each run starts a fresh `python -m spdinv` process, at one thread, with `--no-cache`.

Known limits of this first version (keep them until the baseline is next regenerated, so that the
committed hashes stay comparable): config.json records the model's folder, so compare runs made
from the same source path (or rewrite it before hashing); `.spdinv-manifest.json` holds checksums
of config.json with its timings and bench/run.json the exported data's temporary folder, so those
differ between any two runs; `stable_json` drops keys by substring, which also drops
"inversion", "inversion_options" and "inversion_settings" ("version") and "image" keys.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

EDITS: dict[str, list[str]] = {
    "spdinv-p2p-blend": ["--inversion", "spdinv", "--engine", "p2p", "--blend", "square circle"],
    "ddim-all-engines": ["--inversion", "ddim", "--engine", "all"],
    "all-inversions-p2p": ["--inversion", "all", "--engine", "p2p"],
    "preset-official": ["--inversion", "spdinv", "--engine", "p2p", "--preset", "spdinv-official",
                        "--blend", "square circle"],
    "preset-pnpinv": ["--inversion", "null_text", "--engine", "masactrl", "--preset", "pnpinv"],
    "wide-gradient": ["--inversion", "spdinv", "--solver", "gradient", "--K", "3", "--engine", "pnp",
                      "--image", "wide"],
    "flow-all-inversions": ["--model", "shapes-world-flow", "--inversion", "all", "--engine", "none"],
    "flow-all-engines": ["--model", "shapes-world-flow", "--inversion", "spdinv", "--engine", "all"],
}
SOURCE = "a large purple square in the centre on a brown background"
TARGET = "a large purple circle in the centre on a brown background"
VOLATILE = ("timings", "seconds", "time", "elapsed", "lock_wait", "command", "cache", "started", "finished",
            "version", "image")


def drawn_images(folder: Path) -> dict[str, Path]:
    square = Image.new("RGB", (64, 64), (120, 72, 40))
    ImageDraw.Draw(square).rectangle((17, 15, 47, 45), fill=(140, 50, 170))
    wide = Image.new("RGB", (96, 64), (120, 72, 40))
    ImageDraw.Draw(wide).rectangle((30, 14, 62, 46), fill=(140, 50, 170))
    paths = {"square": folder / "square.png", "wide": folder / "wide.png"}
    square.save(paths["square"])
    wide.save(paths["wide"])
    return paths


def spdinv(*args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "spdinv", *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"spdinv {' '.join(args)} failed:\n{done.stderr}")


def stable_json(value):
    """The JSON value without the fields that differ between identical runs (times, paths)."""
    if isinstance(value, dict):
        return {k: stable_json(v) for k, v in value.items() if not any(w in k.lower() for w in VOLATILE)}
    if isinstance(value, list):
        return [stable_json(v) for v in value]
    return value


def digest(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".json":
        data = json.dumps(stable_json(json.loads(data)), sort_keys=True).encode()
    elif path.suffix == ".csv":
        rows = [stable_json(row) for row in csv.DictReader(io.StringIO(data.decode()))]
        data = json.dumps(rows, sort_keys=True).encode()
    return hashlib.sha256(data).hexdigest()


def run_edits(root: Path, images: dict[str, Path]) -> None:
    for name, flags in EDITS.items():
        flags = list(flags)
        image = images["square"]
        if "--image" in flags:
            at = flags.index("--image")
            image = images[flags[at + 1]]
            del flags[at:at + 2]
        spdinv("edit", str(image), "--source", SOURCE, "--target", TARGET, "--steps", "10", "--quiet",
               "--no-cache", "--out", str(root / name), *flags)
    spdinv("invert", str(images["square"]), "--prompt", SOURCE, "--method", "spdinv", "--steps", "10",
           "--quiet", "--out", str(root / "invert"))


def run_bench(root: Path) -> None:
    data = root / "world"
    spdinv("world", "export", "--n", "2", str(data))
    spdinv("bench", str(data), "--inversion", "ddim", "spdinv", "--engine", "p2p", "masactrl", "--steps", "10",
           "--quiet", "--out", str(root / "bench"), "--metrics", "psnr,mse,ssim,noise_error,network_calls,edit_calls", "--no-diagnostics")


def run_demo(root: Path, images: dict[str, Path]) -> None:
    from spdinv.demo.session import DemoSession, EditRequest
    from spdinv.model import load_model

    model = load_model(None)
    session = DemoSession(model, None, [images["square"].parent], workdir=root / "demo-work")
    request = EditRequest(images["square"], SOURCE, TARGET, ["ddim", "spdinv"], ["p2p", "masactrl"],
                          blend="square circle", steps=10, options={"cross_replace": 0.7})
    result = session.edit(request)
    target = root / "demo"
    result.folder.rename(target)


def main() -> None:
    import torch

    torch.set_num_threads(1)
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "output_identity.sha256")
    with tempfile.TemporaryDirectory(prefix="spdinv-identity-") as folder:
        root = Path(folder)
        images = drawn_images(root)
        run_edits(root, images)
        run_bench(root)
        run_demo(root, images)
        files = sorted(p for p in root.rglob("*") if p.suffix in {".png", ".json", ".csv"}
                       and "demo-work" not in p.parts and "world" not in p.parts[len(root.parts):][:1])
        lines = [f"{digest(p)}  {p.relative_to(root)}" for p in files]
    out.write_text("\n".join(lines) + "\n")
    print(f"{len(lines)} files hashed into {out}")


if __name__ == "__main__":
    main()
