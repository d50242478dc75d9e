"""The intent log packs its pending entries with the sizes it counted as it noted
them, and a random write's entry holds its pointer as ints (intentlog.py): the
record is byte for byte what `pack_record` makes of the same entries given as
arrays, through the pointer conversion and in a reused, dirty buffer."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from blockxfer.drivers.blockdev import FileDevice, open_device
from blockxfer.volume import intentlog as il
from blockxfer.volume.layout import ObjectRef, RootRecord

BS = 4096


def _log(dev: FileDevice) -> il.IntentLog:
    log = il.IntentLog(dev, BS, 2, 1024)
    root = RootRecord(7, 1, ObjectRef(10, 0xAB, 100, 2), ObjectRef(11, 0xCD, 1, 1),
                      ObjectRef(12, 0xEF, 300, 1))
    log.reset(bytes(range(16)), root)
    return log


def _as_arrays(entries: list[il.Entry]) -> list[il.Entry]:
    """The same entries with every pointer as an array (as parse_record gives them)."""
    out = []
    for e in entries:
        ptrs = e.ptrs if e.one is None else np.array([e.one], dtype=np.uint64)
        out.append(il.Entry(e.vblock, e.count, e.kind, ptrs, e.data))
    return out


def _note_some(log: il.IntentLog, blocks: int) -> None:
    for k in range(blocks):
        log.note_one(100 + 3 * k, 5000 + k, 2**64 - 1 - k, os.urandom(BS))
    log.note(7, np.array([[900, 1], [901, 2], [902, 3]], dtype=np.uint64), os.urandom(3 * BS))
    log.note(20, np.array([[950, 9]], dtype=np.uint64), None)
    log.note_unmap(40, 6)
    log.note_one(41, 6000, 77, os.urandom(BS))


@pytest.mark.parametrize("limit", [il.INLINE_LIMIT, 4 * BS])
def test_the_log_packs_what_pack_record_packs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                              limit: int) -> None:
    """With the inline limit low, the first entries turn into pointers on the way;
    each record is also written, so the next one packs into a dirty buffer."""
    monkeypatch.setattr(il, "INLINE_LIMIT", limit)
    with open_device(str(tmp_path / "log.img"), write=True, create_size=1030 * BS) as dev:
        log = _log(dev)
        for blocks in (1, 150, 2):     # small, large, small in the large one's dirty buffer
            _note_some(log, blocks)
            want = bytes(il.pack_record(log.token, log.seq + 1, log.generation, log.last,
                                        _as_arrays(log.entries), BS))
            prev = log.last
            rec, at = log.prepare()
            assert bytes(rec) == want and rec.obj is log._buf
            assert log.last == il.parse_head(rec).checksum != prev
            assert il.verify(rec)
            parsed = il.parse_record(rec, BS)
            assert [(e.vblock, e.count, e.kind) for e in parsed] == \
                [(e.vblock, e.count, e.kind) for e in il.parse_record(memoryview(want), BS)]
            log.write_record(rec, at)
