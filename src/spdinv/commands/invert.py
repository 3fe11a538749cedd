"""`spdinv invert`: invert an image; write z_T, the trajectory, diagnostics and a reconstruction."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import common
from ..arguments import add_framing_arguments, add_model_arguments, framing_from_args


def _method_help() -> str:
    from ..inversion import METHODS

    return "; ".join(f"{name}: {m.summary}" for name, m in METHODS.items())


def add_invert_parser(sub) -> None:
    from ..presets import PRESETS

    invert = sub.add_parser("invert", epilog=common.families_epilog(),
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            help="invert an image; write z_T, the trajectory, diagnostics and a reconstruction")
    invert.add_argument("image", type=Path)
    invert.add_argument("--prompt", required=True, help="the source prompt describing the image")
    invert.add_argument("--method", default="spdinv", help=_method_help() + "; which run on which model family: below")
    common.add_inversion_arguments(invert)
    invert.add_argument("--preset", default=None, choices=tuple(PRESETS),
                        help="a published script's inversion settings (explicit flags override them; see spdinv edit "
                             "--help)")
    common.add_concept_arguments(invert)
    add_model_arguments(invert)
    add_framing_arguments(invert)
    invert.add_argument("--out", type=Path, default=Path("spdinv-out"), help="output folder (default ./spdinv-out)")
    invert.set_defaults(run=run_invert)


def run_invert(args: argparse.Namespace) -> None:
    from ..images import open_image
    from ..inversion import check_prompt, get_method, options_for
    from ..export import INVERT_FILES
    from ..outputs import check_no_foreign, check_output_dir

    prompt = check_prompt(args.prompt)
    get_method(args.method)
    options = options_for(args.method, common.given_inversion_options(args), args.preset)  # typed once, here
    check_output_dir(args.out)
    check_no_foreign(args.out, list(INVERT_FILES))
    raw_image, opened = open_image(args.image)  # fail before the model loads; fitting it needs the model's size
    common.check_model_settings(args)
    framing = framing_from_args(args)
    concept = common.concept_from_args(args, {"prompt": prompt})
    from ..export import invert_to_folder

    model = common.load_model_from_args(args).with_concept(concept)
    image, notices = model.fit(raw_image, framing)
    for notice in opened + notices:
        print(f"note: {notice}", file=sys.stderr)
    for warning in common.prompt_warnings(model, prompt):
        print(f"warning: {warning}", file=sys.stderr)
    summary = invert_to_folder(model, image, prompt, args.method, args.steps, options, args.out, seed=args.seed,
                               progress=not args.quiet, command=sys.argv)
    print(summary)
