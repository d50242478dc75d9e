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
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack

from blockxfer.stream.send import plan_send
from blockxfer.volume import Volume

from .packer import PACK_BYTES
from .store import Store
from .upload import Add, UploadResult, check_retain, upload_blocks

REQUEST = 4 << 20                      # bytes per device read (DEPTH of them in flight)
DEPTH = 4


# (runs, blocks per request, check) -> (first VBN, blocks) in ascending order, several
# reads in flight, `check` run on each request's blocks as it is read: the wiring's
# drivers.reader.read_runs(..., ordered=True)
Check = Callable[[int, memoryview], object]
OrderedReader = Callable[[list[tuple[int, int]], int, Check | None],
                         Iterator[tuple[int, memoryview]]]


def upload_volume(store: Store, volume: str, vol: Volume, expression: str,
                  reader: OrderedReader, *,
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
            check = plan.check.known if plan.check is not None else None
            for vbn, data in reader(plan.runs, _unit(bs, c), check):
                add(vbn, len(data) // bs, data)
                if progress:
                    progress(len(data))
            return plan.dealloc
        return upload_blocks(store, volume, plan.header, feed, pack_bytes=pack_bytes,
                             retain_until=retain_until)


def _unit(block_size: int, c: int) -> int:
    """Blocks per read: whole chunks of `c` blocks, about REQUEST bytes (a chunk's
    blocks then come in one piece)."""
    return max(1, REQUEST // block_size // c) * c
