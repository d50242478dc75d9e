"""block_checksums: one xxh3-64 per block, whatever buffer the blocks come in."""

from __future__ import annotations

import os

import pytest

from blockxfer.checksum import block_checksums, checksum


@pytest.mark.parametrize("block_size", [512, 4096])
@pytest.mark.parametrize("extra", [0, 100])
def test_each_block_hashed_alone(block_size: int, extra: int) -> None:
    raw = os.urandom(block_size * 5 + extra)
    want = [checksum(raw[i * block_size:(i + 1) * block_size]) for i in range(5)]
    for buf in (raw, bytearray(raw), memoryview(raw), memoryview(bytearray(raw))[:]):
        assert block_checksums(buf, block_size).tolist() == want   # a partial tail is left out


def test_no_block_and_the_buffer_stays_free() -> None:
    assert block_checksums(b"", 4096).tolist() == []
    assert block_checksums(bytes(100), 4096).tolist() == []
    buf = bytearray(8192)
    block_checksums(buf, 4096)
    buf.extend(b"x")                    # no view of it is left behind
    assert len(buf) == 8193
