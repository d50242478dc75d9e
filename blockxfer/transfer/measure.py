"""What a send or dump of an image would move, without moving it (`-n`, like
`zfs send -nv` and `qemu-img measure`): the exact data size from the planes and
an estimate after compression from a sample of the image's blocks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import zstandard
from bitarray import bitarray
from bitarray.util import count_n

from blockxfer.image import evaluate
from blockxfer.stream.send import Reader

SAMPLES = 64           # runs read for the compression estimate
RUN_BLOCKS = 16        # blocks per sampled run (a record compresses many blocks together)
LEVEL = 1              # the stream's data-record level (stream/send.py)


@dataclass(frozen=True)
class Measure:
    expression: str
    top: str | None
    base: str | None
    blocks: int                 # data blocks of the image: exact, from the planes
    bytes: int                  # blocks × block size
    estimated_bytes: int         # after zstd, estimated from a sample of the blocks
    sampled_blocks: int

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def measure(vol: Any, expression: str, reader: Reader, *, compress: bool = True) -> Measure:
    """The image `expression` of the volume `vol` (a `Volume`), reading only a
    sample of its blocks through `reader` for the compression estimate."""
    img = evaluate(expression, vol, vol.block_size)
    top, base = (img.top.name if img.top else None), (img.base.name if img.base else None)
    size = img.blocks * vol.block_size
    if not compress or not img.blocks:
        return Measure(expression, top, base, img.blocks, size, size, 0)
    raw = packed = sampled = 0
    zc = zstandard.ZstdCompressor(level=LEVEL)
    for _, view in reader(_sample_runs(img.plane)):
        data = bytes(view)
        sampled += len(data) // vol.block_size
        raw += len(data)
        packed += min(len(zc.compress(data)), len(data))   # a record is kept raw if larger
    estimate = size if not raw else round(size * packed / raw)
    return Measure(expression, top, base, img.blocks, size, estimate, sampled)


def _sample_starts(plane: bitarray) -> list[int]:
    """VBNs of up to SAMPLES image blocks spread evenly over the image: the
    n-th set bit is where the first n+1 set bits end (count_n, in C)."""
    total = plane.count()
    step = max(total // SAMPLES, 1)
    return [count_n(plane, n + 1) - 1 for n in range(0, total, step)][:SAMPLES]


def _sample_runs(plane: bitarray) -> list[tuple[int, int]]:
    """(start, count) runs of image blocks to read, none overlapping another."""
    runs: list[tuple[int, int]] = []
    for start in _sample_starts(plane):
        if not runs or start >= runs[-1][0] + runs[-1][1]:
            runs.append((start, _run_length(plane, start)))
    return runs


def _run_length(plane: bitarray, start: int) -> int:
    """How many image blocks follow on from `start`, at most RUN_BLOCKS."""
    window = plane[start:start + RUN_BLOCKS]
    return window.index(0) if not window.all() else len(window)
