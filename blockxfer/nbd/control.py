"""The control socket: other blockxfer commands talk to the server that owns a volume.

While `blockxfer serve` has a volume open, nobody else may open it; commands
such as `snapshot`, `snapshots` and `info` send a request to the server
instead. The socket lives at `socket_path(volume_path)`:
`/run/blockxfer/<sha256 of the volume's realpath, 32 hex>.sock` (the directory
can be moved with `$BLOCKXFER_RUN_DIR`), mode 0600.

Protocol: JSON lines over a Unix stream socket. A request is
`{"id": 1, "command": "snapshot", "args": {"name": "daily"}}`; the answer is
`{"id": 1, "ok": true, "result": ...}` or
`{"id": 1, "ok": false, "error": {"type": "AlreadyExists", "message": "...",
"exit_code": 5}}`. Requests on one connection are answered in order. `call()`
is the client: it raises the named BlockxferError subclass on an error.

`ControlServer` itself answers only `ping`, `commit` and the server's `info`;
the volume commands (`snapshot`, `snapshots`, `image`, ...) are registered by
`blockxfer.remote`. Freezing a file system is an ioctl, so the function that
does it is handed in (`freezer`) by whoever wires the server up.
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
from collections.abc import Callable, Iterator
from typing import Any

from blockxfer import errors
from blockxfer.errors import BlockxferError, DeviceError, UsageError

from .exports import LockedVolume

log = logging.getLogger(__name__)

RUN_DIR = "/run/blockxfer"
MAX_LINE = 1 << 20
_ids = itertools.count(1)

Handler = Callable[..., Any]
Freezer = Callable[[str], contextlib.AbstractContextManager[None]]


class ServerNotRunning(DeviceError):
    """No server owns this volume (no control socket, or nobody listening on it)."""


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


def call(volume_path: str, command: str, *, timeout: float | None = 300.0,
         fd: int | None = None, **args: Any) -> Any:
    """Run `command` in the server that owns `volume_path`; return its result.
    `fd` is passed along (SCM_RIGHTS): `send` writes its stream into it."""
    path = socket_path(volume_path)
    request = {"id": next(_ids), "command": command, "args": args}
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            raw = json.dumps(request).encode() + b"\n"
            if fd is None:
                s.sendall(raw)
            else:
                socket.send_fds(s, [raw], [fd])
            line = s.makefile("rb").readline(MAX_LINE)
    except (FileNotFoundError, ConnectionRefusedError) as e:
        raise ServerNotRunning(f"no server owns {volume_path} ({path})") from e
    except OSError as e:
        raise DeviceError(f"control socket {path}: {e}") from e
    if not line:
        raise DeviceError(f"control socket {path}: server closed the connection")
    return _result(json.loads(line))


def _result(reply: dict[str, Any]) -> Any:
    if reply.get("ok"):
        return reply.get("result")
    err = reply.get("error") or {}
    cls = getattr(errors, str(err.get("type")), None)
    if not (isinstance(cls, type) and issubclass(cls, BlockxferError)):
        cls = BlockxferError
    exc = cls(err.get("message", "server error"))
    if "exit_code" in err:
        exc.exit_code = int(err["exit_code"])
    raise exc


class ControlServer:
    """Answers control requests against the server's locked volume."""

    def __init__(self, vol: LockedVolume, *, info: Callable[[], dict[str, Any]] | None = None,
                 freezer: Freezer | None = None) -> None:
        self.vol, self._extra_info, self._freezer = vol, info, freezer
        self.commands: dict[str, Handler] = {
            "ping": lambda: {"pid": os.getpid()},
            "info": self.server_info,
            "commit": lambda: self.vol.call("commit"),
        }

    def register(self, command: str, handler: Handler) -> None:
        """Add a command (e.g. `snapshot`) that another layer implements."""
        self.commands[command] = handler

    def server_info(self) -> dict[str, Any]:
        """Who serves the volume and how: pid, clients, exports."""
        out: dict[str, Any] = {"pid": os.getpid()}
        if self._extra_info:
            out.update(self._extra_info())
        return out

    def frozen(self, mountpoint: str | None) -> contextlib.AbstractContextManager[None]:
        """Freeze `mountpoint` for the body (nothing when None). Call it outside the
        volume lock: the file system flushes through NBD to this very server."""
        if not mountpoint:
            return contextlib.nullcontext()
        if self._freezer is None:
            raise UsageError("this server was started without file system freezing")
        return self._freezer(mountpoint)

    def handle(self, request: dict[str, Any], fds: list[int] | None = None) -> dict[str, Any]:
        rid = request.get("id") if isinstance(request, dict) else None
        try:
            if not isinstance(request, dict):
                raise UsageError("a request is a JSON object")
            handler = self.commands.get(str(request.get("command")))
            if handler is None:
                raise UsageError(f"unknown control command {request.get('command')!r}")
            args = request.get("args") or {}
            if not isinstance(args, dict):
                raise UsageError("args must be an object")
            if request.get("command") in FD_COMMANDS:
                if not fds:
                    raise UsageError(f"{request.get('command')} needs a file descriptor")
                args = {**args, "fd": fds.pop(0)}
            try:
                result = handler(**args)
            except TypeError as e:
                raise UsageError(f"{request.get('command')}: {e}") from e
            return {"id": rid, "ok": True, "result": result}
        except BlockxferError as e:
            return {"id": rid, "ok": False, "error": {
                "type": type(e).__name__, "message": str(e), "exit_code": e.exit_code}}

    def start_connection(self, conn: socket.socket) -> threading.Thread:
        t = threading.Thread(target=self._serve, args=(conn,), name="nbd-control", daemon=True)
        t.start()
        return t

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            for line, fds in _lines_with_fds(conn):
                try:
                    request = json.loads(line)
                except ValueError:
                    request = None
                try:
                    reply = self.handle(request, fds)
                except Exception as e:   # a bug: answer, log, keep serving
                    log.exception("control request failed")
                    reply = {"id": None, "ok": False,
                             "error": {"type": "BlockxferError", "message": repr(e)}}
                for fd in fds:                    # any the command did not take
                    os.close(fd)
                try:
                    conn.sendall(json.dumps(reply).encode() + b"\n")
                except OSError:
                    return


FD_COMMANDS = {"send"}


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
