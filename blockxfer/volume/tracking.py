"""Change tracking: mark-on-allocate and mark-on-deallocate planes (the patent's
moa/mod), and the blocks allocated or freed since a snapshot.

A mirror asks for the changes between two of its snapshots without subtracting
planes: `snapshot_changes` takes the new snapshot and swaps the double buffers
exactly at its CP, so the buffer handed out holds every block allocated and freed
since the previous cut, and the other one starts filling at once. It does not
read or store anything: the buffers live in memory only (the patent's "need not
be stored"); after a restart a caller falls back to the plane difference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from bitarray import bitarray

from blockxfer.errors import VolumeError

from .objects import empty_plane
from .state import VolumeState


@dataclass
class ChangeTracker:
    """Mark-on-allocate and mark-on-deallocate planes, double-buffered: one pair
    fills while the previous pair is read by a transfer. `since` names the
    snapshot at whose CP the filling pair started (None: mid-way, not a cut)."""

    allocated: bitarray
    freed: bitarray
    since: str | None = None

    def swap(self) -> tuple[bitarray, bitarray]:
        done = (self.allocated, self.freed)
        self.allocated, self.freed = empty_plane(len(done[0])), empty_plane(len(done[1]))
        return done


@dataclass(frozen=True)
class Changes:
    """What changed between two snapshots, from the buffers: the blocks of the top
    that the base lacks (the image), and the blocks of the base that the top no
    longer uses (the deallocations)."""

    base: str
    top: str
    image: bitarray
    freed: bitarray


class Tracking(VolumeState):
    """What changed: since the last call (double-buffered planes) or since a snapshot."""

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
            self._tracker.since = None
            return self._tracker.swap()

    def snapshot_changes(self, name: str) -> Changes | None:
        """Take snapshot `name` and cut the buffers at its CP: the changes since the
        previous cut (a snapshot), or None when the buffers did not start at one
        (tracking was off or just started: tracking starts now, from `name`).

        Why the sets are exact without a plane subtraction: while the previous cut
        `base` exists it pins its blocks, so no block of `base` is allocated again
        before `top`; the allocated buffer is disjoint from `base`, and the top's
        blocks it holds are exactly `top - base`. A block of `base` gone from `top`
        was freed in between (marked); one allocated and freed in between is in both
        buffers. The CP that records the snapshot's root runs after the snapshot's
        own CP: what it allocates or frees belongs to the next pair."""
        with self._lock:
            self.track_changes()
            assert self._tracker is not None
            base = self._tracker.since
            self.create_snapshot(name)
            allocated, freed = self._tracker.swap()
            top = self.plane(name)
            active = self.active.bits
            self._tracker.allocated |= active & ~top
            self._tracker.freed |= top & ~active
            self._tracker.since = name
            if base is None or not any(e.name == base for e in self.snapshots()):
                return None
            return Changes(base, name, allocated & top, freed & ~top & ~allocated)

    def forget_cut(self) -> None:
        """The buffers can no longer be trusted to start at a snapshot (a rollback or a
        failed transfer): the next `snapshot_changes` returns None."""
        with self._lock:
            if self._tracker is not None:
                self._tracker.since = None

    def changed_checksums(self, name: str, image: bitarray) -> tuple[np.ndarray, np.ndarray]:
        """The checksums snapshot `name`'s map keeps for the data blocks in `image`
        (sorted VBNs, checksums), reading only the map nodes `image` holds: a block
        written since the base sits under map nodes rewritten since (copy on write
        copies the whole path), so the changed part of the map is found level by
        level without walking the rest (a send verifies blocks against these)."""
        with self._lock:
            e = self.resolve(name)
            self._snapshot_tree(name)                 # refuses a shadow or incomplete one
            assert e.root is not None
            levels = e.root.lba.levels or self._snapshot_tree(name).levels
            rows = np.array([[e.root.lba.vbn, e.root.lba.checksum]], dtype=np.uint64)
            packed = np.frombuffer(image.tobytes(), dtype=np.uint8)
            for _ in range(levels):
                rows = rows[(rows[:, 0] != 0) & _member(packed, rows[:, 0])]
                if not len(rows):
                    break
                rows = np.concatenate([
                    np.frombuffer(self.io.read_many(rows[k:k + 4096]), dtype=np.uint64)
                    .reshape(-1, 2) for k in range(0, len(rows), 4096)])
            rows = rows[(rows[:, 0] != 0) & _member(packed, rows[:, 0])]
            vbns, first = np.unique(rows[:, 0], return_index=True)
            return vbns, rows[first, 1]

    def allocated_since(self, snapshot: str) -> bitarray:
        """Blocks of the active file system that the snapshot does not have."""
        return self.active.bits & ~self.plane(snapshot)

    def freed_since(self, snapshot: str) -> bitarray:
        """Blocks the snapshot has that the active file system no longer uses."""
        return self.plane(snapshot) & ~self.active.bits

    # -- provided by the snapshots part (snapshots.py) -------------------------------------
    def create_snapshot(self, name: str, *, shadow: bool = False, master: bool = False) -> None:
        raise NotImplementedError


def _member(packed: np.ndarray, vbns: np.ndarray) -> np.ndarray:
    """Which VBNs are set in a little-endian plane given as its bytes."""
    byte = (vbns >> np.uint64(3)).astype(np.int64)
    ok = byte < len(packed)
    out = np.zeros(len(vbns), dtype=bool)
    bits = vbns[ok] & np.uint64(7)
    out[ok] = (packed[byte[ok]] >> bits.astype(np.uint8)) & 1 == 1
    return out
