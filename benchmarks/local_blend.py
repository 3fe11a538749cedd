"""LocalBlend's mask and the background it keeps, at two map resolutions, on world P2P edits.

    spdinv world export world40 --n 40 --seed 0
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/local_blend.py world40 [--limit 24] [--steps 50]
        [--configs 0.5:max,0.5:range,auto:range,auto:max,auto:range:noise] [--json out.json]

Each pair with blend words is inverted once with DDIM and edited with P2P (the bench's settings:
PIE-Bench's blend words) once per LocalBlend configuration SCALE:NORM: the map resolution
(`blend_scale`, relative to the latent; `auto` = the default, the maps with 16 tokens a side)
and `blend_norm` (max: P2P's; range: minus the map's min first). `0.5:max` is what the embedded
model got before the default changed; a third part `:noise` reads the mask from the difference of
the two branches' noise predictions instead (`blend_map`), a fourth sets `blend_threshold`
(default 0.3), e.g. `auto:range:noise:0.5`. Per configuration, means over pairs:
mask coverage (fraction of the frame LocalBlend lets the target change), IoU of that mask with
the pair's ground-truth edit region (both at image size, without PIE-Bench's border), background
PSNR (PIE-Bench's: outside the edit region, with the border) and the attribute classifier's edit
accuracy. One held-out image drawn here with PIL (a pink square, 25% of the frame) is edited to
green and reported on its own (coverage and IoU with the square).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from spdinv.bench.datasets import load_dataset
from spdinv.masks import rle_decode
from spdinv.bench.metrics import background_scores, load_judge, mask_tensor, to_unit
from spdinv.editing import edit
from spdinv.images import conform_image, to_pil
from spdinv.inversion import invert
from spdinv.model import load_model


def mask_at(mask: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """LocalBlend's (1, 1, h, w) latent mask at image size (nearest), as a bool array."""
    return F.interpolate(mask.float(), size=size, mode="nearest")[0, 0].numpy() > 0.5


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else float("nan")


def blend_options(config: str) -> dict:
    scale, norm, *rest = config.split(":")
    options = {"blend_scale": None if scale == "auto" else float(scale), "blend_norm": norm,
               "blend_map": rest[0] if rest else "attention"}
    return options | ({"blend_threshold": float(rest[1])} if len(rest) > 1 else {})


def held_out(model, steps: int, configs: list[str]) -> dict:
    image = Image.new("RGB", (64, 64), (40, 60, 200))
    ImageDraw.Draw(image).rectangle([16, 16, 47, 47], fill=(255, 120, 200))
    square = np.zeros((64, 64), dtype=bool)
    square[16:48, 16:48] = True
    source, target = "a large pink square in the centre on a blue background", "a large green square in the centre on a blue background"
    inversion = invert(model, conform_image(image, model.image_size)[0], source, "ddim", steps, progress=False)
    out = {}
    for config in configs:
        result = edit(model, None, source, target, inversion, "p2p", num_steps=steps, blend="square",
                      **blend_options(config))
        lb = mask_at(result.mask, (64, 64))
        out[config] = {"coverage": float(lb.mean()), "iou": iou(lb, square)}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--limit", type=int, default=24)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--configs", default="0.5:max,0.5:range,auto:range,auto:max")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    configs = args.configs.split(",")
    model, judge = load_model(), load_judge(None)
    items = [item for item in load_dataset(args.data).items if item.blend_words][: args.limit]
    rows: dict[str, list[dict]] = {config: [] for config in configs}
    for item in items:
        source = item.load_image()
        width, height = item.image_size
        truth = rle_decode(list(item.mask_rle), (height, width), official_border=False).astype(bool)
        image = conform_image(source, model.image_size)[0]
        inversion = invert(model, image, item.source_prompt, "ddim", args.steps, progress=False)
        for config in configs:
            torch.manual_seed(0)
            result = edit(model, None, item.source_prompt, item.target_prompt, inversion, "p2p", num_steps=args.steps,
                          blend=" ".join(item.blend_words), **blend_options(config))
            edited = to_pil(result.edited)[0].resize(source.size, Image.LANCZOS)
            lb = mask_at(result.mask, (height, width))
            background = background_scores(to_unit(source), to_unit(edited), mask_tensor(item.mask()))
            rows[config].append({"id": item.id, "category": item.category, "coverage": float(lb.mean()),
                                "iou": iou(lb, truth), "truth_coverage": float(truth.mean()),
                                "bg_psnr": background["psnr"],
                                "accuracy": judge(edited, item.ground_truth.target_scene)})
    summary = {config: {key: statistics.fmean(r[key] for r in rs if r[key] == r[key])
                       for key in ("coverage", "iou", "truth_coverage", "bg_psnr", "accuracy")}
               for config, rs in rows.items()}
    extra = held_out(model, args.steps, configs)
    print(f"{len(items)} world P2P edits (DDIM inversion, {args.steps} steps)\n")
    print("| blend_scale:blend_norm | LocalBlend mask coverage % | truth region % | IoU with truth | bg PSNR dB | edit accuracy % |"
          " held-out square: coverage % | IoU |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for config, s in summary.items():
        print(f"| {config} | {100 * s['coverage']:.1f} | {100 * s['truth_coverage']:.1f} | {s['iou']:.3f} | "
              f"{s['bg_psnr']:.2f} | {100 * s['accuracy']:.1f} | {100 * extra[config]['coverage']:.1f} | "
              f"{extra[config]['iou']:.3f} |")
    a = configs[0]
    for b in configs[1:]:
        diffs = [rb["bg_psnr"] - ra["bg_psnr"] for ra, rb in zip(rows[a], rows[b]) if rb["bg_psnr"] == rb["bg_psnr"]
                 and ra["bg_psnr"] == ra["bg_psnr"]]
        print(f"\npaired bg PSNR difference {b} - {a}: mean {statistics.fmean(diffs):+.2f} dB over {len(diffs)} pairs, "
              f"{sum(d > 0 for d in diffs)} higher, {sum(d < 0 for d in diffs)} lower")
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "held_out": extra, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
