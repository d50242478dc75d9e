"""SCSI extras on a fake transport; the devices/tape commands through argparse."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from blockxfer.cli import main
from blockxfer.drivers.scsi import ScsiCommandFailed, ScsiTape, Sense
from blockxfer.errors import UsageError
from blockxfer.units import parse_size

ILLEGAL = bytes([0x70, 0, 0x05, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x20, 0x00])
MEDIUM = bytes([0x70, 0, 0x03, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x11, 0x00])


def inquiry_data() -> bytes:
    d = bytearray(96)
    d[0] = 1
    d[8:16], d[16:32], d[32:36] = b"IBM     ", b"ULT3580-TD8     ", b"K4P0"
    return bytes(d)


def fake(answers: dict[int, tuple[bytes, bytes | None]]
         ) -> Callable[[bytes, int], tuple[bytes, bytes | None]]:
    def execute(cdb: bytes, alloc: int) -> tuple[bytes, bytes | None]:
        key = cdb[0] if cdb[0] != 0x12 or not cdb[1] & 1 else 0x1280
        return answers.get(key, (bytes(alloc), ILLEGAL))
    return execute


def test_inquiry_and_limits() -> None:
    serial = bytes([1, 0x80, 0, 8]) + b"10WT0123"
    s = ScsiTape(fake({0x12: (inquiry_data(), None), 0x1280: (serial, None),
                       0x05: (bytes([9, 0x10, 0, 0, 0, 4]), None)}))
    i = s.inquiry()
    assert (i.vendor, i.product, i.revision, i.serial, i.peripheral_type) == (
        "IBM", "ULT3580-TD8", "K4P0", "10WT0123", 1)
    lim = s.block_limits()
    assert lim is not None and (lim.granularity, lim.max_block, lim.min_block) == (9, 1 << 20, 4)


def test_missing_commands_degrade_to_none() -> None:                 # like tgt
    s = ScsiTape(fake({}))
    assert s.tape_alerts() is None and s.barcode() is None and s.block_limits() is None


def test_tapealert_and_barcode() -> None:
    params = b"".join(bytes([0, n, 0, 1, 1 if n in (3, 20) else 0]) for n in range(1, 65))
    page = bytes([0x2E, 0]) + len(params).to_bytes(2, "big") + params
    attr = (0x0806).to_bytes(2, "big") + bytes([0x01]) + (8).to_bytes(2, "big") + b"ABC123L8"
    mam = len(attr).to_bytes(4, "big") + attr
    s = ScsiTape(fake({0x4D: (page, None), 0x8C: (mam, None)}))
    assert s.tape_alerts() == [3, 20]
    assert s.barcode() == "ABC123L8"


def test_real_errors_are_raised() -> None:
    s = ScsiTape(fake({0x4D: (b"", MEDIUM)}))
    with pytest.raises(ScsiCommandFailed, match="sense key 0x3"):
        s.tape_alerts()
    assert Sense.parse(bytes([0x70, 0, 0xC0] + [0] * 11)).filemark


def test_parse_size() -> None:
    assert parse_size("10G") == 10 << 30 and parse_size("512k") == 512 << 10
    assert parse_size("4096") == 4096 and parse_size("1MiB") == 1 << 20
    with pytest.raises(UsageError):
        parse_size("ten")


def run(*argv: str) -> int:
    return main(list(argv))


def test_tape_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(tmp_path / "t.vtape")
    assert run("tape", "create", path, "--capacity", "2M", "--no-locate",
               "--early-warning", "640K") == 0       # the least a 256K-record dump spans in
    assert run("tape", "status", path, "--json") == 0
    out = capsys.readouterr().out
    st = json.loads(out[out.index("{"):])
    assert st["bot"] and st["online"] and st["position"] is None
    assert run("tape", "rewind", path) == 0
    assert run("tape", "erase", path, "--dry-run") == 0
    assert run("tape", "erase", path) == 0
    assert run("tape", "eject", path) == 0


def test_unit_attention_after_reset_is_retried() -> None:
    """The test bed's drive answered the first READ BLOCK LIMITS after boot with UNIT
    ATTENTION 29/00 (power on or reset); the command must simply be sent again."""
    ua = bytes([0x70, 0, 0x06, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x29, 0x00])
    calls: list[int] = []

    def execute(cdb: bytes, alloc: int) -> tuple[bytes, bytes | None]:
        calls.append(cdb[0])
        if len(calls) == 1:
            return bytes(alloc), ua
        return bytes([0x09, 0x10, 0x00, 0x00, 0x00, 0x04]), None
    limits = ScsiTape(execute).block_limits()
    assert limits is not None and limits.max_block == 1 << 20 and calls == [0x05, 0x05]


def _attr(ident: int, fmt: int, value: bytes) -> bytes:
    return ident.to_bytes(2, "big") + bytes([fmt]) + len(value).to_bytes(2, "big") + value


def test_mam_attributes() -> None:
    attrs = (_attr(0x0000, 0, (120).to_bytes(8, "big"))
             + _attr(0x0001, 0, (1500).to_bytes(8, "big"))
             + _attr(0x0003, 0, (7).to_bytes(8, "big")) + _attr(0x0401, 1, b"SER0042  ")
             + _attr(0x0806, 1, b"BXM001L5" + b" " * 24))
    s = ScsiTape(fake({0x8C: (len(attrs).to_bytes(4, "big") + attrs, None)}))
    m = s.mam()
    assert m is not None
    assert (m.remaining_mib, m.max_mib, m.load_count, m.medium_serial, m.barcode) == (
        120, 1500, 7, "SER0042", "BXM001L5")


def test_mam_without_a_tape_is_none() -> None:
    not_ready = bytes([0x70, 0, 0x02, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x3A, 0x00])
    s = ScsiTape(fake({0x8C: (b"", not_ready), 0x4D: (b"", not_ready)}))
    assert s.mam() is None and s.tape_alerts() is None


def test_compression_page() -> None:
    page = bytes([0x0F, 14, 0xC0, 0]) + bytes(12)      # DCE and DCC
    s = ScsiTape(fake({0x1A: (bytes([len(page) + 3, 0, 0, 0]) + page, None)}))
    assert s.compression() == (True, True)
    off = bytes([0x0F, 14, 0x40, 0]) + bytes(12)
    assert ScsiTape(fake({0x1A: (bytes([19, 0, 0, 0]) + off, None)})).compression() == (True, False)
    assert ScsiTape(fake({})).compression() is None      # no page 0x0F: not reported


def test_tapealert_text() -> None:
    from blockxfer.drivers.scsi import tapealert_text
    assert tapealert_text(20) == ("C", "clean now: the drive needs cleaning")
    assert tapealert_text(64)[0] == "W" and "64" in tapealert_text(64)[1]


def test_tape_alerts_after_a_dump_or_restore(monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Critical flags: one line each and exit status 4; warnings: a line, status 0;
    information flags: nothing."""
    from blockxfer.cli import tapealert as cli_devices
    from blockxfer.drivers import tapes

    flags: list[tuple[int, str, str]] = []
    monkeypatch.setattr(tapes, "tape_alerts", lambda path: flags)
    assert cli_devices.report_tape_alerts("/dev/nst0", "dump") == 0
    flags[:] = [(1, "W", "read warning: x"), (11, "I", "cleaning media: y")]
    assert cli_devices.report_tape_alerts("/dev/nst0", "dump") == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "warning: /dev/nst0: TapeAlert 1, read warning" in err
    flags[:] = [(20, "C", "clean now: the drive needs cleaning")]
    assert cli_devices.report_tape_alerts("/dev/nst0", "restore") == 4
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the restore finished" in err and "TapeAlert 20" in err


def test_compression_on_a_drive_that_cannot(tmp_path: Path) -> None:
    """The virtual tape answers MTCOMPRESSION like a drive without it (DCC=0): one
    clear error from `dump --compression on`, before anything is written."""
    import subprocess
    import sys

    from tests.test_stream import make_source
    src = str(tmp_path / "src.img")
    make_source(src).close()
    tape = str(tmp_path / "t.vtape")
    assert run("tape", "create", tape, "--capacity", "64M") == 0
    r = subprocess.run([sys.executable, "-m", "blockxfer.cli", "dump", src, "june1", "--tape",
                        tape, "--compression", "on"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 4, r.stderr
    assert "cannot switch compression on" in r.stderr and r.stderr.count("\n") == 1
    from blockxfer.drivers.tapes import open_tape_handle
    from blockxfer.transfer.tapeset import read_label
    t = open_tape_handle(tape, write=False)
    try:
        assert read_label(t) is None                   # nothing was written
    finally:
        t.close()
