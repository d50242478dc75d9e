"""Exact-length reads and gathered writes, shared by both protocol phases.

They work on a `Stream`: a plain connected socket, or a `tls.TlsStream` after
NBD_OPT_STARTTLS (which offers the same calls), so no protocol code asks which.
A peer closing the connection surfaces as `ConnectionClosed`; other socket
errors pass through as OSError (the caller ends the connection either way).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterable, Sequence
from typing import Protocol

IOV_MAX = 1024          # sendmsg takes at most this many pieces (Linux UIO_MAXIOV)


class ConnectionClosed(EOFError):
    """The peer closed the connection (possibly in the middle of a message)."""


class Stream(Protocol):
    """What the protocol needs of a connection (a socket has it all)."""

    def recv_into(self, buffer: memoryview, nbytes: int = 0, /) -> int: ...
    def sendmsg(self, buffers: Iterable[bytes | bytearray | memoryview], /) -> int: ...
    def shutdown(self, how: int, /) -> None: ...
    def settimeout(self, timeout: float | None, /) -> None: ...
    def close(self) -> None: ...


def recv_into_exact(sock: Stream, view: memoryview) -> None:
    got, n = 0, len(view)
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionClosed(f"peer closed after {got} of {n} bytes")
        got += k


def recv_exact(sock: Stream, n: int) -> bytes:
    buf = bytearray(n)
    recv_into_exact(sock, memoryview(buf))
    return bytes(buf)


def send_all(sock: Stream, parts: Sequence[bytes | bytearray | memoryview]) -> None:
    """Send headers and payloads with one sendmsg (per IOV_MAX pieces) where the
    kernel takes it all. The first try passes `parts` as they are: building a
    byte view of each only pays off when the kernel took part of them."""
    sent = 0
    if len(parts) <= IOV_MAX:
        sent = sock.sendmsg(parts)
        if sent == sum(map(len, parts)):
            return
    views = [memoryview(b).cast("B") for b in parts if len(b)]
    i = 0
    while i < len(views):
        while i < len(views) and sent >= len(views[i]):
            sent -= len(views[i])
            i += 1
        if i == len(views):
            return
        if sent:
            views[i] = views[i][sent:]
        sent = sock.sendmsg(views[i:i + IOV_MAX])


def tune(sock: socket.socket, bufsize: int = 4 << 20) -> None:
    """Large buffers, and no Nagle delay on TCP: replies leave at once."""
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, opt, bufsize)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
