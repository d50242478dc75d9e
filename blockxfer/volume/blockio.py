"""Block I/O for the volume: coalesced runs, several requests in flight, checksums.

Reads and writes go through page-aligned buffers in pieces of at most
`MAX_REQUEST` bytes, `IN_FLIGHT` at a time (research: 1 MiB requests at queue
depth 8 reach the device's limit; measured through NBD with nbdcopy against
qemu-nbd, interleaved: 4 in flight and 2 large-write buffers gave sequential
reads ~0.45x and writes ~0.6x qemu-nbd's, 8 and 4 give ~1x and ~0.9x). Reads
have their own pool, `READ_IN_FLIGHT` deep: the NBD server pipelines reads from
several connections, and with 8 the device's queue stayed at 7-8 (1 MiB at
depth 8 reads ~1.1 GB/s here, at 16 ~1.35). Every block read is checked
against the checksum its pointer carries.

Small data writes (up to `SMALL_WRITE`) are staged: copied into a staging buffer
that goes to the device when it is full or at `drain()`, as one request per run
of consecutive VBNs it holds, all from one pool thread. A 4 KiB write thus costs
a copy, not a request and a wait for the device. The allocator mostly hands out
consecutive VBNs, but once CPs have freed scattered blocks (random rewrites of a
full disk) nearly every write lands on its own run: a buffer per run then meant
a pool job, a 1 MiB buffer and, with STAGE_BUFFERS in flight, a wait for the
device per 4 KiB write, under the volume lock (~70 µs a write, profiled).
"""

from __future__ import annotations

import mmap
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from blockxfer.checksum import block_checksums, checksum
from blockxfer.device import BlockDevice
from blockxfer.errors import DamagedBlock

MAX_REQUEST = 1 << 20
IN_FLIGHT = 8                  # writes in flight
READ_IN_FLIGHT = 16            # reads in flight, from every reader together
WRITE_BUFFERS = 4              # large writes in flight (each up to 16 MiB from NBD)
SMALL_WRITE = 64 << 10         # writes up to this size are staged
STAGE_BYTES = 1 << 20          # one staging buffer (= one device request)
STAGE_BUFFERS = 8              # staging buffers in flight before a writer waits
READ_POOL = 4                  # read buffers kept per size for concurrent readers, or
READ_POOL_BYTES = 64 << 20     # more while they hold no more than this: an NBD connection
#                                has several 4 MiB reads in flight, and unmapping and
#                                faulting in fresh buffers cost more than the reads' checksums
MAX_POOLED = 32 << 20          # larger ones are unmapped after use


def aligned(size: int) -> mmap.mmap:
    return mmap.mmap(-1, max(size, mmap.PAGESIZE))


def runs_of(vbns: np.ndarray) -> list[tuple[int, int, int]]:
    """Split consecutive VBNs into runs: (position in input, first vbn, count)."""
    if len(vbns) == 0:
        return []
    breaks = np.nonzero(np.diff(vbns.astype(np.int64)) != 1)[0] + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(vbns)]))
    return [(int(s), int(vbns[s]), int(e - s)) for s, e in zip(starts, ends, strict=True)]


