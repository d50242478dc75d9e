"""The write-anywhere volume: virtual disk, consistency points, snapshots.

Nothing reachable from the committed root is ever overwritten. Data goes to
free blocks at once; a consistency point (CP) moves every changed metadata block
to a free block (phase 1, repeated until allocation stops changing the planes),
writes them bottom-up with checksums (phase 2), syncs, then writes the
superblock into the other slot and syncs again. A block freed since the last CP
stays busy until the next CP commits, so the last committed state is always
intact on disk.

Free blocks = not (active | pinned | busy-since-last-CP), where `pinned` is the
union of the regular (non-shadow) snapshot planes. Allocating a block clears its
bit in every shadow plane.
"""

from __future__ import annotations

import re
import threading
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from bitarray import bitarray

from blockxfer.checksum import block_checksums
from blockxfer.device import BlockDevice
from blockxfer.errors import (
    AlreadyExists,
    BlockxferError,
    NotFound,
    UsageError,
    VolumeError,
    VolumeFull,
)

from . import layout
from .blockio import SMALL_WRITE, BlockIO, aligned, runs_of
from .layout import Catalog, ObjectRef, RootRecord, SnapshotEntry, Superblock
from .local import LocalArea, LocalState
from .objects import BlobObject, PlaneObject, empty_plane
from .receiver import IncomingImage, Receiver
from .receiving import refuse_on_replica
from .superblock import read_superblock_slot, reserved_blocks, write_superblock
from .tree import CowTree

CP_INTERVAL = 10.0                      # seconds between CPs while writes are pending
MAX_DIRTY_NODES = 16384                 # a CP also starts when this many map nodes are dirty
CHECK_WINDOW = 1 << 18                  # map entries gathered per batch by data_checksums
PREFETCH = 8                            # iter_read loads map leaves this many chunks ahead
NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,254}$")


@dataclass
class ChangeTracker:
    """Mark-on-allocate and mark-on-deallocate planes, double-buffered (the patent's
    moa/mod): one pair fills while the previous pair is read by a transfer."""

    allocated: bitarray
    freed: bitarray

    def swap(self) -> tuple[bitarray, bitarray]:
        done = (self.allocated, self.freed)
        self.allocated, self.freed = empty_plane(len(done[0])), empty_plane(len(done[1]))
        return done


