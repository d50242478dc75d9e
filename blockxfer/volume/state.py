"""The state every part of an open volume shares: the committed root loaded into
memory, snapshot and plane lookups, and the count of reads running outside the lock.

The volume's behaviour lives in focused parts that build on this class
(allocator.py, reads.py, writes.py, snapshots.py, tracking.py, the receive side in
receiver.py and receiveside.py) and is composed, with consistency points, into
`Volume` (volume.py).
"""

from __future__ import annotations

import json
import threading
import time
from typing import TYPE_CHECKING

from bitarray import bitarray

from blockxfer.device import BlockDevice
from blockxfer.errors import NotFound, UsageError, VolumeError

from . import layout
from .blockio import BlockIO
from .intentlog import IntentLog
from .layout import Catalog, RootRecord, SnapshotEntry, Superblock
from .local import LocalArea
from .objects import BlobObject, PlaneObject, Stored
from .superblock import local_end
from .tree import CowTree

if TYPE_CHECKING:
    from .tracking import ChangeTracker


class VolumeState:
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
        # A sync writes its intent log record outside the lock (syncing.py): one at
        # a time (_log_lock, taken before _lock), and a CP waits until none is in
        # flight (it starts the log over).
        self._log_lock = threading.Lock()
        self._log_writing = False
        self._log_idle = threading.Condition(self._lock)
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
        start = local_end(self.nblocks, bs)     # the log region ends at the first data VBN
        self.log = IntentLog(self.dev, bs, start, self.sb.first_data_vbn - start)
        self.log.reset(self.sb.uuid, root)      # records of an older or foreign root: stale
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
        self._spare_busy: bitarray | None = None    # the last CP's, rebuilt in place
        self._free = 0
        self._cursor = self.sb.first_data_vbn
        self._new: tuple[SnapshotEntry, PlaneObject] | None = None
        self._snap_trees: dict[int, CowTree] = {}
        self._claimed: bitarray | None = None     # blocks a receive is placing
        self.claims_offered: bytes | None = None  # stream id of an offered resume's claims
        # Snapshots a receive in progress releases and has begun to overwrite (their
        # release is recorded in the local area): still in the catalog in force, so
        # still pinned, but offered to nobody (listings, sends, holds) any more.
        self._reusing: set[int] = set()

    @property
    def virtual_size(self) -> int:
        return self.virtual_blocks * self.block_size

    @property
    def generation(self) -> int:
        return self.sb.generation

    @property
    def uuid(self) -> str:
        return self.sb.uuid_str

    def _no_record_in_flight(self) -> None:
        """Wait (holding the lock) until no intent log record is being written
        outside it: before anything that starts the log over (a CP, a new root)."""
        self._log_idle.wait_for(lambda: not self._log_writing)

    def _check_usable(self, write: bool = False) -> None:
        if self._failed:
            raise VolumeError(f"{self.dev.path}: {self._failed}; reopen the volume "
                              "(the last committed state is intact)")
        if write and not self.writable:
            raise VolumeError(f"{self.dev.path} is open read-only")

    def _needs_cp(self) -> bool:
        return (self._catalog_dirty or self._new is not None or self.lba.dirty
                or self.active.is_dirty)

    def snapshots(self) -> list[SnapshotEntry]:
        return [e for e in self.catalog.snapshots if e.id not in self._reusing]

    def snapshot_names(self) -> list[str]:
        return [e.name for e in self.snapshots()]

    @property
    def pointers(self) -> dict[str, str]:
        names = {e.id: e.name for e in self.catalog.snapshots}
        return {p: names.get(sid, "?") for p, sid in self.catalog.pointers.items()}

    def resolve(self, name: str) -> SnapshotEntry:
        """A snapshot by name or through a pointer."""
        sid = self.catalog.pointers.get(name)
        for e in self.snapshots():
            if e.name == name or e.id == sid:
                return e
        raise NotFound(f"no snapshot or pointer named {name!r} on {self.dev.path}; "
                       "see 'blockxfer snapshots'")

    def _plane_object(self, e: SnapshotEntry) -> PlaneObject:
        return PlaneObject(e.plane, self.nblocks, self.block_size, self.io.read_block,
                           self.io.read_many)

    def _shadow_planes(self) -> dict[int, PlaneObject]:
        if self._shadow is None:
            self._shadow = {e.id: self._plane_object(e) for e in self.catalog.snapshots
                            if e.shadow}
        return self._shadow

    def plane(self, name: str) -> bitarray:
        """The plane of a snapshot, the caller's to keep or change (a regular
        snapshot's is loaded fresh; a shadow's, which the volume keeps, is copied)."""
        e = self.resolve(name)
        if e.shadow:
            return self._shadow_planes()[e.id].bits.copy()
        if self._new and self._new[0].id == e.id:
            return self._new[1].bits.copy()
        return self._plane_object(e).bits

    def stored_plane(self, name: str) -> Stored | None:
        """A committed snapshot's plane as its stored data blocks (see merge_stored),
        without building the whole plane; None for a plane kept only in memory."""
        e = self.resolve(name)
        if e.shadow or (self._new and self._new[0].id == e.id):
            return None
        return self._plane_object(e).stored()

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

    def held_by(self, e: SnapshotEntry) -> list[str]:
        """The tags holding snapshot `e` (see properties.py)."""
        raw = self.local.props.get("holds")
        return list(json.loads(raw).get(e.guid.hex(), [])) if raw else []

    def _span(self, offset: int, length: int) -> tuple[int, int]:
        if offset < 0 or length < 0 or offset + length > self.virtual_size:
            raise UsageError(f"range {offset}+{length} is outside the virtual disk "
                             f"({self.virtual_size} bytes)")
        bs = self.block_size
        return offset // bs, -(-(offset + length) // bs)

    def _wait_readers(self) -> None:
        """Wait for the reads running outside the lock (the caller holds it)."""
        with self._readers_cv:
            self._readers_cv.wait_for(lambda: self._readers == 0)

    def _count_reader(self, delta: int) -> None:
        with self._readers_cv:
            self._readers += delta
            if delta < 0:
                self._readers_cv.notify_all()

    # -- provided by the consistency-point part (volume.py) ---------------------------------
    def commit(self) -> None:
        raise NotImplementedError

    def _maybe_commit(self) -> None:
        raise NotImplementedError

    def _map_cache_limit(self) -> int:
        """Map nodes a tree keeps cached (a CP also starts at this many dirty)."""
        raise NotImplementedError