class BlockIO:
    def __init__(self, dev: BlockDevice, block_size: int):
        self.dev = dev
        self.bs = block_size
        self.pool = ThreadPoolExecutor(IN_FLIGHT, thread_name_prefix="blockio")
        self.rpool = ThreadPoolExecutor(READ_IN_FLIGHT, thread_name_prefix="blockio-read")
        # data writes in flight per large-write buffer; the buffers are used in turn
        self._pending: list[list[Future[None]]] = [[] for _ in range(WRITE_BUFFERS)]
        self._wbufs: list[mmap.mmap | None] = [None] * WRITE_BUFFERS
        self._turn = 0
        self._rpool: dict[int, list[mmap.mmap]] = {}   # read buffers by size, for readers
        self._rpool_lock = threading.Lock()
        self._stage: mmap.mmap | None = None     # collecting small writes
        self._stage_segs: list[list[int]] = []   # where it goes: [vbn, count] runs
        self._stage_len = 0                      # bytes collected
        self._staged: deque[tuple[Future[None], mmap.mmap]] = deque()   # submitted, in order
        self._stage_free: list[mmap.mmap] = []
        self._stage_error: BaseException | None = None
        # Blocks a read-only open replayed from the intent log but may not write to
        # their VBNs: reads see them here (vbn -> content).
        self.overlay: dict[int, bytes] = {}

    def close(self) -> None:
        try:
            self.drain()
        finally:
            self.pool.shutdown(wait=True)
            self.rpool.shutdown(wait=True)

    def write_buffer(self, size: int) -> memoryview:
        """The next aligned write buffer: the others can be in flight while it fills.
        Waits for the writes that last used the buffer it hands out."""
        self._turn = (self._turn + 1) % len(self._wbufs)
        self._wait(self._turn)
        buf = self._wbufs[self._turn]
        if buf is None or len(buf) < size:
            buf = self._wbufs[self._turn] = aligned(size)
        return memoryview(buf)[:size]

    def take_read_buffer(self, size: int) -> mmap.mmap:
        """An aligned buffer of at least `size` bytes for one reader (thread-safe),
        from a pool by power-of-two size; hand it back with `give_read_buffer`."""
        size = max(mmap.PAGESIZE, 1 << (size - 1).bit_length())
        with self._rpool_lock:
            free = self._rpool.get(size)
            if free:
                return free.pop()
        return aligned(size)

    def give_read_buffer(self, buf: mmap.mmap) -> None:
        if len(buf) <= MAX_POOLED:
            with self._rpool_lock:
                free = self._rpool.setdefault(len(buf), [])
                if len(free) < max(READ_POOL, READ_POOL_BYTES // len(buf)):
                    free.append(buf)

    def _wait(self, turn: int) -> None:
        pending, self._pending[turn] = self._pending[turn], []
        for j in pending:
            j.result()

    def drain(self) -> None:
        """Send the staged writes, then wait for every data write in flight; the
        first failure is raised."""
        self._submit_stage()
        try:
            while self._staged:
                self._retire_staged()
            if self._stage_error is not None:
                e, self._stage_error = self._stage_error, None
                raise e
        finally:
            for turn in range(len(self._pending)):
                self._wait(turn)

    # -- reads ----------------------------------------------------------------------------
    def read_block(self, vbn: int, ck: int) -> bytes:
        buf = aligned(self.bs)
        self.dev.pread(memoryview(buf)[:self.bs], vbn * self.bs)
        raw = bytes(buf[:self.bs])
        if checksum(raw) != ck:
            raise DamagedBlock(f"checksum mismatch in block {vbn}: the volume is damaged; "
                              "run 'blockxfer check'")
        return raw

    def read_many(self, rows: np.ndarray) -> bytes:
        """Blocks for rows (vbn, checksum), in row order, verified."""
        buf = aligned(len(rows) * self.bs)
        self.read_ptrs_into(rows, memoryview(buf))
        return bytes(memoryview(buf)[:len(rows) * self.bs])

    def read_ptrs_into(self, ptrs: np.ndarray, out: memoryview, verify: bool = True,
                       vblock: int | None = None) -> None:
        """Fill `out` (aligned, len = rows * bs) from pointers; holes (vbn 0) become zeros."""
        self.finish_reads(self.submit_reads(ptrs, out, verify, vblock))

    def submit_reads(self, ptrs: np.ndarray, out: memoryview, verify: bool = True,
                     vblock: int | None = None) -> list[Future[None]]:
        """Start the reads for `read_ptrs_into`; zero the holes now. Each request is
        checked against its pointers' checksums in the thread that read it, so the
        hashing spreads over the pool instead of one long GIL hold per chunk.
        `vblock` is the virtual block of the first pointer: a checksum error then
        names the virtual offset an operator asked for, not only the VBN."""
        bs, vbns = self.bs, ptrs[:, 0]
        jobs: list[Future[None]] = []
        per = MAX_REQUEST // bs
        for pos, vbn, count in runs_of(vbns):
            if vbn == 0:
                out[pos * bs:(pos + count) * bs] = bytes(count * bs)
                continue
            for k in range(0, count, per):
                c = min(per, count - k)
                view = out[(pos + k) * bs:(pos + k + c) * bs]
                cks = ptrs[pos + k:pos + k + c, 1] if verify else None
                at = None if vblock is None else vblock + pos + k
                jobs.append(self.rpool.submit(self._read_request, view, vbn + k, cks, at))
        return jobs

    def _read_request(self, view: memoryview, vbn: int, cks: np.ndarray | None,
                      vblock: int | None = None) -> None:
        self.dev.pread(view, vbn * self.bs)
        if self.overlay:
            self._patch(view, vbn)
        if cks is None:
            return
        bad = np.nonzero(block_checksums(view, self.bs) != cks)[0]
        if len(bad):
            first = int(bad[0])
            where = "" if vblock is None else f"at virtual offset {(vblock + first) * self.bs} "
            raise DamagedBlock(f"checksum mismatch {where}in block VBN {vbn + first} "
                              f"({len(bad)} bad blocks in one request): the volume is damaged; "
                              "run 'blockxfer check'")

    def _patch(self, view: memoryview, vbn: int) -> None:
        bs = self.bs
        for k in range(len(view) // bs):
            raw = self.overlay.get(vbn + k)
            if raw is not None:
                view[k * bs:(k + 1) * bs] = raw

    def finish_reads(self, jobs: list[Future[None]]) -> None:
        """Wait for every request of `submit_reads`, then raise the first failure
        (device or checksum): raising at the first would let the caller hand the
        buffer back while later requests still land in it."""
        first: BaseException | None = None
        for j in jobs:
            e = j.exception()
            if e is not None and first is None:
                first = e
        if first is not None:
            raise first

    # -- writes ---------------------------------------------------------------------------
    def write_runs(self, runs: list[tuple[int, int]], data: memoryview,
                   wait: bool = True) -> None:
        """Write `data` (aligned) across VBN runs (start, count) in order. With
        wait=False the writes stay in flight until `drain()`."""
        bs, per, pos = self.bs, MAX_REQUEST // self.bs, 0
        for start, count in runs:
            for k in range(0, count, per):
                c = min(per, count - k)
                view = data[(pos + k) * bs:(pos + k + c) * bs]
                self._pending[self._turn].append(
                    self.pool.submit(self.dev.pwrite, view, (start + k) * bs))
            pos += count
        if wait:
            self.drain()

    def stage_runs(self, runs: list[tuple[int, int]], data: bytes | bytearray | memoryview) -> None:
        """Write `data` (no alignment needed, at most STAGE_BYTES) across VBN runs
        (start, count) through the staging buffer; see the module docstring."""
        bs, pos = self.bs, 0
        for start, count in runs:
            n = count * bs
            self.stage_run(start, count, data[pos:pos + n])
            pos += n

    def stage_run(self, start: int, count: int, data: bytes | bytearray | memoryview) -> None:
        """`stage_runs` of one run; `data` is its `count` blocks (a random 4 KiB
        write calls this directly: no list of runs to build and walk)."""
        n = count * self.bs
        stage, at = self._stage, self._stage_len
        if stage is None or at + n > STAGE_BYTES:
            self._submit_stage()
            stage = self._stage = self._stage_buffer()
            at = 0
        segs = self._stage_segs
        if segs and segs[-1][0] + segs[-1][1] == start:
            segs[-1][1] += count          # continues the last run: one request
        else:
            segs.append([start, count])
        stage[at:at + n] = data
        self._stage_len = at + n

    def _stage_buffer(self) -> mmap.mmap:
        while self._staged and (len(self._staged) >= STAGE_BUFFERS or self._staged[0][0].done()):
            self._retire_staged()
        return self._stage_free.pop() if self._stage_free else aligned(STAGE_BYTES)

    def _retire_staged(self) -> None:
        """Wait for the oldest staged request. A failure is kept for `drain` (the
        CP then fails): raising here would fail a later, unrelated write after its
        blocks were allocated."""
        job, buf = self._staged.popleft()
        self._stage_free.append(buf)
        e = job.exception()
        if e is not None and self._stage_error is None:
            self._stage_error = e

    def _submit_stage(self) -> None:
        if self._stage is None:
            return
        buf, segs = self._stage, self._stage_segs
        self._stage, self._stage_len, self._stage_segs = None, 0, []
        if segs:
            job = self.pool.submit(self._write_segments, memoryview(buf), segs)
            self._staged.append((job, buf))
        else:
            self._stage_free.append(buf)

    def _write_segments(self, buf: memoryview, segs: list[list[int]]) -> None:
        """One staging buffer's runs, in order, from one pool thread."""
        bs, at = self.bs, 0
        for vbn, count in segs:
            self.dev.pwrite(buf[at:at + count * bs], vbn * bs)
            at += count * bs

    def write_many(self, pairs: list[tuple[int, bytes]]) -> None:
        """Write (vbn, block) pairs, coalescing neighbours into large requests."""
        if not pairs:
            return
        pairs.sort(key=lambda p: p[0])
        vbns = np.array([p[0] for p in pairs], dtype=np.uint64)
        buf = aligned(len(pairs) * self.bs)
        view = memoryview(buf)
        for k, (_, raw) in enumerate(pairs):
            view[k * self.bs:k * self.bs + len(raw)] = raw
        runs = [(vbn, count) for _, vbn, count in runs_of(vbns)]
        self.write_runs(runs, view)
