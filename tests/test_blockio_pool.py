"""BlockIO's read buffer pool and its read pool: what NBD's pipelined reads rely on."""

from __future__ import annotations

import threading

import numpy as np

from blockxfer.volume import blockio
from blockxfer.volume.blockio import BlockIO

BS = 4096


class Counting:
    """A device that counts the reads in flight at once."""
    path, logical_block_size, physical_block_size = "mem", 512, 4096

    def __init__(self, size: int) -> None:
        self.size, self.now, self.most = size, 0, 0
        self.lock, self.gate = threading.Lock(), threading.Barrier(blockio.READ_IN_FLIGHT)

    def pread(self, buf: memoryview | bytearray, offset: int) -> None:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
        self.gate.wait(timeout=5)          # all READ_IN_FLIGHT requests arrive together
        buf[:] = bytes(len(buf))
        with self.lock:
            self.now -= 1

    def pwrite(self, data: bytes | memoryview | bytearray, offset: int) -> None: ...
    def flush(self) -> None: ...
    def discard(self, offset: int, length: int) -> None: ...
    def close(self) -> None: ...


def test_reads_have_their_own_pool_read_in_flight_deep() -> None:
    n = blockio.READ_IN_FLIGHT
    dev = Counting(n * blockio.MAX_REQUEST)
    io = BlockIO(dev, BS)
    try:
        per = blockio.MAX_REQUEST // BS
        ptrs = np.zeros((n * per, 2), dtype=np.uint64)
        ptrs[:, 0] = np.arange(1, n * per + 1)       # one run: n requests of MAX_REQUEST
        buf = blockio.aligned(n * blockio.MAX_REQUEST)
        io.read_ptrs_into(ptrs, memoryview(buf), verify=False)
        assert dev.most == n > blockio.IN_FLIGHT
    finally:
        io.close()


def test_read_buffer_pool_keeps_a_connection_worth_per_size() -> None:
    io = BlockIO(Counting(1 << 20), BS)
    try:
        size = 4 << 20
        bufs = [io.take_read_buffer(size) for _ in range(blockio.READ_POOL_BYTES // size + 2)]
        for b in bufs:
            io.give_read_buffer(b)
        again = [io.take_read_buffer(size) for _ in range(blockio.READ_POOL_BYTES // size)]
        assert all(any(a is b for b in bufs) for a in again)     # reused, not new mappings
        big = io.take_read_buffer(blockio.MAX_POOLED)
        io.give_read_buffer(big)
        assert io.take_read_buffer(blockio.MAX_POOLED) is big    # at least READ_POOL kept
    finally:
        io.close()
