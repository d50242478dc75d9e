"""The request stream in large pieces, and pooled buffers for write payloads."""

from __future__ import annotations

from . import protocol as p
from .sockio import ConnectionClosed, Stream, recv_into_exact

RECV_BYTES = 256 << 10           # receive buffer: many small requests per recv


class BufferPool:
    """Reuses payload buffers by power-of-two size class: no allocation per write.
    What it keeps is capped in count per class and in bytes overall (the volume's
    memory budget is a few hundred MiB, and a READ may be 32 MiB)."""

    def __init__(self, keep: int = 64, budget: int = 96 << 20) -> None:
        self._free: dict[int, list[bytearray]] = {}
        self._keep, self._budget, self._held = keep, budget, 0

    def get(self, n: int) -> bytearray:
        size = max(4096, 1 << (n - 1).bit_length())
        free = self._free.setdefault(size, [])
        try:
            buf = free.pop()
        except IndexError:
            return bytearray(size)
        self._held -= len(buf)
        return buf

    def put(self, buf: bytearray) -> None:
        free = self._free.setdefault(len(buf), [])
        if len(free) < self._keep and self._held + len(buf) <= self._budget:
            free.append(buf)
            self._held += len(buf)


class Receiver:
    """Reads the request stream in large pieces: with many small requests queued
    by the client, one recv brings several headers and payloads (per request, two
    exact recvs cost two syscalls and two GIL hand-offs)."""

    def __init__(self, sock: Stream, size: int = RECV_BYTES) -> None:
        self.sock = sock
        self.buf = memoryview(bytearray(size))
        self.start = self.end = 0

    def available(self) -> int:
        """Bytes already received and not yet taken: no syscall needed for them."""
        return self.end - self.start

    def header(self) -> p.Request:
        """The next request header, parsed in place."""
        if self.end - self.start < p.REQUEST.size:
            self._fill(p.REQUEST.size)
        req = p.parse_request(self.buf, self.start)
        self.start += p.REQUEST.size
        return req

    def take_view(self, n: int) -> memoryview:
        """The next `n` (<= buffer size) bytes in place: valid until the next recv."""
        if self.end - self.start < n:
            self._fill(n)
        view = self.buf[self.start:self.start + n]
        self.start += n
        return view

    def take_into(self, out: memoryview) -> None:
        """The next len(out) bytes into `out`; large payloads mostly bypass the buffer."""
        have = min(len(out), self.end - self.start)
        out[:have] = self.buf[self.start:self.start + have]
        self.start += have
        if have < len(out):
            recv_into_exact(self.sock, out[have:])

    def _fill(self, n: int) -> None:
        left = self.end - self.start
        self.buf[:left] = self.buf[self.start:self.end]
        self.start, self.end = 0, left
        while self.end < n:
            k = self.sock.recv_into(self.buf[self.end:])
            if k == 0:
                raise ConnectionClosed(f"peer closed after {self.end} of {n} bytes")
            self.end += k
