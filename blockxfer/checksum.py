"""Checksums: xxh3-64 for blocks, records and headers; xxh3-128 for whole streams.

xxh3 runs at about 15 GB/s from DRAM here (shared/research/performance-baseline.md),
so checking every block costs about 70 ms per GiB.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

import numpy as np
import xxhash

checksum = xxhash.xxh3_64_intdigest


def block_checksums(buf: bytes | bytearray | memoryview, block_size: int) -> np.ndarray:
    """The checksum of each `block_size` block of `buf`, as a uint64 array. The rows
    of an array view are handed to xxh3 by `map`, with no Python frame per block:
    a send checks every block it reads, and under emulation (the test bed) the
    per-block work cost more than the hashing (issue 15)."""
    mv = memoryview(buf).cast("B")
    n = len(mv) // block_size
    rows = np.frombuffer(mv, dtype=np.uint8, count=n * block_size).reshape(n, block_size)
    # each row is a buffer (numpy's stubs do not say so)
    return np.fromiter(map(checksum, cast("Iterable[memoryview]", rows)), dtype=np.uint64,
                       count=n)
