"""SCSI extras on a real drive (the test bed's mhvtl and tgt tapes): INQUIRY and
READ BLOCK LIMITS answer; TapeAlert, compression and MAM answer on mhvtl and
degrade to None on tgt, which lacks them; `tape status` shows them and `dump`
bounds its record size by the drive's limit."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from blockxfer.drivers.tapes import drive_info, max_record
from tests import clihelp

TAPE = os.environ.get("BLOCKXFER_TEST_TAPE")
need_tape = pytest.mark.skipif(not TAPE, reason="no drive: set BLOCKXFER_TEST_TAPE=/dev/nstN")


def _cli(*argv: str) -> subprocess.CompletedProcess[str]:
    """The command, forked from this process (tests/clihelp.py: no start-up under TCG)."""
    return clihelp.run(argv, text=True, timeout=300)


@pytest.mark.device
@need_tape
def test_drive_describes_itself() -> None:
    assert TAPE
    info = drive_info(TAPE)
    assert info is not None and info["sg"].startswith("/dev/sg")
    assert info["vendor"] and info["product"]
    assert max_record(TAPE) == info["max_block"] and (info["max_block"] or 0) > 0
    if os.environ.get("BLOCKXFER_TEST_TAPE_KIND") == "tgt":    # research §2.2: no LOG SENSE, MAM
        assert info["tape_alerts"] is None and info["barcode"] is None
        assert info["max_block"] == 1 << 20
    if os.environ.get("BLOCKXFER_TEST_TAPE_KIND") == "mhvtl":   # vm-testbed/guest/mhvtl.sh
        assert info["tape_alerts"] == [] and info["compression"] in ("on", "off")
        assert info["barcode"] == "BXM001L5" and info["medium_serial"]
        assert isinstance(info["load_count"], int) and info["load_count"] >= 1
        assert 0 < info["remaining_mib"] <= info["capacity_mib"]


@pytest.mark.device
@need_tape
def test_tape_status_shows_the_drive() -> None:
    assert TAPE
    out = _cli("tape", "status", TAPE, "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["drive"]["product"]
    text = _cli("tape", "status", TAPE)
    assert text.returncode == 0, text.stderr
    for field in ("block limits", "tape alerts", "compression", "barcode", "medium serial",
                  "remaining", "load count"):
        assert f"\n{field} " in text.stdout
    if os.environ.get("BLOCKXFER_TEST_TAPE_KIND") == "mhvtl":
        assert "BXM001L5" in text.stdout


def test_virtual_tape_has_no_scsi(tmp_path: object) -> None:
    from blockxfer.drivers.vtape import create_virtual_tape
    path = os.path.join(str(tmp_path), "v.vtape")
    create_virtual_tape(path, 1 << 24)
    assert drive_info(path) is None and max_record(path) is None


VTLCMD = os.environ.get("BLOCKXFER_TEST_MHVTL_VTLCMD")
need_mhvtl = pytest.mark.skipif(not (TAPE and VTLCMD), reason="needs the test bed's mhvtl "
                                "(BLOCKXFER_TEST_MHVTL_VTLCMD injects TapeAlert flags)")


def _inject(flags: int) -> None:
    assert VTLCMD
    subprocess.run([VTLCMD, os.environ.get("BLOCKXFER_TEST_MHVTL_DRIVE", "11"), "TapeAlert",
                    f"{flags:x}"], check=True, capture_output=True, timeout=30)


@pytest.mark.device("tape")
@need_mhvtl
def test_tape_alert_after_dump_and_compression(tmp_path: object) -> None:
    """`dump --compression on|off` switches the drive ('tape status' shows it), and a
    critical TapeAlert flag raised during the dump gives one line and exit status 4."""
    from tests.test_stream import make_source
    assert TAPE
    src = os.path.join(str(tmp_path), "src.img")
    make_source(src).close()
    assert _cli("tape", "label", TAPE, "TA-TEST", "--force").returncode == 0
    for mode in ("on", "off"):
        r = _cli("dump", src, "june1", "--tape", TAPE, "--compression", mode)
        assert r.returncode == 0, r.stderr
        assert json.loads(_cli("tape", "status", TAPE, "--json").stdout)["drive"][
            "compression"] == mode
    _inject(1 << 19)                                  # flag 20: clean now
    try:
        r = _cli("dump", src, "june2", "--tape", TAPE)
    finally:
        _inject(0)
    assert r.returncode == 4, r.stderr
    assert "image 3" in r.stdout                      # the dump itself finished
    lines = [x for x in r.stderr.splitlines() if "TapeAlert" in x]
    assert len(lines) == 1 and "TapeAlert 20, clean now" in lines[0]
