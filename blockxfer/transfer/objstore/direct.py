"""Upload straight from a volume opened here: no image stream in between.

A send to a pipe encodes every block into records and the upload decodes them
again; from a local volume the upload reads the image's blocks itself, with
several large reads in flight, and hands them to the chunker in ascending VBN
order: the blocks, the deallocations and the header a send would have streamed
(the same plan, the same checks of every data block against the maps), so the
packs, manifest and catalog entry are those of an upload of that stream.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, ExitStack
from mmap import mmap

from blockxfer.stream.send import BlockCheck, SendPlan, plan_send
from blockxfer.volume import Volume
from blockxfer.volume.blockio import aligned

from .packer import PACK_BYTES
from .store import Store
from .upload import Add, UploadResult, check_retain, upload_blocks

REQUEST = 4 << 20                      # bytes per device read
DEPTH = 4                              # reads in flight


def upload_volume(store: Store, volume: str, vol: Volume, expression: str, *,
                  lock: AbstractContextManager[object] | None = None,
                  progress: Callable[[int], None] | None = None,
                  pack_bytes: int = PACK_BYTES,
                  retain_until: float | None = None) -> UploadResult:
    """Store the image `expression` of `vol` as a snapshot of `volume`, as
    `upload_stream` of its send would. The plan is made under `lock` (a service's
    volume lock); the image's snapshots are held against destroy while it reads."""
    check_retain(store, retain_until)
    with ExitStack() as held:
        with lock if lock is not None else contextlib.nullcontext():
            plan = plan_send(vol, expression)
            held.enter_context(vol.holding(plan.tops))

        def feed(add: Add, c: int) -> list[tuple[int, int]]:
            bs = plan.block_size
            for vbn, data in ordered_reads(vol.dev.pread, plan, _unit(bs, c), DEPTH):
                add(vbn, len(data) // bs, data)
                if progress:
                    progress(len(data))
            return plan.dealloc
        return upload_blocks(store, volume, plan.header, feed, pack_bytes=pack_bytes,
                             retain_until=retain_until)


def _unit(block_size: int, c: int) -> int:
    """Blocks per read: whole chunks of `c` blocks, about REQUEST bytes."""
    return max(1, REQUEST // block_size // c) * c


Pread = Callable[[memoryview, int], None]


def _cut(runs: list[tuple[int, int]], unit: int) -> Iterator[tuple[int, int]]:
    """The runs cut at the multiples of `unit` blocks."""
    for start, count in runs:
        end = start + count
        while start < end:
            stop = min(end, (start // unit + 1) * unit)
            yield start, stop - start
            start = stop


def ordered_reads(pread: Pread, plan: SendPlan, unit: int,
                  depth: int) -> Iterator[tuple[int, memoryview]]:
    """(first VBN, blocks) for the plan's runs, ascending, read in pieces cut at the
    multiples of `unit` blocks (a chunk's blocks come in one piece when `unit` is
    a number of chunks) with `depth` reads in flight. Each read is checked in the
    thread that made it (a damaged data block raises DamagedBlock, as a send does);
    a view is valid until the next one is asked for."""
    bs = plan.block_size
    pieces = _cut(plan.runs, unit)
    free: list[mmap] = [aligned(unit * bs) for _ in range(depth + 1)]
    queue: deque[tuple[int, memoryview, mmap, Future[None]]] = deque()
    with ThreadPoolExecutor(depth, thread_name_prefix="bx-upread") as pool:
        try:
            while True:
                while len(queue) < depth and free:
                    nxt = next(pieces, None)
                    if nxt is None:
                        break
                    buf = free.pop()
                    view = memoryview(buf)[:nxt[1] * bs]
                    queue.append((nxt[0], view, buf,
                                  pool.submit(_read, pread, view, nxt[0], bs, plan.check)))
                if not queue:
                    return
                vbn, view, buf, fut = queue.popleft()
                fut.result()
                yield vbn, view
                free.append(buf)
        finally:
            for *_, fut in queue:              # stopped early: cancel, let the rest land
                fut.cancel()


def _read(pread: Pread, view: memoryview, vbn: int, bs: int, check: BlockCheck | None) -> None:
    pread(view, vbn * bs)
    if check is not None:
        check.known(vbn, view)
