"""The stream-endpoint protocol: one request, framed stream bytes, one result.

Spoken over any byte pipe: an OpenSSH session (`ssh://`, the far side runs
`blockxfer stdio-serve`) or a mutual-TLS connection (`tls://`). Layout
(docs/transport.md):

    request   b"BXS1 " JSON b"\n"      client -> server, at most MAX_LINE bytes
    status    b"OK " JSON b"\n"  or  b"ERR " JSON b"\n"
    frame     >I length, then that many bytes; a length of 0 ends the stream

    receive:  C: request   S: status(ready)   C: frames, end   S: status(result)
    send:     C: request   S: status(ready)   S: frames, end   S: status(result)
    replicate: C: request  S: status(plan)    S: frames, end   S: status(result)
               (no frames when the plan has no stream; docs/replication.md)

A session: a request may carry `"keep": SECONDS`, the client's wish to send its
next request on the same connection within that time. A server that grants it
adds `"kept": SECONDS` (at most what was asked) to the request's final OK status
and then waits for the next request, EOF or the end of that idle time; without
`kept` (an older server, an error, or `keep` not asked) the connection ends after
the result, as it always did. Every request is checked on its own, as on a new
connection.

The server answers "ready" only after it has checked the request (the volume it
names, the image, the resume token), so a refused request costs no data. The
final status is an application-level acknowledgement: a stream counts as
delivered only when the far side says so, never on a bare close (a TLS close can
drop the last bytes).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import struct
from typing import Any, Protocol

from blockxfer.errors import BlockxferError, StreamError, error_from_dict, error_to_dict

from .base import Result

MAGIC = b"BXS1 "
MAX_LINE = 64 << 10
FRAME = struct.Struct(">I")
FRAME_SIZE = 1 << 20                 # bytes gathered before a frame goes out
MAX_FRAME = 16 << 20
PIPE_SIZE = 1 << 20                  # Linux's default pipe-max-size


def widen_pipe(fd: int) -> None:
    """Give a pipe room for a whole frame (the default 64 KiB makes the writer and
    the far reader, ssh in between, take turns sixteen times a frame); nothing on
    a socket, a file or where the limit is lower."""
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)


class Writer(Protocol):
    def write(self, data: bytes | bytearray | memoryview, /) -> int: ...
    def flush(self) -> None: ...


class Reader(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...
    def readline(self, limit: int = -1, /) -> bytes: ...


class Closed(StreamError):
    """The far side closed the connection where a line was due, without a byte of it."""


def _line(r: Reader, what: str) -> bytes:
    line = r.readline(MAX_LINE + 1)
    if not line:
        raise Closed(f"the far side closed the connection before {what}")
    if len(line) > MAX_LINE or not line.endswith(b"\n"):
        raise StreamError(f"the far side sent {what} that is malformed or too long")
    return line[:-1]


def write_request(w: Writer, request: dict[str, Any]) -> None:
    w.write(MAGIC + json.dumps(request, sort_keys=True).encode() + b"\n")
    w.flush()


def read_request(r: Reader) -> dict[str, Any]:
    """The next request; `Closed` at a clean end (EOF before any byte of one)."""
    line = _line(r, "a request")
    if not line.startswith(MAGIC):
        raise StreamError("not a blockxfer stream request (expected BXS1)")
    try:
        req = json.loads(line[len(MAGIC):])
    except ValueError as e:
        raise StreamError("the stream request is not valid JSON") from e
    if not isinstance(req, dict):
        raise StreamError("the stream request is not a JSON object")
    return req


def write_status(w: Writer, result: Result | None = None,
                 error: BlockxferError | None = None) -> None:
    if error is not None:
        w.write(b"ERR " + json.dumps(error_to_dict(error)).encode() + b"\n")
    else:
        w.write(b"OK " + json.dumps(result or {}, sort_keys=True).encode() + b"\n")
    w.flush()


def read_status(r: Reader, peer: str) -> Result:
    """The far side's status: its result, or its error raised here with its exit code."""
    line = _line(r, "its answer")
    word, _, body = line.partition(b" ")
    try:
        obj = json.loads(body) if body else {}
    except ValueError as e:
        raise StreamError(f"{peer} sent a malformed answer") from e
    if word == b"OK" and isinstance(obj, dict):
        return obj
    if word == b"ERR" and isinstance(obj, dict):
        raise error_from_dict(obj, prefix=f"{peer}: ")
    raise StreamError(f"{peer} sent a malformed answer")


class FrameWriter:
    """Gathers writes into frames of about FRAME_SIZE bytes (at most MAX_FRAME).

    Small pieces are kept (copied, as a caller may reuse its buffer) until a frame
    fills; a piece that fills one goes out at once, behind its frame header and the
    kept pieces, without being copied: a record's body is never gathered into a
    buffer first, and the far side reads it out of one frame."""

    def __init__(self, w: Writer) -> None:
        self._w = w
        self._kept: list[bytes | memoryview] = []
        self._size = 0

    def write(self, data: bytes | bytearray | memoryview, /) -> int:
        n = len(data)
        view = memoryview(data).cast("B") if not isinstance(data, bytes) else data
        while len(view) > MAX_FRAME - FRAME_SIZE:       # a frame never exceeds MAX_FRAME
            self._put(view[:FRAME_SIZE])
            view = view[FRAME_SIZE:]
        self._put(view)
        return n

    def _put(self, piece: bytes | memoryview) -> None:
        if self._size + len(piece) >= FRAME_SIZE:
            self._kept.append(piece)
            self._size += len(piece)
            self._emit()
            return
        self._kept.append(piece if isinstance(piece, bytes) else bytes(piece))
        self._size += len(piece)

    def flush(self) -> None:
        """Frames go out as they fill; `end` sends the rest."""

    def _emit(self) -> None:
        if self._size:
            self._w.write(FRAME.pack(self._size))
            for piece in self._kept:
                self._w.write(piece)
            self._kept, self._size = [], 0

    def end(self) -> None:
        self._emit()
        self._w.write(FRAME.pack(0))
        self._w.flush()


class FrameReader:
    """Reads the frames back as a plain byte stream; b"" after the end frame."""

    def __init__(self, r: Reader, peer: str) -> None:
        self._r, self._peer = r, peer
        self._left = 0
        self.ended = False

    def _exact(self, n: int) -> bytes:
        data = self._r.read(n)
        while len(data) < n:
            more = self._r.read(n - len(data))
            if not more:
                raise StreamError(f"{self._peer} closed the connection inside the stream")
            data += more
        return data

    def read(self, n: int = -1, /) -> bytes:
        if self.ended:
            return b""
        if self._left == 0:
            (self._left,) = FRAME.unpack(self._exact(FRAME.size))
            if self._left == 0:
                self.ended = True
                return b""
            if self._left > MAX_FRAME:
                raise StreamError(f"{self._peer} sent a malformed frame")
        want = self._left if n < 0 else min(n, self._left)
        data = self._exact(want)
        self._left -= len(data)
        return data

    def drain(self) -> None:
        """Read to the end frame (what the decoder left unread)."""
        while self.read(FRAME_SIZE):
            pass
