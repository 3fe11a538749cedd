"""`spdinv world export|train`."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path


def add_world_parser(sub) -> None:
    world = sub.add_parser("world", help="the shapes world: export edit pairs, train the embedded model")
    actions = world.add_subparsers(dest="world_command", required=True, parser_class=type(world))

    export = actions.add_parser("export", help="write N edit pairs with ground truth as a PIE-Bench-format folder")
    export.add_argument("out", type=Path)
    export.add_argument("--n", type=int, default=100, help="number of edit pairs (default 100)")
    export.add_argument("--seed", type=int, default=0)
    export.set_defaults(run=run_export)

    train = actions.add_parser("train", help="train the shapes-world SD model from scratch (resumable)")
    train.add_argument("--work", type=Path, required=True, help="checkpoints and caches")
    train.add_argument("--out", type=Path, required=True, help="where the diffusers folder is written")
    train.add_argument("--export-only", action="store_true", help="write the latest checkpoint (EMA weights) to --out and stop")
    from .config import TrainConfig

    for name, value in asdict(TrainConfig()).items():
        train.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    train.set_defaults(run=run_train)


def run_export(args: argparse.Namespace) -> None:
    from ..errors import SpdinvError
    from ..outputs import check_output_dir
    from .dataset import export

    if args.n <= 0:
        raise SpdinvError(f"--n must be > 0, got {args.n}")
    check_output_dir(args.out)
    export(args.out, args.n, args.seed)
    print(f"wrote {args.n} edit pairs to {args.out}")


def run_train(args: argparse.Namespace) -> None:
    import logging

    from .train import TrainConfig, Trainer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    config = TrainConfig(**{k: getattr(args, k) for k in asdict(TrainConfig())})
    trainer = Trainer(args.work, config)
    if args.export_only:
        trainer.export_checkpoint(args.out)
    else:
        trainer.run(args.out)
