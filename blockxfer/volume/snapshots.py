"""Snapshots and pointers: taking, destroying and rolling back to snapshots,
holding them while a send streams their blocks, and named pointers to them."""

from __future__ import annotations

import re
import time
import uuid as uuidlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import numpy as np
from bitarray import bitarray

from blockxfer.errors import AlreadyExists, NotFound, UsageError, VolumeError, VolumeFull

from . import layout
from .allocator import Allocator
from .layout import ObjectRef, SnapshotEntry
from .objects import PlaneObject
from .receiving import refuse_on_replica
from .tree import CowTree

MASTER_POINTER = "master"          # moved by every new master snapshot
NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,254}$")
# A NEW snapshot's name may not hold '-' either: it is the difference operator of
# image expressions, and 'june3-june1' (one name) beside 'june3 - june1' (a
# difference) misleads people. Names that arrive by receive are kept as sent.
SNAPSHOT_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:]{0,254}$")


class Snapshots(Allocator):
    """The catalog's snapshots and pointers, changed one CP at a time."""

    def _check_new_name(self, name: str, *, snapshot: bool = False) -> None:
        if snapshot and NAME_RE.match(name) and not SNAPSHOT_NAME_RE.match(name):
            raise UsageError(f"bad snapshot name {name!r}: '-' is the difference operator of "
                             f"image expressions ('a - b'); use '_' or '.' instead, e.g. "
                             f"{name.replace('-', '_')!r}")
        if not NAME_RE.match(name):
            allowed = ". _ :" if snapshot else ". _ : -"
            raise UsageError(f"bad name {name!r}: use letters, digits and {allowed} "
                             "(up to 255, not starting with a punctuation mark)")
        if any(e.name == name for e in self.catalog.snapshots) or name in self.catalog.pointers:
            raise AlreadyExists(f"a snapshot or pointer named {name!r} already exists on "
                                f"{self.dev.path}")

    def _is_replica(self) -> bool:
        """Is the committed root the one a receive wrote (the top's CP), so that this
        volume still takes incrementals? Any local CP moves past it."""
        newest = max((e.generation for e in self.catalog.snapshots), default=-1)
        return self.local_area.received_root and self.generation == newest

    def is_replica(self) -> bool:
        """Public for schedules: a snapshot taken here would end its incrementals."""
        return self._is_replica()

    def create_snapshot(self, name: str, *, shadow: bool = False, master: bool = False) -> None:
        """Freeze the active file system: a CP whose catalog lists the new snapshot and
        whose active plane (with the CP's own blocks) is copied into its plane."""
        with self._lock:
            self._check_usable(write=True)
            self._check_new_name(name, snapshot=True)
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
            if master and not any(e.name == MASTER_POINTER for e in self.catalog.snapshots):
                self.catalog.pointers[MASTER_POINTER] = entry.id   # in the same CP: atomic
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
            e = next((s for s in self.snapshots() if s.name == name), None)
            if e is None:
                hint = " (it is a pointer: use 'pointer --delete')" \
                    if name in self.catalog.pointers else ""
                raise NotFound(f"no snapshot named {name!r} on {self.dev.path}{hint}")
            if self._held.get(e.id):
                raise VolumeError(f"snapshot {name!r} is being sent; destroy it when the send "
                                  "has finished")
            tags = self.held_by(e)
            if tags:
                raise VolumeError(f"snapshot {name!r} is held by {', '.join(tags)}; release "
                                  f"it first ('blockxfer release TAG VOLUME@{name}')")
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
                self._tracker.since = None    # blocks of older snapshots came back
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
            gone = [e.name for e in entries if e.id in self._reusing]
            if gone:
                raise VolumeError(f"snapshot {gone[0]!r} on {self.dev.path} is being released "
                                  "by a receive in progress (its source dropped it) and its "
                                  "blocks are being reused; it can no longer be sent")
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
