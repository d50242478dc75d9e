"""On-disk layouts: round trips, checksums checked first, and golden bytes so that
format drift fails the tests (tests/data/superblock-v1.bin)."""

from __future__ import annotations

import os

import pytest

from blockxfer.errors import FormatError
from blockxfer.volume.layout import (
    Catalog,
    ObjectRef,
    RootRecord,
    SnapshotEntry,
    Superblock,
    check_block_size,
)

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "superblock-v1.bin")


def _sample() -> Superblock:
    root = RootRecord(7, 1_700_000_000_000_000_000, ObjectRef(10, 0xAB, 100, 2),
                      ObjectRef(11, 0xCD, 1, 1), ObjectRef(12, 0xEF, 300, 1))
    return Superblock(4096, 262144, 230000, bytes(range(16)), 20, 3, root)


def test_superblock_golden_bytes() -> None:
    raw = _sample().pack()
    if not os.path.exists(GOLDEN):  # first run writes it; commit it
        with open(GOLDEN, "wb") as f:
            f.write(raw)
    with open(GOLDEN, "rb") as f:
        assert f.read() == raw, "the superblock layout changed: bump VERSION and document it"
    assert Superblock.unpack(raw) == _sample()


def test_superblock_checksum_before_fields() -> None:
    raw = bytearray(_sample().pack())
    raw[20] ^= 1
    with pytest.raises(FormatError, match="checksum"):
        Superblock.unpack(bytes(raw))
    with pytest.raises(FormatError, match="wrong magic"):
        Superblock.unpack(b"X" + bytes(raw[1:]))


def test_catalog_round_trip() -> None:
    cat = Catalog([SnapshotEntry(1, "june1", b"g" * 16, 5, 3, 2, 99, ObjectRef(1, 2, 3, 1),
                                 _sample().root),
                   SnapshotEntry(2, "june2", b"h" * 16, 6, 4, 1, 98, ObjectRef(), None)],
                  {"master": 1})
    assert Catalog.unpack(cat.pack()) == cat
    with pytest.raises(FormatError):
        Catalog.unpack(cat.pack()[:30])


@pytest.mark.parametrize("size", [512, 2048, 4097, 3 << 20])
def test_block_size_limits(size: int) -> None:
    with pytest.raises(FormatError, match="power of two"):
        check_block_size(size)
