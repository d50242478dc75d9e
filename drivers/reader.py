"""Bulk reads of VBN runs with several requests in flight.

    for start_block, data in read_runs(dev, runs, block_size):
        sink.write_blocks(start_block, data)      # data: len(data) // block_size blocks

`runs` are `(start_block, count)` pairs (any order; adjacent runs are
coalesced). Each run is cut into large aligned requests (1 MiB by default) that
`depth` threads read with `dev.pread` (O_DIRECT when the device was opened
so); chunks come back in completion order, each tagged with its first block.
Memory stays bounded: `depth + 1` page-aligned buffers of `request_size`.
A yielded memoryview is valid only until the next chunk is requested: copy or
consume it before iterating on. Closing the iterator early cancels what is not
yet started and waits for what is in flight.

With an md `geometry` (raid0/10/5) requests follow the array layout: when the
chunk is large (>= 256 KiB) each request is one chunk and requests are issued
round-robin over the members so every member has work at once; with small
chunks each request covers whole stripes, which busies every member by itself.
This module reads; it never writes and never opens devices.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from itertools import islice
from mmap import mmap
from typing import Protocol

from .blockdev import aligned_buffer
from .md import MdGeometry, member_of

MiB = 1 << 20
_WINDOW = 64        # requests per member looked ahead when spreading over md members


class Readable(Protocol):
    def pread(self, buf: memoryview, offset: int) -> None: ...


Check = Callable[[int, memoryview], object]   # (start_block, data) of a request read


def coalesce(runs: Iterable[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """Merge runs that touch (in the order given); drop empty ones."""
    cur: tuple[int, int] | None = None
    for start, count in runs:
        if count <= 0:
            continue
        if cur and cur[0] + cur[1] == start:
            cur = (cur[0], cur[1] + count)
            continue
        if cur:
            yield cur
        cur = (start, count)
    if cur:
        yield cur


def _cut(runs: Iterable[tuple[int, int]], unit: int, limit: int) -> Iterator[tuple[int, int]]:
    """Cut runs at multiples of `unit` blocks into pieces of at most `limit` blocks."""
    for start, count in coalesce(runs):
        end = start + count
        while start < end:
            boundary = (start // unit + 1) * unit
            stop = min(end, boundary, start + limit)
            yield start, stop - start
            start = stop


def plan_requests(runs: Iterable[tuple[int, int]], block_size: int, *,
                  request_size: int = MiB,
                  geometry: MdGeometry | None = None) -> Iterator[tuple[int, int]]:
    """The (start_block, count) requests `read_runs` issues, in issue order."""
    per_req = max(1, request_size // block_size)
    if geometry is None or not geometry.chunk_size or geometry.chunk_size % block_size:
        return _cut(runs, per_req, per_req)
    chunk = geometry.chunk_size // block_size
    if geometry.chunk_size < 256 * 1024 or geometry.level not in ("raid0", "raid10", "raid5"):
        stripe = chunk * geometry.data_disks
        whole = max(1, per_req // stripe) * stripe
        return _cut(runs, whole, whole)
    return _spread(_cut(runs, chunk, chunk), geometry, block_size)


def _spread(pieces: Iterator[tuple[int, int]], g: MdGeometry,
            block_size: int) -> Iterator[tuple[int, int]]:
    """Round-robin over members, looking ahead a bounded window of requests."""
    while True:
        window = list(islice(pieces, _WINDOW * g.raid_disks))
        if not window:
            return
        queues: dict[int, deque[tuple[int, int]]] = {}
        for p in window:
            queues.setdefault(member_of(g, p[0] * block_size), deque()).append(p)
        while queues:
            for m in list(queues):
                yield queues[m].popleft()
                if not queues[m]:
                    del queues[m]


def read_runs(dev: Readable, runs: Iterable[tuple[int, int]], block_size: int, *,
              request_size: int = MiB, depth: int = 4,
              geometry: MdGeometry | None = None, ordered: bool = False,
              check: Check | None = None) -> Iterator[tuple[int, memoryview]]:
    """Yield (start_block, data) for every block of `runs`, in completion order, or
    with `ordered` in issue order (an object-store upload packs chunks in VBN
    order, so that a rerun makes the same packs). `check(start_block, data)` runs
    in the thread that read the request (a send's checksum verification: the
    hashing spreads over the threads); what it raises ends the iteration."""
    requests = plan_requests(runs, block_size, request_size=request_size, geometry=geometry)
    if geometry is not None:
        depth = max(depth, 2 * geometry.raid_disks)
    largest = max(request_size, block_size,
                  max(geometry.stripe_width, geometry.chunk_size) if geometry else 0)
    largest = -(-largest // block_size) * block_size
    free = [aligned_buffer(largest) for _ in range(depth + 1)]
    if ordered:
        yield from _in_order(dev, requests, block_size, free, depth, check)
        return
    pending: dict[Future[None], tuple[int, memoryview, mmap]] = {}
    with ThreadPoolExecutor(depth, thread_name_prefix="blockxfer-read") as pool:
        try:
            _fill(pool, pending, free, requests, dev, block_size, depth, check)
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    start, view, buf = pending.pop(fut)
                    fut.result()
                    yield start, view
                    free.append(buf)
                    _fill(pool, pending, free, requests, dev, block_size, depth, check)
        finally:
            for fut in pending:
                fut.cancel()


def _fill(pool: ThreadPoolExecutor, pending: dict[Future[None], tuple[int, memoryview, mmap]],
          free: list[mmap], requests: Iterator[tuple[int, int]], dev: Readable,
          block_size: int, depth: int, check: Check | None) -> None:
    while len(pending) < depth and free:
        req = next(requests, None)
        if req is None:
            return
        start, count = req
        buf = free.pop()
        view = memoryview(buf)[:count * block_size]
        pending[pool.submit(_read, dev, view, start, block_size, check)] = (start, view, buf)


def _in_order(dev: Readable, requests: Iterator[tuple[int, int]], block_size: int,
              free: list[mmap], depth: int,
              check: Check | None) -> Iterator[tuple[int, memoryview]]:
    """`read_runs` yielding in issue order: the oldest request is waited for."""
    queue: deque[tuple[Future[None], int, memoryview, mmap]] = deque()
    with ThreadPoolExecutor(depth, thread_name_prefix="blockxfer-read") as pool:
        try:
            while True:
                while len(queue) < depth and free:
                    req = next(requests, None)
                    if req is None:
                        break
                    buf = free.pop()
                    view = memoryview(buf)[:req[1] * block_size]
                    queue.append((pool.submit(_read, dev, view, req[0], block_size, check),
                                  req[0], view, buf))
                if not queue:
                    return
                fut, start, view, buf = queue.popleft()
                fut.result()
                yield start, view
                free.append(buf)
        finally:
            for fut, *_ in queue:
                fut.cancel()


def _read(dev: Readable, view: memoryview, start: int, block_size: int,
          check: Check | None) -> None:
    dev.pread(view, start * block_size)
    if check is not None:
        check(start, view)
