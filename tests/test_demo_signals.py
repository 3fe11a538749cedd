"""`spdinv demo` stopped by Ctrl-C (SIGINT) or SIGTERM, during start-up or while serving: at most one line
on stderr for the stop, never a traceback, and the demo's temporary folder (results, Gradio's copies of
uploads) removed. The demo runs in a child process with its own TMPDIR, so what it leaves is seen."""

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import spdinv

pytest.importorskip("gradio", reason="the demo extra is not installed: pip install -e '.[demo]'")

STARTED = 600  # seconds a loaded machine may take to import torch and Gradio and serve
INTERRUPTED = "spdinv: interrupted while starting; nothing was done"
# `python -m spdinv` with Ctrl-C delivered as a terminal delivers it, even where this test runs with SIGINT
# ignored (a CI job started in the background or under nohup), which the child would otherwise inherit
WITH_CTRL_C = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
               "sys.argv[0] = 'spdinv'; runpy.run_module('spdinv', run_name='__main__', alter_sys=True)")


def start_demo(tmp_path: Path) -> tuple[subprocess.Popen, "queue.Queue[str]"]:
    from spdinv.demo.app import free_port

    env = {**os.environ, "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(spdinv.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    env.pop("GRADIO_TEMP_DIR", None)
    child = subprocess.Popen([sys.executable, "-c", WITH_CTRL_C, "demo", "--port", str(free_port()), "--no-cache"],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        for line in child.stderr:
            lines.put(line.rstrip("\n"))

    threading.Thread(target=read, daemon=True).start()
    return child, lines


def finish(child: subprocess.Popen, lines: "queue.Queue[str]") -> tuple[int, list[str]]:
    code = child.wait(timeout=STARTED)
    child.stderr.close()
    out = []
    while True:
        try:
            out.append(lines.get(timeout=1))
        except queue.Empty:
            return code, out


def leftovers(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("spdinv-demo-", "gradio")))


def wait_for_library(child: subprocess.Popen, library: str, timeout: float = STARTED) -> None:
    """Until the child has mapped `library` (a shared object its imports load), i.e. it is importing."""
    maps, deadline = Path(f"/proc/{child.pid}/maps"), time.monotonic() + timeout
    while library not in maps.read_text():
        assert child.poll() is None and time.monotonic() < deadline, f"{library} never loaded"
        time.sleep(0.05)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc to see what the child imports")
@pytest.mark.parametrize("library", ["libtorch", "_pydantic_core"])  # parsing imports torch; Gradio, pydantic
def test_ctrl_c_during_start_up_prints_one_line(tmp_path, library):
    child, lines = start_demo(tmp_path)
    try:
        wait_for_library(child, library)
        child.send_signal(signal.SIGINT)
        code, err = finish(child, lines)
    finally:
        if child.poll() is None:
            child.kill()
    assert not any(line.startswith("serving") for line in err), "the signal came after start-up: not this test"
    assert err in ([INTERRUPTED], ["stopped"]), err  # while parsing / once the command runs
    assert code in (130, 0) and leftovers(tmp_path) == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_serving_stops_in_one_line_and_removes_the_temporary_folder(tmp_path, signum):
    child, lines = start_demo(tmp_path)
    try:
        first = lines.get(timeout=STARTED)
        assert first.startswith("serving"), first
        assert [name for name in leftovers(tmp_path) if name.startswith("spdinv-demo-")]  # there while serving
        child.send_signal(signum)
        code, err = finish(child, lines)
    finally:
        if child.poll() is None:
            child.kill()
    assert code == 0 and err == ["stopped"], err
    assert leftovers(tmp_path) == []


def test_sigterm_while_the_model_loads_removes_the_temporary_folder(tmp_path, monkeypatch, capsys):
    """In this process: SIGTERM arrives during start-up, after the temporary folder is made."""
    import tempfile

    import spdinv.commands.common
    from spdinv.cli import main
    from spdinv.demo.app import free_port

    def slow_load(args):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # the handler interrupts this
        raise AssertionError("SIGTERM did not interrupt the start-up")

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(spdinv.commands.common, "load_model_from_args", slow_load)
    monkeypatch.delenv("GRADIO_TEMP_DIR", raising=False)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["demo", "--port", str(free_port()), "--no-cache"]) == 0
    assert capsys.readouterr().err.strip() == "stopped"
    assert leftovers(tmp_path) == [] and signal.getsignal(signal.SIGTERM) is before
    assert "GRADIO_TEMP_DIR" not in os.environ
