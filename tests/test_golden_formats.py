"""Golden bytes for the stream and tape formats (tests/data/stream-v1.bin,
tests/data/tape-v1.bin), like the superblock's: a layout change fails here until the
format version is bumped, docs/stream-format.md or docs/tape-format.md describe it and
the file is written again (delete it and run this test once)."""

from __future__ import annotations

from pathlib import Path

import xxhash

from blockxfer.stream import format as fmt
from blockxfer.stream.decode import Data, Dealloc, StreamReader
from blockxfer.transfer import tapefmt
from blockxfer.volume.layout import ObjectRef, RootRecord

DATA = Path(__file__).parent / "data"


def _golden(name: str, raw: bytes) -> None:
    path = DATA / name
    if not path.exists():                   # first run writes it; commit it
        path.write_bytes(raw)
    assert path.read_bytes() == raw, f"the layout in {name} changed: bump the format " \
        "version, document it, and write the golden file again"


def _stream() -> bytes:
    root = RootRecord(7, 1_700_000_000_000_000_000, ObjectRef(10, 0xAB, 100, 2),
                      ObjectRef(11, 0xCD, 1, 1), ObjectRef(12, 0xEF, 300, 1))
    top = fmt.SnapshotRef(2, b"T" * 16, 7, 0, "june5")
    base = fmt.SnapshotRef(1, b"B" * 16, 4, 0, "june4")
    h = fmt.Header(bytes(range(16)), 4096, 1024, 900, 20, 3, b"S" * 16, "june5 - june4", top,
                   base, root, [base, top], image_blocks=2, image_digest=0x1234,
                   dealloc_blocks=1)
    digest = xxhash.xxh3_128()
    out: list[bytes] = []

    def put(rtype: int, body: bytes, flags: int = 0) -> None:
        pieces = [bytes(p) for p in fmt.record(rtype, len(out), body, flags)]
        if rtype != fmt.TRAILER:
            for p in pieces:
                digest.update(p)
        out.append(b"".join(pieces))

    put(fmt.HEADER, h.pack())
    put(fmt.DATA, fmt.DATA_HEAD.pack(40, 2) + bytes([0xA5]) * 8192)
    put(fmt.DEALLOC, fmt.RUN.pack(41, 1))
    size = sum(len(r) for r in out)
    trailer = fmt.Trailer(len(out), 2, 1, size, digest.digest())   # what precedes it
    put(fmt.TRAILER, trailer.pack())
    return b"".join(out)


def test_stream_golden_bytes() -> None:
    raw = _stream()
    _golden("stream-v1.bin", raw)


def test_stream_golden_decodes() -> None:
    import io
    reader = StreamReader(io.BytesIO(_stream()))
    h = reader.read_header()
    assert (h.top.name, h.base and h.base.name, h.expression) == ("june5", "june4",
                                                                  "june5 - june4")
    recs = list(reader)
    assert isinstance(recs[0], Data) and (recs[0].vbn, recs[0].count) == (40, 2)
    assert isinstance(recs[1], Dealloc) and recs[1].runs == [(41, 1)]
    assert reader.trailer is not None and reader.trailer.records == 3


def test_tape_golden_bytes() -> None:
    label = tapefmt.Label("VT0001", "weekly", b"I" * 16, 1, 4096, 1_700_000_000)
    image = bytes(range(16))
    desc = tapefmt.Descriptor(image.hex(), "june5 - june4", "june5", "june4", ["june4", "june5"],
                              "0" * 32, 2, 1_700_000_000)
    index = tapefmt.Index(image.hex(), 0, 0, 9000, True, 9000, records=[(40, 2, 100)])
    raw = b"".join([label.pack(),
                    tapefmt.pack_record(tapefmt.DESCRIPTOR, image, 0, 0, desc.pack(), 4096),
                    tapefmt.pack_record(tapefmt.DATA, image, 0, 1, b"\x5a" * 100, 4096),
                    tapefmt.pack_record(tapefmt.INDEX, image, 0, 2, index.pack(), 4096)])
    _golden("tape-v1.bin", raw)
    assert tapefmt.Label.unpack(raw[:tapefmt.LABEL_SIZE]) == label
    kind, part, _, idx, payload = tapefmt.unpack_record(raw[2 * 4096:3 * 4096], "golden")
    assert (kind, part, idx, payload) == (tapefmt.DATA, 0, 1, b"\x5a" * 100)
