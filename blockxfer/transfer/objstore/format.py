"""The object-store format, declared once (docs/object-store-format.md: the same bytes).

Four kinds of object: the store marker, a catalog per volume, a manifest per
snapshot (all three inside a checksummed *envelope*), and write-once *packs* of
*blobs*. A blob holds some blocks of one fixed, VBN-aligned chunk of C blocks:
a mask of which blocks, then their bytes (zstd when that is smaller). Block
addresses never shift, so chunks are by address, not by content.

Pure: no I/O here.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

import xxhash
import zstandard
from bitarray import bitarray

from blockxfer.errors import FormatError

VERSION = 1
CHUNK_BYTES = 1 << 20                      # a chunk is 1 MiB of blocks (at least 8 blocks)

ENVELOPE = struct.Struct("<8sHHIQ")        # magic, version, flags, reserved, body length
CHECK = struct.Struct("<Q")                # xxh3-64
assert ENVELOPE.size == 24
E_ZSTD = 1                                 # envelope body is one zstd frame
STORE_MAGIC, CATALOG_MAGIC, MANIFEST_MAGIC = b"BXOSTORE", b"BXOCATAL", b"BXOMANIF"
MAX_ENVELOPE = 1 << 30                     # no manifest or catalog may claim more

PACK = struct.Struct("<8sHH4x")            # magic, version, reserved
PACK_MAGIC = b"BXOPACK1"
assert PACK.size == 16
BLOB = struct.Struct("<4sBBHQII")          # magic, version, flags, reserved, chunk, C, payload
BLOB_MAGIC = b"BXCK"
assert BLOB.size == 24
B_ZSTD = 1

MAN_HEAD = struct.Struct("<16s16s16sIQIIQQQI")
# volume uuid, top guid, base guid (zero: a full upload), block size, nblocks, chunk blocks C,
# packs P, entries E, blocks, created (unix seconds), stream header length H
assert MAN_HEAD.size == 96
ENTRY = struct.Struct("<QIIQQ")            # chunk, pack index, blob length, blob offset, blob check
assert ENTRY.size == 32


def chunk_blocks_for(block_size: int) -> int:
    return max(8, CHUNK_BYTES // block_size)


def new_mask(c: int) -> bitarray:
    m = bitarray(c, endian="little")
    m.setall(0)
    return m


# -- envelope ---------------------------------------------------------------------------------
def seal(magic: bytes, body: bytes, *, compress: bool = False) -> bytes:
    flags = 0
    if compress:
        body, flags = zstandard.ZstdCompressor(level=3).compress(body), E_ZSTD
    head = ENVELOPE.pack(magic, VERSION, flags, 0, len(body))
    return head + body + CHECK.pack(xxhash.xxh3_64_intdigest(head + body))


def unseal(magic: bytes, raw: bytes, what: str) -> bytes:
    """The body of an envelope: checksum first, then magic and version."""
    if len(raw) < ENVELOPE.size + CHECK.size:
        raise FormatError(f"{what} is truncated ({len(raw)} bytes)")
    (check,) = CHECK.unpack_from(raw, len(raw) - CHECK.size)
    if xxhash.xxh3_64_intdigest(raw[:-CHECK.size]) != check:
        raise FormatError(f"{what} is damaged: checksum mismatch")
    got, version, flags, _, length = ENVELOPE.unpack_from(raw, 0)
    if got != magic:
        raise FormatError(f"{what} is not a blockxfer {magic.decode()} object")
    if version != VERSION:
        raise FormatError(f"{what} has format version {version}; this blockxfer reads {VERSION}")
    body = raw[ENVELOPE.size:-CHECK.size]
    if len(body) != length:
        raise FormatError(f"{what} is damaged: body length {len(body)}, header says {length}")
    if flags & E_ZSTD:
        try:
            body = zstandard.ZstdDecompressor().decompress(body, max_output_size=MAX_ENVELOPE)
        except zstandard.ZstdError as e:
            raise FormatError(f"{what} does not decompress ({e})") from e
    return body


def seal_json(magic: bytes, obj: dict[str, object]) -> bytes:
    return seal(magic, json.dumps(obj, sort_keys=True, separators=(",", ":")).encode())


def unseal_json(magic: bytes, raw: bytes, what: str) -> dict[str, object]:
    try:
        obj = json.loads(unseal(magic, raw, what))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{what} is malformed ({e})") from e
    if not isinstance(obj, dict):
        raise FormatError(f"{what} is malformed (not an object)")
    return obj


# -- blobs and packs --------------------------------------------------------------------------
def pack_header() -> bytes:
    return PACK.pack(PACK_MAGIC, VERSION, 0)


SAMPLE = 16 << 10                          # bytes of each of a payload's three samples


def _worth_compressing(zc: zstandard.ZstdCompressor, data: memoryview) -> bool:
    """Do samples from the start, middle and end shrink by 1/32? Random or encrypted
    data does not, and compressing a whole chunk of it in vain costs as much CPU as
    the rest of an upload's work on it together. Decided by the bytes alone, so the
    same chunk always makes the same blob (packs named by content stay reusable)."""
    n = len(data)
    if n <= 3 * SAMPLE:
        return True
    mid = (n // 2) & ~(SAMPLE - 1)
    sample = b"".join((data[:SAMPLE], data[mid:mid + SAMPLE], data[n - SAMPLE:]))
    return len(zc.compress(sample)) < len(sample) - len(sample) // 32


def blob_pieces(chunk: int, mask: bitarray, data: bytes | memoryview, *,
                compress: bool = True) -> tuple[bytes, bytes | memoryview, int]:
    """A blob as (head and mask, payload, check): written back to back, then the check
    as CHECK, they are `make_blob`'s bytes, without a copy of the payload made here."""
    view = memoryview(data).cast("B")
    payload: bytes | memoryview = view
    flags = 0
    if compress:
        zc = zstandard.ZstdCompressor(level=1)
        if _worth_compressing(zc, view):
            packed = zc.compress(view)
            if len(packed) < len(view):
                payload, flags = packed, B_ZSTD
    head = BLOB.pack(BLOB_MAGIC, VERSION, flags, 0, chunk, len(mask), len(payload)) + mask.tobytes()
    h = xxhash.xxh3_64(head)
    h.update(payload)
    return head, payload, h.intdigest()


