"""Change tracking: mark-on-allocate and mark-on-deallocate planes (the patent's
moa/mod), and the blocks allocated or freed since a snapshot."""

from __future__ import annotations

from dataclasses import dataclass

from bitarray import bitarray

from blockxfer.errors import VolumeError

from .objects import empty_plane
from .state import VolumeState


@dataclass
class ChangeTracker:
    """Mark-on-allocate and mark-on-deallocate planes, double-buffered: one pair
    fills while the previous pair is read by a transfer."""

    allocated: bitarray
    freed: bitarray

    def swap(self) -> tuple[bitarray, bitarray]:
        done = (self.allocated, self.freed)
        self.allocated, self.freed = empty_plane(len(done[0])), empty_plane(len(done[1]))
        return done


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
            return self._tracker.swap()

    def allocated_since(self, snapshot: str) -> bitarray:
        """Blocks of the active file system that the snapshot does not have."""
        return self.active.bits & ~self.plane(snapshot)

    def freed_since(self, snapshot: str) -> bitarray:
        """Blocks the snapshot has that the active file system no longer uses."""
        return self.plane(snapshot) & ~self.active.bits
