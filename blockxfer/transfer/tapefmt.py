"""The tape layout, declared once (docs/tape-format.md, "Dump layout").

    file 0        LABEL (one 4 KiB record)
    file 2k+1     image k: DESCRIPTOR record, then DATA records (the stream, packed)
    file 2k+2     image k: INDEX records (the location table), ends with its filemark

Every record after the label is `record_size` bytes (the label says how many), so
a reader always asks for exactly the record size (tgt returns wrong data to a
larger read). Each starts with a 40-byte header naming what it is, its image, its
place and a checksum, so a record read after mispositioning is recognised.
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass, field

from blockxfer.checksum import checksum
from blockxfer.errors import FormatError

LABEL_SIZE = 4096
LABEL_MAGIC = b"BXTAPE01"
_LABEL = struct.Struct("<8s32s32s16sIIQ")     # magic, serial, set name, set id, seq, record size,
#                                              created (s)
REC = struct.Struct("<4sBBHQQIIQ")            # magic, kind, flags, part, image id (8 of its 16),
#                                              index, valid bytes, reserved, checksum
REC_MAGIC = b"BXTR"
assert REC.size == 40
DESCRIPTOR, DATA, INDEX = 1, 2, 3
DEFAULT_RECORD = 256 << 10


@dataclass(frozen=True)
class Label:
    serial: str
    set_name: str
    set_id: bytes
    seq: int
    record_size: int
    created: int

    def pack(self) -> bytes:
        body = _LABEL.pack(LABEL_MAGIC, self.serial.encode()[:32], self.set_name.encode()[:32],
                           self.set_id, self.seq, self.record_size, self.created)
        return (body + struct.pack("<Q", checksum(body))).ljust(LABEL_SIZE, b"\0")

    @classmethod
    def unpack(cls, raw: bytes) -> Label:
        body = raw[:_LABEL.size]
        if len(raw) != LABEL_SIZE or body[:8] != LABEL_MAGIC:
            raise FormatError("not a blockxfer tape (no label)")
        if struct.unpack_from("<Q", raw, _LABEL.size)[0] != checksum(body):
            raise FormatError("tape label checksum mismatch")
        _, serial, name, sid, seq, rsize, created = _LABEL.unpack(body)
        return cls(serial.rstrip(b"\0").decode(), name.rstrip(b"\0").decode(), sid, seq, rsize,
                   created)


def pack_record(kind: int, image: bytes, part: int, index: int, payload: bytes | memoryview,
                size: int) -> bytes:
    """One tape record: header, payload, zero padding to `size`."""
    head = REC.pack(REC_MAGIC, kind, 0, part, int.from_bytes(image[:8], "little"), index,
                    len(payload), 0, checksum(payload))
    return (head + bytes(payload)).ljust(size, b"\0")


def pack_header_into(rec: bytearray, kind: int, image: bytes, part: int, index: int,
                     valid: int) -> None:
    """Fill in the header of a record whose payload already sits at REC.size (and is
    zero-padded to the record's end): what pack_record makes, without copying the
    payload again (the dump's records are filled in place)."""
    REC.pack_into(rec, 0, REC_MAGIC, kind, 0, part, int.from_bytes(image[:8], "little"), index,
                  valid, 0, checksum(memoryview(rec)[REC.size:REC.size + valid]))


def unpack_record(raw: bytes, where: str) -> tuple[int, int, int, int, bytes]:
    """(kind, part, image key, index, payload) of a tape record, checked."""
    if len(raw) < REC.size or raw[:4] != REC_MAGIC:
        raise FormatError(f"{where}: not a blockxfer record")
    _, kind, _, part, key, index, valid, _, ck = REC.unpack_from(raw, 0)
    payload = raw[REC.size:REC.size + valid]
    if len(payload) != valid or checksum(payload) != ck:
        raise FormatError(f"{where}: record checksum mismatch (damaged tape)")
    return kind, part, key, index, payload


@dataclass
class Descriptor:
    """What an image is; the first record of its data file on every tape it spans."""

    image_id: str                  # hex of 16 random bytes
    expression: str
    top: str
    base: str | None
    snapshots: list[str]
    volume: str
    blocks: int
    written: int                   # s since the epoch
    part: int = 0                  # 0 on the tape where it starts
    stream_offset: int = 0         # stream bytes carried by earlier parts
    block_size: int = 4096

    def pack(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def unpack(cls, raw: bytes) -> Descriptor:
        try:
            return cls(**json.loads(raw))
        except (ValueError, TypeError) as e:
            raise FormatError(f"image descriptor is malformed ({e})") from e


@dataclass
class Index:
    """The location table of one part: stream bytes it holds and where each data
    record of the stream starts (VBN, count, stream offset)."""

    image_id: str
    part: int
    stream_start: int
    stream_end: int
    complete: bool                 # the image's last part
    total: int = 0                 # stream bytes of the whole image (on the last part)
    abandoned: bool = False        # the dump stopped here (end of medium, no next tape)
    position: int = -1             # logical position of the descriptor (-1: no LOCATE)
    records: list[tuple[int, int, int]] = field(default_factory=list)

    def pack(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    def locate(self, vbn: int) -> list[tuple[int, int, int]]:
        """The stream data records holding `vbn`.. as (vbn, count, offset) rows."""
        return [r for r in self.records if r[0] <= vbn < r[0] + r[1]]

    @classmethod
    def unpack(cls, raw: bytes) -> Index:
        try:
            d = json.loads(raw)
            d["records"] = [tuple(r) for r in d["records"]]
            return cls(**d)
        except (ValueError, TypeError, KeyError) as e:
            raise FormatError(f"image index is malformed ({e})") from e
