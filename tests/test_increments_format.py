"""Golden bytes of the increments directory's header slot and metadata file: the
hex in docs/increments-format.md is what this blockxfer writes. A layout change
fails here until the version is bumped and the document is written again (run
`python -m tests.test_increments_format` to print the new dumps)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from bitarray import bitarray

from blockxfer.checksum import checksum
from blockxfer.errors import FormatError
from blockxfer.stream import format as sfmt
from blockxfer.transfer.increments.format import READY, SLOT_SIZE, Meta, Slot
from blockxfer.volume.layout import ObjectRef, RootRecord

DOC = Path(__file__).resolve().parent.parent / "docs" / "increments-format.md"


def golden_meta() -> Meta:
    root = RootRecord(7, 1_700_000_000_000_000_000, ObjectRef(10, 0xAB, 100, 2),
                      ObjectRef(11, 0xCD, 1, 1), ObjectRef(12, 0xEF, 300, 1))
    top = sfmt.SnapshotRef(2, b"T" * 16, 7, 0, "incr.00010203.1")
    base = sfmt.SnapshotRef(1, b"B" * 16, 4, 0, "incr.00010203.0")
    h = sfmt.Header(b"V" * 16, 4096, 1024, 900, 20, 3, b"S" * 16,
                    "incr.00010203.1 - incr.00010203.0", top, base, root, [base, top],
                    image_blocks=2, image_digest=0x1234, dealloc_blocks=2)
    present = bitarray(1024, endian="little")
    present.setall(0)
    present[40:42] = 1
    return Meta(3, h, [b"B" * 16], present, np.array([0x1111, 0x2222], dtype=np.uint64),
                journal=[(41, 1)], dealloc=[(50, 2)])


def golden_slot(meta_raw: bytes) -> Slot:
    return Slot(3, READY, bytes(range(16)), b"V" * 16, 4096, 1024, "tape:/dev/nst0",
                "incr.00010203.0", base_guid=b"B" * 16, base_set=b"I" * 16, base_image=1,
                flags=1, meta_id=3, meta_len=len(meta_raw), meta_check=checksum(meta_raw),
                present=2, updates=1, written=2, updated=1_700_000_000_000_000_000)


def hexdump(raw: bytes) -> str:
    return "\n".join(f"{i:04x}  " + " ".join(f"{b:02x}" for b in raw[i:i + 16])
                     for i in range(0, len(raw), 16))


def documented(name: str) -> bytes:
    """The bytes of the ```hex block after the line naming `name` in the document."""
    text = DOC.read_text()
    m = re.search(rf"<!-- golden {name} -->\s*```hex\n(.*?)```", text, re.S)
    assert m, f"docs/increments-format.md has no golden {name} block"
    return bytes(int(b, 16) for line in m.group(1).splitlines() for b in line.split()[1:])


def test_meta_golden_bytes() -> None:
    assert golden_meta().pack() == documented("meta")


def test_slot_golden_bytes() -> None:
    raw, doc = golden_slot(golden_meta().pack()).pack(), documented("slot")
    assert len(raw) == SLOT_SIZE and raw[:len(doc)] == doc and not any(raw[len(doc):])


def test_golden_round_trip_and_damage() -> None:
    meta = golden_meta()
    raw = meta.pack()
    back = Meta.unpack(raw, 1024, "meta.3")
    assert back.present == meta.present and list(back.checks) == [0x1111, 0x2222]
    assert back.journal == [(41, 1)] and back.dealloc == [(50, 2)]
    assert back.header.top.name == "incr.00010203.1"
    slot = golden_slot(raw)
    assert Slot.unpack(slot.pack()) == slot
    for k in (0, 20, len(raw) // 2, len(raw) - 1):
        bad = bytearray(raw)
        bad[k] ^= 1
        with pytest.raises(FormatError):
            Meta.unpack(bytes(bad), 1024, "meta.3")
    bad = bytearray(slot.pack())
    bad[30] ^= 1
    with pytest.raises(FormatError, match="checksum"):
        Slot.unpack(bytes(bad))


if __name__ == "__main__":
    raw = golden_meta().pack()
    slot = golden_slot(raw)
    used = 0xA0 + 2 + len(slot.base_url) + 2 + len(slot.base_name) + 8
    print("<!-- golden slot -->\n```hex\n" + hexdump(slot.pack()[:used])
          + "\n```\n\n<!-- golden meta -->\n```hex\n" + hexdump(raw) + "\n```")
