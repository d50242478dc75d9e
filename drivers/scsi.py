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
ILLEGAL_REQUEST = 0x5
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
        off, end = 4, min(len(d), 4 + int.from_bytes(d[0:4], "big"))
        while off + 5 <= end:
            ident, length = int.from_bytes(d[off:off + 2], "big"), int.from_bytes(
                d[off + 3:off + 5], "big")
            if ident == 0x0806:
                return d[off + 5:off + 5 + length].decode("ascii", "replace").strip() or None
            off += 5 + length
        return None


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
