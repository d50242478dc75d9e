"""BlockIO.finish_reads waits for every request before it raises: the caller hands
the buffer back to the pool on the error, and a request still landing in it would
then write into a buffer another reader already holds."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from blockxfer.errors import DamagedBlock
from blockxfer.volume.blockio import MAX_REQUEST, BlockIO, aligned

BS = 4096


class SlowSecond:
    """A device whose first request fails at once and whose second takes a while."""
    path, logical_block_size, physical_block_size = "mem", 512, 4096

    def __init__(self, size: int) -> None:
        self.size, self.landed = size, threading.Event()

    def pread(self, buf: memoryview | bytearray, offset: int) -> None:
        if offset == BS:
            raise OSError(5, "Input/output error")
        time.sleep(0.3)
        buf[:] = bytes(len(buf))
        self.landed.set()

    def pwrite(self, data: bytes | memoryview | bytearray, offset: int) -> None: ...
    def flush(self) -> None: ...
    def discard(self, offset: int, length: int) -> None: ...
    def close(self) -> None: ...


def test_finish_reads_waits_for_every_request_before_raising() -> None:
    per = MAX_REQUEST // BS
    dev = SlowSecond(64 << 20)
    io = BlockIO(dev, BS)
    ptrs = np.zeros((2 * per, 2), dtype=np.uint64)
    ptrs[:, 0] = np.arange(1, 2 * per + 1)   # one run from VBN 1: two requests
    out = memoryview(aligned(2 * per * BS))
    jobs = io.submit_reads(ptrs, out, verify=False)
    assert len(jobs) == 2
    with pytest.raises(OSError):
        io.finish_reads(jobs)
    assert dev.landed.is_set()               # the slow request had landed first
    io.pool.shutdown()


def test_finish_reads_raises_the_checksum_error() -> None:
    class Zeros(SlowSecond):
        def pread(self, buf: memoryview | bytearray, offset: int) -> None:
            buf[:] = bytes(len(buf))
    io = BlockIO(Zeros(1 << 20), BS)
    ptrs = np.array([[1, 12345]], dtype=np.uint64)
    with pytest.raises(DamagedBlock):
        io.read_ptrs_into(ptrs, memoryview(aligned(BS)))
    io.pool.shutdown()
