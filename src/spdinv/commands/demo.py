"""`spdinv demo`: serve the web demo, with a picker of the shipped models and --model (localhost by default)."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def add_demo_parser(sub) -> None:
    """Register `spdinv demo` on the CLI's subparsers."""
    import textwrap

    from ..arguments import add_model_arguments
    from .common import families_epilog
    from ..model import NAMED_MODELS

    about = ("The page opens on --model (default shapes-world); its model picker also offers the shipped models "
             f"({', '.join(NAMED_MODELS)}), each loaded on its first use and kept, and lists the inversions and "
             "engines of the picked model's family.")
    demo = sub.add_parser("demo", help="serve the web demo (Gradio; pip install spdinv[demo])",
                          description=textwrap.fill(about, width=100), epilog=families_epilog(),
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine only)")
    demo.add_argument("--port", type=_port, default=7860, help="port (default 7860)")
    demo.add_argument("--queue-size", type=_port, default=8, help="requests that may wait at once (default 8)")
    add_model_arguments(demo)
    demo.add_argument("--cache", type=Path, default=None,
                      help="inversion cache folder, shared with `spdinv edit` (default $SPDINV_CACHE or "
                           "~/.cache/spdinv/inversions)")
    demo.add_argument("--no-cache", action="store_true", help="neither read nor write the inversion cache")
    demo.set_defaults(run=run_demo)


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be in [1, 65535], got {value}")
    return value


def run_demo(args: argparse.Namespace) -> None:
    check_address(args.host, args.port)  # before the model loads: the right reason, in one line
    workdir = Path(tempfile.mkdtemp(prefix="spdinv-demo-"))
    # Gradio's copies of uploads and examples go there too (read when Gradio is imported), so none outlive the demo.
    gradio_temp = "GRADIO_TEMP_DIR" not in os.environ
    if gradio_temp:
        os.environ["GRADIO_TEMP_DIR"] = str(workdir / "gradio")
    with sigterm_interrupts():  # SIGTERM (kill, systemd, docker stop) stops the demo as Ctrl-C does
        try:
            serve(args, workdir)
        except KeyboardInterrupt:  # Ctrl-C is how a server stops: not an interruption of work
            pass
        finally:
            shutil.rmtree(workdir, ignore_errors=True)  # results and uploads of this run
            if gradio_temp:
                os.environ.pop("GRADIO_TEMP_DIR", None)
    print("stopped", file=sys.stderr)


def serve(args: argparse.Namespace, workdir: Path) -> None:
    """Load the model and serve the demo until Ctrl-C or SIGTERM (KeyboardInterrupt)."""
    from .common import load_model_from_args
    from ..errors import SpdinvError
    from ..demo.session import DemoSession

    try:
        from ..demo.app import launch, readable_folders
    except ImportError as error:
        raise SpdinvError(f"the demo needs Gradio ({error.name} is missing): pip install 'spdinv[demo]'") from None
    models = demo_models(args, load_model_from_args)
    session = DemoSession(models, demo_cache(args), readable_folders(), seed=args.seed, workdir=workdir)
    app, _ = launch(session, args.host, args.port, queue_size=args.queue_size, block=False)
    print(f"serving {models.get(None).name} on http://{args.host}:{args.port} (the page's model picker: "
          f"{', '.join(models.names)}; Ctrl-C stops)", file=sys.stderr)
    serve_until_stopped(app)


def demo_models(args: argparse.Namespace, load_given: Callable[[argparse.Namespace], object]):
    """The picker's models: the shipped ones and --model if it is another. The --model one (default
    shapes-world) loads now, so that a bad --model is refused in one line before anything is served;
    the others on their first use, on the same --device and --dtype (--variant and --config are the
    given model's)."""
    from functools import partial

    from ..demo.models import DemoModels
    from ..model import NAMED_MODELS, load_model

    given = args.model or "shapes-world"
    loaders = {name: partial(load_model, name, device=args.device, dtype=args.dtype)
               for name, folder in NAMED_MODELS.items() if (folder / "model_index.json").is_file()}
    loaders[given] = partial(load_given, args)
    models = DemoModels(loaders, given)
    models.get(given)
    return models


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Within: SIGTERM raises KeyboardInterrupt in the main thread, so the cleanup that Ctrl-C runs runs
    (the default action kills the process where it stands and leaves the temporary folder behind)."""
    def interrupt(signum, frame) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():  # signal handlers belong to the main thread
        yield
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def serve_until_stopped(app) -> None:
    """Block until a signal (Ctrl-C, SIGTERM) interrupts or the server closes, then close it."""
    try:
        while app.is_running:
            time.sleep(0.2)
    finally:
        app.close(verbose=False)


def check_address(host: str, port: int) -> None:
    """A one-line SpdinvError when the server could not listen on host:port, naming why: the host
    does not resolve, is not this machine's, or the port is taken or reserved."""
    import errno
    import socket

    from ..errors import SpdinvError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise SpdinvError(f"cannot resolve the host {host!r} ({error.strerror}); e.g. --host 127.0.0.1") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will
        try:
            probe.bind(address)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise SpdinvError(f"port {port} on {host} is in use by another program; pick another --port") from None
            if error.errno == errno.EADDRNOTAVAIL:
                raise SpdinvError(f"{host} is not an address of this machine; serve on 127.0.0.1 or 0.0.0.0") from None
            if error.errno == errno.EACCES:
                raise SpdinvError(f"port {port} needs administrator rights (ports below 1024); pick another --port") \
                    from None
            raise SpdinvError(f"cannot listen on {host}:{port} ({error.strerror})") from None


def demo_cache(args: argparse.Namespace):
    """The inversion cache the CLI uses, unless --no-cache or it cannot be written (a warning)."""
    from ..editing.cache import InversionCache, default_cache_dir

    if args.no_cache:
        return None
    cache = InversionCache(args.cache or default_cache_dir())
    if problem := cache.unusable():
        print(f"warning: not caching inversions: {problem}", file=sys.stderr)
        return None
    return cache
