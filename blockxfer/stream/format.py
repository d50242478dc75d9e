"""The stream format, declared once (docs/stream-format.md describes the same bytes).

A stream is a sequence of records. Every record is

    RECORD header (24 bytes) | body (payload_len bytes) | xxh3-64 of header+body (8 bytes)

and carries a sequence number, so a reordered, repeated or missing record is
caught as surely as a flipped bit. Record 0 is the HEADER, the last is the
TRAILER, whose digest (xxh3-128) covers every byte before it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import xxhash

from blockxfer.errors import StreamError
from blockxfer.volume.layout import RootRecord

MAGIC = b"BXSTRM01"
VERSION = 1
RECORD = struct.Struct("<4sBBHIQI")        # magic, type, flags, reserved, payload_len, seq, pad
CHECK = struct.Struct("<Q")
assert RECORD.size == 24
RECORD_MAGIC = b"BXR1"

HEADER, DATA, DEALLOC, TRAILER, BITMAP = 1, 2, 3, 4, 5
NAMES = {HEADER: "header", DATA: "data", DEALLOC: "dealloc", TRAILER: "trailer",
         BITMAP: "bitmap"}
F_ZSTD = 1                                 # DATA body compressed with zstd
F_IMPLICIT = 2                             # DATA first field is an ordinal in the BITMAP

MAX_BODY = 64 << 20                        # no record body may claim more
DATA_HEAD = struct.Struct("<QI4x")         # first VBN, block count
RUN = struct.Struct("<QI4x")               # dealloc run: first VBN, count
TRAILER_BODY = struct.Struct("<QQQQ16s")   # records, data blocks, dealloc blocks, bytes, digest

# header flags
H_INCREMENTAL, H_RESUMING, H_IMPLICIT = 1, 2, 4

_HEAD = struct.Struct("<8sHHI16sIQQQQ16sQQQQ")
# magic, version, flags, reserved, volume uuid, block size, nblocks, virtual blocks,
# first data vbn, next snapshot id, stream id, image blocks, image digest, dealloc blocks,
# snapshots in the set
_SNAP = struct.Struct("<Q16sQIH")          # id, guid, generation, flags, name length
_STR = struct.Struct("<H")


@dataclass(frozen=True)
class SnapshotRef:
    id: int
    guid: bytes
    generation: int
    flags: int
    name: str

    def pack(self) -> bytes:
        raw = self.name.encode()
        return _SNAP.pack(self.id, self.guid, self.generation, self.flags, len(raw)) + raw


@dataclass
class Header:
    volume_uuid: bytes
    block_size: int
    nblocks: int
    virtual_blocks: int
    first_data_vbn: int
    next_id: int
    stream_id: bytes
    expression: str
    top: SnapshotRef
    base: SnapshotRef | None
    root: RootRecord                       # committed last by the receiver
    snapshot_set: list[SnapshotRef] = field(default_factory=list)
    image_blocks: int = 0
    image_digest: int = 0
    dealloc_blocks: int = 0
    flags: int = 0

    @property
    def incremental(self) -> bool:
        return self.base is not None

    def pack(self) -> bytes:
        flags = self.flags | (H_INCREMENTAL if self.base else 0)
        expr = self.expression.encode()
        parts = [_HEAD.pack(MAGIC, VERSION, flags, 0, self.volume_uuid, self.block_size,
                            self.nblocks, self.virtual_blocks, self.first_data_vbn, self.next_id,
                            self.stream_id, self.image_blocks, self.image_digest,
                            self.dealloc_blocks, len(self.snapshot_set)),
                 _STR.pack(len(expr)), expr, self.root.pack(), self.top.pack(),
                 (self.base.pack() if self.base else _SNAP.pack(0, bytes(16), 0, 0, 0))]
        parts += [s.pack() for s in self.snapshot_set]
        return b"".join(parts)

    @classmethod
    def unpack(cls, raw: bytes) -> Header:
        try:
            return cls._unpack(raw)
        except (struct.error, UnicodeDecodeError, IndexError) as e:
            raise StreamError(f"stream header is malformed ({e})") from e

    @classmethod
    def _unpack(cls, raw: bytes) -> Header:
        (magic, version, flags, _, uuid, bs, n, vb, first, next_id, sid, blocks, digest,
         dealloc, nsnap) = _HEAD.unpack_from(raw, 0)
        if magic != MAGIC:
            raise StreamError("not a blockxfer image stream (wrong magic)")
        if version != VERSION:
            raise StreamError(f"stream format version {version} is not supported "
                              f"(this blockxfer reads {VERSION})")
        pos = _HEAD.size
        (elen,) = _STR.unpack_from(raw, pos)
        pos += _STR.size
        expr = raw[pos:pos + elen].decode()
        pos += elen
        root = RootRecord.unpack(raw[pos:pos + RootRecord.SIZE])
        pos += RootRecord.SIZE
        top, pos = _snap(raw, pos)
        base, pos = _snap(raw, pos)
        if nsnap > 100_000:
            raise StreamError("stream header lists an impossible number of snapshots")
        snaps = []
        for _ in range(nsnap):
            s, pos = _snap(raw, pos)
            snaps.append(s)
        if pos != len(raw):
            raise StreamError("stream header has trailing bytes")
        _check_named(top, "top")
        if flags & H_INCREMENTAL:
            _check_named(base, "base")
        for s in snaps:
            _check_named(s, "listed")
        return cls(uuid, bs, n, vb, first, next_id, sid, expr, top,
                   base if flags & H_INCREMENTAL else None, root, snaps, blocks, digest,
                   dealloc, flags & ~H_INCREMENTAL)


def _check_named(s: SnapshotRef, role: str) -> None:
    """A damaged header must not reach messages as snapshot '' (a sender always
    names its snapshots and gives each a GUID)."""
    if not s.name or s.guid == bytes(16):
        raise StreamError(f"stream header is damaged: its {role} snapshot has no "
                          f"{'name' if not s.name else 'GUID'}")


def _snap(raw: bytes, pos: int) -> tuple[SnapshotRef, int]:
    sid, guid, gen, flags, nlen = _SNAP.unpack_from(raw, pos)
    pos += _SNAP.size
    name = raw[pos:pos + nlen].decode()
    if len(name.encode()) != nlen:
        raise StreamError("stream header is truncated inside a snapshot name")
    return SnapshotRef(sid, guid, gen, flags, name), pos + nlen


Piece = bytes | memoryview


def record(rtype: int, seq: int, body: Piece, flags: int = 0, *more: Piece) -> list[Piece]:
    """The pieces of one record, ready for writev (no copy of the body). The body
    may come in parts (`body` then `more`: a data record's head and its blocks)."""
    head = RECORD.pack(RECORD_MAGIC, rtype, flags, 0, len(body) + sum(map(len, more)), seq, 0)
    h = xxhash.xxh3_64(head)
    h.update(body)
    for part in more:
        h.update(part)
    return [head, body, *more, CHECK.pack(h.intdigest())]


@dataclass(frozen=True)
class Trailer:
    records: int
    data_blocks: int
    dealloc_blocks: int
    nbytes: int
    digest: bytes

    def pack(self) -> bytes:
        return TRAILER_BODY.pack(self.records, self.data_blocks, self.dealloc_blocks,
                                 self.nbytes, self.digest)

    @classmethod
    def unpack(cls, raw: bytes) -> Trailer:
        if len(raw) != TRAILER_BODY.size:
            raise StreamError("stream trailer has the wrong size")
        return cls(*TRAILER_BODY.unpack(raw))
