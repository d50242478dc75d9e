"""Writing the virtual disk: write anywhere (data to free blocks, the map points at
them), and trim (unmap whole blocks).

A block written with nothing but zeros is unmapped instead of stored (it reads
as zeros all the same): writing a disk image with empty space allocates only
its data. Every map change is noted in the intent log, so that `sync` can make
it durable without a CP (intentlog.py).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from blockxfer.checksum import block_checksums, checksum
from blockxfer.errors import VolumeFull

from .allocator import Allocator
from .blockio import SMALL_WRITE, STAGE_BYTES
from .reads import Reads

_COMPARE_BLOCKS = 64        # up to this many blocks, zero blocks are found by comparison


@functools.cache
def _zeros(size: int) -> bytes:
    return bytes(size)


@functools.cache
def _zero_checksum(size: int) -> int:
    return checksum(bytes(size))


def _holds_data(raw: bytes, cks: np.ndarray, bs: int) -> np.ndarray:
    """Which blocks of `raw` are not all zeros: those whose checksum is not a zero
    block's, and those that only share it (compared)."""
    has = cks != _zero_checksum(bs)
    if has.all():
        return has
    for k in np.nonzero(~has)[0].tolist():
        has[k] = raw[k * bs:(k + 1) * bs] != _zeros(bs)
    return has


def _run_vbns(runs: list[tuple[int, int]]) -> np.ndarray:
    """The VBNs of allocated runs (start, count), in order."""
    if len(runs) == 1:
        return np.arange(runs[0][0], runs[0][0] + runs[0][1], dtype=np.uint64)
    return np.concatenate([np.arange(s, s + n, dtype=np.uint64) for s, n in runs])