def make_blob(chunk: int, mask: bitarray, data: bytes | memoryview, *,
              compress: bool = True) -> bytes:
    """One blob: `data` is the blocks named by `mask`, ascending, back to back."""
    head, payload, check = blob_pieces(chunk, mask, data, compress=compress)
    return b"".join((head, payload, CHECK.pack(check)))


def blob_check(blob: bytes | memoryview) -> int:
    return int(CHECK.unpack_from(blob, len(blob) - CHECK.size)[0])


def open_blob(raw: bytes | memoryview, block_size: int,
              what: str) -> tuple[int, bitarray, bytes | memoryview]:
    """(chunk, mask, blocks) of a blob, every check done before anything is returned
    (the blocks of an uncompressed blob are a view of `raw`)."""
    raw = memoryview(raw)
    if len(raw) < BLOB.size + CHECK.size:
        raise FormatError(f"{what} is truncated")
    if xxhash.xxh3_64_intdigest(raw[:-CHECK.size]) != blob_check(raw):
        raise FormatError(f"{what} is damaged: chunk checksum mismatch")
    magic, version, flags, _, chunk, c, plen = BLOB.unpack_from(raw, 0)
    if magic != BLOB_MAGIC or version != VERSION or c % 8 or c == 0:
        raise FormatError(f"{what} is not a blockxfer chunk of this version")
    if BLOB.size + c // 8 + plen + CHECK.size != len(raw):
        raise FormatError(f"{what} is damaged: its lengths do not add up")
    mask = bitarray(endian="little")
    mask.frombytes(bytes(raw[BLOB.size:BLOB.size + c // 8]))
    payload: bytes | memoryview = raw[BLOB.size + c // 8:BLOB.size + c // 8 + plen]
    want = mask.count() * block_size
    if flags & B_ZSTD:
        try:
            payload = zstandard.ZstdDecompressor().decompress(payload, max_output_size=want)
        except zstandard.ZstdError as e:
            raise FormatError(f"{what} does not decompress ({e})") from e
    if len(payload) != want:
        raise FormatError(f"{what} holds {len(payload)} bytes for {mask.count()} blocks")
    return chunk, mask, payload


# -- manifest ---------------------------------------------------------------------------------
@dataclass
class Entry:
    """Blocks `mask` of chunk `chunk` come from the blob at `pack`[offset:offset+length]."""

    chunk: int
    pack: bytes                            # 16-byte pack id
    offset: int
    length: int
    check: int                             # the blob's own trailing xxh3-64
    mask: bitarray                         # blocks taken from this blob (a subset of its own)


@dataclass
class Manifest:
    volume_uuid: bytes
    top_guid: bytes
    base_guid: bytes
    block_size: int
    nblocks: int
    chunk_blocks: int
    stream_header: bytes                   # the upload's HEADER record body, as sent
    entries: list[Entry] = field(default_factory=list)
    created: int = 0

    @property
    def blocks(self) -> int:
        return sum(e.mask.count() for e in self.entries)

    def packs(self) -> list[bytes]:
        return sorted({e.pack for e in self.entries})

    def pack(self, *, compress: bool = True) -> bytes:
        packs = self.packs()
        index = {p: i for i, p in enumerate(packs)}
        entries = sorted(self.entries, key=lambda e: (e.chunk, e.pack, e.offset))
        parts = [MAN_HEAD.pack(self.volume_uuid, self.top_guid, self.base_guid, self.block_size,
                               self.nblocks, self.chunk_blocks, len(packs), len(entries),
                               self.blocks, self.created, len(self.stream_header)),
                 self.stream_header, *packs]
        for e in entries:
            parts.append(ENTRY.pack(e.chunk, index[e.pack], e.length, e.offset, e.check))
            parts.append(e.mask.tobytes())
        return seal(MANIFEST_MAGIC, b"".join(parts), compress=compress)

    @classmethod
    def unpack(cls, raw: bytes, what: str = "manifest") -> Manifest:
        body = unseal(MANIFEST_MAGIC, raw, what)
        try:
            return cls._unpack(body, what)
        except (struct.error, IndexError) as e:
            raise FormatError(f"{what} is malformed ({e})") from e

    @classmethod
    def _unpack(cls, body: bytes, what: str) -> Manifest:
        (uuid, top, base, bs, n, c, npacks, nentries, blocks, created,
         hlen) = MAN_HEAD.unpack_from(body, 0)
        if c % 8 or c == 0 or bs == 0:
            raise FormatError(f"{what} has an impossible chunk of {c} blocks")
        pos = MAN_HEAD.size
        header = body[pos:pos + hlen]
        pos += hlen
        packs = [body[pos + 16 * i:pos + 16 * (i + 1)] for i in range(npacks)]
        pos += 16 * npacks
        step = ENTRY.size + c // 8
        if len(body) != pos + step * nentries or len(header) != hlen:
            raise FormatError(f"{what} is malformed: its lengths do not add up")
        m = cls(uuid, top, base, bs, n, c, header, created=created)
        for i in range(nentries):
            chunk, pi, length, offset, check = ENTRY.unpack_from(body, pos + i * step)
            mask = bitarray(endian="little")
            mask.frombytes(body[pos + i * step + ENTRY.size:pos + (i + 1) * step])
            m.entries.append(Entry(chunk, packs[pi], offset, length, check, mask))
        if m.blocks != blocks:
            raise FormatError(f"{what} is malformed: it counts {blocks} blocks, holds {m.blocks}")
        return m
