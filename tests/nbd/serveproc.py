"""A real `blockxfer serve` process for tests: started, waited for until its control
socket answers, and stopped with SIGTERM (killed if it hangs). What it printed is
kept in `proc.output` (stdout, stderr) once it has stopped."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

from blockxfer.service import control


@contextlib.contextmanager
def serve_process(path: str, sock: str, *extra: str,
                  timeout: float = 60) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen([sys.executable, "-m", "blockxfer.cli", "serve", path,
                             "--listen", f"unix:{sock}", *extra], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + timeout
        while not control.server_running(path):
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "blockxfer serve did not start"
            time.sleep(0.05)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.output = proc.communicate(timeout=timeout)  # type: ignore[attr-defined]
            except subprocess.TimeoutExpired:
                proc.kill()