class Volume:
    """A volume open on a block device. Methods are serialized by one lock, except
    that `read` holds it only to look up the pointers: its device reads run outside
    it, so several threads can read at once (see `_readers`)."""

    concurrent_reads = True

    def __init__(self, dev: BlockDevice, sb: Superblock, *, writable: bool, slot: int = 0):
        self.dev, self.sb, self.writable, self.slot = dev, sb, writable, slot
        self.block_size, self.nblocks = sb.block_size, sb.nblocks
        self.virtual_blocks = sb.virtual_blocks
        self.io = BlockIO(dev, sb.block_size)
        self._lock = threading.RLock()
        self._held: dict[int, int] = {}      # snapshot id -> sends in flight using it
        # Reads in flight outside the lock hold pointers to blocks that must not be
        # reused under them. A freed block becomes free only when a CP commits, and a
        # CP (holding the lock, so no read can start) waits for this count to reach 0.
        self._readers = 0
        self._readers_cv = threading.Condition(threading.Lock())
        self._failed: str | None = None
        self._load_root(sb.root)
        self._last_cp = time.monotonic()
        self._tracker: ChangeTracker | None = None
        self._timer: threading.Thread | None = None
        self._stop = threading.Event()

    def _load_root(self, root: RootRecord) -> None:
        bs = self.block_size
        self.lba = CowTree(root.lba, bs, self.io.read_block, self.virtual_blocks)
        self.active = PlaneObject(root.plane, self.nblocks, bs, self.io.read_block,
                                  self.io.read_many)
        self.catalog_obj = BlobObject(root.catalog, bs, self.io.read_block, self.io.read_many)
        raw = self.catalog_obj.load()
        self.catalog = Catalog.unpack(raw) if raw else Catalog()
        self._catalog_dirty = False
        self._fill_pending = False
        for e in self.catalog.snapshots:      # the CP that took it was the last one
            if e.root is None and e.generation == root.generation:
                e.root = root                 # persisted with the next CP's catalog
                self._fill_pending = True
        self.local_area = LocalArea(self.dev, self.block_size, self.nblocks)
        self.local = self.local_area.read(root.generation)
        for e in self.catalog.snapshots:
            if e.guid in self.local.incomplete:
                e.flags |= layout.INCOMPLETE
        # released here (the source dropped them): hidden now, freed when this copy
        # first rewrites its catalog, since their plane objects are then unreachable
        self._released = [e for e in self.catalog.snapshots if e.guid in self.local.released]
        self.catalog.snapshots = [e for e in self.catalog.snapshots
                                  if e.guid not in self.local.released]
        self._shadow: dict[int, PlaneObject] | None = None
        self._pinned: bitarray | None = None
        self._busy: bitarray | None = None
        self._free = 0
        self._cursor = self.sb.first_data_vbn
        self._new: tuple[SnapshotEntry, PlaneObject] | None = None
        self._snap_trees: dict[int, CowTree] = {}
        self._claimed: bitarray | None = None     # blocks a receive is placing

    # -- creation and opening -------------------------------------------------------------
    @classmethod
    def create(cls, dev: BlockDevice, *, block_size: int = 4096,
               virtual_size: int | None = None) -> Volume:
        layout.check_block_size(block_size)
        nblocks = dev.size // block_size
        first = reserved_blocks(nblocks, block_size)
        if nblocks < first + 64:
            raise VolumeError(f"{dev.path} is too small for a volume: {dev.size} bytes, "
                              f"need at least {(first + 64) * block_size}")
        usable = nblocks - first
        vblocks = usable * 9 // 10 if virtual_size is None else virtual_size // block_size
        if vblocks <= 0 or vblocks > usable:
            raise VolumeError(f"virtual size must be between one block and {usable * block_size} "
                              f"bytes on {dev.path}")
        zero = aligned((first) * block_size)          # wipe both slots and the local area
        dev.pwrite(memoryview(zero)[:first * block_size], 0)
        root = RootRecord(0, time.time_ns(), ObjectRef(), ObjectRef(), ObjectRef())
        sb = Superblock(block_size, nblocks, vblocks, uuidlib.uuid4().bytes, first, 1, root)
        vol = cls(dev, sb, writable=True, slot=1)
        vol._catalog_dirty = True
        vol.commit()
        return vol

    @classmethod
    def open(cls, dev: BlockDevice, *, writable: bool = True) -> Volume:
        sb, slot = read_superblock_slot(dev)
        return cls(dev, sb, writable=writable, slot=slot)

    # -- properties -----------------------------------------------------------------------
    @property
    def virtual_size(self) -> int:
        return self.virtual_blocks * self.block_size

    @property
    def generation(self) -> int:
        return self.sb.generation

    @property
    def uuid(self) -> str:
        return self.sb.uuid_str

    def _check_usable(self, write: bool = False) -> None:
        if self._failed:
            raise VolumeError(f"{self.dev.path}: {self._failed}; reopen the volume "
                              "(the last committed state is intact)")
        if write and not self.writable:
            raise VolumeError(f"{self.dev.path} is open read-only")

    # -- allocation -----------------------------------------------------------------------
    def _shadow_planes(self) -> dict[int, PlaneObject]:
        if self._shadow is None:
            self._shadow = {e.id: self._plane_object(e) for e in self.catalog.snapshots
                            if e.shadow}
        return self._shadow

    def _plane_object(self, e: SnapshotEntry) -> PlaneObject:
        return PlaneObject(e.plane, self.nblocks, self.block_size, self.io.read_block,
                           self.io.read_many)

    def pinned(self) -> bitarray:
        """Union of the regular snapshot planes: blocks no allocation may take."""
        if self._pinned is None:
            pinned = empty_plane(len(self.active.bits))
            for e in self.catalog.snapshots:
                if not e.shadow:
                    pinned |= self.plane(e.name)
            self._pinned = pinned
        return self._pinned

    def _busy_plane(self) -> bitarray:
        if self._busy is None:
            busy = self.active.bits | self.pinned()
            if self._claimed is not None:
                busy |= self._claimed
            busy[:self.sb.first_data_vbn] = 1
            busy[self.nblocks:] = 1
            self._busy = busy
            self._free = len(busy) - busy.count()
            self._shadow_planes()
        return self._busy

    def free_blocks(self) -> int:
        self._busy_plane()
        return self._free

    def _reserve(self) -> int:
        """Blocks kept back so the next CP can always place its metadata."""
        return 64 + 3 * self.lba.dirty_nodes * self.lba.levels + 2 * self.active.data_blocks

    def _alloc_runs(self, count: int, reserve: int = 0) -> list[tuple[int, int]]:
        busy = self._busy_plane()
        if self._free - count < reserve:
            raise VolumeFull(f"{self.dev.path}: volume full: {count} blocks wanted, "
                             f"{max(0, self._free - reserve)} free; "
                             "destroy a snapshot or trim data")
        runs: list[tuple[int, int]] = []
        pos, left, wrapped = self._cursor, count, False
        while left:
            s = busy.find(0, pos)
            if s < 0:
                if wrapped:
                    raise VolumeError("allocator found no free block although the count said so")
                pos, wrapped = self.sb.first_data_vbn, True
                continue
            limit = min(s + left, len(busy))   # only as far as needed: free runs can be TiBs
            e = busy.find(1, s, limit)
            e = limit if e < 0 else e
            take = min(e - s, left)
            self._mark_allocated(s, s + take)
            runs.append((s, take))
            left -= take
            pos = s + take
        self._cursor = pos
        return runs

    def _mark_allocated(self, start: int, stop: int) -> None:
        assert self._busy is not None
        self._busy[start:stop] = 1
        self._free -= stop - start
        self.active.mark_range(start, stop, True)
        for plane in self._shadow_planes().values():
            if plane.bits.count(1, start, stop):
                plane.mark_range(start, stop, False)
                self._catalog_dirty = True
        if self._tracker:
            self._tracker.allocated[start:stop] = 1

    def _free_vbns(self, vbns: np.ndarray) -> None:
        self._busy_plane()    # from the committed state first: freed blocks stay busy till the CP
        if len(vbns) <= 16:               # a small write: numpy's per-call cost dominates
            for v in vbns.tolist():
                if v:
                    self._free_run(v, 1)
            return
        vbns = np.sort(vbns[vbns != 0])
        for _, start, count in runs_of(vbns):
            self._free_run(start, count)

    def _free_run(self, start: int, count: int) -> None:
        self.active.mark_range(start, start + count, False)
        if self._tracker:
            self._tracker.freed[start:start + count] = 1

    def _freed_pending(self) -> bool:
        """Are blocks waiting for the next CP to become free?"""
        busy = self._busy_plane()
        return busy.count() > (self.active.bits | self.pinned()).count() + \
            self.sb.first_data_vbn + (len(busy) - self.nblocks)

    def _free_plane_object(self, e: SnapshotEntry) -> None:
        """Free the blocks holding a snapshot's plane (its data blocks are freed by
        the planes no longer pinning them)."""
        nodes, data = self._plane_object(e).tree.walk()
        self._busy_plane()
        self._free_vbns(np.array(nodes + data[:, 0].tolist(), dtype=np.uint64))

    def _alloc_meta(self, count: int) -> list[int]:
        return [v for s, c in self._alloc_runs(count) for v in range(s, s + c)]

    def _free_one(self, vbn: int) -> None:
        self._free_vbns(np.array([vbn], dtype=np.uint64))

    # -- consistency points ---------------------------------------------------------------
    def _needs_cp(self) -> bool:
        return (self._catalog_dirty or self._new is not None or self.lba.dirty
                or self.active.is_dirty)

    def commit(self) -> None:
        """Take a consistency point: everything written so far becomes durable."""
        with self._lock:
            self._check_usable()
            if not self._needs_cp():
                return
            try:
                self._commit()
            except BaseException as e:
                self._failed = f"a consistency point failed ({e})"
                raise

    def _commit(self) -> None:
        self.io.drain()
        if self._fill_pending:
            self._catalog_dirty, self._fill_pending = True, False
        if self._catalog_dirty and self._released:
            for e in self._released:
                self._free_plane_object(e)
            self._released = []
        alloc, free = self._alloc_meta, self._free_one
        while True:                                   # phase 1: allocate to a fixpoint
            changes = self.lba.allocate(alloc, free)
            for p in self._shadow_planes().values():
                if p.is_dirty:
                    changes += p.allocate(alloc, free)
            if self._new:
                self._new[1].track(self.active.bits)
                changes += self._new[1].allocate(alloc, free)
            if self._catalog_dirty:
                changes += self.catalog_obj.allocate(len(self.catalog.pack()), alloc, free)
            changes += self.active.allocate(alloc, free)
            if changes == 0:
                break
        if self._new:                                 # the snapshot keeps the final copy
            self._new[1]._bits = self.active.bits.copy()
        out: list[tuple[int, bytes]] = []             # phase 2: write bottom-up
        lba_ref = self.lba.write(out)
        by_id = {e.id: e for e in self.catalog.snapshots}
        for sid, p in self._shadow_planes().items():
            if p.is_dirty:
                by_id[sid].plane = p.write(out)
                by_id[sid].blocks = p.bits.count()
        if self._new:
            entry, plane = self._new
            entry.plane, entry.blocks = plane.write(out), plane.bits.count()
        plane_ref = self.active.write(out)
        cat_ref = self.catalog_obj.ref
        if self._catalog_dirty:
            cat_ref = self.catalog_obj.write(self.catalog.pack(), out)
        self.io.write_many(out)
        self.dev.flush()
        root = RootRecord(self.generation + 1, time.time_ns(), lba_ref, plane_ref, cat_ref)
        sb = replace(self.sb, root=root)
        if self.local.incomplete or self.local.released:   # carry what only this copy knows
            self.local.root_generation = root.generation
            self.local_area.write(self.local)
        write_superblock(self.dev, sb, 1 - self.slot)
        self.sb, self.slot = sb, 1 - self.slot
        self._catalog_dirty = False
        self._wait_readers()          # they may hold pointers to blocks freed since the last CP
        self._busy = None                             # freed blocks become free now
        self._last_cp = time.monotonic()
        self.lba.trim_cache(MAX_DIRTY_NODES)

    def _maybe_commit(self) -> None:
        if (self.lba.dirty_nodes >= MAX_DIRTY_NODES
                or time.monotonic() - self._last_cp >= CP_INTERVAL):
            self.commit()

    def start_cp_timer(self, interval: float = CP_INTERVAL) -> None:
        """Commit every `interval` seconds while writes are pending (for servers)."""
        def run() -> None:
            while not self._stop.wait(interval):
                with self._lock:
                    if self._failed is None and self._needs_cp():
                        self.commit()
        self._timer = threading.Thread(target=run, name="cp-timer", daemon=True)
        self._timer.start()

    def close(self) -> None:
        self._stop.set()
        if self._timer:
            self._timer.join()
        with self._lock:
            try:
                if self.writable and self._failed is None:
                    self.commit()
            finally:
                self._wait_readers()
                self.io.close()
                self.dev.close()

    def __enter__(self) -> Volume:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the virtual disk -----------------------------------------------------------------
    def _span(self, offset: int, length: int) -> tuple[int, int]:
        if offset < 0 or length < 0 or offset + length > self.virtual_size:
            raise UsageError(f"range {offset}+{length} is outside the virtual disk "
                             f"({self.virtual_size} bytes)")
        bs = self.block_size
        return offset // bs, -(-(offset + length) // bs)

    def read(self, offset: int, length: int, snapshot: str | None = None) -> bytes:
        """Bytes of the virtual disk (or of a snapshot); unmapped blocks read as zeros.
        Thread-safe; the device reads run outside the volume lock."""
        view, release = self.read_leased(offset, length, snapshot)
        try:
            return bytes(view)
        finally:
            release()

    def read_leased(self, offset: int, length: int,
                    snapshot: str | None = None) -> tuple[memoryview, Callable[[], None]]:
        """`read` without the final copy: a view of a pooled buffer, and the function
        that hands the buffer back (call it once the view is no longer used). The NBD
        server sends the view as it is: the copy held the GIL ~3 ms per 16 MiB, and
        a fresh buffer per read measured slower still (page faults and unmapping)."""
        with self._reading(offset, length, snapshot) as (ptrs, skip):
            buf = self.io.take_read_buffer(len(ptrs) * self.block_size)
            try:
                view = memoryview(buf)[:len(ptrs) * self.block_size]
                self.io.read_ptrs_into(ptrs, view, vblock=offset // self.block_size)
            except BaseException:
                self.io.give_read_buffer(buf)
                raise
            return view[skip:skip + length], lambda: self.io.give_read_buffer(buf)

    @contextmanager
    def _reading(self, offset: int, length: int,
                 snapshot: str | None) -> Iterator[tuple[np.ndarray, int]]:
        """The pointers of a range and the offset of `offset` in their first block,
        looked up under the lock; the caller reads them outside it, counted as a
        reader in flight (a CP waits for readers before it frees blocks)."""
        with self._lock:
            self._check_usable()
            v0, v1 = self._span(offset, length)
            tree = self.lba if snapshot is None else self._snapshot_tree(snapshot)
            if v1 > v0:
                self.io.drain()              # data writes still in flight land first
            ptrs = tree.get(v0, v1 - v0)     # a copy: later writes do not change it
            tree.trim_cache(MAX_DIRTY_NODES)
            self._count_reader(+1)
        try:
            yield ptrs, offset - v0 * self.block_size
        finally:
            self._count_reader(-1)

    def _wait_readers(self) -> None:
        """Wait for the reads running outside the lock (the caller holds it)."""
        with self._readers_cv:
            self._readers_cv.wait_for(lambda: self._readers == 0)

    def iter_read(self, offset: int, length: int, snapshot: str | None = None,
                  chunk: int = 32 << 20) -> Iterator[memoryview]:
        """Stream a block-aligned range: the next chunk's reads are in flight while the
        caller consumes this one (each view is valid until the next iteration).

        The lock is held only to look up each chunk's pointers; the chunk in flight is
        counted as a reader, so no CP reuses its blocks. A chunk is finished (and no
        longer counted) before the next lookup waits for the lock: a CP holds the lock
        while it waits for readers, so waiting for the lock while counted would
        deadlock. Close the iterator if you stop early: a CP waits for it."""
        bs = self.block_size
        if offset % bs or length % bs:
            raise UsageError(f"streamed reads take whole blocks of {bs} bytes")
        with self._lock:
            self._span(offset, length)
            tree = self.lba if snapshot is None else self._snapshot_tree(snapshot)
        bufs = [aligned(chunk), aligned(chunk)]
        pending: tuple[memoryview, list[Any]] | None = None
        try:
            for i, start in enumerate(range(offset, offset + length, chunk)):
                n = min(chunk, offset + length - start)
                prev, pending = pending, None      # finished once, even when it fails
                done = self._finish_chunk(prev)
                with self._lock:
                    self.io.drain()                    # data writes in flight land first
                    if (start - offset) % (PREFETCH * chunk) == 0:
                        tree.trim_cache(MAX_DIRTY_NODES)   # bounded, however much is read
                        tree.prefetch(start // bs, min(PREFETCH * chunk,
                                                       offset + length - start) // bs,
                                      self.io.read_many)
                    ptrs = tree.get(start // bs, n // bs)
                    self._count_reader(+1)
                view = memoryview(bufs[i % 2])[:n]
                pending = (view, self.io.submit_reads(ptrs, view, vblock=start // bs))
                if done is not None:
                    yield done
            prev, pending = pending, None
            done = self._finish_chunk(prev)
            if done is not None:
                yield done
        finally:
            if pending is not None:                    # stopped early: let it land
                self._finish_chunk(pending, check=False)

    def _finish_chunk(self, pending: tuple[memoryview, list[Any]] | None,
                      check: bool = True) -> memoryview | None:
        if pending is None:
            return None
        try:
            self.io.finish_reads(pending[1])
        except BlockxferError:
            if check:
                raise
        finally:
            self._count_reader(-1)
        return pending[0]

    def _count_reader(self, delta: int) -> None:
        with self._readers_cv:
            self._readers += delta
            if delta < 0:
                self._readers_cv.notify_all()

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write anywhere: the blocks go to free VBNs; the map points at them."""
        with self._lock:
            self._check_usable(write=True)
            data = memoryview(data).cast("B")
            v0, v1 = self._span(offset, len(data))
            if v1 == v0:
                return
            bs = self.block_size
            head, tail = offset - v0 * bs, v1 * bs - (offset + len(data))
            first = self.read(v0 * bs, bs) if head else b""
            last = self.read((v1 - 1) * bs, bs) if tail else b""
            n = (v1 - v0) * bs
            # a small write is staged (copied on) by the I/O layer: any buffer will do
            view = memoryview(bytearray(n)) if n <= SMALL_WRITE else self.io.write_buffer(n)
            view[:len(first)] = first
            if last:
                view[-bs:] = last
            view[head:head + len(data)] = data
            self._place(v0, view)
            self._maybe_commit()

    def _place(self, v0: int, view: memoryview) -> None:
        count = len(view) // self.block_size
        try:
            runs = self._alloc_runs(count, reserve=self._reserve())
        except VolumeFull:
            if not self._freed_pending():
                raise
            self.commit()                  # blocks freed since the last CP become free
            runs = self._alloc_runs(count, reserve=self._reserve())
        if len(view) <= SMALL_WRITE:
            self.io.stage_runs(runs, view)          # drained before any read or CP
        else:
            self.io.write_runs(runs, view, wait=False)
        ptrs = np.empty((count, 2), dtype=np.uint64)
        at = 0
        for s, n in runs:
            ptrs[at:at + n, 0] = np.arange(s, s + n, dtype=np.uint64)
            at += n
        ptrs[:, 1] = block_checksums(view, self.block_size)
        old = self.lba.set(v0, ptrs)
        self._free_vbns(old[:, 0])

    def trim(self, offset: int, length: int) -> None:
        """Unmap whole blocks in the range; partial blocks at the edges get zeros."""
        with self._lock:
            self._check_usable(write=True)
            v0, v1 = self._span(offset, length)
            bs = self.block_size
            first, last = -(-offset // bs), (offset + length) // bs
            if first >= last:
                self.write(offset, bytes(length))
                return
            if offset < first * bs:
                self.write(offset, bytes(first * bs - offset))
            if offset + length > last * bs:
                self.write(last * bs, bytes(offset + length - last * bs))
            old = self.lba.set(first, np.zeros((last - first, 2), dtype=np.uint64))
            self._free_vbns(old[:, 0])
            self._maybe_commit()

    write_zeroes = trim

    def extents(self, offset: int, length: int,
                snapshot: str | None = None) -> list[tuple[int, int, bool]]:
        """(offset, length, mapped) runs covering the range, clipped to it."""
        with self._lock:
            v0, v1 = self._span(offset, length)
            if v1 == v0:
                return []
            tree = self.lba if snapshot is None else self._snapshot_tree(snapshot)
            mapped = tree.get(v0, v1 - v0)[:, 0] != 0
            edges = np.nonzero(np.diff(mapped.astype(np.int8)))[0] + 1
            out, bs, start = [], self.block_size, 0
            for end in [*edges.tolist(), len(mapped)]:
                lo = max(offset, (v0 + start) * bs)
                hi = min(offset + length, (v0 + end) * bs)
                out.append((lo, hi - lo, bool(mapped[start])))
                start = end
            return out

    # -- snapshots and pointers -----------------------------------------------------------
    def snapshots(self) -> list[SnapshotEntry]:
        return list(self.catalog.snapshots)

    def snapshot_names(self) -> list[str]:
        return [e.name for e in self.catalog.snapshots]

    @property
    def pointers(self) -> dict[str, str]:
        names = {e.id: e.name for e in self.catalog.snapshots}
        return {p: names.get(sid, "?") for p, sid in self.catalog.pointers.items()}

    def resolve(self, name: str) -> SnapshotEntry:
        """A snapshot by name or through a pointer."""
        sid = self.catalog.pointers.get(name)
        for e in self.catalog.snapshots:
            if e.name == name or e.id == sid:
                return e
        raise NotFound(f"no snapshot or pointer named {name!r} on {self.dev.path}; "
                       "see 'blockxfer snapshots'")

    def plane(self, name: str) -> bitarray:
        """The plane of a snapshot, the caller's to keep or change (a regular
        snapshot's is loaded fresh; a shadow's, which the volume keeps, is copied)."""
        e = self.resolve(name)
        if e.shadow:
            return self._shadow_planes()[e.id].bits.copy()
        if self._new and self._new[0].id == e.id:
            return self._new[1].bits.copy()
        return self._plane_object(e).bits

    def _snapshot_tree(self, name: str) -> CowTree:
        e = self.resolve(name)
        if e.shadow:
            raise VolumeError(f"snapshot {e.name!r} is a shadow snapshot: its blocks may have "
                              "been reused, so it can serve only as a base, not be read")
        if e.incomplete:
            raise VolumeError(f"snapshot {e.name!r} is incomplete here: not all of its blocks "
                              "were received; it can be neither read nor used as a base")
        if e.root is None:
            raise VolumeError(f"snapshot {e.name!r} has no root yet")
        tree = self._snap_trees.get(e.id)
        if tree is None:
            tree = CowTree(e.root.lba, self.block_size, self.io.read_block, self.virtual_blocks)
            self._snap_trees[e.id] = tree
        return tree

    def data_checksums(self, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Every data block the snapshots' maps point at: their VBNs (sorted, unique)
        and the checksums the maps keep for them, gathered from the map leaves in
        bulk (a send verifies the blocks it streams against these)."""
        with self._lock:
            trees = [self._snapshot_tree(n) for n in names]
        rows = [np.zeros((0, 2), dtype=np.uint64)]
        for tree in trees:
            for start in range(0, tree.length, CHECK_WINDOW):
                count = min(CHECK_WINDOW, tree.length - start)
                with self._lock:       # leaves in batched reads, not one 4 KiB read each
                    tree.prefetch(start, count, self.io.read_many)
                    ptrs = tree.get(start, count)
                    tree.trim_cache(MAX_DIRTY_NODES)
                rows.append(ptrs[ptrs[:, 0] != 0])
        both = np.concatenate(rows)
        vbns, first = np.unique(both[:, 0], return_index=True)
        return vbns, both[first, 1]

    def _check_new_name(self, name: str) -> None:
        if not NAME_RE.match(name):
            raise UsageError(f"bad name {name!r}: use letters, digits and . _ : - "
                             "(up to 255, not starting with a punctuation mark)")
        if any(e.name == name for e in self.catalog.snapshots) or name in self.catalog.pointers:
            raise AlreadyExists(f"a snapshot or pointer named {name!r} already exists on "
                                f"{self.dev.path}")

    def _is_replica(self) -> bool:
        """Is the committed root the one a receive wrote (the top's CP), so that this
        volume still takes incrementals? Any local CP moves past it."""
        newest = max((e.generation for e in self.catalog.snapshots), default=-1)
        return self.local_area.received_root and self.generation == newest

    def create_snapshot(self, name: str, *, shadow: bool = False, master: bool = False) -> None:
        """Freeze the active file system: a CP whose catalog lists the new snapshot and
        whose active plane (with the CP's own blocks) is copied into its plane."""
        with self._lock:
            self._check_usable(write=True)
            self._check_new_name(name)
            needed = 2 * self.active.data_blocks + self._reserve()
            if self.free_blocks() < needed:
                raise VolumeFull(f"{self.dev.path}: volume full: no room for the plane of "
                                 f"snapshot {name!r}; destroy a snapshot or trim data")
            flags = (layout.SHADOW if shadow else 0) | (layout.MASTER if master else 0)
            entry = SnapshotEntry(self.sb.next_id, name, uuidlib.uuid4().bytes, time.time_ns(),
                                  self.generation + 1, flags, 0, ObjectRef(), None)
            plane = PlaneObject(ObjectRef(), self.nblocks, self.block_size,
                                self.io.read_block, self.io.read_many)   # phase 1 fills it
            self.sb = replace(self.sb, next_id=self.sb.next_id + 1)
            self.catalog.snapshots.append(entry)
            self._catalog_dirty = True
            self._new = (entry, plane)
            self.commit()
            self._new = None
            if shadow:
                self._shadow_planes()[entry.id] = plane
            elif self._pinned is not None:
                self._pinned |= plane.bits
            entry.root = self.sb.root       # recorded by the next CP (see _load_root)
            self._catalog_dirty = True
            self.commit()

    def destroy_snapshot(self, name: str) -> None:
        with self._lock:
            self._check_usable(write=True)
            e = next((s for s in self.catalog.snapshots if s.name == name), None)
            if e is None:
                hint = " (it is a pointer: use 'pointer --delete')" \
                    if name in self.catalog.pointers else ""
                raise NotFound(f"no snapshot named {name!r} on {self.dev.path}{hint}")
            if self._held.get(e.id):
                raise VolumeError(f"snapshot {name!r} is being sent; destroy it when the send "
                                  "has finished")
            users = sorted(p for p, sid in self.catalog.pointers.items() if sid == e.id)
            if users:
                raise VolumeError(f"snapshot {name!r} is the target of pointer {users[0]!r}; "
                                  "move or delete the pointer first")
            refuse_on_replica(self.dev.path, self._is_replica(),
                              f"destroying {name!r}", "destroy it on the source: the next "
                              "incremental releases it here")
            self._free_plane_object(e)
            self.catalog.snapshots.remove(e)
            if self._shadow is not None:
                self._shadow.pop(e.id, None)
            self._snap_trees.pop(e.id, None)
            self._pinned = None
            self._catalog_dirty = True
            self.commit()

    def rollback(self, name: str) -> None:
        """Discard the active state back to a snapshot: the virtual disk reads as the
        snapshot again, blocks written since become free at the CP this commits.
        Every snapshot stays (later ones too)."""
        with self._lock:
            self._check_usable(write=True)
            self._snapshot_tree(name)        # refuses a shadow, incomplete or rootless one
            e = self.resolve(name)
            assert e.root is not None
            self.io.drain()
            self._busy_plane()               # the committed state stays busy until the CP
            new = self._reachable_with(CowTree(e.root.lba, self.block_size,
                                               self.io.read_block, self.virtual_blocks))
            old = self.active.bits
            changed = old ^ new
            bpb = self.active.bits_per_block
            self.active.dirty.update({i // bpb for i in changed.search(1)})
            if self._tracker:
                self._tracker.allocated |= new & ~old
                self._tracker.freed |= old & ~new
            old[:] = new
            self.lba = CowTree(e.root.lba, self.block_size, self.io.read_block,
                               self.virtual_blocks)
            self._catalog_dirty = True
            self.commit()

    def _reachable_with(self, lba: CowTree) -> bitarray:
        """The active plane a root with this LBA map would have: its map, the current
        active plane object and catalog, and every snapshot's plane object."""
        nodes, data = lba.walk()
        meta = nodes + self.catalog_obj.blocks()
        a_nodes, a_data = self.active.tree.walk()
        meta += a_nodes + a_data[:, 0].tolist()
        for s in self.catalog.snapshots + self._released:
            s_nodes, s_data = self._plane_object(s).tree.walk()
            meta += s_nodes + s_data[:, 0].tolist()
        used = np.zeros(len(self.active.bits), dtype=np.uint8)
        used[np.asarray(meta, dtype=np.int64)] = 1
        used[data[:, 0].astype(np.int64)] = 1
        used[0] = 0                          # VBN 0 in a pointer means "unmapped"
        bits = bitarray(endian="little")
        bits.pack(used.tobytes())
        return bits

    @contextmanager
    def holding(self, entries: list[SnapshotEntry]) -> Iterator[None]:
        """Keep these snapshots (and so their blocks) from being destroyed meanwhile:
        a send streams their blocks without holding the volume lock."""
        with self._lock:
            for e in entries:
                self._held[e.id] = self._held.get(e.id, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                for e in entries:
                    self._held[e.id] -= 1

    def set_pointer(self, name: str, snapshot: str) -> None:
        with self._lock:
            self._check_usable(write=True)
            target = self.resolve(snapshot)
            if name not in self.catalog.pointers:
                self._check_new_name(name)
            refuse_on_replica(self.dev.path, self._is_replica(),
                              f"setting pointer {name!r}", "set it on the source: the next "
                              "incremental brings it here")
            self.catalog.pointers[name] = target.id
            self._catalog_dirty = True
            self.commit()

    def delete_pointer(self, name: str) -> None:
        with self._lock:
            self._check_usable(write=True)
            if name not in self.catalog.pointers:
                raise NotFound(f"no pointer named {name!r} on {self.dev.path}")
            refuse_on_replica(self.dev.path, self._is_replica(),
                              f"deleting pointer {name!r}", "delete it on the source: the "
                              "next incremental removes it here")
            del self.catalog.pointers[name]
            self._catalog_dirty = True
            self.commit()

    # -- change tracking (mark-on-allocate / mark-on-deallocate) ---------------------------
    def track_changes(self) -> None:
        """Start recording allocated and freed blocks (see `changes`)."""
        with self._lock:
            if self._tracker is None:
                n = len(self.active.bits)
                self._tracker = ChangeTracker(empty_plane(n), empty_plane(n))

    def changes(self) -> tuple[bitarray, bitarray]:
        """(allocated, freed) since the last call or `track_changes`; swaps the buffers."""
        with self._lock:
            if self._tracker is None:
                raise VolumeError("change tracking is not on; call track_changes() first")
            return self._tracker.swap()

    def allocated_since(self, snapshot: str) -> bitarray:
        """Blocks of the active file system that the snapshot does not have."""
        return self.active.bits & ~self.plane(snapshot)

    def freed_since(self, snapshot: str) -> bitarray:
        """Blocks the snapshot has that the active file system no longer uses."""
        return self.plane(snapshot) & ~self.active.bits

    # -- the receive side -------------------------------------------------------------------
    def receiver(self, image: IncomingImage) -> Receiver:
        """A receiver placing `image` (an incremental on this volume's snapshots)."""
        self._check_usable(write=True)
        return Receiver(self.dev, image, self)

    def claim(self, start: int, stop: int) -> None:
        """Keep blocks a receive is placing from any local allocation until the next
        CP (its commit replaces the whole state; an abandoned receive frees them)."""
        with self._lock:
            if self._claimed is None:
                self._claimed = empty_plane(len(self.active.bits))
            self._claimed[start:stop] = 1
            busy = self._busy_plane()
            self._free -= stop - start - busy.count(1, start, stop)
            busy[start:stop] = 1

    def release_claims(self) -> None:
        """An abandoned receive: its blocks become free again at the next CP."""
        with self._lock:
            self._claimed = None

    def adopt_foreign_root(self, sb: Superblock, state: LocalState) -> None:
        """Commit a received root on this open volume and continue from it."""
        with self._lock:
            self._check_usable(write=True)
            if self._needs_cp():
                raise VolumeError(f"{self.dev.path} has changes not yet committed; a receive "
                                  "cannot replace them")
            self.io.drain()
            old = self.active.bits
            try:
                self.commit_foreign_root(self.dev, sb, self.slot, self.local_area, state)
            except BaseException as e:
                self._failed = f"committing a received root failed ({e})"
                raise
            self.sb, self.slot = sb, 1 - self.slot
            self._wait_readers()          # they may hold pointers into the old state
            self._load_root(sb.root)
            if self._tracker:
                new = self.active.bits
                self._tracker.allocated |= new & ~old
                self._tracker.freed |= old & ~new
            self._last_cp = time.monotonic()

    @staticmethod
    def commit_foreign_root(dev: BlockDevice, sb: Superblock, slot: int, area: LocalArea,
                            state: LocalState) -> None:
        """What only this copy knows first, then the superblock naming the foreign
        root into the slot not in force: the last write of a receive."""
        area.write(state)
        write_superblock(dev, sb, 1 - slot)

    # -- reporting ------------------------------------------------------------------------
    def info(self) -> dict[str, object]:
        with self._lock:
            used = self.active.bits.count()
            return {
                "path": self.dev.path, "uuid": self.uuid, "block_size": self.block_size,
                "blocks": self.nblocks, "virtual_size": self.virtual_size,
                "generation": self.generation, "used_blocks": used,
                "free_blocks": self.free_blocks(),
                "snapshots": len(self.catalog.snapshots), "pointers": self.pointers,
                "committed": self.sb.root.timestamp / 1e9,
            }
