"""Pipelined READs (blockxfer.nbd.readpipe): many in flight on one connection,
completing out of order, over a volume that lends its buffers like the real one."""

from __future__ import annotations

import random
import struct
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from blockxfer.errors import DamagedBlock
from blockxfer.nbd import protocol as p
from blockxfer.nbd import readpipe
from blockxfer.nbd.server import Server
from tests.nbd.fakes import FakeVolume
from tests.nbd.nbdclient import Client

KiB, MiB = 1 << 10, 1 << 20
SIZE = 32 * MiB


class LendingVolume(FakeVolume):
    """Reads outside any lock into lent buffers (`read_leased`), as `Volume` does.
    `delay(offset)` says how long a read takes, `bad` which offsets fail (a
    damaged block). A buffer handed back is poisoned at once: a reply sent from
    it after that would carry the poison. Counts the reads in flight."""

    concurrent_reads = True

    def __init__(self) -> None:
        super().__init__(SIZE)
        rng = random.Random(17)
        self.write(0, rng.randbytes(SIZE))
        self.delay: Callable[[int], float] = lambda off: 0.0
        self.bad: set[int] = set()
        self.lent = self.returned = self.in_flight = self.most = 0
        self._lock = threading.Lock()

    def read_leased(self, offset: int, length: int,
                    snapshot: str | None = None) -> tuple[memoryview, Callable[[], None]]:
        with self._lock:
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
        try:
            time.sleep(self.delay(offset))
            if any(offset <= b < offset + length for b in self.bad):
                raise DamagedBlock(f"checksum mismatch in a block of {offset}+{length}")
            buf = bytearray(self.read(offset, length, snapshot))
        finally:
            with self._lock:
                self.in_flight -= 1
        with self._lock:
            self.lent += 1
        returned: list[bool] = []

        def release() -> None:
            assert not returned, "buffer handed back twice"
            returned.append(True)
            buf[:] = b"\xee" * len(buf)
            with self._lock:
                self.returned += 1
        return memoryview(buf), release


@pytest.fixture
def lending() -> LendingVolume:
    return LendingVolume()


@pytest.fixture
def lserver(lending: LendingVolume) -> Iterator[Server]:
    s = Server(lending)
    yield s
    s.shutdown(timeout=5)


def scattered_reads(n: int, length: int = 256 * KiB) -> list[tuple[int, int]]:
    """(cookie, offset) of `n` reads with gaps between them: none merge."""
    return [(i, (2 * i) * length) for i in range(n)]


def test_many_reads_in_flight_complete_out_of_order(
        lserver: Server, lending: LendingVolume) -> None:
    """Every fourth read is slow: later ones overtake it. Each reply carries the
    bytes of its own request, and every buffer goes back once, after its send."""
    lending.delay = lambda off: 0.05 if off // (512 * KiB) % 4 == 0 else 0.0
    c = Client.opened(lserver)
    reads = scattered_reads(48)
    c.sock.sendall(b"".join(p.pack_request(p.Request(0, p.CMD_READ, cookie, off, 256 * KiB))
                            for cookie, off in reads))
    order, offsets = [], dict(reads)
    for _ in reads:
        error, cookie, data = c.simple(256 * KiB)
        assert error == 0
        assert data == lending.read(offsets[cookie], 256 * KiB), cookie
        order.append(cookie)
    assert sorted(order) == [cookie for cookie, _ in reads]
    assert order != sorted(order)                # the slow ones were overtaken
    assert 1 < lending.most <= readpipe.DEPTH
    c.close()
    lserver.shutdown(timeout=5)
    assert lending.lent == lending.returned == len(reads)


def test_failing_read_in_a_pipeline_fails_only_itself(
        lserver: Server, lending: LendingVolume) -> None:
    """A damaged block in the middle of a stream of structured READs, some merged
    (contiguous): the request covering it gets an error chunk with its cookie, the
    others their bytes, and no buffer is lost."""
    c = Client.opened(lserver, structured=True)
    n, length = 32, 128 * KiB
    bad_cookie = 13
    lending.bad = {bad_cookie * length + 4096}
    lending.delay = lambda off: 0.01 if off // length % 3 == 0 else 0.0
    c.sock.sendall(b"".join(p.pack_request(p.Request(0, p.CMD_READ, i, i * length, length))
                            for i in range(n)))
    got: dict[int, tuple[int, bytes]] = {}
    for _ in range(n):
        flags, typ, cookie, payload = c.chunk()
        assert flags & p.REPLY_FLAG_DONE and cookie not in got
        got[cookie] = (typ, payload)
    assert set(got) == set(range(n))
    for i in range(n):
        typ, payload = got[i]
        if i == bad_cookie:
            assert typ == p.REPLY_TYPE_ERROR
            assert struct.unpack(">I", payload[:4])[0] == p.EIO
        else:
            assert typ == p.REPLY_TYPE_OFFSET_DATA
            assert payload == struct.pack(">Q", i * length) + lending.read(i * length, length)
    c.close()
    lserver.shutdown(timeout=5)
    assert lending.lent == lending.returned


def test_a_write_waits_for_the_reads_before_it(
        lserver: Server, lending: LendingVolume) -> None:
    """READ, WRITE, READ of the same range, pipelined: the slow first READ still
    sees the old bytes, the second the new ones (commands take effect in order)."""
    lending.delay = lambda off: 0.1
    c = Client.opened(lserver)
    old, new = lending.read(0, MiB), b"\x5a" * MiB
    c.sock.sendall(p.pack_request(p.Request(0, p.CMD_READ, 1, 0, MiB))
                   + p.pack_request(p.Request(0, p.CMD_WRITE, 2, 0, MiB)) + new
                   + p.pack_request(p.Request(0, p.CMD_READ, 3, 0, MiB)))
    got = {}
    for _ in range(3):                   # replies may come in any order
        magic, error, cookie = p.SIMPLE_REPLY.unpack(c.recv(p.SIMPLE_REPLY.size))
        got[cookie] = (error, c.recv(0 if cookie == 2 else MiB))
    assert got == {1: (0, old), 2: (0, b""), 3: (0, new)}


def test_pipeline_depth_bounds_reads_in_flight(
        lserver: Server, lending: LendingVolume, monkeypatch: pytest.MonkeyPatch) -> None:
    """With DEPTH 4, at most four 1 MiB reads are in flight however many are queued."""
    monkeypatch.setattr(readpipe, "DEPTH", 4)
    lending.delay = lambda off: 0.01
    c = Client.opened(lserver)
    reads = scattered_reads(12, MiB)
    c.sock.sendall(b"".join(p.pack_request(p.Request(0, p.CMD_READ, cookie, off, MiB))
                            for cookie, off in reads))
    for _ in reads:
        error, cookie, data = c.simple(MiB)
        assert error == 0 and data == lending.read(dict(reads)[cookie], MiB)
    assert 1 < lending.most <= 4
