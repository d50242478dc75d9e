"""A real `blockxfer serve` process for tests: started, waited for until its control
socket answers, and stopped with SIGTERM (killed if it hangs). `serve_process`
starts the installed command (what it printed is kept in `proc.output`, stdout and
stderr, once it has stopped); `serve_forked` forks this process instead
(tests/clihelp.py: no interpreter start-up, which takes seconds under the test
bed's TCG), its output in SOCK.log."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from blockxfer.service import control
from tests import clihelp


@contextlib.contextmanager
def serve_process(path: str, sock: str, *extra: str,
                  timeout: float = 60) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen([sys.executable, "-m", "blockxfer.cli", "serve", path,
                             "--listen", f"unix:{sock}", *extra], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def stopped() -> None:
        proc.output = proc.communicate(timeout=timeout)  # type: ignore[attr-defined]  # kept on the Popen

    with _running(proc, path, timeout, lambda: proc.communicate()[1], stopped):
        yield proc


@contextlib.contextmanager
def serve_forked(path: str, sock: str, *extra: str,
                 timeout: float = 60) -> Iterator[clihelp.Forked]:
    proc = clihelp.Forked(["serve", path, "--listen", f"unix:{sock}", *extra], f"{sock}.log")
    with _running(proc, path, timeout, lambda: Path(proc.log).read_text(),
                  lambda: proc.wait(timeout)):
        yield proc


@contextlib.contextmanager
def _running(proc: Any, path: str, timeout: float, output: Callable[[], str],
             stopped: Callable[[], object]) -> Iterator[None]:
    """Until the server answers on its control socket; SIGTERM on the way out."""
    try:
        deadline = time.monotonic() + timeout
        while not control.server_running(path):
            assert proc.poll() is None, output()
            assert time.monotonic() < deadline, "blockxfer serve did not start"
            time.sleep(0.05)
        yield
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                stopped()
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
