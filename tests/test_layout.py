"""On-disk layouts: round trips, checksums checked first, and golden bytes so that
format drift fails the tests (tests/data/superblock-v2.bin; superblock-v1.bin is what
version 1 wrote, which still opens)."""

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

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "superblock-v2.bin")
GOLDEN_V1 = os.path.join(os.path.dirname(__file__), "data", "superblock-v1.bin")


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


def test_superblock_version_1_opens_and_is_written_as_2() -> None:
    """A version 1 volume has no intent log region (its first data VBN follows the
    local area); it opens as it is, and its next CP writes version 2."""
    with open(GOLDEN_V1, "rb") as f:
        raw = f.read()
    assert raw[8:12] == b"\x01\x00\x00\x00"
    assert Superblock.unpack(raw) == _sample()
    assert _sample().pack()[8:12] == b"\x02\x00\x00\x00"


def test_superblock_unknown_version_refused() -> None:
    from blockxfer.checksum import checksum
    body = bytearray(_sample().pack()[:-8])
    body[8:12] = (3).to_bytes(4, "little")
    raw = bytes(body) + checksum(bytes(body)).to_bytes(8, "little")
    with pytest.raises(FormatError, match="version 3 is not supported"):
        Superblock.unpack(raw)


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
