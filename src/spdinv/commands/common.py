"""What the subcommands (`spdinv invert`, `edit`, `bench`) share once below the command line:
the inversion flags (built from the methods' option dataclasses), the model the model flags
describe, the checks made before it loads, and the prompt warnings."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from ..arguments import add_option_arguments, add_steps_argument, flag_name, given_options
from ..errors import SpdinvError

WORD_LEVEL_VOCABULARY = 5000  # fewer tokens than this: whole words (the shapes world's 333), not sub-word pieces


def inversion_classes() -> dict[str, type]:
    """Inversion method name -> its options dataclass."""
    from ..inversion import METHODS

    return {name: method.options for name, method in METHODS.items()}


def families_epilog() -> str:
    """`--help`'s closing lines: which inversions and engines run on which model family, from the
    registries (`inversion.applies_to`, `editing.engine_applies_to`); families with the same choices
    share a line, and the shipped models are named by their family."""
    import textwrap

    from ..editing import family_choices
    from ..families import SUPPORTED_FAMILIES
    from ..inversion import METHODS

    groups: dict = {}
    for family in SUPPORTED_FAMILIES:
        shipped = [name for name, of in shipped_families().items() if of == family]
        groups.setdefault(family_choices(family), []).append(family.name + "".join(f" (shipped: {n})" for n in shipped))
    free = {name for name, method in METHODS.items() if method.engine_free}
    lines = [textwrap.fill("which inversions and engines run on which model family (any other is refused in one line; "
                           "`spdinv edit --inversion all --engine all` takes those of the model's family):", width=100)]
    for choices, names in groups.items():
        inversions = ", ".join(f"{n} (engine none only)" if n in free else n for n in choices.inversions)
        text = f"{'; '.join(names)}: inversions {inversions}; engines {', '.join(choices.engines)}"
        lines.append(textwrap.fill(text, width=100, initial_indent="  ", subsequent_indent="    "))
    return "\n".join(lines)


def shipped_families() -> dict:
    """The shipped models' families (`--model shapes-world`, ...), read from their model_index.json."""
    import json

    from ..families import family_of
    from ..model import NAMED_MODELS

    found = {}
    for name, folder in NAMED_MODELS.items():
        index = folder / "model_index.json"
        if index.is_file():
            found[name] = family_of(json.loads(index.read_text()).get("_class_name"), name)
    return found


def add_inversion_arguments(parser: argparse.ArgumentParser) -> None:
    """--steps and one flag per inversion option (every method's)."""
    add_steps_argument(parser)
    add_option_arguments(parser, inversion_classes())


def given_inversion_options(args: argparse.Namespace) -> dict[str, object]:
    """The inversion options given on the command line (field name -> value)."""
    return given_options(args, inversion_classes())


def method_options(given: dict[str, object], methods: list[str]) -> dict[str, dict]:
    """Each selected method's option fields among the option flags given (`given`: dest -> value;
    with several methods, each takes those it has); an inversion flag no selected method has is an
    error. Their values are checked where they become the methods' dataclasses
    (`inversion.options_for`)."""
    import dataclasses

    from ..arguments import option_flags
    from ..inversion import get_method

    inversion_flags = option_flags(inversion_classes())
    given = {dest: value for dest, value in given.items() if dest in inversion_flags}
    fields = {m: {f.name for f in dataclasses.fields(get_method(m).options)} for m in methods}
    unused = sorted(set(given) - set().union(*fields.values()))
    if unused:
        raise SpdinvError(f"{', '.join(flag_name(u) for u in unused)} do(es) not apply to inversion {', '.join(methods)}")
    return {m: {k: v for k, v in given.items() if k in fields[m]} for m in methods}


def load_model_from_args(args: argparse.Namespace):
    """The model `spdinv.arguments.add_model_arguments` describes."""
    from ..model import load_model

    return load_model(args.model, device=args.device, dtype=args.dtype, variant=args.variant, config=args.config)


def check_model_settings(args: argparse.Namespace) -> None:
    """Before the model loads: --steps within the timesteps its scheduler was trained with (read
    from the model folder; a hub id is checked once loaded), and a warning that float16 is slow
    on the CPU."""
    import json

    import torch

    from ..inversion import check_steps
    from ..model import resolve_model

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
    """One line each: the words the text encoder's window cuts off, for a word-level tokenizer like
    the embedded model's the words it does not know (spelled out in letters, which the model never
    learnt), and the pieces with characters it reads as its unknown token (emoji, zero-width spaces)."""
    from ..inputs import unread_pieces

    tokenizer, found = model.tokenizer, []
    ids = tokenizer(prompt, truncation=False).input_ids
    window = tokenizer.model_max_length
    if len(ids) > window:
        cut = tokenizer.decode(ids[window - 1:-1]).strip()
        cut = cut if len(cut) <= 60 else cut[:57] + "..."
        found.append(f"the {what} is {len(ids)} tokens; the text encoder reads {window}, so it ignores: {cut!r}")
    if len(tokenizer) < WORD_LEVEL_VOCABULARY:
        if getattr(model, "concept", None) is not None:  # the concept word is known by construction
            from ..concepts import word_pattern

            prompt = word_pattern(model.concept.word).sub(" ", prompt)
        words = dict.fromkeys(re.findall(r"[a-z]+", prompt.lower()))
        unknown = [w for w in words if len(tokenizer.tokenize(w)) != 1]
        if unknown:
            found.append(f"the model does not know these {what} words: {', '.join(unknown)}")
    unread = unread_pieces(tokenizer, prompt)
    if unread:
        shown = ", ".join(repr(piece) for piece in unread[:5])
        found.append(f"the tokenizer reads characters of {shown} in the {what} as end-of-text (unknown), not as words")
    return found


