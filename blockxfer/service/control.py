"""The control socket: other blockxfer commands talk to the service that owns a volume.

While `blockxfer serve` has a volume open, nobody else may open it; every other
command sends its request to the service instead. The socket lives at
`socket_path(volume_path)`: `/run/blockxfer/<sha256 of the volume's realpath, 32
hex>.sock` (the directory can be moved with `$BLOCKXFER_RUN_DIR`), mode 0600.

Protocol: JSON lines over a Unix stream socket. A request is
`{"id": 1, "command": "snapshot", "args": {"name": "daily"}}`, with the file
descriptors a bulk command works on attached to it (SCM_RIGHTS: `read` writes
into the client's standard output, `write` reads its standard input, `send` and
`receive` use a pipe). Bulk data never goes as JSON. While a command runs the
service may send `{"id": 1, "progress": BYTES}` lines, and it may ask the client
a question (`{"id": 1, "ask": "next_tape", "args": {...}}`: the next tape of a
set is the operator's, found by the client's --next-tape, changer or terminal),
which the client answers with one line, `{"answer": ...}` or `{"error": {...}}`.
The answer is
`{"id": 1, "ok": true, "result": ...}` or `{"id": 1, "ok": false, "error":
{"type": "AlreadyExists", "message": "...", "exit_code": 5}}`
(`errors.error_to_dict`). Requests on one connection are answered in order.
`call()` is the client: it raises the named BlockxferError subclass, so exit
codes and one-line errors reach the operator unchanged.

`ControlServer` knows no volume: it answers `ping` and whatever commands are
registered (`blockxfer.service.commands`).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from blockxfer import errors
from blockxfer.errors import BlockxferError, DeviceError, UsageError

log = logging.getLogger(__name__)

RUN_DIR = "/run/blockxfer"
MAX_LINE = 1 << 20
PROGRESS_EVERY = 0.5            # seconds between progress lines
_ids = itertools.count(1)

Handler = Callable[..., Any]
Progress = Callable[[int], None]
Answer = Callable[[str, dict[str, Any]], Any]     # (question, args) -> answer
Ask = Callable[..., Any]                          # ask(question, **args) -> answer


class ServerNotRunning(DeviceError):
    """No service owns this volume (no control socket, or nobody listening on it)."""


def run_dir() -> str:
    return os.environ.get("BLOCKXFER_RUN_DIR", RUN_DIR)


def socket_path(volume_path: str) -> str:
    digest = hashlib.sha256(os.path.realpath(volume_path).encode()).hexdigest()[:32]
    return os.path.join(run_dir(), digest + ".sock")


def bind_control(volume_path: str) -> socket.socket:
    path = socket_path(volume_path)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    if server_running(volume_path):
        raise errors.DeviceBusy(f"{volume_path} is already served (control socket {path})")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)                     # stale: nobody answered on it
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    os.chmod(path, 0o600)
    sock.listen(16)
    return sock


def server_running(volume_path: str) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(socket_path(volume_path))
        return True
    except OSError:
        return False


# -- client ---------------------------------------------------------------------------------
def call(volume_path: str, command: str, *, timeout: float | None = 300.0,
         fds: list[int] | None = None, handover: bool = False,
         progress: Progress | None = None, answer: Answer | None = None,
         **args: Any) -> Any:
    """Run `command` in the service that owns `volume_path`; return its result.
    `fds` go along with the request (SCM_RIGHTS), and with `handover` they are
    closed here once sent (a pipe end only the service should hold); `progress`
    hears the bytes done; `answer` answers the service's questions."""
    path = socket_path(volume_path)
    request = {"id": next(_ids), "command": command, "args": args}
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            raw = json.dumps(request).encode() + b"\n"
            if fds:
                socket.send_fds(s, [raw], fds)
                if handover:
                    _close_all(fds)
                    fds = None
            else:
                s.sendall(raw)
            reply = _final_reply(s, progress, answer)
    except (FileNotFoundError, ConnectionRefusedError) as e:
        raise ServerNotRunning(f"no server owns {volume_path} ({path})") from e
    except OSError as e:
        raise DeviceError(f"control socket {path}: {e}") from e
    finally:
        if handover and fds:
            _close_all(fds)
    if reply is None:
        raise DeviceError(f"control socket {path}: the server closed the connection "
                          f"before it answered {command!r}")
    return result_of(reply)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _final_reply(s: socket.socket, progress: Progress | None,
                 answer: Answer | None) -> dict[str, Any] | None:
    """Read progress lines and answer questions until the command's answer."""
    f = s.makefile("rb")
    done = 0
    while line := f.readline(MAX_LINE):
        reply = json.loads(line)
        if not isinstance(reply, dict):
            return {"ok": False}
        if "ok" in reply:
            return reply
        if "progress" in reply:
            total = int(reply["progress"])
            if progress and total > done:
                progress(total - done)
            done = max(done, total)
        elif "ask" in reply:
            s.sendall(json.dumps(_answer(answer, reply)).encode() + b"\n")
    return None


