"""The `spdinv` command line."""

from __future__ import annotations

import argparse
import atexit
import gc
import os
import re
import sys
import threading
import warnings
from pathlib import Path

# Before anything imports transformers: its optional-dependency notices are not for CLI users.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from .errors import SpdinvError  # noqa: E402


# argparse's own pattern takes "-1e-6" or "-inf" for an option ("expected one argument")
_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)
MAX_SEED = 2**63 - 1  # torch's generators take a signed 64-bit seed


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line, and reads any negative number
    (-1, -0.5, -1e-6) as a value, so that a range check, not the parser, answers it."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = _NEGATIVE_NUMBER

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


def parse_seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**63 - 1], got {text}")
    return value


def parse_device(text: str) -> str:
    """A device this torch build can use: cpu, cuda, cuda:N or mps."""
    import torch

    try:
        parsed = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; expected cpu, cuda, cuda:N or mps") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            build = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise argparse.ArgumentTypeError(f"{text}: {build} (torch {torch.__version__}); use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise argparse.ArgumentTypeError(f"{text}: MPS is not available in this torch build or on this machine")
    elif parsed.type != "cpu":
        raise argparse.ArgumentTypeError(f"unsupported device {text!r}; expected cpu, cuda, cuda:N or mps")
    return text


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="SD 1.x/2.x or SDXL: a diffusers folder, a hub id in the local cache, or a single-file "
                             ".safetensors/.ckpt checkpoint; default: the embedded shapes-world model")
    parser.add_argument("--variant", default=None, help="weight variant of a diffusers folder, e.g. fp16 (*.fp16.safetensors)")
    parser.add_argument("--config", default=None,
                        help="for a single-file --model: a local diffusers folder of the same family (configs, tokenizers, scheduler)")
    parser.add_argument("--device", type=parse_device, default="cpu", help="cpu, cuda, cuda:1, mps (default cpu)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--seed", type=parse_seed, default=0, help="random seed, 0 to 2**63 - 1 (default 0)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--verbose", action="store_true", help="let diffusers/transformers log and warn on the terminal")


def load_model_from_args(args: argparse.Namespace):
    """The model `add_model_arguments` describes."""
    from .model import load_model

    return load_model(args.model, device=args.device, dtype=args.dtype, variant=args.variant, config=args.config)


def add_inversion_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=_positive_int, default=50, help="DDIM steps (default 50)")
    spd = parser.add_argument_group("SPDInv options")
    spd.add_argument("--K", type=_positive_int, default=None, help="most gradient steps per timestep (default 25)")
    spd.add_argument("--lr", type=_positive_float, default=None,
                     help="step size (spdinv default 1e-3; null_text: Adam's, default 1e-2)")
    spd.add_argument("--delta", type=_positive_float, default=None, help="early-stop threshold on the mean squared residual (default 5e-6)")
    spd.add_argument("--relative-delta", type=_positive_float, default=None,
                     help="also stop only below this fraction of each step's first residual (scale-aware; default off)")
    spd.add_argument("--optimizer", default=None, help="adamw (default), adam or sgd")
    guided = parser.add_argument_group("null_text and negative_prompt options")
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

INVERSION_OPTIONS = ("K", "lr", "delta", "relative_delta", "optimizer", "guidance", "inner_steps", "lr_decay", "early_stop",
                     "early_stop_growth", "iterations", "window", "damping", "tol")


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


WORD_LEVEL_VOCABULARY = 5000  # fewer tokens than this: whole words (the shapes world's 333), not sub-word pieces


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
        words = dict.fromkeys(re.findall(r"[a-z]+", prompt.lower()))
        unknown = [w for w in words if len(tokenizer.tokenize(w)) != 1]
        if unknown:
            found.append(f"the model does not know these {what} words: {', '.join(unknown)}")
    return found


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
    from .demo.command import add_demo_parser

    add_demo_parser(sub)
    return parser


def run_invert(args: argparse.Namespace) -> None:
    from .images import conform_image, open_image
    from .inversion import check_prompt, get_method
    from .outputs import check_output_dir

    prompt = check_prompt(args.prompt)
    get_method(args.method)
    options = inversion_options(args, args.method)
    check_output_dir(args.out)
    raw_image, opened = open_image(args.image)  # fail before the model loads; fitting it needs the model's size
    check_model_settings(args)
    from .export import invert_to_folder

    model = load_model_from_args(args)
    image, notices = conform_image(raw_image, model.image_size)
    for notice in opened + notices:
        print(f"note: {notice}", file=sys.stderr)
    for warning in prompt_warnings(model, prompt):
        print(f"warning: {warning}", file=sys.stderr)
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
    warnings.filterwarnings("ignore", module=r"(diffusers|transformers|huggingface_hub|torch)(\.|$)")
    warnings.formatwarning = lambda message, *args, **kwargs: f"spdinv: warning: {message}\n"


def parse(argv: list[str] | None = None) -> argparse.Namespace | int:
    """The parsed command line with the libraries quietened (unless --verbose), or the exit status when argparse
    has answered already (--help, a bad command line)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    if not getattr(args, "verbose", False):
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