def add_concept_arguments(parser: argparse.ArgumentParser) -> None:
    """--concept FILE and --concept-word WORD."""
    from ..concepts import DEFAULT_WORD

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
    from ..concepts import check_word, load_concept

    if args.concept is None:
        return None
    word = check_word(args.concept_word)
    concept = load_concept(args.concept, word)
    check_concept_word(word, prompts, "--concept")
    return concept


def check_concept_word(word: str, prompts: dict[str, str], flag: str) -> None:
    """At least one of `prompts` (what -> prompt) contains the concept word."""
    from ..concepts import check_word, mentions

    check_word(word)
    if not any(mentions(prompt, word) for prompt in prompts.values()):
        raise SpdinvError(f"{flag} is given but no {' or '.join(prompts)} contains the concept word {word!r} "
                          "(case-sensitive, a whole word)")


def add_concept_encoder_arguments(parser: argparse.ArgumentParser, *, for_edit: bool) -> None:
    """--concept-encoder and --image-encoder; for `spdinv edit` also --concept-image and --elite-projections."""
    group = parser.add_argument_group("concept encoder")
    group.add_argument("--concept-encoder", type=Path, default=None,
                       help="encode the concept from an image: a spdinv concept encoder (.safetensors, e.g. the "
                            "shipped one for the embedded model) or ELITE's global_mapper.pt (SD 1.x; needs "
                            "--image-encoder)" + ("" if for_edit else "; default: the shipped encoder"))
    group.add_argument("--image-encoder", type=Path, default=None,
                       help="with an ELITE global_mapper.pt: the local CLIP ViT-L/14 folder it was trained with")
    group.add_argument("--shape-reader", default=None, metavar="PATH|off",
                       help="with a spdinv concept encoder: the shape reader that reads the object's shape "
                            "(docs/model-card.md, issue 26): a .safetensors, or off (encoder alone); default: "
                            "the shipped reader")
    if for_edit:
        group.add_argument("--concept-image", type=Path, default=None,
                           help="the image the concept is encoded from (default: the edited image)")
        group.add_argument("--elite-projections", action="store_true",
                           help="with an ELITE global_mapper.pt: use its trained cross-attention key/value "
                                "projections during inversion and editing")


def world_choice(path: Path | None, reader: str | None):
    """A spdinv concept encoder at `path` (None: the shipped one) with the shape reader `--shape-reader` names:
    None: the shipped reader, "off": none, else a .safetensors path (checked here)."""
    from ..world.concept_choice import EncoderChoice

    if reader == "off":
        return EncoderChoice("world", path)
    if reader is not None and (Path(reader).suffix.lower() != ".safetensors" or not Path(reader).is_file()):
        raise SpdinvError(f"--shape-reader must be off or a shape reader .safetensors file, not {reader}")
    return EncoderChoice("world", path, shape_reader=True, reader_path=None if reader is None else Path(reader))


def encoder_choice_from_args(args: argparse.Namespace, default_shipped: bool = False):
    """The concept encoder the flags name (None: none), checked before any model loads."""
    from ..concepts import PICKLE_SUFFIXES
    from ..world.concept_choice import EncoderChoice

    path, image_encoder = args.concept_encoder, args.image_encoder
    projections = getattr(args, "elite_projections", False)
    reader = getattr(args, "shape_reader", None)
    if path is not None and getattr(args, "concept", None) is not None:
        raise SpdinvError("--concept and --concept-encoder are alternatives: give a concept file or an encoder")
    if path is None:
        if image_encoder is not None or projections:
            raise SpdinvError(f"{'--image-encoder' if image_encoder is not None else '--elite-projections'} "
                              "needs --concept-encoder (an ELITE global_mapper.pt)")
        if getattr(args, "concept_image", None) is not None:
            raise SpdinvError("--concept-image needs --concept-encoder")
        if reader is not None and not default_shipped:
            raise SpdinvError("--shape-reader needs --concept-encoder (a spdinv concept encoder)")
        return world_choice(None, reader) if default_shipped else None
    if not path.is_file():
        raise SpdinvError(f"concept encoder not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        if image_encoder is not None or projections:
            raise SpdinvError(f"{path} is a spdinv concept encoder (it holds its own image encoder); "
                              "--image-encoder and --elite-projections are for ELITE's global_mapper.pt")
        return world_choice(path, reader)
    if reader is not None:
        raise SpdinvError(f"--shape-reader is for spdinv concept encoders (.safetensors), not {path}")
    if suffix not in PICKLE_SUFFIXES:
        raise SpdinvError(f"unknown concept encoder format {suffix or '(no suffix)'!r}: {path}; expected a spdinv "
                          f".safetensors or ELITE's global_mapper.pt")
    if image_encoder is None:
        raise SpdinvError(f"{path} is an ELITE global mapper: --image-encoder (the CLIP vision model folder) is needed")
    if not (image_encoder / "config.json").is_file():
        raise SpdinvError(f"--image-encoder must be a local CLIP model folder with a config.json: {image_encoder}")
    return EncoderChoice("elite", path, image_encoder)