def _answer(answer: Answer | None, question: dict[str, Any]) -> dict[str, Any]:
    try:
        if answer is None:
            raise UsageError(f"the server asked for {question['ask']!r}, which this command "
                             "cannot answer")
        args = question.get("args")
        return {"answer": answer(str(question["ask"]), args if isinstance(args, dict) else {})}
    except BlockxferError as e:
        return {"error": errors.error_to_dict(e)}


def result_of(reply: dict[str, Any]) -> Any:
    if reply.get("ok"):
        return reply.get("result")
    err = reply.get("error")
    raise errors.error_from_dict(err if isinstance(err, dict) else {}, "server error")


# -- server ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Registered:
    handler: Handler
    fds: int = 0                 # descriptors the request must carry (`fd`, `fd2` args)
    progress: bool = False       # the handler takes `progress=`
    asks: bool = False           # the handler takes `ask=` (questions to the client)


class ControlServer:
    """Answers control requests with the registered commands, one thread per
    connection. `running()` counts the commands in flight (the service waits for
    them before it closes the volume)."""

    def __init__(self) -> None:
        self.commands: dict[str, Registered] = {
            "ping": Registered(lambda: {"pid": os.getpid()})}
        self._busy = 0
        self._idle = threading.Condition()

    def register(self, command: str, handler: Handler, *, fds: int = 0,
                 progress: bool = False, asks: bool = False) -> None:
        """Add a command that another module implements."""
        self.commands[command] = Registered(handler, fds, progress, asks)

    def handle(self, request: Any, fds: list[int] | None = None,
               send: Callable[[dict[str, Any]], None] | None = None,
               lines: Iterator[tuple[bytes, list[int]]] | None = None) -> dict[str, Any]:
        rid = request.get("id") if isinstance(request, dict) else None
        try:
            if not isinstance(request, dict):
                raise UsageError("a request is a JSON object")
            name = str(request.get("command"))
            reg = self.commands.get(name)
            if reg is None:
                raise UsageError(f"unknown control command {request.get('command')!r}")
            args = request.get("args") or {}
            if not isinstance(args, dict):
                raise UsageError("args must be an object")
            args = {**args, **_take_fds(name, reg.fds, fds if fds is not None else [])}
            if reg.progress:
                args["progress"] = _progress_lines(rid, send)
            if reg.asks:
                args["ask"] = _asker(rid, send, lines)
            with self._running():
                try:
                    result = reg.handler(**args)
                except TypeError as e:
                    if e.__traceback__ is not None and e.__traceback__.tb_next is not None:
                        raise                        # raised inside the handler: a bug
                    raise UsageError(f"{name}: {e}") from e
            return {"id": rid, "ok": True, "result": result}
        except BlockxferError as e:
            return {"id": rid, "ok": False, "error": errors.error_to_dict(e)}

    def running(self) -> int:
        with self._idle:
            return self._busy

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no command runs; False when some still do after `timeout`."""
        with self._idle:
            return self._idle.wait_for(lambda: self._busy == 0, timeout)

    def _running(self) -> _Busy:
        return _Busy(self)

    def start_connection(self, conn: socket.socket) -> threading.Thread:
        t = threading.Thread(target=self._serve, args=(conn,), name="control", daemon=True)
        t.start()
        return t

    def _serve(self, conn: socket.socket) -> None:
        lock = threading.Lock()

        def send(reply: dict[str, Any]) -> None:
            with lock:
                conn.sendall(json.dumps(reply).encode() + b"\n")
        with conn:
            lines = _lines_with_fds(conn)
            for line, fds in lines:
                try:
                    request = json.loads(line)
                except ValueError:
                    request = None
                try:
                    reply = self.handle(request, fds, send, lines)
                except Exception as e:   # a bug: answer, log, keep serving
                    log.exception("control request failed")
                    reply = {"id": None, "ok": False,
                             "error": {"type": "BlockxferError", "message": repr(e)}}
                for fd in fds:                    # any the command did not take
                    os.close(fd)
                try:
                    send(reply)
                except OSError:
                    return


class _Busy:
    def __init__(self, ctl: ControlServer) -> None:
        self.ctl = ctl

    def __enter__(self) -> None:
        with self.ctl._idle:
            self.ctl._busy += 1

    def __exit__(self, *exc: object) -> None:
        with self.ctl._idle:
            self.ctl._busy -= 1
            self.ctl._idle.notify_all()


def _take_fds(command: str, wanted: int, fds: list[int]) -> dict[str, int]:
    """The descriptors a command takes, as `fd` (and `fd2`); removed from `fds`, so
    the handler owns (and closes) them."""
    if not wanted:
        return {}
    if len(fds) < wanted:
        raise UsageError(f"{command} needs {wanted} file descriptor(s) with the request")
    return {n: fds.pop(0) for n in ["fd", "fd2"][:wanted]}


def _progress_lines(rid: Any, send: Callable[[dict[str, Any]], None] | None) -> Progress:
    """A progress callback that sends the running total now and then."""
    state = {"total": 0, "last": 0.0}

    def progress(n: int) -> None:
        state["total"] += n
        now = time.monotonic()
        if send is not None and now - state["last"] >= PROGRESS_EVERY:
            state["last"] = now
            with contextlib.suppress(OSError):   # the client went away: the command
                send({"id": rid, "progress": state["total"]})   # notices on its fd
    return progress


def _asker(rid: Any, send: Callable[[dict[str, Any]], None] | None,
           lines: Iterator[tuple[bytes, list[int]]] | None) -> Ask:
    """Ask the client a question on the command's own connection; its answer is
    the next line (the handler runs inside the loop reading them)."""
    def ask(question: str, **args: Any) -> Any:
        if send is None or lines is None:
            raise UsageError(f"no client to ask for {question!r}")
        try:
            send({"id": rid, "ask": question, "args": args})
            line, fds = next(lines)
        except (OSError, StopIteration) as e:
            raise DeviceError(f"the client went away while asked for {question!r}") from e
        _close_all(fds)
        try:
            reply = json.loads(line)
        except ValueError as e:
            raise UsageError(f"the client's answer to {question!r} is not JSON") from e
        if not isinstance(reply, dict):
            raise UsageError(f"the client's answer to {question!r} is not an object")
        if isinstance(reply.get("error"), dict):
            raise errors.error_from_dict(reply["error"])
        return reply.get("answer")
    return ask


def _lines_with_fds(conn: socket.socket) -> Iterator[tuple[bytes, list[int]]]:
    """Request lines, each with the descriptors that came with it (SCM_RIGHTS)."""
    buf, fds = b"", []
    while True:
        try:
            data, got, _, _ = socket.recv_fds(conn, 65536, 4)
        except OSError:
            return
        fds.extend(got)
        if not data:
            for fd in fds:
                os.close(fd)
            return
        buf += data
        if len(buf) > MAX_LINE and b"\n" not in buf:
            return
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            yield line, fds
            fds = []
