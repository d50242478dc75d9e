"""Incremental mirroring with its base on a real st drive (the test bed's tape,
BLOCKXFER_TEST_TAPE=/dev/nstN, a scratch tape: it is relabelled) and, when
BLOCKXFER_TEST_MD0 names the test bed's scratch RAID0, the source on
it; reintegration from `tape:/dev/nstN` gives the newest state byte for byte."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from blockxfer.cli.increments import wire
from blockxfer.drivers.blockdev import open_device
from blockxfer.transfer.increments import mirror_status, mirror_update, reintegrate
from blockxfer.transfer.tapeset import label_tape
from blockxfer.volume import Volume
from tests.test_increments import assert_reintegrated, churn
from tests.test_tape_dump import opener

pytestmark = pytest.mark.device
TAPE = os.environ.get("BLOCKXFER_TEST_TAPE")
DISK = os.environ.get("BLOCKXFER_TEST_MD0")           # scratch: overwritten


@pytest.mark.skipif(not TAPE, reason="no drive: set BLOCKXFER_TEST_TAPE=/dev/nstN (scratch)")
def test_base_on_st_and_reintegrate(tmp_path: Path) -> None:
    assert TAPE
    wire()
    t = opener(TAPE, True)
    try:
        label_tape(t, "ST-INCR", force=True)
    finally:
        t.close()
    src = DISK or str(tmp_path / "src.img")
    vol = Volume.create(open_device(src, write=True, create_size=None if DISK else 32 << 20),
                        virtual_size=16 << 20)
    rng = random.Random(3)
    vol.write(0, rng.randbytes(4 << 20))
    vol.close()
    assert mirror_update(src, f"tape:{TAPE}", str(tmp_path / "incr"))["kind"] == "base"
    for _ in range(5):
        with Volume.open(open_device(src, write=True)) as v:
            churn(v, rng, set())
        mirror_update(src, f"tape:{TAPE}", str(tmp_path / "incr"))
    assert mirror_status(str(tmp_path / "incr"))["updates"] == 5
    target = str(tmp_path / "back.img")
    reintegrate(target, f"tape:{TAPE}", str(tmp_path / "incr"))
    assert_reintegrated(target, src)
