"""The on-disk format of an increments directory (docs/increments-format.md).

Two small structures, both checksummed with xxh3-64:
  * a header slot (two fixed 4 KiB slots in DIR/header; the valid one with the
    higher sequence number is in force), naming the base and the metadata file;
  * a metadata file (DIR/meta.ID, written once, never changed): the newest
    mirrored state's stream header (the root record, top, base and snapshot set
    the receive side commits), the plane of VBNs the structure holds, each held
    block's checksum, the VBNs still in the journal, and the deallocations.
The blocks themselves live in DIR/data at VBN x block size (holes: unchanged
VBNs), or, for a block that replaced one the committed state still used, in
DIR/journal.ID until that journal is applied.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from bitarray import bitarray

from blockxfer.checksum import checksum
from blockxfer.errors import FormatError, StreamError
from blockxfer.stream import format as sfmt

SLOT_SIZE = 4096
SLOT_MAGIC = b"BXINCR01"
META_MAGIC = b"BXINCMT1"
VERSION = 1

PENDING, READY = 1, 2            # header states: base being written, base and state held
F_JOURNAL = 1                    # the metadata's journal is not yet applied to DIR/data

_SLOT = struct.Struct("<8sHHIQ16s16sIIQQQQQQQQ16s16s")
# magic, version, state, flags, seq, dir id, volume uuid, block size, base image number,
# nblocks, meta id, meta length, meta checksum, present blocks, updates, blocks written,
# last update (ns), base snapshot guid, base tape set id; then base URL and base snapshot
# name (u16 length + UTF-8 each), then xxh3-64 of everything before it
_STR = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_RUN = struct.Struct("<QQ")
_META = struct.Struct("<8sHHIQ")   # magic, version, zero, zero, meta id


@dataclass
class Slot:
    """One header slot: what the directory holds and where its state is."""

    seq: int
    state: int
    dir_id: bytes
    volume_uuid: bytes
    block_size: int
    nblocks: int
    base_url: str
    base_name: str
    base_guid: bytes = bytes(16)
    base_set: bytes = bytes(16)
    base_image: int = 0
    flags: int = 0
    meta_id: int = 0
    meta_len: int = 0
    meta_check: int = 0
    present: int = 0
    updates: int = 0
    written: int = 0
    updated: int = 0

    @property
    def tag(self) -> str:
        """The short id in the names of this directory's snapshots on the source."""
        return self.dir_id.hex()[:8]

    def pack(self) -> bytes:
        url, name = self.base_url.encode(), self.base_name.encode()
        body = (_SLOT.pack(SLOT_MAGIC, VERSION, self.state, self.flags, self.seq, self.dir_id,
                           self.volume_uuid, self.block_size, self.base_image, self.nblocks,
                           self.meta_id, self.meta_len, self.meta_check, self.present,
                           self.updates, self.written, self.updated, self.base_guid,
                           self.base_set)
                + _STR.pack(len(url)) + url + _STR.pack(len(name)) + name)
        raw = body + _U64.pack(checksum(body))
        if len(raw) > SLOT_SIZE:
            raise FormatError("increments header: the base URL is too long")
        return raw.ljust(SLOT_SIZE, b"\0")

    @classmethod
    def unpack(cls, raw: bytes) -> Slot:
        """A slot, or FormatError if it is not a whole, valid one."""
        if raw[:8] != SLOT_MAGIC:
            raise FormatError("no increments header")
        try:
            (_, version, state, flags, seq, dir_id, vol, bs, image, n, meta_id, meta_len,
             meta_check, present, updates, written, updated, base_guid,
             base_set) = _SLOT.unpack_from(raw, 0)
            pos = _SLOT.size
            url, pos = _string(raw, pos)
            name, pos = _string(raw, pos)
            (ck,) = _U64.unpack_from(raw, pos)
        except (struct.error, UnicodeDecodeError) as e:
            raise FormatError("increments header is malformed") from e
        if ck != checksum(raw[:pos]):
            raise FormatError("increments header checksum mismatch")
        if version != VERSION:
            raise FormatError(f"increments format version {version} is not supported "
                              f"(this blockxfer reads {VERSION})")
        if state not in (PENDING, READY):
            raise FormatError(f"increments header has an unknown state {state}")
        return cls(seq, state, dir_id, vol, bs, n, url, name, base_guid, base_set, image, flags,
                   meta_id, meta_len, meta_check, present, updates, written, updated)