class Writes(Allocator, Reads):
    """Writes and trims of the active file system."""

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write anywhere: the blocks go to free VBNs; the map points at them."""
        with self._lock:
            self._check_usable(write=True)
            data = memoryview(data).cast("B")
            bs = self.block_size
            if (len(data) == bs <= SMALL_WRITE and not offset % bs
                    and 0 <= offset < self.virtual_blocks * bs):
                if data != _zeros(bs):      # a random 4 KiB write: no arrays, no runs
                    self._place_one(offset // bs, data)
                else:
                    self._unmap(offset // bs, 1)
                self._maybe_commit()
                return
            v0, v1 = self._span(offset, len(data))
            if v1 == v0:
                return
            head, tail = offset - v0 * bs, v1 * bs - (offset + len(data))
            first = self.read(v0 * bs, bs) if head else b""
            last = self.read((v1 - 1) * bs, bs) if tail else b""
            n = (v1 - v0) * bs
            if n <= SMALL_WRITE and not head and not tail:
                view = data        # staged and logged by copying: the caller's buffer will do
            else:
                # a small write is staged (copied on) by the I/O layer: any buffer will do
                view = memoryview(bytearray(n)) if n <= SMALL_WRITE else self.io.write_buffer(n)
                view[:len(first)] = first
                if last:
                    view[-bs:] = last
                view[head:head + len(data)] = data
            self._place_sparse(v0, view)
            self._maybe_commit()

    def write_parts(self, offset: int, parts: Sequence[bytes | bytearray | memoryview]) -> None:
        """`write` of the parts one after another (the NBD server's merged requests):
        a large aligned one is copied once, into the aligned write buffer, instead
        of being joined into one buffer first (a second pass over up to 16 MiB)."""
        total = sum(len(p) for p in parts)
        bs = self.block_size
        if offset % bs or total % bs or total <= SMALL_WRITE:
            self.write(offset, b"".join(parts))
            return
        with self._lock:
            self._check_usable(write=True)
            v0, _ = self._span(offset, total)
            view, at = self.io.write_buffer(total), 0
            for part in parts:
                raw = memoryview(part).cast("B")
                view[at:at + len(raw)] = raw
                at += len(raw)
            self._place_sparse(v0, view)
            self._maybe_commit()

    def write_blocks(self, offsets: Sequence[int],
                     datas: Sequence[bytes | bytearray | memoryview]) -> None:
        """`write(offsets[k], datas[k])` for each k in turn, in one call: the NBD
        server's queued random writes. When every one is a whole block at a block
        boundary and no two hit the same block, they are placed together: one
        allocation, one staging copy, checksums and the map update over arrays, one
        intent log call (a Python step per block only where the map and the log
        entries need one). Anything else is written one after another."""
        with self._lock:
            self._check_usable(write=True)
            if len(offsets) != len(datas):
                raise ValueError(f"{len(offsets)} offsets for {len(datas)} buffers")
            if not offsets:
                return
            bs = self.block_size
            vblocks = [o // bs for o in offsets]
            if (bs > SMALL_WRITE or any(o % bs for o in offsets)
                    or any(len(d) != bs for d in datas)
                    or min(offsets) < 0 or max(offsets) > self.virtual_size - bs
                    or len(set(vblocks)) != len(vblocks)):
                for o, d in zip(offsets, datas, strict=True):
                    self.write(o, d)
                return
            per = STAGE_BYTES // bs             # the runs fit in one staging buffer
            for at in range(0, len(vblocks), per):
                self._place_blocks(vblocks[at:at + per], b"".join(datas[at:at + per]))
            self._maybe_commit()

    def _place_blocks(self, vblocks: list[int], raw: bytes) -> None:
        """Place distinct scattered blocks: block k of `raw` is virtual block
        vblocks[k]; all-zero ones are unmapped."""
        bs = self.block_size
        cks = block_checksums(raw, bs)
        has = _holds_data(raw, cks, bs)
        if not has.all():
            for k in np.nonzero(~has)[0].tolist():
                self._unmap(vblocks[k], 1)
            keep = np.nonzero(has)[0]
            if not len(keep):
                return
            vblocks = [vblocks[k] for k in keep.tolist()]
            raw = np.frombuffer(raw, dtype=np.uint8).reshape(-1, bs)[keep].tobytes()
            cks = cks[keep]
        runs = self._alloc_data(len(vblocks))
        self.io.stage_runs(runs, raw)
        ptrs = np.empty((len(vblocks), 2), dtype=np.uint64)
        ptrs[:, 0] = _run_vbns(runs)
        ptrs[:, 1] = cks
        old = self.lba.set_scattered(np.array(vblocks, dtype=np.int64), ptrs)[:, 0]
        freed = old[old != 0].tolist()
        if freed:
            self._free_scattered(freed)
        if self.log.enabled:
            self.log.note_blocks(vblocks, ptrs, raw)

    def _alloc_data(self, count: int) -> list[tuple[int, int]]:
        """Free blocks for data, committing once when only a CP can free enough."""
        try:
            return self._alloc_runs(count, reserve=self._reserve())
        except VolumeFull:
            if not self._freed_pending():
                raise
            self.commit()                  # blocks freed since the last CP become free
            return self._alloc_runs(count, reserve=self._reserve())

    def _place_one(self, vblock: int, view: memoryview) -> None:
        """`_place` of one block."""
        try:
            vbn = self._alloc_one()
        except VolumeFull:
            vbn = self._alloc_data(1)[0][0]
        self.io.stage_run(vbn, 1, view)        # drained before any read or CP
        ck = checksum(view)
        old = self.lba.set_one(vblock, vbn, ck)
        if old:
            self._free_run(old, 1)        # the busy plane exists: _alloc_one built it
        self.log.note_one(vblock, vbn, ck, view)   # copies it: the view is reused

    def _place_sparse(self, v0: int, view: memoryview) -> None:
        """Place the blocks that hold data; unmap the all-zero ones."""
        bs = self.block_size
        count = len(view) // bs
        if count <= _COMPARE_BLOCKS:       # memcmp per block: numpy's any() costs ~10 µs a call
            zero = _zeros(bs)
            listed = [view[k * bs:(k + 1) * bs] != zero for k in range(count)]
            if all(listed):
                self._place(v0, view)
                return
            has = np.array(listed)
            cks = None
        else:     # the checksums _place needs anyway find the zero blocks: no extra pass
            cks = block_checksums(view, bs)
            has = cks != checksum(_zeros(bs))
            for k in np.nonzero(~has)[0].tolist():       # a zero block's checksum: compare
                has[k] = view[k * bs:(k + 1) * bs] != _zeros(bs)
            if has.all():
                self._place(v0, view, cks)
                return
        edges = np.nonzero(np.diff(has.astype(np.int8)))[0] + 1
        start = 0
        for end in [*edges.tolist(), count]:
            if has[start]:
                self._place(v0 + start, view[start * bs:end * bs],
                            None if cks is None else cks[start:end])
            else:
                self._unmap(v0 + start, end - start)
            start = end

    def _unmap(self, v0: int, count: int) -> None:
        if not self.lba.get(v0, count)[:, 0].any():
            return                          # a hole already: nothing to change or log
        old = self.lba.set(v0, np.zeros((count, 2), dtype=np.uint64))
        self._free_vbns(old[:, 0])
        self.log.note_unmap(v0, count)

    def _place(self, v0: int, view: memoryview, cks: np.ndarray | None = None) -> None:
        """Write `view` to free blocks and map them from `v0`; `cks`: the blocks'
        checksums when the caller has them."""
        count = len(view) // self.block_size
        runs = self._alloc_data(count)
        small = len(view) <= SMALL_WRITE
        if small:
            self.io.stage_runs(runs, view)          # drained before any read or CP
        else:
            self.io.write_runs(runs, view, wait=False)
        if count == 1:                # a random 4 KiB write: no per-run numpy steps
            ptrs = np.array([(runs[0][0], checksum(view))], dtype=np.uint64)
        else:
            ptrs = np.empty((count, 2), dtype=np.uint64)
            ptrs[:, 0] = _run_vbns(runs)
            ptrs[:, 1] = block_checksums(view, self.block_size) if cks is None else cks
        old = self.lba.set(v0, ptrs)
        self._free_vbns(old[:, 0])
        if self.log.enabled:          # small ones inline (a copy: the view may be reused)
            self.log.note(v0, ptrs, bytes(view) if small else None)

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
            self._unmap(first, last - first)
            self._maybe_commit()

    write_zeroes = trim
