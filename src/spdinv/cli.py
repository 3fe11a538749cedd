"""The `spdinv` command line."""

from __future__ import annotations

import argparse
import atexit
import gc
import os
import sys
import threading
import warnings
from pathlib import Path

# Before anything imports transformers: its optional-dependency notices are not for CLI users.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from .errors import SpdinvError  # noqa: E402


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line."""

    def error(self, message: str) -> None:  # noqa: D401
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="diffusers SD folder or hub id (local files only); default: the embedded shapes-world model")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps (default cpu)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _solver_names() -> list[str]:
    from .inversion.solvers import SOLVERS

    return list(SOLVERS)


def add_inversion_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=_positive_int, default=50, help="DDIM steps (default 50)")
    spd = parser.add_argument_group("SPDInv options")
    spd.add_argument("--K", type=_positive_int, default=None, help="most gradient steps per timestep (default 25)")
    spd.add_argument("--lr", type=_positive_float, default=None,
                     help="step size (spdinv default 1e-3; null_text: Adam's, default 1e-2)")
    spd.add_argument("--delta", type=_positive_float, default=None, help="early-stop threshold on the mean squared residual (default 5e-6)")
    spd.add_argument("--relative-delta", type=_positive_float, default=None,
                     help="also stop only below this fraction of each step's first residual (scale-aware; default off)")
    spd.add_argument("--optimizer", default=None, help="the gradient solver's: adamw (default), adam or sgd")
    spd.add_argument("--solver", default=None, choices=_solver_names(),
                     help="fixed-point solver: gradient (the paper's, default), anderson, hybrid (Anderson with gradient "
                          "fallback), polyak (residual-scaled gradient steps), newton_krylov (GMRES with UNet JVPs)")
    guided = parser.add_argument_group("null_text, negative_prompt and direct options")
    guided.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance scale, >= 1 (default 7.5)")
    nti = parser.add_argument_group("null_text options (and --lr)")
    nti.add_argument("--inner-steps", type=int, default=None, help="most Adam steps per timestep (default 10)")
    nti.add_argument("--lr-decay", type=float, default=None,
                     help="lr at sampling step i is lr*(1 - lr_decay*i) (default 0.01)")
    nti.add_argument("--early-stop", type=float, default=None,
                     help="stop a step once its loss < early_stop + i*growth (default 1e-5)")
    nti.add_argument("--early-stop-growth", type=float, default=None,
                     help="growth of that threshold per step (default 2e-5)")
    aidi = parser.add_argument_group("AIDI options")
    aidi.add_argument("--iterations", type=int, default=None, help="most Anderson updates per timestep (default 10)")
    aidi.add_argument("--window", type=int, default=None,
                      help="iterates Anderson remembers; 1 = damped iteration (default 5)")
    aidi.add_argument("--damping", type=float, default=None, help="mixing parameter beta in (0, 1] (default 1)")
    aidi.add_argument("--tol", type=_positive_float, default=None,
                      help="early-stop threshold on the mean squared residual (default 5e-6)")

INVERSION_OPTIONS = ("K", "lr", "delta", "relative_delta", "optimizer", "solver", "guidance", "inner_steps", "lr_decay", "early_stop",
                     "early_stop_growth", "iterations", "window", "damping", "tol")


def inversion_options(args: argparse.Namespace, method: str) -> dict:
    """Only the options given on the command line, checked against the method's options."""
    from .inversion import make_options

    given = {name: getattr(args, name) for name in INVERSION_OPTIONS if getattr(args, name, None) is not None}
    make_options(method, **given)
    return given


def _method_help() -> str:
    from .inversion import METHODS

    return "; ".join(f"{name}: {m.summary}" for name, m in METHODS.items())


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="spdinv", description="Text-driven editing of real images with diffusion inversion (SPDInv and peers).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    invert = sub.add_parser("invert", help="invert an image; write z_T, the trajectory, diagnostics and a reconstruction")
    invert.add_argument("image", type=Path)
    invert.add_argument("--prompt", required=True, help="the source prompt describing the image")
    invert.add_argument("--method", default="spdinv", help=_method_help())
    add_inversion_arguments(invert)
    add_model_arguments(invert)
    invert.add_argument("--out", type=Path, default=Path("spdinv-out"), help="output folder (default ./spdinv-out)")
    invert.set_defaults(run=run_invert)

    from .editing.command import add_edit_parser

    add_edit_parser(sub)
    from .world.command import add_world_parser

    add_world_parser(sub)
    from .bench.command import add_bench_parser

    add_bench_parser(sub)
    return parser


def run_invert(args: argparse.Namespace) -> None:
    from .images import conform_image, open_image
    from .inversion import check_prompt, get_method
    from .outputs import check_output_dir

    prompt = check_prompt(args.prompt)
    get_method(args.method)
    options = inversion_options(args, args.method)
    check_output_dir(args.out)
    raw_image = open_image(args.image)  # fail before the model loads; fitting it needs the model's size
    from .model import load_model
    from .export import invert_to_folder

    model = load_model(args.model, device=args.device, dtype=args.dtype)
    image, notices = conform_image(raw_image, model.image_size)
    for notice in notices:
        print(f"note: {notice}", file=sys.stderr)
    summary = invert_to_folder(model, image, prompt, args.method, args.steps, options, args.out, seed=args.seed,
                               progress=not args.quiet, command=sys.argv)
    print(summary)


def quiet_libraries() -> None:
    """Keep third-party chatter (loading bars, optional-dependency notices) off the terminal."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


def parse(argv: list[str] | None = None) -> argparse.Namespace | int:
    """The parsed command line with the libraries quietened, or the exit status when argparse
    has answered already (--help, a bad command line)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    quiet_libraries()
    return args


def execute(args: argparse.Namespace) -> int:
    """Run the parsed command; its errors become one line on stderr and exit status 2."""
    try:
        args.run(args)
    except SpdinvError as error:
        print(f"spdinv: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("spdinv: interrupted; nothing partial was written", file=sys.stderr)
        return 130
    return 0


def main(argv: list[str] | None = None) -> int:
    parsed = parse(argv)
    return parsed if isinstance(parsed, int) else execute(parsed)


def run() -> None:
    """The `spdinv` executable: `main()` with two economies only a short-lived process can make
    (together about 1.5 s of an edit's wall time on a 2-core CPU; docs/results.md, "Edit time").

    - Start-up: parsing imports torch, diffusers and transformers, hundreds of thousands of
      objects the cyclic garbage collector would traverse again and again (~0.7 s). It is paused
      for the parse; the survivors are then frozen out of later collections (`gc.freeze`, the
      recipe the gc docs give for long-lived start-up state) and collection resumes.
    - Exit: finalising the ~3,500 loaded modules takes ~0.9 s. When the command returns, every
      output is closed and renamed into place, so the standard streams are flushed, the atexit
      handlers run (what interpreter shutdown would do first), non-daemon threads are joined,
      and the process leaves at once. An unexpected exception takes the normal path, traceback
      included.
    """
    gc.disable()
    try:
        parsed = parse()
    finally:
        gc.freeze()
        gc.enable()
    code = parsed if isinstance(parsed, int) else execute(parsed)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    atexit._run_exitfuncs()  # the handlers Py_FinalizeEx runs; os._exit would skip them
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    os._exit(code)


if __name__ == "__main__":
    run()
