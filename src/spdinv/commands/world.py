"""`spdinv world export|train|train-concept-encoder`."""

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
    train.add_argument("--flow", action="store_true",
                       help="train shapes-world-flow instead: a rectified-flow MMDiT (StableDiffusion3Pipeline folder) "
                            "on the shipped model's frozen VAE and text encoder; the --flow-* options and the shared "
                            "ones apply, the --vae-* / --unet-* ones do not")
    from ..world.config import FlowTrainConfig, TrainConfig

    settings = {**asdict(TrainConfig()), **asdict(FlowTrainConfig())}  # shared names have the same defaults
    for name, value in settings.items():
        train.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    train.set_defaults(run=run_train)

    from ..world.config import ConceptEncoderConfig

    encoder = actions.add_parser("train-concept-encoder",
                                 help="train the ELITE-style concept encoder on the embedded model (resumable)")
    encoder.add_argument("--out", type=Path, required=True,
                         help="folder for the checkpoint and the result (concept-encoder.safetensors + .json); "
                              "a rerun continues from its checkpoint")
    encoder.add_argument("--quiet", action="store_true", help="no progress bar")
    for name, value in asdict(ConceptEncoderConfig()).items():
        encoder.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    encoder.set_defaults(run=run_train_concept_encoder)


def run_export(args: argparse.Namespace) -> None:
    from ..errors import SpdinvError
    from ..outputs import check_output_dir
    from ..world.dataset import export

    if args.n <= 0:
        raise SpdinvError(f"--n must be > 0, got {args.n}")
    check_output_dir(args.out)
    export(args.out, args.n, args.seed)
    print(f"wrote {args.n} edit pairs to {args.out}")


def check_shared_settings(config, positive: tuple[str, ...], seed_limit: int) -> None:
    """The settings every trainer has (and `positive`) in range, as one-line errors. `seed_limit`: the largest
    seed whose per-step seeds (seed * a constant + step) stay below MAX_SEED."""
    from ..arguments import parse_device
    from ..errors import SpdinvError

    for name in positive + ("n_scenes", "checkpoint_every", "threads"):
        if not getattr(config, name) > 0:
            raise SpdinvError(f"--{name.replace('_', '-')} must be > 0, got {getattr(config, name)}")
    for name in ("ema_decay", "caption_dropout"):
        if not 0 <= getattr(config, name) < 1:
            raise SpdinvError(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(config, name)}")
    if not 0 <= config.seed <= seed_limit:
        raise SpdinvError(f"--seed must be in [0, {seed_limit}], got {config.seed}")
    try:
        parse_device(config.device)
    except argparse.ArgumentTypeError as error:
        raise SpdinvError(f"--device {error}") from None


def check_config(config) -> None:
    """Every training setting in its range, as a one-line error before anything is built."""
    from ..arguments import MAX_SEED
    from ..errors import SpdinvError

    check_shared_settings(config, ("vae_steps", "vae_batch", "vae_crop", "unet_steps", "unet_batch", "unet_warmup",
                                   "vae_lr", "unet_lr"),  # steps: the cosine schedules divide by them
                          MAX_SEED // 8_000_000)  # the trainer derives per-step seeds seed * 7_000_003 + step
    if not config.vae_kl_weight >= 0:
        raise SpdinvError(f"--vae-kl-weight must be >= 0, got {config.vae_kl_weight}")
    if config.vae_crop > 64 or config.vae_crop % 4:
        raise SpdinvError(f"--vae-crop must be a multiple of 4 up to 64 (the world's image size), got {config.vae_crop}")


def check_flow_config(config) -> None:
    """Every `--flow` training setting in its range, as a one-line error before anything is built."""
    from ..arguments import MAX_SEED
    from ..errors import SpdinvError

    check_shared_settings(config, ("flow_steps", "flow_batch", "flow_lr", "flow_warmup", "flow_layers", "flow_heads",
                                   "flow_head_dim", "flow_shift"),
                          MAX_SEED // 6_000_000)  # per-step seeds seed * 5_000_011 + step
    if config.flow_export_every < 0:
        raise SpdinvError(f"--flow-export-every must be >= 0, got {config.flow_export_every}")


def run_train(args: argparse.Namespace) -> None:
    import logging

    from ..errors import SpdinvError
    from ..outputs import check_output_dir
    from ..world.config import FlowTrainConfig, TrainConfig

    settings, check = (FlowTrainConfig, check_flow_config) if args.flow else (TrainConfig, check_config)
    config = settings(**{k: getattr(args, k) for k in asdict(settings())})
    check(config)
    check_output_dir(args.work, "--work")
    check_output_dir(args.out)
    if args.export_only and not (args.work / "checkpoint.pt").is_file():
        raise SpdinvError(f"no checkpoint in {args.work} to export; train first (without --export-only)")

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.flow:
        from ..world.flow_train import FlowTrainer

        flow = FlowTrainer(args.work, config)
        flow.resume()
        if not args.export_only:
            flow.train(args.out)
        flow.save_pipeline(args.out)
        return

    from ..world.train import Trainer

    trainer = Trainer(args.work, config)
    if args.export_only:
        trainer.export_checkpoint(args.out)
    else:
        trainer.run(args.out)


def check_concept_encoder_config(config) -> None:
    from ..arguments import MAX_SEED
    from ..errors import SpdinvError

    for name in ("steps", "batch", "warmup", "checkpoint_every", "threads", "learning_rate"):
        if not getattr(config, name) > 0:
            raise SpdinvError(f"--{name.replace('_', '-')} must be > 0, got {getattr(config, name)}")
    for name in ("word_l1", "attributes", "word_teacher", "diffusion"):
        if not getattr(config, name) >= 0:
            raise SpdinvError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(config, name)}")
    for name in ("w0_only", "teacher", "augment", "drawn"):
        if not 0 <= getattr(config, name) <= 1:
            raise SpdinvError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(config, name)}")
    if config.start and not Path(config.start).is_file():
        raise SpdinvError(f"--start: concept encoder not found: {config.start}")
    if config.word_teacher > 0 and not config.start:
        raise SpdinvError("--word-teacher needs --start (the encoder whose words it keeps)")
    if not 0 <= config.seed <= MAX_SEED // 2_000_000:  # per-step seeds are seed * 1_000_003 + step
        raise SpdinvError(f"--seed must be in [0, {MAX_SEED // 2_000_000}], got {config.seed}")


def run_train_concept_encoder(args: argparse.Namespace) -> None:
    import logging
    import time

    from ..errors import SpdinvError
    from ..world.config import ConceptEncoderConfig

    config = ConceptEncoderConfig(**{k: getattr(args, k) for k in asdict(ConceptEncoderConfig())})
    check_concept_encoder_config(config)
    if args.out.exists() and not args.out.is_dir():
        raise SpdinvError(f"--out must be a folder, not the file {args.out}")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SpdinvError(f"cannot create {args.out} ({error.strerror or error})") from None

    from ..world.concept_training import ConceptEncoderTrainer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    wall = time.perf_counter()
    trainer = ConceptEncoderTrainer(args.out, config)
    trainer.resume()
    trainer.train(progress=not args.quiet)
    path = trainer.save_result(args.out)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB) after {trainer.step} steps; "
          f"{time.perf_counter() - wall:.0f} s")
