"""The allocator: which blocks are free, and handing them out in runs.

Free blocks = not (active | pinned | busy-since-last-CP | claimed), where
`pinned` is the union of the regular (non-shadow) snapshot planes and `claimed`
the blocks a receive into this open volume is placing. The busy plane is built
from the committed state before anything is freed, so a block freed since the
last CP stays busy until the next CP commits. Allocating a block clears its bit
in every shadow plane.
"""

from __future__ import annotations

import numpy as np
from bitarray import bitarray

from blockxfer.errors import StreamError, VolumeError, VolumeFull

from .blockio import runs_of
from .layout import SnapshotEntry
from .objects import empty_plane
from .state import VolumeState


class Allocator(VolumeState):
    """Free-space accounting and allocation over the volume's planes."""

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
            busy, self._spare_busy = self._spare_busy, None
            if busy is not None and len(busy) == len(self.active.bits):
                busy[:] = self.active.bits     # in place: a new plane is 32 MiB of fresh
                busy |= self.pinned()          # pages on 1 TiB, ~17 ms of faults a CP
            else:
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

    def _alloc_one(self) -> int:
        """One block (a random 4 KiB write): what `_alloc_runs(1)` does, without
        its lists; the rare cases (full, wrapping around) go through it."""
        busy = self._busy_plane()
        s = busy.find(0, self._cursor)
        if s < 0 or self._free <= self._reserve():
            return self._alloc_runs(1, reserve=self._reserve())[0][0]
        busy[s] = 1
        self._free -= 1
        self.active.mark_one(s, True)
        self._mark_elsewhere(s, s + 1)
        self._cursor = s + 1
        return s

    def _mark_allocated(self, start: int, stop: int) -> None:
        assert self._busy is not None
        self._busy[start:stop] = 1
        self._free -= stop - start
        self.active.mark_range(start, stop, True)
        self._mark_elsewhere(start, stop)

    def _mark_elsewhere(self, start: int, stop: int) -> None:
        """Allocated blocks leave every shadow plane and enter the change tracker."""
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

    def _free_scattered(self, vbns: list[int]) -> None:
        """`_free_vbns` for distinct, nonzero, scattered VBNs (the blocks a batch of
        random writes replaced): one plane call, not one per run."""
        self._busy_plane()
        self.active.mark_scattered(vbns, False)
        if self._tracker:
            self._tracker.freed[vbns] = 1

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

    def busy_now(self) -> bitarray:
        """A copy of the blocks no allocation may take now (a receive's reference)."""
        with self._lock:
            return self._busy_plane().copy()

    def claim(self, start: int, stop: int, before: bitarray) -> None:
        """Keep blocks a receive is placing from any local allocation until the next
        CP (its commit replaces the whole state; an abandoned receive frees them).
        `before`: what was busy here when the receive began (it checked those
        blocks against the snapshots it keeps); a block busy now that was not then
        was allocated here meanwhile, or claimed by another receive, and is
        refused."""
        with self._lock:
            busy = self._busy_plane()
            taken = busy[start:stop] & ~before[start:stop]
            if taken.any():
                raise StreamError(f"{self.dev.path}: block {start + taken.find(1)} was "
                                  "allocated here after the receive began (the volume was "
                                  "written meanwhile, or another receive places it); the "
                                  "target is unchanged: receive again")
            self._claim(start, stop)

    def claim_placed(self, placed: bitarray, stream_id: bytes) -> None:
        """Claim the blocks an interrupted receive placed before (resuming it): they
        were free in this committed state then; one allocated here since holds
        other data now, and the resume is refused. Claims kept for this very
        stream since its cut (`offer_claims`) are its own."""
        with self._lock:
            if self.claims_offered == stream_id:
                self._claimed, self.claims_offered = None, None
            taken = placed & (self.active.bits | self._claimed_plane())
            if taken.any():
                raise StreamError(f"{self.dev.path}: block {taken.find(1)}, which the "
                                  "interrupted receive placed, was allocated here since; "
                                  "send the stream again without resuming")
            busy = self._busy_plane()
            self._free -= (placed & ~busy).count()
            busy |= placed
            claimed = self._claimed_plane()
            claimed |= placed

    def offer_claims(self, stream_id: bytes) -> None:
        """An interrupted receive of `stream_id` is offered for resume: its claims
        stay (no local write takes its blocks) until it resumes or they are released."""
        with self._lock:
            self.claims_offered = stream_id

    def _claimed_plane(self) -> bitarray:
        if self._claimed is None:
            self._claimed = empty_plane(len(self.active.bits))
        return self._claimed

    def _claim(self, start: int, stop: int) -> None:
        self._claimed_plane()[start:stop] = 1
        busy = self._busy_plane()
        self._free -= stop - start - busy.count(1, start, stop)
        busy[start:stop] = 1

    def release_claims(self) -> None:
        """An abandoned receive: its blocks become free again at the next CP."""
        with self._lock:
            self._claimed, self.claims_offered = None, None
