"""`spdinv bench` and `spdinv report`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _names(values: list[str]) -> list[str]:
    """`--inversion ddim,spdinv` and `--inversion ddim spdinv` alike; order kept, repeats dropped."""
    return list(dict.fromkeys(n.strip() for v in values for n in v.split(",") if n.strip()))


def _key_value(text: str) -> tuple[str, object]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip().replace("-", "_"), value


def add_bench_parser(sub) -> None:
    from ..arguments import add_model_arguments, positive_int
    from .common import add_inversion_arguments, families_epilog
    from .edit import add_preset_argument
    from ..bench.lpips import BACKBONE_FILE
    from ..bench.metrics import DEFAULT_CLIP, DEFAULT_DINO, METRICS, STRUCTURE_RESIZES
    from ..bench.protocol import PROTOCOLS

    bench = sub.add_parser("bench", help="benchmark inversions x engines on a PIE-Bench-format folder (resumable)",
                           description="One CSV row per image x inversion x engine. Rerun the same command to "
                                       "resume. Under torchrun/accelerate launch the images are sharded over ranks.",
                           epilog=families_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_argument("data", type=Path, help="PIE-Bench-format folder (mapping_file.json), e.g. `spdinv world export` output")
    bench.add_argument("--inversion", nargs="+", required=True, help="inversion methods, comma- or space-separated")
    bench.add_argument("--engine", nargs="+", required=True, help="editing engines, comma- or space-separated")
    bench.add_argument("--categories", nargs="+", default=None, help="editing_type_id values (0-9) or names; default all")
    bench.add_argument("--limit", type=positive_int, default=None, help="only the first N images (after --categories)")
    bench.add_argument("--out", type=Path, default=Path("bench-out"), help="output folder (default ./bench-out)")
    bench.add_argument("--metrics", default="all", help=f"comma-separated, default all: {', '.join(METRICS)}")
    bench.add_argument("--engine-option", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                       help="passed to the editing engine (repeatable; VALUE read as JSON when it parses)")
    evaluation = bench.add_argument_group("evaluation models (local folders or hub ids already in the cache)")
    evaluation.add_argument("--dino", default=DEFAULT_DINO,
                            help=f"structure-distance ViT (default {DEFAULT_DINO}; 'none' to skip)")
    evaluation.add_argument("--clip", default=DEFAULT_CLIP, help=f"CLIP for the CLIP score (default {DEFAULT_CLIP}; 'none' to skip)")
    evaluation.add_argument("--lpips-backbone", default=None, metavar="FILE",
                            help=f"torchvision's SqueezeNet 1.1 weights ({BACKBONE_FILE}; default: torch hub's "
                                 "cache, checkpoints/ folder); never downloaded, torchvision not needed")
    evaluation.add_argument("--protocol", choices=list(PROTOCOLS), default=None,
                            help="pie-bench: score each edit after a JPEG quality-75 round trip, as the official "
                                 "scripts do (default for the real PIE-Bench); lossless: score it as generated "
                                 "(default for world exports)")
    evaluation.add_argument("--structure-resize", choices=list(STRUCTURE_RESIZES), default=None,
                            help="resize to the DINO input: official = bilinear without antialiasing, as the paper's "
                                 "evaluator (default under --protocol pie-bench); antialias (default otherwise)")
    evaluation.add_argument("--classifier", default=None, help="attribute classifier weights (default: the packaged one)")
    bench.add_argument("--no-diagnostics", action="store_true", help="do not save per-step inversion diagnostics")
    bench.add_argument("--save-images", action="store_true",
                       help="also save every edit under OUT/images/, exactly as it was scored (the JPEG itself "
                            "under --protocol pie-bench, else a PNG)")
    add_preset_argument(bench)
    add_inversion_arguments(bench)
    add_model_arguments(bench)
    bench.set_defaults(seed=1234, run=run_bench)

    report = sub.add_parser("report", help="markdown tables (the paper's layout) and plots from bench results")
    report.add_argument("results", type=Path, help="results.csv or a bench output folder")
    report.add_argument("--out", type=Path, default=None, help="report folder (default RESULTS/report)")
    report.set_defaults(run=run_report)


def _model_or_none(name: str | None) -> str | None:
    """'none' (or '') switches an evaluation model off."""
    return None if name is None or name.strip().lower() in ("", "none") else name


def bench_options(args: argparse.Namespace):
    from .common import given_inversion_options
    from ..model import resolve_dtype
    from ..bench.metrics import EvaluationModels, parse_metrics
    from ..bench.runner import BenchOptions

    return BenchOptions(
        data=args.data, inversions=_names(args.inversion), engines=_names(args.engine),
        out=args.out, categories=_names(args.categories) if args.categories else None, limit=args.limit,
        model=str(args.model) if args.model else None, variant=args.variant, config=args.config,
        device=args.device, dtype=str(resolve_dtype(args.dtype, args.device)).removeprefix("torch."), steps=args.steps,
        seed=args.seed, metrics=parse_metrics(args.metrics),
        evaluation=EvaluationModels(dino=_model_or_none(args.dino), clip=_model_or_none(args.clip),
                                    lpips_backbone=args.lpips_backbone, classifier=args.classifier),
        inversion_options=given_inversion_options(args),
        engine_options=dict(args.engine_option), preset=args.preset, save_diagnostics=not args.no_diagnostics,
        save_images=args.save_images, progress=not args.quiet, protocol=args.protocol,
        structure_resize=args.structure_resize,
    )


def run_bench(args: argparse.Namespace) -> None:
    from .common import check_model_settings
    from ..outputs import check_output_dir
    from ..bench.runner import run_benchmark

    options = bench_options(args)
    check_output_dir(options.out)
    check_model_settings(args)
    summary = run_benchmark(options)
    if summary.results is not None:
        print(summary)


def run_report(args: argparse.Namespace) -> None:
    from ..bench.report import write_report

    path = write_report(args.results, args.out)
    print(f"wrote {path}", file=sys.stdout)
