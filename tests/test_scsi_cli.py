"""SCSI extras on a fake transport; the devices/tape commands through argparse."""

from __future__ import annotations

import json

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


def fake(answers: dict[int, tuple[bytes, bytes | None]]):
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


def test_tape_commands(tmp_path, capsys) -> None:
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
