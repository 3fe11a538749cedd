"""`spdinv concept learn|encode`: a concept word's embedding from one image, by textual inversion
(`learn`) or by a concept encoder in one forward pass (`encode`: the shipped shapes-world encoder,
or ELITE's global mapper with its CLIP image encoder), saved in diffusers' format
({word: tensor[k, width]} safetensors)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def add_concept_parser(sub) -> None:
    from ..arguments import Parser, add_model_arguments, number, positive_int
    from ..concepts import DEFAULT_WORD
    from ..textual_inversion import LearnOptions

    concept = sub.add_parser("concept", help="concept words from an image: learn (textual inversion) or encode")
    actions = concept.add_subparsers(dest="concept_command", required=True, parser_class=Parser)
    learn = actions.add_parser("learn", help="learn the concept word's embedding from an image on the frozen model")
    learn.add_argument("image", type=Path)
    learn.add_argument("--prompt", required=True,
                       help="a prompt describing the image with the concept word in it, e.g. 'a large S in the "
                            "centre on a blue background'")
    learn.add_argument("--out", type=Path, required=True, help="the .safetensors file to write")
    learn.add_argument("--concept-word", default=DEFAULT_WORD, help=f"the placeholder word (default {DEFAULT_WORD})")
    defaults = LearnOptions()
    learn.add_argument("--steps", type=positive_int, default=defaults.steps,
                       help=f"optimisation steps (default {defaults.steps})")
    learn.add_argument("--learning-rate", type=number, default=defaults.learning_rate,
                       help=f"Adam's learning rate (default {defaults.learning_rate})")
    learn.add_argument("--batch", type=positive_int, default=defaults.batch,
                       help=f"noise levels drawn per step (default {defaults.batch})")
    add_model_arguments(learn)
    learn.set_defaults(run=run_learn)

    from .common import add_concept_encoder_arguments

    encode = actions.add_parser("encode", help="encode an image into the concept word's embedding (one forward pass)")
    encode.add_argument("image", type=Path)
    encode.add_argument("--out", type=Path, required=True, help="the .safetensors file to write")
    encode.add_argument("--concept-word", default=DEFAULT_WORD, help=f"the placeholder word (default {DEFAULT_WORD})")
    add_concept_encoder_arguments(encode, for_edit=False)
    add_model_arguments(encode)
    encode.set_defaults(run=run_encode)


def check_out_file(out: Path) -> None:
    from ..errors import SpdinvError

    if out.suffix.lower() != ".safetensors":
        raise SpdinvError(f"--out must name a .safetensors file, not {out}")
    if out.is_dir() or not out.parent.is_dir():
        why = "a folder" if out.is_dir() else "its folder does not exist"
        raise SpdinvError(f"cannot write {out}: {why}")


def run_learn(args: argparse.Namespace) -> None:
    from .common import load_model_from_args, prompt_warnings
    from ..concepts import check_word, save_concept
    from ..errors import require_finite
    from ..images import conform_image, open_image
    from ..inversion import check_prompt
    from ..textual_inversion import LearnOptions, check_learn_prompt, learn_concept

    wall = time.perf_counter()
    word = check_word(args.concept_word)
    prompt = check_prompt(args.prompt)
    check_learn_prompt(prompt, word)
    check_out_file(args.out)
    raw_image, opened = open_image(args.image)
    model = load_model_from_args(args)
    image, notices = conform_image(raw_image, model.image_size)
    for notice in opened + notices:
        print(f"note: {notice}", file=sys.stderr)
    for warning in prompt_warnings(model, prompt):
        print(f"warning: {warning}", file=sys.stderr)
    options = LearnOptions(steps=args.steps, learning_rate=args.learning_rate, batch=args.batch, seed=args.seed)
    result = learn_concept(model, image, prompt, word, options, progress=not args.quiet)
    require_finite(result.concept.vectors, "the learned embedding")
    save_concept(result.concept, args.out)
    tail = result.losses[-10:]
    print(f"wrote {args.out} ({word!r}: {result.concept.vectors.shape[0]} x {result.concept.vectors.shape[1]}); "
          f"diffusion loss first step {result.losses[0]:.4f}, "
          f"mean of the last {len(tail)} {sum(tail) / len(tail):.4f}; "
          f"{time.perf_counter() - wall:.1f} s")


def run_encode(args: argparse.Namespace) -> None:
    from .common import encoder_choice_from_args, load_model_from_args
    from ..world.concept_choice import encode_with
    from ..concepts import check_word, save_concept
    from ..errors import require_finite
    from ..images import open_image

    wall = time.perf_counter()
    word = check_word(args.concept_word)
    check_out_file(args.out)
    choice = encoder_choice_from_args(args, default_shipped=True)
    image, opened = open_image(args.image)
    for notice in opened:
        print(f"note: {notice}", file=sys.stderr)
    # The world encoder needs no model (it is the embedded model's); given one, the width is checked.
    needs_model = choice.kind == "elite" or args.model is not None
    model = load_model_from_args(args) if needs_model else None
    started = time.perf_counter()
    concept, _ = encode_with(choice, model, image, word)
    encoded = time.perf_counter() - started
    require_finite(concept.vectors, "the encoded embedding")
    save_concept(concept, args.out)
    encoder = choice.path or "the shipped shapes-world encoder"
    if choice.shape_reader:
        encoder = f"{encoder} and {choice.reader_path or 'the shipped shape reader'}"
    print(f"wrote {args.out} ({word!r}: {concept.vectors.shape[0]} x {concept.vectors.shape[1]}) from {args.image} "
          f"with {encoder}; encoding {encoded:.2f} s, {time.perf_counter() - wall:.1f} s in all")