def _string(raw: bytes, pos: int) -> tuple[str, int]:
    (n,) = _STR.unpack_from(raw, pos)
    pos += _STR.size
    if pos + n > len(raw):
        raise struct.error("string runs past the slot")
    return raw[pos:pos + n].decode(), pos + n


Runs = list[tuple[int, int]]


@dataclass
class Meta:
    """One committed state of the structure (DIR/meta.ID)."""

    meta_id: int
    header: sfmt.Header                    # the newest state, as a stream header says it
    base_guids: list[bytes]                # snapshots the base image carries
    present: bitarray                      # VBNs held (nblocks bits; stored as runs)
    checks: np.ndarray                     # xxh3-64 of each held block, ascending VBN
    journal: Runs = field(default_factory=list)    # VBNs whose block is in journal.ID
    dealloc: Runs = field(default_factory=list)    # base - top

    def pack(self) -> bytes:
        head = self.header.pack()
        parts = [_META.pack(META_MAGIC, VERSION, 0, 0, self.meta_id),
                 _U32.pack(len(head)), head,
                 _U32.pack(len(self.base_guids)), *self.base_guids,
                 _runs(list(plane_runs(self.present))),
                 _U64.pack(len(self.checks)), self.checks.astype("<u8").tobytes(),
                 _runs(self.journal), _runs(self.dealloc)]
        body = b"".join(parts)
        return body + _U64.pack(checksum(body))

    @classmethod
    def unpack(cls, raw: bytes, nblocks: int, what: str) -> Meta:
        if len(raw) < _META.size + 8 or raw[:8] != META_MAGIC:
            raise FormatError(f"{what} is not increments metadata")
        (ck,) = _U64.unpack_from(raw, len(raw) - 8)
        if ck != checksum(memoryview(raw)[:-8]):
            raise FormatError(f"{what}: checksum mismatch (the metadata is damaged)")
        try:
            return cls._unpack(raw, nblocks, what)
        except (struct.error, StreamError, ValueError) as e:
            raise FormatError(f"{what} is malformed ({e})") from e

    @classmethod
    def _unpack(cls, raw: bytes, nblocks: int, what: str) -> Meta:
        _, version, _, _, meta_id = _META.unpack_from(raw, 0)
        if version != VERSION:
            raise FormatError(f"{what}: format version {version} is not supported")
        pos = _META.size
        (hlen,) = _U32.unpack_from(raw, pos)
        header = sfmt.Header.unpack(raw[pos + 4:pos + 4 + hlen])
        pos += 4 + hlen
        (nguid,) = _U32.unpack_from(raw, pos)
        pos += 4
        guids = [raw[pos + 16 * i:pos + 16 * (i + 1)] for i in range(nguid)]
        pos += 16 * nguid
        held, pos = _unruns(raw, pos)
        present = bitarray(nblocks, endian="little")
        present.setall(0)
        for s, c in held:
            if s + c > nblocks:
                raise ValueError(f"held blocks {s}+{c} lie beyond the volume")
            present[s:s + c] = 1
        (count,) = _U64.unpack_from(raw, pos)
        pos += 8
        if count != present.count():
            raise ValueError("checksum count does not match the plane")
        checks = np.frombuffer(raw, dtype="<u8", count=count, offset=pos).astype(np.uint64)
        pos += 8 * count
        journal, pos = _unruns(raw, pos)
        dealloc, pos = _unruns(raw, pos)
        if pos != len(raw) - 8:
            raise ValueError("trailing bytes")
        return cls(meta_id, header, guids, present, checks, journal, dealloc)


def plane_runs(plane: bitarray, value: int = 1) -> Iterator[tuple[int, int]]:
    """Runs (first, count) of bits equal to `value`, ascending."""
    pos, end = 0, len(plane)
    while pos < end:
        s = plane.find(value, pos, end)
        if s < 0:
            return
        e = plane.find(1 - value, s, end)
        e = end if e < 0 else e
        yield s, e - s
        pos = e


def _runs(runs: Runs) -> bytes:
    return _U32.pack(len(runs)) + b"".join(_RUN.pack(s, c) for s, c in runs)


def _unruns(raw: bytes, pos: int) -> tuple[Runs, int]:
    (n,) = _U32.unpack_from(raw, pos)
    pos += 4
    out = [_RUN.unpack_from(raw, pos + _RUN.size * i) for i in range(n)]
    return [(int(s), int(c)) for s, c in out], pos + _RUN.size * n
