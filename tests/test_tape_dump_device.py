"""Tape backup and restore on a real st drive (the test bed's mhvtl and tgt tapes):
levels 0/1/2 on /dev/nst0, and an image spanning the small tape
(BLOCKXFER_TEST_TAPE_SMALL) onto the big one. Scratch tapes: they are relabelled."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from blockxfer.errors import EndOfMedium
from blockxfer.transfer.tapeset import label_tape, list_tape
from tests.test_stream import snapshot_contents
from tests.test_tape_dump import LEVELS, dump, opener, restore, src  # noqa: F401

pytestmark = pytest.mark.device
TAPE = os.environ.get("BLOCKXFER_TEST_TAPE")
SMALL = os.environ.get("BLOCKXFER_TEST_TAPE_SMALL")


def _fresh(path: str, name: str, record_size: int = 256 << 10) -> None:
    t = opener(path, True)
    try:
        label_tape(t, name, force=True, record_size=record_size)
    finally:
        t.close()


@pytest.mark.skipif(not TAPE, reason="no drive: set BLOCKXFER_TEST_TAPE=/dev/nstN (scratch)")
def test_levels_on_st(src: tuple[str, dict[str, bytes]], tmp_path: Path) -> None:  # noqa: F811
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
def test_spanning_on_st(src: tuple[str, dict[str, bytes]], tmp_path: Path) -> None:  # noqa: F811
    path, contents = src
    assert TAPE and SMALL
    _fresh(SMALL, "ST-SPAN")
    t = opener(TAPE, True)
    t.rewind()
    t.write_filemarks(1)        # blank enough: no label at BOT
    t.close()
    res = dump(path, "june*", SMALL, next_tape=lambda name, seq: TAPE)   # ~18 MB: spans
    assert len(res.tapes) == 2
    target = str(tmp_path / "r.img")
    restore(SMALL, target, next_tape=lambda name, seq: TAPE)
    got = snapshot_contents(target)
    assert got["june9"] == contents["june9"] and got["june1"] == contents["june1"]


@pytest.mark.device("tape")                 # counted for the tape of the pass, even skipped
@pytest.mark.skipif(not (TAPE and SMALL and os.environ.get("BLOCKXFER_TEST_TAPE_HARD_EOM")),
                    reason="needs BLOCKXFER_TEST_TAPE and BLOCKXFER_TEST_TAPE_SMALL on a drive "
                    "with a physical end of medium (BLOCKXFER_TEST_TAPE_HARD_EOM=1: mhvtl)")
def test_dump_spanning_near_the_physical_end(src: tuple[str, dict[str, bytes]],  # noqa: F811
                                             tmp_path: Path) -> None:
    """A spanning dump on the cartridge with a physical end 2 MB after early warning.
    The dump must fail with EndOfMedium, or span and finish; either way nothing it
    claims is missing: the first tape lists the part's index and the set restores.
    With 256 KiB records the part's end stays inside the zone (larger records, which
    would run past the end, cannot be read back on mhvtl here: read() fails with
    EBUSY from 1 MiB on); test_end_of_medium[st] is the one that runs into the
    physical end."""
    path, contents = src
    assert TAPE and SMALL
    _fresh(SMALL, "ST-HARD-EOM")
    t = opener(TAPE, True)
    t.rewind()
    t.write_filemarks(1)        # blank enough: no label at BOT
    t.close()
    try:
        dump(path, "june*", SMALL, next_tape=lambda name, seq: TAPE)
        finished = True
    except EndOfMedium as e:
        assert "not written" in str(e)
        finished = False
    first = list_tape(opener(SMALL, False))
    assert len(first.images) == 1
    if not finished:
        assert first.images[0].index is None       # no index claimed that is not there
        return
    # the dump wrote this part's index (a full restore does not need it, LOCATE does)
    assert first.images[0].index is not None
    target = str(tmp_path / "r.img")
    restore(SMALL, target, next_tape=lambda name, seq: TAPE)
    got = snapshot_contents(target)
    assert got["june9"] == contents["june9"] and got["june1"] == contents["june1"]
