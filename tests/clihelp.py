"""Running the `blockxfer` command from tests, as an operator would.

`run(argv)` runs the command line's `main` in a forked child of the test process
with its own stdin, stdout, stderr, environment and working directory, and
returns what `subprocess.run` would. The child is a real process (its own exit
code, its own file descriptors, killed at the timeout) that skips the
interpreter's start-up and imports (about 0.3 s of CPU, a thousand times a
suite). `BLOCKXFER_TEST_EXEC=1` runs the installed script instead, which
tests/test_package.py always does for the installed wheel.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any

# the venv's console script when it is there (what `pip install` gives), else the module
_SCRIPT = os.path.join(os.path.dirname(sys.executable), "blockxfer")
BX = [_SCRIPT] if os.path.exists(_SCRIPT) else [sys.executable, "-m", "blockxfer.cli"]
EXEC = os.environ.get("BLOCKXFER_TEST_EXEC") == "1"
Out = int | IO[Any] | None          # what subprocess takes for stdout and stderr


def bx(*args: str, data: bytes | None = None, timeout: float = 120,
       **kw: Any) -> subprocess.CompletedProcess[bytes]:
    return run(list(args), input=data, timeout=timeout, **kw)


def run(argv: Sequence[str], *, input: bytes | str | None = None, stdin: Out = None,
        timeout: float = 120,
        env: Mapping[str, str] | None = None, cwd: str | os.PathLike[str] | None = None,
        text: bool = False, check: bool = False, stdout: Out = subprocess.PIPE,
        stderr: Out = subprocess.PIPE) -> subprocess.CompletedProcess:
    """`blockxfer ARGV...` to completion, like `subprocess.run([*BX, *argv], ...)`."""
    if EXEC:
        return subprocess.run([*BX, *argv], input=input, stdin=stdin, timeout=timeout, env=env,
                              cwd=cwd, text=text, check=check, stdout=stdout, stderr=stderr)
    res = call_forked(lambda: _main(list(argv)), input=input, stdin=stdin, timeout=timeout,
                      env=env,
                      cwd=cwd, text=text, stdout=stdout, stderr=stderr, name=[*BX, *argv])
    if check:
        res.check_returncode()
    return res


def _main(argv: list[str]) -> int:
    """What the console script runs (blockxfer.cli.entry.run), in the child."""
    sys.argv = [BX[-1], *argv]
    from blockxfer.cli.entry import run
    try:
        return run(argv)
    except SystemExit as e:                          # argparse's usage errors, --help
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)


def call_forked(fn: Callable[[], int | None], *, input: bytes | str | None = None,
                stdin: Out = None, timeout: float = 120, env: Mapping[str, str] | None = None,
                cwd: str | os.PathLike[str] | None = None, text: bool = False,
                stdout: Out = subprocess.PIPE, stderr: Out = subprocess.PIPE,
                name: Sequence[str] = ("forked",)) -> subprocess.CompletedProcess:
    """`fn()` in a forked child with its own stdin/stdout/stderr, environment and
    working directory; its return value is the exit code (a signal: minus it)."""
    data = input.encode() if isinstance(input, str) else input
    out, err, code = _forked(fn, data, stdin, timeout, env, cwd, stdout, stderr, list(name))
    return subprocess.CompletedProcess(
        list(name), code, out.decode(errors="replace") if text and out is not None else out,
        err.decode(errors="replace") if text and err is not None else err)


def _forked(fn: Callable[[], int | None], data: bytes | None, stdin: Out, timeout: float,
            env: Mapping[str, str] | None, cwd: str | os.PathLike[str] | None,
            stdout: Out, stderr: Out, name: list[str],
            ) -> tuple[bytes | None, bytes | None, int]:
    pipes = {fd: os.pipe() for fd in (0, 1, 2)}
    keep = {1: stdout == subprocess.PIPE, 2: stderr == subprocess.PIPE}
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:                                     # the child: never returns
        _child(fn, pipes, keep, stdin, stdout, stderr, env, cwd)
    os.close(pipes[0][0])
    os.close(pipes[1][1])
    os.close(pipes[2][1])
    got: dict[int, bytes] = {}
    readers = [threading.Thread(target=_drain, args=(pipes[fd][0], got, fd), daemon=True)
               for fd in (1, 2)]
    readers.append(threading.Thread(target=_feed, args=(pipes[0][1], data), daemon=True))
    for t in readers:
        t.start()
    code = _wait(pid, timeout, name)
    for t in readers:
        t.join()
    return (got[1] if keep[1] else None), (got[2] if keep[2] else None), code


def _child(fn: Callable[[], int | None], pipes: dict[int, tuple[int, int]],
           keep: dict[int, bool], stdin: Out, stdout: Out, stderr: Out,
           env: Mapping[str, str] | None, cwd: str | os.PathLike[str] | None) -> None:
    code = 1
    try:
        os.setpgid(0, 0)              # a timeout kills the child and whatever it started
        atexit._clear()               # the test runner's exit handlers are not the child's
        os.dup2(pipes[0][0], 0)
        if stdin is not None:
            os.dup2(_fd_of(stdin, os.O_RDONLY), 0)
        for fd, want in ((1, stdout), (2, stderr)):
            if keep[fd]:
                os.dup2(pipes[fd][1], fd)
            elif want == subprocess.STDOUT:
                os.dup2(1, fd)
            elif want is not None:
                os.dup2(_fd_of(want, os.O_WRONLY), fd)
        for r, w in pipes.values():
            os.close(r)
            os.close(w)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)   # as the interpreter sets it
        if env is not None:
            os.environ.clear()
            os.environ.update(env)
        if cwd is not None:
            os.chdir(cwd)
        # the test runner replaced these with its capture; the child writes to its fds
        sys.stdin = io.TextIOWrapper(io.BufferedReader(io.FileIO(0, "r", closefd=False)))
        sys.stdout = io.TextIOWrapper(io.BufferedWriter(io.FileIO(1, "w", closefd=False)),
                                      line_buffering=os.isatty(1))
        sys.stderr = io.TextIOWrapper(io.BufferedWriter(io.FileIO(2, "w", closefd=False)),
                                      line_buffering=True)
        for h in logging.root.handlers[:]:           # the test runner's capture, not ours
            logging.root.removeHandler(h)
        logging.root.setLevel(logging.WARNING)
        code = fn() or 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:                            # a traceback, as the real script shows
        import traceback
        traceback.print_exc()
        code = 1
    finally:
        atexit._run_exitfuncs()       # as the interpreter does on its way out
        for f in (sys.stdout, sys.stderr):
            with contextlib.suppress(BaseException):
                f.flush()
        os._exit(code)


def _fd_of(want: int | IO[Any], mode: int) -> int:
    """The descriptor subprocess would give the child for `want`."""
    if want == subprocess.DEVNULL:
        return os.open(os.devnull, mode)
    return want if isinstance(want, int) else want.fileno()


def _drain(fd: int, got: dict[int, bytes], key: int) -> None:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    os.close(fd)
    got[key] = b"".join(chunks)


def _feed(fd: int, data: bytes | None) -> None:
    try:
        if data:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
    except BrokenPipeError:
        pass
    finally:
        os.close(fd)


def _wait(pid: int, timeout: float, name: list[str]) -> int:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise subprocess.TimeoutExpired(name, timeout)
        time.sleep(0.002)


class Forked:
    """A command running on in a forked child (a server), as `subprocess.Popen` would
    run it: pid, poll, wait, send_signal, kill. Its stdout and stderr go to `log`;
    its stdin is at its end at once."""

    def __init__(self, argv: Sequence[str], log: str) -> None:
        self.args, self.log = [*BX, *argv], log
        self.returncode: int | None = None
        out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        pipes = {fd: os.pipe() for fd in (0, 1, 2)}
        self.pid = os.fork()
        if self.pid == 0:
            _child(lambda: _main(list(argv)), pipes, {1: False, 2: False}, None, out, out,
                   None, None)
        os.close(out)
        for r, w in pipes.values():
            os.close(r)
            os.close(w)

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout or 0)
            time.sleep(0.02)
        return code

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def one_line(r: subprocess.CompletedProcess[bytes]) -> str:
    """The error line of a refused command; fails if it is more (a traceback)."""
    err = r.stderr.decode()
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err
