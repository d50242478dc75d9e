"""Describe and verify a stream without a target: every checksum, counts, digest."""

from __future__ import annotations

import uuid

from . import format as fmt
from .decode import Data, Dealloc, StreamReader
from .io import ByteSource


def inspect_stream(f: ByteSource) -> dict[str, object]:
    reader = StreamReader(f, "stream")
    h = reader.read_header()
    runs, first, last, dealloc_runs = 0, None, None, 0
    end_of_previous = -1
    for rec in reader:
        if isinstance(rec, Data):
            first = rec.vbn if first is None else min(first, rec.vbn)
            last = rec.vbn + rec.count - 1 if last is None else max(last, rec.vbn + rec.count - 1)
            runs += rec.vbn != end_of_previous
            end_of_previous = rec.vbn + rec.count
        elif isinstance(rec, Dealloc):
            dealloc_runs += len(rec.runs)
    t = reader.trailer
    assert t is not None
    return {
        "volume": str(uuid.UUID(bytes=h.volume_uuid)), "block_size": h.block_size,
        "blocks": h.nblocks, "kind": "incremental" if h.base else "full",
        "expression": h.expression, "top": h.top.name,
        "base": h.base.name if h.base else None, "resuming": bool(h.flags & fmt.H_RESUMING),
        "snapshots": [s.name for s in h.snapshot_set], "records": t.records,
        "data_blocks": t.data_blocks, "image_blocks": h.image_blocks,
        "dealloc_blocks": t.dealloc_blocks, "bytes": t.nbytes, "vbn_first": first,
        "vbn_last": last, "vbn_runs": runs, "dealloc_runs": dealloc_runs,
    }
