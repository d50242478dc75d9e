"""SCSI extras on a real drive (the test bed's tgt tape): INQUIRY and READ BLOCK
LIMITS answer; TapeAlert and MAM, which tgt lacks, degrade to None; `tape status`
shows them and `dump` bounds its record size by the drive's limit."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from blockxfer.drivers.tapes import drive_info, max_record

TAPE = os.environ.get("BLOCKXFER_TEST_TAPE")
need_tape = pytest.mark.skipif(not TAPE, reason="no drive: set BLOCKXFER_TEST_TAPE=/dev/nstN")


@pytest.mark.device
@need_tape
def test_drive_describes_itself() -> None:
    assert TAPE
    info = drive_info(TAPE)
    assert info is not None and info["sg"].startswith("/dev/sg")  # type: ignore[union-attr]
    assert info["vendor"] and info["product"]
    assert max_record(TAPE) == info["max_block"] and (info["max_block"] or 0) > 0
    if os.environ.get("BLOCKXFER_TEST_TAPE_KIND") == "tgt":    # research §2.2: no LOG SENSE, MAM
        assert info["tape_alerts"] is None and info["barcode"] is None
        assert info["max_block"] == 1 << 20


@pytest.mark.device
@need_tape
def test_tape_status_shows_the_drive() -> None:
    assert TAPE
    out = subprocess.run([sys.executable, "-m", "blockxfer.cli", "tape", "status", TAPE,
                          "--json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["drive"]["product"]


def test_virtual_tape_has_no_scsi(tmp_path: object) -> None:
    from blockxfer.drivers.vtape import create_virtual_tape
    path = os.path.join(str(tmp_path), "v.vtape")
    create_virtual_tape(path, 1 << 24)
    assert drive_info(path) is None and max_record(path) is None
