"""The increments directory on disk: its committed state, reading its blocks
(every one checked), and replacing that state by a newer one so that a kill at
any instant leaves the old state or the new one (docs/increments-format.md).

The order of an update (`Update`):
  1. blocks at VBNs the committed state does not hold go straight into DIR/data;
     blocks replacing held ones go to DIR/journal.ID (the committed state still
     reads the old ones from DIR/data); both are made durable;
  2. DIR/meta.ID is written under a temporary name, fsynced and renamed;
  3. the header slot not in force gets the next sequence number naming meta.ID
     (with F_JOURNAL when a journal exists): this write commits;
  4. the journal is copied into DIR/data, made durable, and the header says so
     (the next sequence number, no F_JOURNAL); then the journal and older metadata
     files are removed and every VBN the state does not hold is punched out.
A kill before 3 leaves stray blocks at VBNs nobody reads (punched by the next
update); a kill during 4 is finished by the next update (`settle`), and readers
meanwhile read the journal.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace

import numpy as np
from bitarray import bitarray

from blockxfer.checksum import block_checksums, checksum
from blockxfer.device import BlockDevice
from blockxfer.errors import DamagedBlock, DeviceError, FormatError, UsageError
from blockxfer.volume.blockio import MAX_REQUEST, aligned

from .format import F_JOURNAL, READY, SLOT_SIZE, Meta, Runs, Slot, plane_runs

OpenDevice = Callable[..., BlockDevice]
HEADER, DATA = "header", "data"


def meta_name(meta_id: int) -> str:
    return f"meta.{meta_id}"


def journal_name(meta_id: int) -> str:
    return f"journal.{meta_id}"


def plane_of(runs: Iterable[tuple[int, int]], nbits: int) -> bitarray:
    p = bitarray(nbits, endian="little")
    p.setall(0)
    for s, c in runs:
        p[s:s + c] = 1
    return p


def set_bits(plane: bitarray) -> np.ndarray:
    """The positions of the set bits, ascending, as uint64 (memory in proportion
    to the nonzero bytes, not to the plane)."""
    raw = np.frombuffer(plane.tobytes(), dtype=np.uint8)
    nz = np.flatnonzero(raw)
    bits = np.unpackbits(raw[nz][:, None], axis=1, bitorder="little").astype(bool)
    pos = (nz[:, None] * 8 + np.arange(8))[bits]
    return pos[pos < len(plane)].astype(np.uint64)


def allocated(path: str, nblocks: int, block_size: int) -> bitarray:
    """The blocks of a sparse file that hold data (SEEK_DATA / SEEK_HOLE)."""
    out = bitarray(nblocks, endian="little")
    out.setall(0)
    fd = os.open(path, os.O_RDONLY)
    try:
        end, pos = os.fstat(fd).st_size, 0
        while pos < end:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:                  # ENXIO: no data after pos
                break
            pos = os.lseek(fd, start, os.SEEK_HOLE)
            out[start // block_size:min(nblocks, -(-pos // block_size))] = 1
    finally:
        os.close(fd)
    return out


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Directory:
    """An increments directory: its header slots and metadata files."""

    def __init__(self, path: str):
        self.path = path

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def exists(self) -> bool:
        return os.path.exists(self.file(HEADER))

    # -- header slots -------------------------------------------------------------------
    def slot(self) -> Slot:
        """The slot in force: the valid one with the higher sequence number."""
        try:
            with open(self.file(HEADER), "rb") as f:
                raw = f.read(2 * SLOT_SIZE)
        except FileNotFoundError as e:
            raise UsageError(f"{self.path} holds no increments (no header file); give the "
                             "directory the first mirror update created") from e
        except OSError as e:
            raise DeviceError(f"cannot read {self.file(HEADER)}: {e.strerror}") from e
        found = []
        for k in range(2):
            with contextlib.suppress(FormatError):
                found.append(Slot.unpack(raw[k * SLOT_SIZE:(k + 1) * SLOT_SIZE]))
        if not found:
            raise FormatError(f"{self.file(HEADER)}: neither header slot is valid (the "
                              "increments are damaged)")
        return max(found, key=lambda s: s.seq)

    def create(self) -> None:
        """A new directory with an empty header file (no valid slot yet)."""
        try:
            os.makedirs(self.path, exist_ok=True)
            left = [n for n in os.listdir(self.path) if not n.startswith(".")]
            if left:
                raise UsageError(f"{self.path} is not empty and holds no increments; give a "
                                 "new or empty directory")
            fd = os.open(self.file(HEADER), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            try:
                os.write(fd, bytes(2 * SLOT_SIZE))
                os.fsync(fd)
            finally:
                os.close(fd)
            _fsync_dir(self.path)
        except OSError as e:
            raise DeviceError(f"cannot create {self.path}: {e.strerror}") from e

    def write_slot(self, slot: Slot) -> None:
        """Write `slot` into the slot its sequence number picks (never the one in
        force, whose number has the other parity) and make it durable."""
        try:
            fd = os.open(self.file(HEADER), os.O_WRONLY)
            try:
                os.pwrite(fd, slot.pack(), (slot.seq % 2) * SLOT_SIZE)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise DeviceError(f"cannot write {self.file(HEADER)}: {e.strerror}") from e

    # -- metadata -----------------------------------------------------------------------
    def write_meta(self, meta: Meta) -> tuple[int, int]:
        """Write meta.ID whole (temporary name, fsync, rename, fsync the folder);
        its length and checksum go into the header that commits it."""
        raw = meta.pack()
        final = self.file(meta_name(meta.meta_id))
        tmp = final + ".tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(raw)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
            _fsync_dir(self.path)
        except OSError as e:
            raise DeviceError(f"cannot write {final}: {e.strerror}") from e
        return len(raw), checksum(raw)

    def meta(self, slot: Slot) -> Meta:
        name = self.file(meta_name(slot.meta_id))
        try:
            with open(name, "rb") as f:
                raw = f.read()
        except FileNotFoundError as e:
            raise FormatError(f"{name} is missing, but the header names it (the increments "
                              "are damaged)") from e
        except OSError as e:
            raise DeviceError(f"cannot read {name}: {e.strerror}") from e
        if len(raw) != slot.meta_len or checksum(raw) != slot.meta_check:
            raise FormatError(f"{name} does not match the checksum its header keeps (the "
                              "increments are damaged)")
        meta = Meta.unpack(raw, slot.nblocks, name)
        if meta.meta_id != slot.meta_id or meta.present.count() != slot.present:
            raise FormatError(f"{name} belongs to another state of {self.path} (the "
                              "increments are damaged)")
        return meta

    def state(self) -> tuple[Slot, Meta | None]:
        """The committed state, for a reader that holds no lock: an update that
        commits and removes the older metadata between reading the slot and the
        file makes it read again."""
        for _ in range(3):
            slot = self.slot()
            if slot.state != READY:
                return slot, None
            try:
                return slot, self.meta(slot)
            except FormatError:
                if self.slot().seq == slot.seq:
                    raise
        raise FormatError(f"{self.path} changes faster than it can be read; try again")

    def allocated_bytes(self) -> int:
        """What the structure occupies on disk (allocated blocks, holes excluded)."""
        total = 0
        for name in os.listdir(self.path):
            with contextlib.suppress(OSError):
                total += os.stat(self.file(name)).st_blocks * 512
        return total


class Blocks:
    """The held blocks of one committed state, read and checked against the
    checksums its metadata keeps."""

    def __init__(self, d: Directory, slot: Slot, meta: Meta, data: BlockDevice):
        self.d, self.slot, self.meta, self.data = d, slot, meta, data
        self.bs = slot.block_size
        self.vbns = set_bits(meta.present)
        self.journal = plane_of(meta.journal if slot.flags & F_JOURNAL else [], slot.nblocks)
        self.jstarts = np.array([s for s, _ in meta.journal], dtype=np.int64)
        self.jbefore = np.cumsum([0] + [c for _, c in meta.journal])[:-1]

    def _journal_offset(self, vbn: int) -> int:
        i = int(np.searchsorted(self.jstarts, vbn, side="right")) - 1
        return int(self.jbefore[i] + vbn - self.jstarts[i]) * self.bs

    def read(self, runs: Iterable[tuple[int, int]]) -> Iterator[tuple[int, memoryview]]:
        """(first VBN, bytes) chunks of the held blocks in `runs`, each checked."""
        per = MAX_REQUEST // self.bs
        buf = aligned(MAX_REQUEST)
        jfd = -1
        try:
            for start, count in runs:
                for k in range(0, count, per):
                    first, n = start + k, min(per, count - k)
                    view = memoryview(buf)[:n * self.bs]
                    for s, c, in_journal in self._split(first, n):
                        part = view[(s - first) * self.bs:(s - first + c) * self.bs]
                        if in_journal:
                            if jfd < 0:
                                jfd = self.open_journal()
                            self.pread_journal(jfd, part, s)
                        else:
                            self.data.pread(part, s * self.bs)
                    self._check(first, view)
                    yield first, view
        finally:
            if jfd >= 0:
                os.close(jfd)

    def _split(self, first: int, n: int) -> Iterator[tuple[int, int, bool]]:
        pos, end = first, first + n
        while pos < end:
            here = bool(self.journal[pos])
            nxt = self.journal.find(0 if here else 1, pos, end)
            nxt = end if nxt < 0 else nxt
            yield pos, nxt - pos, here
            pos = nxt

    def open_journal(self) -> int:
        name = self.d.file(journal_name(self.meta.meta_id))
        try:
            return os.open(name, os.O_RDONLY)
        except OSError as e:
            raise FormatError(f"{name} is missing, but the header names it (the increments "
                              "are damaged)") from e

    def pread_journal(self, fd: int, part: memoryview, vbn: int) -> None:
        off = self._journal_offset(vbn)
        got = os.preadv(fd, [part], off)
        if got != len(part):
            raise FormatError(f"{self.d.file(journal_name(self.meta.meta_id))} ends early "
                              "(the increments are damaged)")

    def _check(self, first: int, view: memoryview) -> None:
        n = len(view) // self.bs
        i = int(np.searchsorted(self.vbns, first))
        want = self.meta.checks[i:i + n]
        if i + n > len(self.vbns) or int(self.vbns[i]) != first \
                or int(self.vbns[i + n - 1]) != first + n - 1:
            raise FormatError(f"{self.d.path}: block {first} is not held here")
        bad = np.nonzero(want != block_checksums(view, self.bs))[0]
        if len(bad):
            raise DamagedBlock(f"{self.d.file(DATA)}: block VBN {first + int(bad[0])} does "
                               f"not match its checksum ({len(bad)} bad in one read): the "
                               "increments are damaged")


class Update:
    """Writes the next state: blocks first (never over a block the committed state
    reads), then the metadata, then the header slot that commits it."""

    def __init__(self, d: Directory, slot: Slot, held: bitarray, data: BlockDevice,
                 meta_id: int):
        self.d, self.slot, self.held, self.data, self.meta_id = d, slot, held, data, meta_id
        self.bs = slot.block_size
        self.journal: Runs = []
        self.jfd = -1
        self.vbns: list[np.ndarray] = []
        self.checks: list[np.ndarray] = []
        self.blocks = 0

    def put(self, first: int, view: memoryview) -> None:
        """Blocks at `first`... (ascending over the whole update)."""
        n = len(view) // self.bs
        self.vbns.append(np.arange(first, first + n, dtype=np.uint64))
        self.checks.append(block_checksums(view, self.bs))
        pos, end = first, first + n
        while pos < end:
            held = bool(self.held[pos])
            nxt = self.held.find(0 if held else 1, pos, end)
            nxt = end if nxt < 0 else nxt
            part = view[(pos - first) * self.bs:(nxt - first) * self.bs]
            if held:
                self._journal(pos, part)
            else:
                self.data.pwrite(part, pos * self.bs)
            pos = nxt
        self.blocks += n

    def _journal(self, vbn: int, part: memoryview) -> None:
        name = self.d.file(journal_name(self.meta_id))
        try:
            if self.jfd < 0:
                self.jfd = os.open(name, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600)
            os.write(self.jfd, part)
        except OSError as e:
            raise DeviceError(f"cannot write {name}: {e.strerror}") from e
        c = len(part) // self.bs
        if self.journal and self.journal[-1][0] + self.journal[-1][1] == vbn:
            self.journal[-1] = (self.journal[-1][0], self.journal[-1][1] + c)
        else:
            self.journal.append((vbn, c))

    def written(self) -> tuple[np.ndarray, np.ndarray]:
        """VBNs written and their checksums, ascending."""
        if not self.vbns:
            return np.zeros(0, np.uint64), np.zeros(0, np.uint64)
        return np.concatenate(self.vbns), np.concatenate(self.checks)

    def commit(self, meta: Meta, slot: Slot) -> Slot:
        """Make the blocks durable, then the metadata, then the header slot (the
        commit). Returns the slot now in force."""
        self.data.flush()
        if self.jfd >= 0:
            try:
                os.fsync(self.jfd)
            finally:
                os.close(self.jfd)
                self.jfd = -1
        meta.journal = self.journal
        length, ck = self.d.write_meta(meta)
        new = replace(slot, meta_id=meta.meta_id, meta_len=length, meta_check=ck,
                      flags=F_JOURNAL if self.journal else 0)
        self.d.write_slot(new)
        return new

    def abandon(self) -> None:
        if self.jfd >= 0:
            os.close(self.jfd)
            self.jfd = -1


def settle(d: Directory, slot: Slot, meta: Meta, data: BlockDevice) -> Slot:
    """Finish the committed state: its journal copied into DIR/data and the header
    saying so, then the files and blocks no state reads removed or punched. Safe
    to run again after a kill at any point (copying the journal is idempotent)."""
    if slot.flags & F_JOURNAL:
        blocks = Blocks(d, slot, meta, data)
        jfd = blocks.open_journal()
        try:
            buf = aligned(MAX_REQUEST)
            per = MAX_REQUEST // slot.block_size
            for start, count in meta.journal:
                for k in range(0, count, per):
                    n = min(per, count - k)
                    view = memoryview(buf)[:n * slot.block_size]
                    blocks.pread_journal(jfd, view, start + k)
                    data.pwrite(view, (start + k) * slot.block_size)
        finally:
            os.close(jfd)
        data.flush()
        slot = replace(slot, seq=slot.seq + 1, flags=0)
        d.write_slot(slot)
    _remove_others(d, slot)
    stray = allocated(d.file(DATA), slot.nblocks, slot.block_size) & ~meta.present
    for s, c in plane_runs(stray):         # blocks left, replaced or never committed
        data.discard(s * slot.block_size, c * slot.block_size)
    data.flush()
    return slot


def _remove_others(d: Directory, slot: Slot) -> None:
    """Metadata and journals of older (or never committed) states."""
    keep = {HEADER, DATA, meta_name(slot.meta_id)}
    for name in os.listdir(d.path):
        if name not in keep and (name.startswith(("meta.", "journal."))):
            with contextlib.suppress(FileNotFoundError):
                os.remove(d.file(name))
