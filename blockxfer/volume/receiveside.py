"""The receive side of an open volume: the receiver placing an image into it
(receiver.py), committing the foreign root it assembled and continuing from it,
giving back what that root no longer uses, and going back to a received state.
"""

from __future__ import annotations

import time
from dataclasses import replace

from bitarray import bitarray

from blockxfer.errors import BlockxferError, VolumeError

from .allocator import Allocator
from .layout import SnapshotEntry, Superblock
from .local import LocalState
from .receiver import IncomingImage, Receiver, commit_foreign_root
from .superblock import write_superblock

DISCARD_MIN = 1 << 20               # bytes: shorter freed runs are not discarded


class ReceiveSide(Allocator):
    """What an open volume offers its receiver: the receiver itself, and committing
    the foreign root it assembled (then continuing from it)."""

    def receiver(self, image: IncomingImage) -> Receiver:
        """A receiver placing `image` (an incremental on this volume's snapshots)."""
        self._check_usable(write=True)
        return Receiver(self.dev, image, self)

    def reusing(self, entries: list[SnapshotEntry]) -> None:
        """A receive begins to overwrite the blocks of these snapshots, which it
        releases (recorded in the local area): offered to nobody from now on."""
        with self._lock:
            self._reusing |= {e.id for e in entries}

    def adopt_foreign_root(self, sb: Superblock, state: LocalState, generation: int) -> int:
        """Commit a received root on this open volume and continue from it; the
        number of blocks that became free here (returned to the device too).
        `generation`: the root in force when the receive began; one committed here
        since is not silently replaced (its changes would be lost)."""
        with self._lock:
            self._no_record_in_flight()          # a new root starts the log over
            self._check_usable(write=True)
            if self._needs_cp():
                raise VolumeError(f"{self.dev.path} has changes not yet committed; a receive "
                                  "cannot replace them")
            if self.generation != generation:
                raise VolumeError(f"{self.dev.path} was changed here while it received "
                                  f"(CP {self.generation}, the receive began at CP "
                                  f"{generation}); a receive cannot replace those changes")
            self.io.drain()
            old = self.active.bits
            old_used = old | self.pinned()
            try:
                commit_foreign_root(self.dev, sb, self.slot, self.local_area, state)
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
                self._tracker.since = None    # a foreign root is no cut of this volume
            self._last_cp = time.monotonic()
            return self._discard(old_used & ~(self.active.bits | self.pinned()))

    def _discard(self, gone: bitarray) -> int:
        """Blocks no root or snapshot here uses any more (the deallocations a stream
        carried, and what released snapshots held): their runs of DISCARD_MIN bytes
        or more go back to the device, so that a sparse file or a thin device gets
        the space back. Advisory: a device without discard keeps the bytes, and they
        are free here all the same. Shorter runs are left: each discard is a file
        system transaction (about a millisecond on ext4), and thin devices do not
        take pieces smaller than their chunk anyway."""
        bs, count = self.block_size, gone.count()
        least = max(1, DISCARD_MIN // bs)
        pos = self.sb.first_data_vbn
        while count and (s := gone.find(1, pos, self.nblocks)) >= 0:
            e = gone.find(0, s, self.nblocks)
            e = self.nblocks if e < 0 else e
            if e - s >= least:
                try:
                    self.dev.discard(s * bs, (e - s) * bs)
                except (BlockxferError, OSError):
                    return count
            pos = e
        return count

    def revert_to_received(self, name: str) -> bool:
        """Discard what changed here since snapshot `name` was received (local writes,
        local snapshots): its root, which the snapshot's plane keeps intact, is
        written back into both superblock slots, so the volume is again exactly
        what it received and takes the next incremental. False when nothing changed.

        The order survives a kill: the local facts for the old root first (ignored
        while a newer root is in force), then the slot not in force (the newer root
        still wins), then the slot in force (a torn write leaves the other slot)."""
        with self._lock:
            self._no_record_in_flight()          # a new root starts the log over
            self._check_usable(write=True)
            e = self.resolve(name)
            if e.root is None or e.shadow or e.incomplete:
                raise VolumeError(f"snapshot {e.name!r} on {self.dev.path} is not a received "
                                  "state this volume can go back to")
            if self.generation == e.root.generation and not self._needs_cp():
                return False
            self.io.drain()
            state = LocalState(self.local.seq, e.root.generation,
                               incomplete=set(self.local.incomplete),
                               released=set(self.local.released),
                               props=dict(self.local.props))
            sb = replace(self.sb, root=e.root)
            try:
                self.local_area.write(state)
                write_superblock(self.dev, sb, 1 - self.slot)
                write_superblock(self.dev, sb, self.slot)
            except BaseException as err:
                self._failed = f"going back to snapshot {e.name!r} failed ({err})"
                raise
            self.sb = sb
            self._wait_readers()
            self._load_root(sb.root)
            if self._tracker:
                self._tracker.since = None
            self._last_cp = time.monotonic()
            return True
