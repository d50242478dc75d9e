"""SCSI extras for a tape drive, sent as raw CDBs to its /dev/sgN.

INQUIRY (vendor, product, revision, unit serial from VPD page 0x80), READ
BLOCK LIMITS, TapeAlert (LOG SENSE page 0x2E) and the MAM barcode (READ
ATTRIBUTE 0x0806). Each degrades cleanly: a drive that lacks the command
(ILLEGAL REQUEST, as tgt answers for LOG SENSE and READ ATTRIBUTE) gives None.
Sense data is checked here, never trusted to a library to raise. The transport
is `execute(cdb, alloc) -> (data, sense)`; the default uses cython-sgio (the
`scsi` extra, also pyscsi's backend). Positioning commands stay with st: this
module must not move the tape behind st's back.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from blockxfer.errors import DeviceError

Execute = Callable[[bytes, int], tuple[bytes, bytes | None]]

INQUIRY = bytes([0x12, 0, 0, 0, 96, 0])
INQUIRY_SERIAL = bytes([0x12, 1, 0x80, 0, 96, 0])
READ_BLOCK_LIMITS = bytes([0x05, 0, 0, 0, 0, 0])
# LOG SENSE: PC=01 (cumulative), page 0x2E, allocation 324
LOG_SENSE_TAPEALERT = bytes([0x4D, 0, 0x6E, 0, 0, 0, 0, 0x01, 0x44, 0])
# READ ATTRIBUTE: service action 0 (values), first attribute 0x0806, allocation 256
READ_ATTRIBUTE_BARCODE = bytes([0x8C, 0, 0, 0, 0, 0, 0, 0, 0x08, 0x06, 0, 0, 1, 0, 0, 0])
# READ ATTRIBUTE: every attribute from 0x0000 on, allocation 4096
READ_ATTRIBUTE_ALL = bytes([0x8C, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0])
MAM_REMAINING_MIB, MAM_MAX_MIB, MAM_LOAD_COUNT = 0x0000, 0x0001, 0x0003
MAM_MEDIUM_SERIAL, MAM_BARCODE = 0x0401, 0x0806
# MODE SENSE(6), DBD=1, page 0x0F (data compression), allocation 255
MODE_SENSE_COMPRESSION = bytes([0x1A, 0x08, 0x0F, 0, 0xFF, 0])
ILLEGAL_REQUEST = 0x5
NOT_READY, MEDIUM_NOT_PRESENT = 0x2, 0x3A
_LIMITS = struct.Struct(">B3sH")     # granularity, max (24 bit), min


# byte 2 of fixed-format sense data (SPC-4 4.5.3)
SENSE_FILEMARK, SENSE_EOM, SENSE_ILI, SENSE_KEY_MASK = 0x80, 0x40, 0x20, 0x0F
TAPEALERT_SET = 0x01              # first byte of a TapeAlert log parameter: the flag is set


@dataclass(frozen=True, slots=True)
class Sense:
    key: int
    asc: int
    ascq: int
    filemark: bool = False
    eom: bool = False
    ili: bool = False

    @classmethod
    def parse(cls, raw: bytes) -> Sense:
        """Fixed (0x70/0x71) or descriptor (0x72/0x73) sense data."""
        code = raw[0] & 0x7F if raw else 0
        if code in (0x72, 0x73) and len(raw) >= 4:
            return cls(raw[1] & 0xF, raw[2], raw[3])
        if code in (0x70, 0x71) and len(raw) >= 14:
            b2 = raw[2]
            return cls(b2 & SENSE_KEY_MASK, raw[12], raw[13], bool(b2 & SENSE_FILEMARK),
                       bool(b2 & SENSE_EOM), bool(b2 & SENSE_ILI))
        return cls(0, 0, 0)


@dataclass(frozen=True, slots=True)
class Inquiry:
    vendor: str
    product: str
    revision: str
    serial: str | None
    peripheral_type: int     # 1: sequential-access (tape)


@dataclass(frozen=True, slots=True)
class BlockLimits:
    granularity: int
    max_block: int           # 0: no limit reported
    min_block: int


@dataclass(frozen=True, slots=True)
class Mam:
    """What the cartridge memory says (each None when the medium does not store it)."""
    remaining_mib: int | None    # 0x0000, remaining capacity in the partition
    max_mib: int | None          # 0x0001, native capacity
    load_count: int | None       # 0x0003
    medium_serial: str | None    # 0x0401
    barcode: str | None          # 0x0806 (host-written, or the library's label)


def parse_attributes(d: bytes) -> dict[int, int | str]:
    """READ ATTRIBUTE values: id -> int (binary format) or str (ASCII/text)."""
    out: dict[int, int | str] = {}
    off, end = 4, min(len(d), 4 + int.from_bytes(d[0:4], "big"))
    while off + 5 <= end:
        ident, fmt = int.from_bytes(d[off:off + 2], "big"), d[off + 2] & 0x3
        length = int.from_bytes(d[off + 3:off + 5], "big")
        raw = d[off + 5:off + 5 + length]
        if fmt == 0:
            out[ident] = int.from_bytes(raw, "big")
        else:
            out[ident] = raw.decode("ascii", "replace").strip("\0 ")
        off += 5 + length
    return out


# TapeAlert flags (SSC-3 annex / HP LTO manual): number -> (severity, what the operator does).
# C: critical (the operation or the data is at risk), W: warning, I: information.
TAPEALERT: dict[int, tuple[str, str]] = {
    1: ("W", "read warning: the drive is having trouble reading"),
    2: ("W", "write warning: the drive is having trouble writing"),
    3: ("W", "hard error: the drive had an unrecoverable read, write or positioning error"),
    4: ("C", "media: the tape is damaged or its data unreadable; copy what you need off it"),
    5: ("C", "read failure: the tape or the drive is failing to read"),
    6: ("C", "write failure: the tape or the drive is failing to write"),
    7: ("W", "media life: the tape is at the end of its life"),
    8: ("W", "not data grade: the tape is not data grade"),
    9: ("C", "write protect: the tape is write-protected"),
    10: ("I", "no removal: the tape is in use and cannot be unloaded"),
    11: ("I", "cleaning media: a cleaning cartridge is loaded"),
    12: ("I", "unsupported format: the tape's format is not supported by the drive"),
    13: ("C", "recoverable snapped tape: the tape snapped; do not reuse the cartridge"),
    14: ("C", "unrecoverable snapped tape: the tape snapped in the drive; call service"),
    15: ("W", "cartridge memory failure"),
    16: ("C", "forced eject: the tape was ejected during an operation"),
    17: ("W", "read-only format: the tape's format is read-only in this drive"),
    18: ("W", "tape directory corrupted: the next load will rebuild it"),
    19: ("I", "nearing media life: replace the tape soon"),
    20: ("C", "clean now: the drive needs cleaning"),
    21: ("W", "clean periodic: the drive is due for routine cleaning"),
    22: ("C", "expired cleaning media: the cleaning cartridge is used up"),
    23: ("C", "invalid cleaning tape: that cartridge is not a cleaning tape"),
    24: ("W", "retension requested"),
    29: ("W", "drive maintenance: preventive maintenance is due"),
    30: ("C", "hardware A: the drive has a hardware fault; reset it"),
    31: ("C", "hardware B: the drive has a hardware fault; call service"),
    32: ("W", "interface: the drive's host interface has a problem"),
    33: ("C", "eject media: unload the tape and retry"),
    34: ("W", "firmware download failed"),
    38: ("C", "predictive failure: the drive is predicted to fail"),
    39: ("W", "diagnostics required"),
    51: ("C", "tape system area write failure"),
    52: ("C", "tape system area read failure"),
    53: ("C", "no start of data: the tape may be damaged or blank"),
    54: ("C", "loading failure: the tape could not be loaded"),
    55: ("C", "unrecoverable unload failure"),
    56: ("C", "automation interface failure"),
    57: ("W", "firmware failure"),
    58: ("W", "WORM medium integrity check failed"),
    59: ("W", "WORM medium overwrite attempted"),
}


def tapealert_text(flag: int) -> tuple[str, str]:
    """(severity C/W/I, text) of a TapeAlert flag number."""
    return TAPEALERT.get(flag, ("W", f"TapeAlert flag {flag}"))


class ScsiCommandFailed(DeviceError):
    """A command ended in CHECK CONDITION other than "not supported"."""


UNIT_ATTENTION = 0x6
UNIT_ATTENTION_RETRIES = 4


class ScsiTape:
    """Drive information through raw CDBs; every query may answer None."""

    def __init__(self, execute: Execute, path: str = "sg"):
        self._execute, self.path = execute, path

    def _run(self, cdb: bytes, alloc: int) -> bytes | None:
        for _ in range(UNIT_ATTENTION_RETRIES):
            data, sense_raw = self._execute(cdb, alloc)
            if sense_raw is None:
                return data
            sense = Sense.parse(sense_raw)
            if sense.key != UNIT_ATTENTION:
                break
            # SPC: reported once per event (power on, reset 29/00, medium change 28/00);
            # the command was not run, so it is simply sent again
        return self._answer(cdb, data, sense)

    def _answer(self, cdb: bytes, data: bytes, sense: Sense) -> bytes | None:
        if sense.key == ILLEGAL_REQUEST:
            return None                      # the drive lacks it
        if sense.key == NOT_READY and sense.asc == MEDIUM_NOT_PRESENT and cdb[0] in (
                LOG_SENSE_TAPEALERT[0], READ_ATTRIBUTE_ALL[0]):
            return None                      # no tape: no cartridge memory to read
        if sense.key == 0 and not (sense.filemark or sense.eom):
            return data                      # NO SENSE / recovered: data is good
        raise ScsiCommandFailed(f"SCSI 0x{cdb[0]:02x} on {self.path}: sense key "
                                f"{sense.key:#x} ASC/ASCQ {sense.asc:02x}/{sense.ascq:02x}")

    def inquiry(self) -> Inquiry:
        d = self._run(INQUIRY, 96)
        if d is None or len(d) < 36:
            raise DeviceError(f"{self.path}: INQUIRY failed")
        vpd = self._run(INQUIRY_SERIAL, 96)
        serial = vpd[4:4 + vpd[3]].decode("ascii", "replace").strip() if vpd and len(vpd) > 4 \
            else None

        def txt(a: int, b: int) -> str:
            return d[a:b].decode("ascii", "replace").strip()

        return Inquiry(txt(8, 16), txt(16, 32), txt(32, 36), serial or None, d[0] & 0x1F)

    def block_limits(self) -> BlockLimits | None:
        d = self._run(READ_BLOCK_LIMITS, 6)
        if d is None or len(d) < 6:
            return None
        gran, mx, mn = _LIMITS.unpack(d[:6])
        return BlockLimits(gran & 0x1F, int.from_bytes(mx, "big"), mn)

    def tape_alerts(self) -> list[int] | None:
        """The TapeAlert flag numbers set (1..64); None when the drive has no page 0x2E.

        Some drives clear the flags when the page is read: read once, log it.
        """
        d = self._run(LOG_SENSE_TAPEALERT, 324)
        if d is None or len(d) < 4 or d[0] & 0x3F != 0x2E:
            return None
        end = 4 + int.from_bytes(d[2:4], "big")
        flags, off = [], 4
        while off + 4 <= min(end, len(d)):
            code, length = int.from_bytes(d[off:off + 2], "big"), d[off + 3]
            if length and off + 4 < len(d) and d[off + 4] & TAPEALERT_SET:
                flags.append(code)
            off += 4 + length
        return flags

    def barcode(self) -> str | None:
        """The MAM host attribute 0x0806 (barcode); None without MAM."""
        d = self._run(READ_ATTRIBUTE_BARCODE, 256)
        if d is None or len(d) < 9:
            return None
        value = parse_attributes(d).get(MAM_BARCODE)
        return value or None if isinstance(value, str) else None

    def compression(self) -> tuple[bool, bool] | None:
        """(capable DCC, enabled DCE) from mode page 0x0F; None without the page."""
        d = self._run(MODE_SENSE_COMPRESSION, 255)
        if d is None or len(d) < 4:
            return None
        off = 4 + d[3]                       # header, then any block descriptor
        if len(d) < off + 3 or d[off] & 0x3F != 0x0F:
            return None
        return bool(d[off + 2] & 0x40), bool(d[off + 2] & 0x80)

    def mam(self) -> Mam | None:
        """The cartridge memory attributes; None without MAM (or with no tape loaded)."""
        d = self._run(READ_ATTRIBUTE_ALL, 4096)
        if d is None or len(d) < 4:
            return None
        a = parse_attributes(d)

        def num(i: int) -> int | None:
            v = a.get(i)
            return v if isinstance(v, int) else None

        def txt(i: int) -> str | None:
            v = a.get(i)
            return v or None if isinstance(v, str) else None

        barcode = txt(MAM_BARCODE)
        if barcode is None and MAM_BARCODE not in a:
            barcode = self.barcode()     # the drive lists attributes from a later id only
        return Mam(num(MAM_REMAINING_MIB), num(MAM_MAX_MIB), num(MAM_LOAD_COUNT),
                   txt(MAM_MEDIUM_SERIAL), barcode)


def sgio_execute(f: BinaryIO) -> Execute:
    """A transport over cython-sgio on an open /dev/sgN."""
    import sgio  # the `scsi` extra; imported only when a drive is queried

    def execute(cdb: bytes, alloc: int) -> tuple[bytes, bytes | None]:
        buf = bytearray(alloc)
        try:
            sgio.execute(f, cdb, None, buf)
        except sgio.CheckConditionError as e:
            return bytes(buf), bytes(getattr(e, "sense", b"") or b"\x70")
        except OSError as e:
            raise DeviceError(f"SCSI 0x{cdb[0]:02x} on {f.name}: {e.strerror}") from e
        return bytes(buf), None

    return execute


@contextmanager
def open_scsi(sg_path: str) -> Iterator[ScsiTape]:
    try:
        f: Any = open(sg_path, "r+b", buffering=0)  # noqa: SIM115 - closed below
    except OSError as e:
        raise DeviceError(f"open {sg_path}: {e.strerror}") from e
    try:
        yield ScsiTape(sgio_execute(f), sg_path)
    finally:
        f.close()


def sg_for_tape(tape_path: str, *, sysfs: Path = Path("/sys")) -> str | None:
    """/dev/sgN of the drive behind /dev/nstN (via sysfs), or None."""
    name = Path(tape_path).name
    d = sysfs / "class" / "scsi_tape" / name / "device" / "scsi_generic"
    try:
        return f"/dev/{next(iter(sorted(p.name for p in d.iterdir())))}"
    except (OSError, StopIteration):
        return None
