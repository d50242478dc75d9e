"""The virtual tape header: golden bytes, checksum first, then magic and version."""

from pathlib import Path

import pytest

from blockxfer.drivers.vtape import VtapeHeader
from blockxfer.errors import FormatError

GOLDEN = Path(__file__).parent / "data" / "vtape-header.bin"
HEADER = VtapeHeader(10 << 30, 1 << 26, 1, 0, 5, 2, 3)


def test_golden_bytes() -> None:
    assert HEADER.pack() == GOLDEN.read_bytes()
    assert VtapeHeader.unpack(GOLDEN.read_bytes()) == HEADER


def test_damage_is_detected() -> None:
    raw = bytearray(GOLDEN.read_bytes())
    raw[20] ^= 1
    with pytest.raises(FormatError, match="checksum"):
        VtapeHeader.unpack(bytes(raw))
    with pytest.raises(FormatError, match="truncated"):
        VtapeHeader.unpack(bytes(raw[:10]))
