"""Tape backup and restore on a real st drive (the test bed's tgt tapes):
levels 0/1/2 on /dev/nst0, and an image spanning the small tape
(BLOCKXFER_TEST_TAPE_SMALL) onto the big one. Scratch tapes: they are relabelled."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from blockxfer.transfer.tapeset import label_tape, list_tape
from tests.test_stream import snapshot_contents
from tests.test_tape_dump import LEVELS, dump, opener, restore, src  # noqa: F401

pytestmark = pytest.mark.device
TAPE = os.environ.get("BLOCKXFER_TEST_TAPE")
SMALL = os.environ.get("BLOCKXFER_TEST_TAPE_SMALL")


def _fresh(path: str, name: str) -> None:
    t = opener(path, True)
    try:
        label_tape(t, name, force=True)
    finally:
        t.close()


@pytest.mark.skipif(not TAPE, reason="no drive: set BLOCKXFER_TEST_TAPE=/dev/nstN (scratch)")
def test_levels_on_st(src, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    path, contents = src
    assert TAPE
    _fresh(TAPE, "ST-LEVELS")
    for expr in LEVELS:
        dump(path, expr, TAPE)
    listing = list_tape(opener(TAPE, False))
    assert [i.descriptor.expression for i in listing.images] == LEVELS
    target = str(tmp_path / "r.img")
    restore(TAPE, target, snapshot="june7")
    got = snapshot_contents(target)
    assert all(got[n] == contents[n] for n in got) and "june7" in got


@pytest.mark.skipif(not (TAPE and SMALL), reason="needs BLOCKXFER_TEST_TAPE and "
                    "BLOCKXFER_TEST_TAPE_SMALL (a few MB tape for spanning)")
def test_spanning_on_st(src, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    path, contents = src
    assert TAPE and SMALL
    _fresh(SMALL, "ST-SPAN")
    t = opener(TAPE, True)
    t.rewind()
    t.write_filemarks(1)        # blank enough: no label at BOT
    t.close()
    res = dump(path, "june*", SMALL, next_tape=lambda name, seq: TAPE)   # ~18 MB: spans
    assert len(res.tapes) == 2  # type: ignore[attr-defined]
    target = str(tmp_path / "r.img")
    restore(SMALL, target, next_tape=lambda name, seq: TAPE)
    got = snapshot_contents(target)
    assert got["june9"] == contents["june9"] and got["june1"] == contents["june1"]
