"""The write-anywhere volume: virtual disk, consistency points, snapshots.

Nothing reachable from the committed root is ever overwritten. Data goes to
free blocks at once; a consistency point (CP) moves every changed metadata block
to a free block (phase 1, repeated until allocation stops changing the planes),
writes them bottom-up with checksums (phase 2), syncs, then writes the
superblock into the other slot and syncs again. A block freed since the last CP
stays busy until the next CP commits, so the last committed state is always
intact on disk.

`Volume` composes the focused parts (state.py, allocator.py, reads.py,
writes.py, syncing.py, snapshots.py, tracking.py, and the receive side in
receiveside.py); this module keeps what ties them together: creating and opening
(which replays the intent log), the CP, closing.
"""

from __future__ import annotations

import threading
import time
import uuid as uuidlib
from dataclasses import replace

from blockxfer.device import BlockDevice
from blockxfer.errors import VolumeError

from . import layout
from .blockio import aligned
from .layout import ObjectRef, RootRecord, Superblock
from .properties import Properties
from .receiveside import ReceiveSide
from .snapshots import Snapshots
from .superblock import read_superblock_slot, reserved_blocks, write_superblock
from .syncing import Syncing
from .tracking import Tracking

CP_INTERVAL = 10.0                      # seconds between CPs while writes are pending
MAX_DIRTY_NODES = 16384                 # a CP also starts when this many map nodes are dirty


class Volume(Syncing, Snapshots, ReceiveSide, Tracking, Properties):
    """A volume open on a block device (see VolumeState for the locking)."""

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
        vol = cls(dev, sb, writable=writable, slot=slot)
        try:
            vol._replay_log()          # acknowledged writes since the committed root
        except BaseException:
            vol.io.close()
            raise
        return vol

    def commit(self) -> None:
        """Take a consistency point: everything written so far becomes durable."""
        with self._lock:
            self._no_record_in_flight()          # the CP starts the log over
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
        self.log.reset(sb.uuid, root)                 # every record so far is obsolete
        self._catalog_dirty = False
        self._wait_readers()          # they may hold pointers to blocks freed since the last CP
        self._busy, self._spare_busy = None, self._busy   # freed blocks become free now
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

    def _map_cache_limit(self) -> int:
        return MAX_DIRTY_NODES          # read at call time: tests lower it
