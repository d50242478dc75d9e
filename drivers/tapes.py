"""Open a tape by name: an st device node or a virtual tape file.

`open_tape` is the one place that opens tapes: the no-rewind st node with
`O_RDWR` (falling back to read-only on a write-protected medium), or a virtual
tape file. Both come back as `drivers.st.StTape`, so the same adapter code runs
on a drive and on the virtual tape.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from io import FileIO
from pathlib import Path
from typing import TYPE_CHECKING

from blockxfer.errors import DeviceBusy, DeviceError, WriteProtected
from blockxfer.tape import Tape, TapeStatus

from .st import StTape, TapeHandle
from .vtape import VirtualTape

if TYPE_CHECKING:
    def _both_are_tapes(node: FileIO, vt: VirtualTape) -> tuple[Tape, Tape, TapeHandle]:
        """Checked by mypy, never run: a drive's node and a virtual tape file are both
        handles StTape drives (the virtual tape answers the st ioctls itself), and
        what `open_tape` returns for either satisfies the `Tape` protocol."""
        return StTape(node), StTape(vt, ioctl=vt.ioctl), vt


def _open_st(path: str, write: bool) -> StTape:
    if re.fullmatch(r"/dev/st\d+[lma]?", path):
        raise DeviceError(f"{path} rewinds at every close; use the no-rewind node "
                          f"{path.replace('/dev/st', '/dev/nst')}")
    mode = "r+b" if write else "rb"
    try:
        f = FileIO(path, mode.replace("b", ""))  # StTape owns and closes it
    except OSError as e:
        if e.errno == errno.EROFS and write:
            return _open_st(path, False)
        if e.errno == errno.EBUSY:
            raise DeviceBusy(f"{path} is open in another process (st allows one)") from e
        if e.errno == errno.ENOMEDIUM:
            raise DeviceError(f"{path}: no tape in the drive") from e
        raise DeviceError(f"open {path}: {e.strerror}") from e
    return StTape(f)


def _open_virtual(path: str, write: bool) -> StTape:
    try:
        vt = VirtualTape(path, write=write)
    except OSError as e:
        if e.errno == errno.EROFS and write:
            return _open_virtual(path, False)
        raise DeviceError(f"open {path}: {e.strerror}") from e
    return StTape(vt, ioctl=vt.ioctl)


def open_tape_handle(path: str, *, write: bool = True) -> StTape:
    """Open `path` as a tape; the caller closes it (see `open_tape`)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise DeviceError(f"{path}: {e.strerror}") from e
    if stat.S_ISCHR(mode):
        return _open_st(path, write)
    if stat.S_ISREG(mode):
        return _open_virtual(path, write)
    raise DeviceError(f"{path} is neither a tape device nor a virtual tape file")


@contextmanager
def open_tape(path: str, *, write: bool = True) -> Iterator[StTape]:
    """Open a tape (read-only if the medium is write-protected) and close it after."""
    tape = open_tape_handle(path, write=write)
    try:
        yield tape
    finally:
        tape.close()


def tape_status(path: str) -> TapeStatus:
    """Status of the drive or virtual tape, without moving it."""
    with open_tape(path, write=False) as t:
        return t.status()


def rewind_tape(path: str) -> TapeStatus:
    with open_tape(path, write=False) as t:
        t.rewind()
        return t.status()


def eject_tape(path: str) -> None:
    """Rewind and unload (a virtual tape is rewound; it stays loaded for the next open)."""
    with open_tape(path, write=False) as t:
        t.unload()


def erase_tape(path: str) -> TapeStatus:
    """Rewind and erase the whole medium."""
    with open_tape(path) as t:
        if t.status().write_protected:
            raise WriteProtected(f"{path}: the tape is write-protected; nothing was erased")
        t.rewind()
        t.erase()
        return t.status()


def drive_info(path: str, *, sysfs: Path = Path("/sys")) -> dict[str, object] | None:
    """What the drive says about itself over SCSI (on its /dev/sgN): INQUIRY, READ BLOCK
    LIMITS, TapeAlert flags (numbers and what they mean), compression (mode page 0x0F)
    and the cartridge memory (MAM: remaining and native capacity, load count, medium
    serial, barcode). Each part is None when the drive lacks it; the whole is None for
    a virtual tape or a drive without an sg node."""
    from .scsi import open_scsi, sg_for_tape, tapealert_text
    if not path.startswith("/dev/"):
        return None
    sg = sg_for_tape(path, sysfs=sysfs)
    if sg is None:
        return None
    with open_scsi(sg) as s:
        inq = s.inquiry()
        limits = s.block_limits()
        alerts = s.tape_alerts()
        comp = s.compression()
        mam = s.mam()
        return {"sg": sg, "vendor": inq.vendor, "product": inq.product,
                "revision": inq.revision, "serial": inq.serial,
                "max_block": limits.max_block if limits else None,
                "min_block": limits.min_block if limits else None,
                "tape_alerts": alerts,
                "tape_alert_text": None if alerts is None
                else [f"{n}: {tapealert_text(n)[1]}" for n in alerts],
                "compression": None if comp is None
                else ("on" if comp[1] else "off") if comp[0] else "not supported",
                "barcode": mam.barcode if mam else s.barcode(),
                "medium_serial": mam.medium_serial if mam else None,
                "remaining_mib": mam.remaining_mib if mam else None,
                "capacity_mib": mam.max_mib if mam else None,
                "load_count": mam.load_count if mam else None}


def set_compression(path: str, on: bool) -> None:
    """Switch the drive's compression (MTCOMPRESSION); it stays until changed or reset."""
    with open_tape(path, write=False) as t:
        t.set_compression(on)


def tape_alerts(path: str, *, sysfs: Path = Path("/sys")) -> list[tuple[int, str, str]]:
    """The drive's TapeAlert flags now set: (flag, severity C/W/I, what it means).
    Empty for a virtual tape or a drive without the log page. Reading may clear them."""
    from .scsi import open_scsi, sg_for_tape, tapealert_text
    sg = sg_for_tape(path, sysfs=sysfs) if path.startswith("/dev/") else None
    if sg is None:
        return []
    with open_scsi(sg) as s:
        flags = s.tape_alerts() or []
    return [(n, *tapealert_text(n)) for n in flags]


def max_record(path: str, *, sysfs: Path = Path("/sys")) -> int | None:
    """The largest record the drive takes (READ BLOCK LIMITS), when it says. Only that
    command: reading the TapeAlert page here could clear flags the dump reports."""
    from .scsi import open_scsi, sg_for_tape
    sg = sg_for_tape(path, sysfs=sysfs) if path.startswith("/dev/") else None
    if sg is None:
        return None
    try:
        with open_scsi(sg) as s:
            limits = s.block_limits()
    except DeviceError:
        return None
    return limits.max_block if limits and limits.max_block > 0 else None
