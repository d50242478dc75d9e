"""The NBD server: listeners, one thread per connection, and a clean stop.

`Server(volume)` serves a volume (anything with the Volume surface) on any
number of listeners (`unix:PATH`, `tcp:HOST:PORT`) and on sockets handed to it
(`start_connection`, used by tests over `socket.socketpair()`). Other listeners
(the service's control socket) join its accept loop with `add_listener`; the
NBD server itself speaks only NBD. `stop()` may be
called from a signal handler: the accept loop stops accepting, every
connection stops reading new requests, the requests already read are answered,
and a final commit (CP) makes everything acknowledged durable.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import logging
import os
import selectors
import socket
import stat
import threading
from collections.abc import Callable

from blockxfer.errors import DeviceError, UsageError

from . import protocol as p
from .exports import ExportTable, LockedVolume, VolumeLike
from .negotiate import negotiate
from .sockio import tune
from .tls import TlsPolicy
from .transmit import Transmission

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 30.0


def parse_listen(spec: str) -> tuple[socket.AddressFamily, str | tuple[str, int]]:
    """`unix:PATH` or `tcp:HOST:PORT` (HOST may be `[v6]`) -> (family, address)."""
    kind, _, rest = spec.partition(":")
    if kind == "unix" and rest:
        return socket.AF_UNIX, rest
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        if host and port.isdigit():
            if host.startswith("[") and host.endswith("]"):
                return socket.AF_INET6, (host[1:-1], int(port))
            return socket.AF_INET, (host, int(port))
    raise UsageError(f"--listen {spec!r}: expected unix:PATH or tcp:HOST:PORT")


def is_loopback(spec: str) -> bool:
    """True when only this host can reach the listener: a unix socket, or a TCP
    address every resolution of which is loopback (0.0.0.0 and :: are not)."""
    family, address = parse_listen(spec)
    if family == socket.AF_UNIX:
        return True
    assert isinstance(address, tuple)
    host = address[0]
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return False                   # cannot tell: the careful answer
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def bind_listener(spec: str, backlog: int = 64) -> socket.socket:
    family, address = parse_listen(spec)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if family == socket.AF_UNIX:
            assert isinstance(address, str)
            _remove_stale_socket(address)
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        raise DeviceError(f"cannot listen on {spec}: {e.strerror}") from e
    return sock


def _remove_stale_socket(path: str) -> None:
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass


class Server:
    def __init__(self, volume: VolumeLike, *, read_only: bool = False,
                 tls: TlsPolicy | None = None) -> None:
        self.vol = LockedVolume(volume)
        self.tls = tls or TlsPolicy()
        self.exports = ExportTable(self.vol, read_only=read_only)
        self._listeners: list[tuple[socket.socket, Callable[[socket.socket], object]]] = []
        self._conns: dict[socket.socket, threading.Thread] = {}
        self._conns_lock = threading.Lock()
        self._stopping = False      # a plain flag, never an Event: stop() takes no lock
        self._numbers = itertools.count(1)          # names connections in the log
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_w.setblocking(False)

    # --- listeners ---

    def listen(self, spec: str) -> socket.socket:
        sock = bind_listener(spec)
        self.add_listener(sock, self.start_connection)
        return sock

    def stats(self) -> dict[str, object]:
        """Clients connected, read-only or not, the exports offered now."""
        with self._conns_lock:
            clients = len(self._conns)
        return {"clients": clients, "read_only": self.exports.read_only,
                "exports": [e.name for e in self.exports.all()]}

    def add_listener(self, sock: socket.socket,
                     handler: Callable[[socket.socket], object]) -> None:
        self._listeners.append((sock, handler))

    def serve_forever(self) -> None:
        """Accept until `stop()`, then drain every connection and commit."""
        sel = selectors.DefaultSelector()
        sel.register(self._wake_r, selectors.EVENT_READ)
        for sock, handler in self._listeners:
            sel.register(sock, selectors.EVENT_READ, handler)
        try:
            while not self._stopping:
                for key, _ in sel.select():
                    if key.data is not None and not self._stopping:
                        self._accept(key.fileobj, key.data)  # type: ignore[arg-type]
        finally:
            sel.close()
            self.shutdown()

    def _accept(self, listener: socket.socket,
                handler: Callable[[socket.socket], object]) -> None:
        try:
            conn, _ = listener.accept()
        except OSError as e:
            log.warning("accept failed: %s", e)
            return
        handler(conn)

    # --- connections ---

    def start_connection(self, sock: socket.socket) -> threading.Thread:
        name = f"connection {next(self._numbers)} from {_peer(sock)}"
        t = threading.Thread(target=self._serve_connection, args=(sock, name),
                             name="nbd-conn", daemon=True)
        with self._conns_lock:
            if self._stopping:
                sock.close()
                return t
            self._conns[sock] = t
        t.start()
        return t

    def _serve_connection(self, sock: socket.socket, name: str) -> None:
        session = None
        try:
            tune(sock)
            sock.settimeout(HANDSHAKE_TIMEOUT)
            session = negotiate(sock, self.exports, self.tls)
            if session is not None and not self._stopping:
                sock.settimeout(None)
                Transmission(session.stream, session, self.vol, name).run()
        except (EOFError, OSError) as e:
            log.debug("connection ended during handshake: %s", e)
        except p.ProtocolError as e:
            log.warning("closing connection: %s", e)
        except Exception:
            log.exception("connection failed")
        finally:
            with self._conns_lock:
                self._conns.pop(sock, None)
            if session is not None:
                session.stream.close()       # TLS: close_notify; a socket: closed
            sock.close()

    # --- stopping ---

    def stop(self) -> None:
        """Ask the server to stop; safe from a signal handler or another thread. It
        takes no lock: Python runs a handler in the main thread, which may hold any
        lock just then, and an Event.set there (as before) could wait forever for
        the event's own lock. It sets the flag and wakes the accept loop."""
        self._stopping = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def shutdown(self, timeout: float = 60.0) -> None:
        """Stop accepting, let connections answer what they read, then commit."""
        self._stopping = True
        for sock, _ in self._listeners:
            _close_listener(sock)
        self._listeners.clear()
        with self._conns_lock:
            conns = list(self._conns.items())
        for sock, _ in conns:
            with contextlib.suppress(OSError):   # the reader sees EOF; replies still go out
                sock.shutdown(socket.SHUT_RD)
        for _, t in conns:
            if t.ident is not None:
                t.join(timeout)
        self.vol.call("commit")


def _peer(sock: socket.socket) -> str:
    """The client's address for the log (a unix socket's peer has none)."""
    try:
        address = sock.getpeername()
    except OSError:
        return "an unknown peer"
    if isinstance(address, tuple):
        return f"[{address[0]}]:{address[1]}" if ":" in address[0] else f"{address[0]}:{address[1]}"
    return address or "a unix socket"


def _close_listener(sock: socket.socket) -> None:
    path = sock.getsockname() if sock.family == socket.AF_UNIX else None
    sock.close()
    if isinstance(path, str) and path:
        with contextlib.suppress(OSError):
            os.unlink(path)
