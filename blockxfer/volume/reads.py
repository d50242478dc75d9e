"""Reading the virtual disk or a snapshot: whole ranges, streamed chunks, extents,
and the checksums the maps keep (a send verifies its blocks against them).

The lock is held only to look pointers up; the device reads run outside it,
counted as readers in flight so that no CP reuses their blocks meanwhile.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from bitarray import bitarray

from blockxfer.errors import BlockxferError, UsageError

from .blockio import aligned
from .state import VolumeState
from .tree import in_plane

PREFETCH = 8                            # iter_read loads map leaves this many chunks ahead
CHECK_WINDOW = 1 << 18                  # map entries gathered per batch by data_checksums


class Reads(VolumeState):
    """Reads of the active file system or of a snapshot."""

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
            tree.trim_cache(self._map_cache_limit())
            self._count_reader(+1)
        try:
            yield ptrs, offset - v0 * self.block_size
        finally:
            self._count_reader(-1)

    def iter_read(self, offset: int, length: int, snapshot: str | None = None,
                  chunk: int = 32 << 20) -> Generator[memoryview, None, None]:
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
                        tree.trim_cache(self._map_cache_limit())   # bounded, however much is read
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

    def data_checksums(self, names: list[str], skip: bitarray | None = None,
                       only: bitarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Every data block the snapshots' maps point at: their VBNs (sorted, unique)
        and the checksums the maps keep for them, gathered from the map leaves in
        bulk (a send verifies the blocks it streams against these). With `skip`, the
        plane of a snapshot holding none of the blocks wanted, the map's subtrees
        that snapshot shares are not read: an incremental reads the changed part of
        the map, not all of it. With `only`, just the VBNs set there."""
        with self._lock:
            trees = [self._snapshot_tree(n) for n in names]
        packed = np.frombuffer(skip.tobytes(), dtype=np.uint8) if skip is not None else None
        wanted = np.frombuffer(only.tobytes(), dtype=np.uint8) if only is not None else None
        rows = [np.zeros((0, 2), dtype=np.uint64)]
        per = CHECK_WINDOW // (self.block_size // 16)
        for tree in trees:
            with self._lock:
                leaves = tree.leaf_pointers(self.io.read_many, packed)
            for k in range(0, len(leaves), per):   # leaves in batched reads, bounded memory
                with self._lock:
                    raw = self.io.read_many(leaves[k:k + per])
                ptrs = np.frombuffer(raw, dtype=np.uint64).reshape(-1, 2)
                ptrs = ptrs[ptrs[:, 0] != 0]
                rows.append(ptrs if wanted is None else ptrs[in_plane(ptrs[:, 0], wanted)])
        both = np.concatenate(rows)
        vbns, first = np.unique(both[:, 0], return_index=True)
        return vbns, both[first, 1]
