"""Run the `blockxfer` command in a forked child of the test process.

The test bed runs its guest under software emulation (TCG), where a fresh
`python -m blockxfer.cli` spends 5-10 s importing before it does anything; the
device tests ran ~40 such start-ups. A child forked from the test process (which
has imported the CLI already) runs the same `main()` with its own stdin, stdout,
stderr, working directory, environment and exit status, as a separate process:
what the command prints and returns is what a test checks. Use `subprocess` where
the point is the interpreter's start-up itself.
"""

from __future__ import annotations

import logging
import os
import selectors
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

from blockxfer.cli.app import main


def _child(argv: Sequence[str], pipes: list[tuple[int, int]], cwd: str | None,
           env: Mapping[str, str] | None) -> None:
    """In the child: a process as `python -m blockxfer.cli ARGV` would be. Never returns."""
    code = 1
    try:
        for i, fd in enumerate((pipes[0][0], pipes[1][1], pipes[2][1])):
            os.dup2(fd, i)
        for fd in {fd for pair in pipes for fd in pair} - {0, 1, 2, -1}:
            os.close(fd)                     # else stdin never reaches its end
        # pytest replaced the std streams with its capture: use the real descriptors
        sys.stdin = open(0, closefd=False)  # noqa: SIM115
        sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", closefd=False, buffering=1)  # noqa: SIM115
        logging.root.handlers.clear()       # pytest's capture: basicConfig must add its own
        logging.root.setLevel(logging.WARNING)
        if env is not None:
            os.environ.clear()
            os.environ.update(env)
        if cwd is not None:
            os.chdir(cwd)
        try:
            code = main(list(argv))
        except SystemExit as e:              # argparse: usage errors, --help
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def run(argv: Sequence[str], *, input: bytes | str | None = None, cwd: str | None = None,
        env: Mapping[str, str] | None = None, text: bool = False, timeout: float = 300,
        ) -> subprocess.CompletedProcess:  # type: ignore[type-arg]
    """`blockxfer ARGV` in a forked child, like `subprocess.run(..., capture_output=True)`."""
    pipes = [os.pipe() for _ in range(3)]
    pid = os.fork()
    if pid == 0:
        _child(argv, pipes, cwd, env)
    for fd in (pipes[0][0], pipes[1][1], pipes[2][1]):
        os.close(fd)
    data = input.encode() if isinstance(input, str) else (input or b"")
    out, err = _communicate(pid, pipes[0][1], data, pipes[1][0], pipes[2][0], timeout)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if text:
        return subprocess.CompletedProcess(["blockxfer", *argv], code, out.decode(),
                                           err.decode())
    return subprocess.CompletedProcess(["blockxfer", *argv], code, out, err)


def _communicate(pid: int, w_in: int, data: bytes, r_out: int, r_err: int,
                 timeout: float) -> tuple[bytes, bytes]:
    """Feed stdin and collect stdout and stderr until both close (the child exited)."""
    got: dict[int, bytearray] = {r_out: bytearray(), r_err: bytearray()}
    sel = selectors.DefaultSelector()
    for fd in got:
        sel.register(fd, selectors.EVENT_READ)
    if data:
        os.set_blocking(w_in, False)
        sel.register(w_in, selectors.EVENT_WRITE)
    else:
        os.close(w_in)
    sent, deadline = 0, time.monotonic() + timeout
    try:
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                raise subprocess.TimeoutExpired(["blockxfer"], timeout)
            for key, _ in sel.select(left):
                fd = key.fd
                if fd == w_in:
                    try:
                        sent += os.write(w_in, data[sent:sent + (1 << 16)])
                    except BrokenPipeError:
                        sent = len(data)
                    if sent >= len(data):
                        sel.unregister(w_in)
                        os.close(w_in)
                    continue
                chunk = os.read(fd, 1 << 16)
                if chunk:
                    got[fd] += chunk
                else:
                    sel.unregister(fd)
                    os.close(fd)
    finally:
        sel.close()
    return bytes(got[r_out]), bytes(got[r_err])


class Forked:
    """A command running in a forked child (a server): Popen's pid, poll, wait,
    send_signal and kill. Its stdout and stderr go to `log`."""

    def __init__(self, argv: Sequence[str], log: str) -> None:
        self.args, self.log = list(argv), log
        self.returncode: int | None = None
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        r, w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            os.close(w)
            _child(argv, [(r, -1), (-1, fd), (-1, fd)], None, None)
        os.close(r)
        os.close(w)                    # the child's stdin: at its end at once
        os.close(fd)

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout or 0)
            time.sleep(0.02)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(9)
