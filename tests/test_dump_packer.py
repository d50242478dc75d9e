"""The dump's packer: the stream goes into tape records' payloads in one copy."""

from __future__ import annotations

import os
import tracemalloc

from blockxfer.transfer import tapefmt as tf
from blockxfer.transfer.dump import _Packer

RS = 64 << 10


class _Records:
    """What _Packer needs of the tape writer: buffers, and a place to put records."""

    rs = RS

    def __init__(self, keep: bool = True) -> None:
        self.spare: list[bytearray] = []
        self.out: list[bytes] = []
        self.keep = keep

    def buffer(self) -> bytearray:
        return self.spare.pop() if self.spare else bytearray(b"\xff" * RS)

    def put(self, rec: bytearray, valid: int) -> None:
        if self.keep:
            self.out.append(bytes(rec[tf.REC.size:tf.REC.size + valid]))
            assert not any(rec[tf.REC.size + valid:]), "the last record is zero-padded"
        self.spare.append(rec)                  # reused, as the writer's are


def test_pieces_cross_records_unchanged() -> None:
    w = _Records()
    p = _Packer(w)  # type: ignore[arg-type]  # writer double
    pieces: list[bytes | memoryview] = [
        os.urandom(24), memoryview(os.urandom(3 * RS + 5)), b"", os.urandom(8),
        memoryview(bytearray(os.urandom(RS)))]
    for piece in pieces:
        assert p.write(piece) == len(piece)
    p.close()
    stream = b"".join(bytes(x) for x in pieces)
    assert b"".join(w.out) == stream and p.total == len(stream)
    assert all(len(r) == RS - tf.REC.size for r in w.out[:-1])


def test_a_large_piece_is_not_copied_twice() -> None:
    """A bytearray slice assigned from a memoryview first copied it into a new
    bytearray (issue 15: a quarter of the dump's CPU under emulation)."""
    w = _Records(keep=False)
    p = _Packer(w)  # type: ignore[arg-type]  # writer double
    piece = memoryview(os.urandom(RS * 4))
    p.write(piece)                              # the buffers exist from here on
    tracemalloc.start()
    try:
        p.write(piece)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < RS // 4, f"{peak} bytes allocated while packing"
