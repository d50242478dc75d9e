"""The intent log: what acknowledged writes need between two consistency points
(the role WAFL gives NVRAM and ZFS its ZIL).

A FLUSH must not cost a whole CP. Instead the map changes made since the last
sync go into one *record* appended to a reserved region of the volume, and one
`fdatasync` makes it durable: small writes carry their data inline, large ones
point at data already written copy-on-write (drained before the record is
written). The next CP makes every record obsolete; opening the volume replays
the records that follow the committed root (volume.py).

A record is bound to the root it follows by a token (xxh3-64 of the volume UUID
and the committed root record): records written before a CP, or on a volume whose
root a receive replaced, never match again. Records are numbered from 1 after
each CP, each carries the checksum of the one before it, and each is made durable
before the next starts, so replay stops at the first record that is absent, torn,
stale or out of order, and never continues into records of a history that a
replay stopped short of (a later session wrote over its start).
docs/volume-format.md describes the same bytes.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import xxhash
from bitarray import bitarray

from blockxfer.checksum import block_checksums, checksum
from blockxfer.device import BlockDevice
from blockxfer.errors import FormatError

from .blockio import aligned
from .layout import RootRecord

UNIT = 4096                      # records start and end on 4 KiB boundaries
MAGIC = b"BXINTENT"
HEAD = struct.Struct("<8sQQQQIIIIQ")
# magic, root token, sequence, root generation, checksum of the previous record (0
# for the first after a CP), meta units, data units, entries, zero, xxh3-64 of the
# whole record (meta and data) with this field zeroed
ENTRY = struct.Struct("<QII")    # first virtual block, blocks, kind
PTR = struct.Struct("<QQ")       # vbn, xxh3-64 of the block
assert HEAD.size == 64 and ENTRY.size == 16 and PTR.size == 16
_ONE = struct.Struct("<QIIQQ")   # ENTRY then PTR: a one-block entry in one call
_CK_AT = HEAD.size - 8
_U64 = struct.Struct("<Q")
_ZEROS = memoryview(bytes(UNIT))   # the padding to a unit's end is shorter than a unit

INLINE, POINTER, UNMAP = 1, 2, 3
INLINE_LIMIT = 8 << 20           # inline bytes held for the next sync; beyond, pointers
KEEP_BUFFER = 1 << 20            # a record buffer up to this size is kept for the next one
# Map changes held for one record; beyond, the next sync is a CP. Under unsynced
# random writes (NBD at queue depth 32) entries piled up until the next CP (~10^5 of
# them): a few us a write to note (the garbage collector walks them all), and the
# first FLUSH packed them under the lock for ~50 ms (for a record as large as a CP).
MAX_ENTRIES = 16384


def root_token(uuid: bytes, root: RootRecord) -> int:
    return checksum(uuid + root.pack())


@dataclass(slots=True)
class Entry:
    """One map change: blocks `vblock ..` now point at `ptrs` (VBN, checksum), with
    the data inline, or were unmapped (kind UNMAP, no pointers). A one-block entry
    the log notes for a random write holds its pointer as `one` (VBN, checksum)
    and no `ptrs` until packed: building an array and an entry took ~18% of a
    random 4 KiB write (sampled with py-spy). Entries parsed from a record always
    have `ptrs`."""

    vblock: int
    count: int
    kind: int
    ptrs: np.ndarray | None = None          # (count, 2) uint64
    data: bytes | bytearray | memoryview | None = None
    one: tuple[int, int] | None = None

    def meta_size(self) -> int:
        return ENTRY.size + (0 if self.kind == UNMAP else PTR.size * self.count)


@dataclass(frozen=True, slots=True)
class Head:
    token: int
    seq: int
    generation: int
    prev: int
    meta_units: int
    data_units: int
    entries: int
    checksum: int

    @property
    def units(self) -> int:
        return self.meta_units + self.data_units


@dataclass(slots=True)
class Record:
    head: Head
    entries: list[Entry] = field(default_factory=list)

    @property
    def seq(self) -> int:
        return self.head.seq


def pack_record(token: int, seq: int, generation: int, prev: int, entries: list[Entry],
                block_size: int, buf: mmap.mmap | None = None) -> memoryview:
    """The record's bytes, whole 4 KiB units, in `buf` when it is large enough (an
    aligned buffer kept for the next record: a fresh one costs an mmap and an
    munmap per FLUSH) or else in a new aligned buffer."""
    meta = HEAD.size + sum(e.meta_size() for e in entries)
    data_len = sum(e.count * block_size for e in entries if e.kind == INLINE)
    return _pack(token, seq, generation, prev, entries, block_size, meta, data_len, buf)[0]


def _pack(token: int, seq: int, generation: int, prev: int, entries: list[Entry],
          block_size: int, meta: int, data_len: int,
          buf: mmap.mmap | None) -> tuple[memoryview, int]:
    """`pack_record` given the bytes of the entries' metadata (with the head) and
    of their inline data, which the log counts as it notes them; also returns the
    record's checksum."""
    meta_units = -(-meta // UNIT)
    data_units = -(-data_len // UNIT)
    size = (meta_units + data_units) * UNIT
    if buf is None or len(buf) < size:
        buf = aligned(size)
    view = memoryview(buf)[:size]
    at, dat = HEAD.size, meta_units * UNIT
    for e in entries:
        if e.one is not None:
            _ONE.pack_into(view, at, e.vblock, 1, e.kind, *e.one)
            at += _ONE.size
        else:
            ENTRY.pack_into(view, at, e.vblock, e.count, e.kind)
            at += ENTRY.size
            if e.kind == UNMAP:
                continue
            assert e.ptrs is not None
            raw = e.ptrs.astype("<u8", copy=False).tobytes()
            view[at:at + len(raw)] = raw
            at += len(raw)
        if e.kind == INLINE:
            assert e.data is not None
            n = e.count * block_size
            view[dat:dat + n] = memoryview(e.data).cast("B")[:n]
            dat += n
    end = meta_units * UNIT
    # the sizes given are the sizes written, so only the pads can hold stale bytes (a
    # reused buffer holds the last record's), and each pad is shorter than a unit
    assert at == meta and dat == end + data_len, "intent log record sizes disagree"
    view[meta:end] = _ZEROS[:end - meta]
    view[dat:] = _ZEROS[:size - dat]
    HEAD.pack_into(view, 0, MAGIC, token, seq, generation, prev, meta_units, data_units,
                   len(entries), 0, 0)
    ck = checksum(view)
    _U64.pack_into(view, _CK_AT, ck)
    return view, ck


def parse_head(raw: bytes | memoryview) -> Head:
    """The head of a record; FormatError when it is not one."""
    magic, token, seq, gen, prev, mu, du, n, _, ck = HEAD.unpack_from(raw, 0)
    if magic != MAGIC or mu < 1:
        raise FormatError("no intent log record")
    return Head(token, seq, gen, prev, mu, du, n, ck)


def parse_record(raw: memoryview, block_size: int) -> list[Entry]:
    """The entries of a whole record whose checksum is already verified."""
    head = parse_head(raw)
    mu, n = head.meta_units, head.entries
    at, dat, out = HEAD.size, mu * UNIT, []
    for _ in range(n):
        if at + ENTRY.size > mu * UNIT:
            raise FormatError("intent log record entries overrun")
        vblock, count, kind = ENTRY.unpack_from(raw, at)
        at += ENTRY.size
        if kind not in (INLINE, POINTER, UNMAP) or count == 0:
            raise FormatError(f"intent log entry of kind {kind} with {count} blocks")
        e = Entry(vblock, count, kind)
        if kind != UNMAP:
            end = at + PTR.size * count
            if end > mu * UNIT:
                raise FormatError("intent log record pointers overrun")
            e.ptrs = np.frombuffer(raw[at:end], dtype="<u8").reshape(count, 2).astype(np.uint64)
            at = end
        if kind == INLINE:
            n_data = count * block_size
            if dat + n_data > len(raw):
                raise FormatError("intent log record data overrun")
            e.data = bytes(raw[dat:dat + n_data])
            dat += n_data
        out.append(e)
    return out


def verify(raw: memoryview) -> bool:
    """Does the record's checksum (taken with its own field zeroed) hold?"""
    ck = _U64.unpack_from(raw, _CK_AT)[0]
    h = xxhash.xxh3_64(raw[:_CK_AT])
    h.update(bytes(8))
    h.update(raw[HEAD.size:])
    return h.intdigest() == ck


def record_problem(rec: Record, used: bitarray, *, first_data_vbn: int, nblocks: int,
                   virtual_blocks: int, block_size: int,
                   read_ptrs: Callable[[np.ndarray, memoryview], None]) -> str | None:
    """Why a replay would stop at `rec`: a block it maps is reserved or set in `used`
    (the committed state's, and earlier records'), or does not hold what it names.
    The blocks of a replayable record are marked in `used`. Shared by the replay
    on open and by `check`, so the two never disagree on which records count."""
    for e in rec.entries:
        if e.vblock + e.count > virtual_blocks:
            return f"maps virtual blocks {e.vblock}+{e.count} beyond the virtual disk"
        if e.kind == UNMAP:
            continue
        assert e.ptrs is not None
        vbns = e.ptrs[:, 0]
        out = (vbns < first_data_vbn) | (vbns >= nblocks)
        if out.any():
            return f"maps block {int(vbns[out][0])}, which is reserved or already in use"
        listed = vbns.tolist()
        taken = used[listed]
        if taken.any() or len(np.unique(vbns)) != len(vbns):
            v = listed[taken.index(1)] if taken.any() else int(vbns[0])
            return f"maps block {v}, which is reserved or already in use"
        if e.kind == INLINE:
            assert e.data is not None
            if (block_checksums(e.data, block_size) != e.ptrs[:, 1]).any():
                return "inline data disagrees with its checksums"
        else:
            view = memoryview(aligned(len(e.ptrs) * block_size))[:len(e.ptrs) * block_size]
            read_ptrs(e.ptrs, view)
            if (block_checksums(view, block_size) != e.ptrs[:, 1]).any():
                return "points at blocks that do not hold the data it names"
        used[listed] = 1
    return None


class IntentLog:
    """The log region of one open volume: where the next record goes, and the map
    changes waiting for the next sync."""

    def __init__(self, dev: BlockDevice, block_size: int, start_vbn: int, blocks: int):
        self.dev, self.bs = dev, block_size
        self.offset = start_vbn * block_size
        self.capacity = max(0, blocks) * block_size // UNIT      # in units
        self.enabled = self.capacity >= 4
        self.token = self.generation = 0
        self.pos = self.seq = 0
        self.last = 0                  # checksum of the last record (0: none since the CP)
        self.entries: list[Entry] = []
        self._inline_from = 0
        self._buf: mmap.mmap | None = None    # the last record's buffer, for the next one
        self.meta = HEAD.size
        self.inline_bytes = 0
        self.pointers = False          # pending entries point at data still to drain
        self.overflow = False          # too much for the region: the next sync is a CP

    def reset(self, uuid: bytes, root: RootRecord) -> None:
        """A new committed root: every record so far is obsolete."""
        self.token, self.generation = root_token(uuid, root), root.generation
        self.pos = self.seq = self.last = 0
        self._clear()
        self.overflow = False

    def _clear(self) -> None:
        self.entries = []
        self._inline_from = 0          # entries before this one hold no inline data
        self.meta, self.inline_bytes, self.pointers = HEAD.size, 0, False

    @property
    def pending(self) -> bool:
        return bool(self.entries) or self.overflow

    def note(self, vblock: int, ptrs: np.ndarray,
             data: bytes | bytearray | memoryview | None) -> None:
        """Blocks `vblock ..` now point at `ptrs`; `data` is their content, or None
        when the blocks were handed to the device (drained before the record)."""
        if not self.enabled or self.overflow:
            return
        count = len(ptrs)
        kind = INLINE if data is not None else POINTER
        self.entries.append(Entry(vblock, count, kind, ptrs.copy(), data))
        self.meta += ENTRY.size + PTR.size * count
        if kind == INLINE:
            self.inline_bytes += count * self.bs
            if self.inline_bytes > INLINE_LIMIT:
                self._to_pointers()
        else:
            self.pointers = True
        self._check_room()

    def note_one(self, vblock: int, vbn: int, ck: int,
                 data: bytes | bytearray | memoryview) -> None:
        """`note` of one block with its data inline (a random 4 KiB write); `data` is
        copied (the caller's buffer may be reused)."""
        if not self.enabled or self.overflow:
            return
        self.entries.append(Entry(vblock, 1, INLINE, None, bytes(data), (vbn, ck)))
        self._noted_inline(1)

    def note_blocks(self, vblocks: list[int], ptrs: np.ndarray, data: bytes) -> None:
        """`note` of scattered single blocks with their data inline: block k of `data`
        now at `ptrs[k]` is virtual block `vblocks[k]` (a batch of random writes).
        Neither `ptrs` nor `data` may change afterwards: the entries share them."""
        if not self.enabled or self.overflow:
            return
        bs, raw = self.bs, memoryview(data)
        self.entries += [Entry(v, 1, INLINE, ptrs[k:k + 1], raw[k * bs:(k + 1) * bs])
                         for k, v in enumerate(vblocks)]
        self._noted_inline(len(vblocks))

    def _noted_inline(self, blocks: int) -> None:
        self.meta += (ENTRY.size + PTR.size) * blocks
        self.inline_bytes += blocks * self.bs
        if self.inline_bytes > INLINE_LIMIT:
            self._to_pointers()
        self._check_room()

    def note_unmap(self, vblock: int, count: int) -> None:
        if not self.enabled or self.overflow or count == 0:
            return
        self.entries.append(Entry(vblock, count, UNMAP))
        self.meta += ENTRY.size
        self._check_room()

    def _to_pointers(self) -> None:
        """Too much inline data held in memory: the blocks are on their way to the
        device anyway (staged), so the record points at them instead."""
        for e in self.entries[self._inline_from:]:
            if e.kind == INLINE:
                e.kind, e.data = POINTER, None
        self._inline_from = len(self.entries)     # the ones before are pointers already
        self.inline_bytes, self.pointers = 0, True

    def record_units(self) -> int:
        return -(-self.meta // UNIT) + -(-self.inline_bytes // UNIT)

    def _check_room(self) -> None:
        if (self.record_units() > self.capacity - self.pos
                or len(self.entries) > MAX_ENTRIES):
            self._clear()
            self.overflow = True

    def append(self) -> None:
        """Write the pending entries as the next record and make it durable."""
        self.write_record(*self.prepare())

    def prepare(self) -> tuple[memoryview, int]:
        """Pack the pending entries as the next record and give it its place in the
        log: (its bytes, its device offset). The caller makes it durable with
        `write_record` before it prepares the next one (records are durable in
        order, each before the next is written: see the module docstring)."""
        size = self.record_units() * UNIT
        buf = self._buf
        if buf is None or len(buf) < size:
            buf = aligned(size)
            if size <= KEEP_BUFFER:
                self._buf = buf
        rec, self.last = _pack(self.token, self.seq + 1, self.generation, self.last,
                               self.entries, self.bs, self.meta, self.inline_bytes, buf)
        units = len(rec) // UNIT
        assert self.pos + units <= self.capacity
        at = self.offset + self.pos * UNIT
        self.pos += units
        self.seq += 1
        self._clear()
        return rec, at

    def write_record(self, rec: memoryview, at: int) -> None:
        self.dev.pwrite(rec, at)
        self.dev.flush()

    def _head_at(self, pos: int) -> Head | None:
        if pos >= self.capacity:
            return None
        buf = memoryview(aligned(UNIT))[:UNIT]
        self.dev.pread(buf, self.offset + pos * UNIT)
        try:
            head = parse_head(buf)
        except FormatError:
            return None
        if head.token != self.token or pos + head.units > self.capacity:
            return None
        return head

    def _record_at(self, pos: int, seq: int, prev: int) -> Record | None:
        """The whole record at `pos` if it is the one that must come next."""
        head = self._head_at(pos)
        if head is None or head.seq != seq or head.prev != prev:
            return None
        size = head.units * UNIT
        raw = memoryview(aligned(size))[:size]
        self.dev.pread(raw, self.offset + pos * UNIT)
        if not verify(raw):
            return None
        try:
            return Record(head, parse_record(raw, self.bs))
        except FormatError:
            return None

    def records(self) -> list[Record]:
        """The records that follow the committed root, in order, up to the first one
        that does not (absent, torn, stale or out of sequence). Data the POINTER
        entries name is not checked here (see syncing.py)."""
        out: list[Record] = []
        pos, prev = 0, 0
        while (rec := self._record_at(pos, len(out) + 1, prev)) is not None:
            out.append(rec)
            pos, prev = pos + rec.head.units, rec.head.checksum
        return out

    def lost_after(self, records: list[Record]) -> int | None:
        """The sequence number of a whole record that follows an unreadable one
        (whose head survived): acknowledged writes a replay cannot reach. None when
        the log simply ends (a torn or never finished last record is normal)."""
        pos = sum(r.head.units for r in records)
        seq = len(records) + 1
        bad = self._head_at(pos)
        prev = records[-1].head.checksum if records else 0
        if bad is None or bad.seq != seq or bad.prev != prev:
            return None                 # the log ends, or what follows is another history
        nxt = self._record_at(pos + bad.units, seq + 1, bad.checksum)
        return None if nxt is None else seq + 1

    def resume_after(self, records: list[Record]) -> None:
        """Continue after the records replayed (the next record follows them)."""
        self.pos = sum(r.head.units for r in records)
        self.seq = len(records)
        self.last = records[-1].head.checksum if records else 0
