"""The `spdinv` command line."""

from __future__ import annotations

import argparse
import atexit
import errno
import gc
import os
import sys
import threading
import warnings

# Before anything imports transformers: its optional-dependency notices are not for CLI users.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from .arguments import Parser  # noqa: E402
from .errors import SpdinvError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="spdinv", description="Text-driven editing of real images with diffusion inversion (SPDInv and peers).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    from .commands.invert import add_invert_parser

    add_invert_parser(sub)
    from .commands.edit import add_edit_parser

    add_edit_parser(sub)
    from .commands.world import add_world_parser

    add_world_parser(sub)
    from .commands.concept import add_concept_parser

    add_concept_parser(sub)
    from .commands.bench import add_bench_parser

    add_bench_parser(sub)
    from .commands.demo import add_demo_parser

    add_demo_parser(sub)
    return parser


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
    except KeyboardInterrupt:  # Ctrl-C while the libraries import: nothing started, one line
        print("spdinv: interrupted while starting; nothing was done", file=sys.stderr)
        return 130
    if not getattr(args, "verbose", False):
        quiet_libraries()
    return args


ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EACCES, errno.EPERM, errno.EFBIG,
                      errno.EMFILE, errno.ENFILE}


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
    except OSError as error:  # the machine's state (a full disk, a read-only mount), not a bug: one line
        if error.errno not in ENVIRONMENT_ERRNOS:
            raise
        where = f" {error.filename}" if error.filename else ""
        print(f"spdinv: error: could not write or read{where}: {error.strerror}; files already there are unchanged",
              file=sys.stderr)
        return 2
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
