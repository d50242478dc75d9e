"""BlockCheck.known: which blocks of a chunk are data blocks, each checked against
its map's checksum, whether the chunk is all data (one slice of checks) or not."""

from __future__ import annotations

import os

import numpy as np
import pytest

from blockxfer.checksum import block_checksums
from blockxfer.errors import DamagedBlock
from blockxfer.stream.send import BlockCheck

BS = 512
FIRST = 10                                   # the chunk: VBNs 10..17


def _check(data: bytes, vbns: list[int]) -> BlockCheck:
    """The maps' checks: `vbns` of the chunk, and data blocks before and after it."""
    cks = block_checksums(data, BS)
    at = [3, *vbns, 40]
    sums = [0, *(int(cks[v - FIRST]) for v in vbns), 0]
    return BlockCheck(np.array(at, dtype=np.uint64), np.array(sums, dtype=np.uint64), BS)


@pytest.mark.parametrize("vbns", [list(range(10, 18)), [10, 11, 13, 14, 15, 16, 17],
                                  [12, 13], [17], []])
def test_known_marks_the_data_blocks(vbns: list[int]) -> None:
    data = os.urandom(8 * BS)
    got = _check(data, vbns).known(FIRST, memoryview(data))
    want = [FIRST + k in vbns for k in range(8)]
    assert (got.tolist() if got is not None else None) == (want if any(want) else None)


@pytest.mark.parametrize("vbns", [list(range(10, 18)), [10, 11, 12, 14, 15]])
def test_a_damaged_data_block_is_named(vbns: list[int]) -> None:
    data = bytearray(os.urandom(8 * BS))
    check = _check(bytes(data), vbns)
    data[4 * BS] ^= 1                        # VBN 14
    with pytest.raises(DamagedBlock, match="VBN 14 "):
        check.known(FIRST, memoryview(data))
    data[4 * BS] ^= 1
    data[3 * BS] ^= 1                        # VBN 13: a data block only in the first case
    if 13 in vbns:
        with pytest.raises(DamagedBlock, match="VBN 13 "):
            check.known(FIRST, memoryview(data))
    else:
        assert check.known(FIRST, memoryview(data)) is not None
