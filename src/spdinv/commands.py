"""What the subcommands (`spdinv invert`, `edit`, `bench`) share once below the command line:
the inversion flags (built from the methods' option dataclasses), the model the model flags
describe, the checks made before it loads, and the prompt warnings."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from .arguments import add_option_arguments, add_steps_argument, flag_name, given_options
from .errors import SpdinvError

WORD_LEVEL_VOCABULARY = 5000  # fewer tokens than this: whole words (the shapes world's 333), not sub-word pieces


def inversion_classes() -> dict[str, type]:
    """Inversion method name -> its options dataclass."""
    from .inversion import METHODS

    return {name: method.options for name, method in METHODS.items()}


def add_inversion_arguments(parser: argparse.ArgumentParser) -> None:
    """--steps and one flag per inversion option (every method's)."""
    add_steps_argument(parser)
    add_option_arguments(parser, inversion_classes())


def inversion_options(args: argparse.Namespace) -> dict[str, object]:
    """The inversion options given on the command line (field name -> value)."""
    return given_options(args, inversion_classes())


def method_options(args: argparse.Namespace, methods: list[str]) -> dict[str, dict]:
    """Each selected method's options from the inversion flags given (with several, each method
    takes those it has); a flag no selected method has is an error."""
    import dataclasses

    from .inversion import get_method, make_options

    given = inversion_options(args)
    fields = {m: {f.name for f in dataclasses.fields(get_method(m).options)} for m in methods}
    unused = sorted(set(given) - set().union(*fields.values()))
    if unused:
        raise SpdinvError(f"{', '.join(flag_name(u) for u in unused)} do(es) not apply to inversion {', '.join(methods)}")
    chosen = {m: {k: v for k, v in given.items() if k in fields[m]} for m in methods}
    for m, options in chosen.items():
        make_options(m, **options)
    return chosen


def load_model_from_args(args: argparse.Namespace):
    """The model `spdinv.arguments.add_model_arguments` describes."""
    from .model import load_model

    return load_model(args.model, device=args.device, dtype=args.dtype, variant=args.variant, config=args.config)


def check_model_settings(args: argparse.Namespace) -> None:
    """Before the model loads: --steps within the timesteps its scheduler was trained with (read
    from the model folder; a hub id is checked once loaded), and a warning that float16 is slow
    on the CPU."""
    import json

    import torch

    from .inversion import check_steps
    from .model import resolve_model

    config = Path(resolve_model(args.model)) / "scheduler" / "scheduler_config.json"
    try:
        train_timesteps = int(json.loads(config.read_text())["num_train_timesteps"])
    except (OSError, ValueError, KeyError, TypeError):
        train_timesteps = None
    if train_timesteps is not None:
        check_steps(args.steps, train_timesteps)
    if args.dtype == "float16" and torch.device(args.device).type == "cpu":
        print("warning: float16 on the CPU is several times slower than float32 (no half-precision kernels there); "
              "use --dtype float32 on a CPU", file=sys.stderr)


def prompt_warnings(model, prompt: str, what: str = "prompt") -> list[str]:
    """One line each: the words the text encoder's window cuts off, and, for a word-level
    tokenizer like the embedded model's, the words it does not know (spelled out in letters,
    which the model never learnt)."""
    tokenizer, found = model.tokenizer, []
    ids = tokenizer(prompt, truncation=False).input_ids
    window = tokenizer.model_max_length
    if len(ids) > window:
        cut = tokenizer.decode(ids[window - 1:-1]).strip()
        cut = cut if len(cut) <= 60 else cut[:57] + "..."
        found.append(f"the {what} is {len(ids)} tokens; the text encoder reads {window}, so it ignores: {cut!r}")
    if len(tokenizer) < WORD_LEVEL_VOCABULARY:
        if getattr(model, "concept", None) is not None:  # the concept word is known by construction
            from .concepts import word_pattern

            prompt = word_pattern(model.concept.word).sub(" ", prompt)
        words = dict.fromkeys(re.findall(r"[a-z]+", prompt.lower()))
        unknown = [w for w in words if len(tokenizer.tokenize(w)) != 1]
        if unknown:
            found.append(f"the model does not know these {what} words: {', '.join(unknown)}")
    return found


def add_concept_arguments(parser: argparse.ArgumentParser) -> None:
    """--concept FILE and --concept-word WORD."""
    from .concepts import DEFAULT_WORD

    group = parser.add_argument_group("concept word")
    group.add_argument("--concept", type=Path, default=None,
                       help="a textual-inversion file (spdinv's or diffusers' .safetensors/.bin, A1111's .pt) whose "
                            "embedding the concept word stands for in every prompt")
    group.add_argument("--concept-word", default=DEFAULT_WORD,
                       help=f"the placeholder word the prompts use for the concept (default {DEFAULT_WORD}; "
                            "case-sensitive)")


def concept_from_args(args: argparse.Namespace, prompts: dict[str, str]):
    """The concept --concept names (None without it), read and checked before the model loads:
    at least one of `prompts` (what -> prompt) must contain the concept word."""
    from .concepts import check_word, load_concept, mentions

    if args.concept is None:
        return None
    word = check_word(args.concept_word)
    concept = load_concept(args.concept, word)
    if not any(mentions(prompt, word) for prompt in prompts.values()):
        raise SpdinvError(f"--concept is given but no {' or '.join(prompts)} contains the concept word {word!r} "
                          "(case-sensitive, a whole word)")
    return concept
