"""A tape through the Linux `st` driver, implementing `blockxfer.tape.Tape`.

Works on any handle with `write`, `readinto`, `fileno` and `name` plus an
ioctl function: the real `/dev/nstN` with `fcntl.ioctl`, the virtual tape
(`drivers.vtape`), or a scripted fake in tests. It does not open devices
(`drivers.tapes.open_tape` does) and never sends SCSI itself (`drivers.scsi`).

End of medium follows st.rst "EOM Behaviour When Writing": the write that
crosses early warning completes, the next returns ENOSPC with nothing written,
and after that ENOSPC and success alternate until the physical end, where the
ENOSPC is followed by EIO. This class turns that into one `EarlyWarning` (record
not written) and then plain successes until `EndOfMedium`.
"""

from __future__ import annotations

import errno
import fcntl
from collections.abc import Callable
from typing import Any, Protocol

from blockxfer.errors import (
    DeviceError,
    EndOfMedium,
    MediumError,
    UsageError,
    WriteProtected,
)
from blockxfer.tape import EarlyWarning, EndOfData, TapeStatus

from . import ioctls as io
from .blockdev import device_op

Ioctl = Callable[[int, int, Any], Any]


class TapeHandle(Protocol):
    @property
    def name(self) -> Any: ...

    def write(self, data: Any, /) -> int | None: ...
    def readinto(self, buf: Any, /) -> int | None: ...
    def fileno(self) -> int: ...
    def close(self) -> None: ...


def _check_protect(e: OSError, what: str, path: str) -> None:
    if e.errno in (errno.EACCES, errno.EROFS):
        raise WriteProtected(f"{what} {path}: the tape is write-protected") from e


class StTape:
    """A tape on the st no-rewind node (/dev/nstN) or anything that behaves like it."""

    def __init__(self, f: TapeHandle, *, ioctl: Ioctl = fcntl.ioctl):
        self._f, self._ioctl = f, ioctl
        self.path = str(f.name)
        self._ew_reported = False
        self._can_locate: bool | None = None

    # -- ioctls -------------------------------------------------------------
    def _op(self, what: str, op: int, count: int = 1) -> None:
        try:
            with device_op(what, self.path):
                self._ioctl(self._f.fileno(), io.MTIOCTOP, io.MTOP.pack(op, count))
        except DeviceError as e:
            if isinstance(e.__cause__, OSError):
                _check_protect(e.__cause__, what, self.path)
            raise
        if op not in (io.MTWEOF, io.MTWEOFI):
            self._ew_reported = False   # st forgets EOM state on any positioning op

    def status(self) -> TapeStatus:
        with device_op("status", self.path):
            raw = self._ioctl(self._f.fileno(), io.MTIOCGET, bytes(io.MTGET.size))
        _type, _part, dsreg, gstat, _erreg, fileno, blkno = io.MTGET.unpack(raw)
        gstat &= 0xFFFFFFFF

        def bit(b: int) -> bool:
            return bool(gstat & b)

        return TapeStatus(
            online=bit(io.GMT_ONLINE), bot=bit(io.GMT_BOT), eof=bit(io.GMT_EOF),
            eot=bit(io.GMT_EOT) or self._ew_reported, eod=bit(io.GMT_EOD),
            write_protected=bit(io.GMT_WR_PROT), file=fileno, block=blkno,
            block_size=dsreg & io.MT_ST_BLKSIZE_MASK,
            position=self.position() if self.can_locate else None)

    @property
    def can_locate(self) -> bool:
        """Probed once: READ POSITION answers (tgt's drive answers "position unknown")."""
        if self._can_locate is None:
            try:
                self._read_position()
                self._can_locate = True
            except OSError as e:
                if e.errno not in (errno.EIO, errno.ENOSYS, errno.EINVAL, errno.ENOTTY):
                    raise DeviceError(f"read position {self.path}: {e.strerror}") from e
                self._can_locate = False
        return self._can_locate

    def _read_position(self) -> int:
        raw = self._ioctl(self._f.fileno(), io.MTIOCPOS, bytes(io.MTPOS.size))
        return int(io.MTPOS.unpack(raw)[0])

    def position(self) -> int:
        self._need_locate("position")
        with device_op("read position", self.path):
            return self._read_position()

    def locate(self, position: int) -> None:
        self._need_locate("locate")
        self._op("locate", io.MTSEEK, position)

    def _need_locate(self, what: str) -> None:
        if not self.can_locate:
            raise UsageError(f"{what} {self.path}: the drive has no LOCATE/READ POSITION; "
                             "position by filemarks and records")

    def write_filemarks(self, count: int = 1) -> None:
        self._op("write filemark", io.MTWEOF, count)

    def space_filemarks(self, count: int) -> None:
        if count:
            self._space("space filemarks", io.MTFSF if count > 0 else io.MTBSF, abs(count))

    def space_records(self, count: int) -> None:
        if count:
            self._space("space records", io.MTFSR if count > 0 else io.MTBSR, abs(count))

    def _space(self, what: str, op: int, count: int) -> None:
        try:
            self._op(what, op, count)
        except MediumError as e:
            st = self.status()
            if st.eod:
                raise EndOfData(f"{what} {self.path}: ran into end of data") from e
            if op in (io.MTBSF, io.MTBSR) and st.bot:
                raise EndOfData(f"{what} {self.path}: ran into beginning of tape") from e
            if op in (io.MTFSR, io.MTBSR):
                raise MediumError(f"{what} {self.path}: crossed a filemark "
                                  f"(now file {st.file} block {st.block})") from e
            raise

    def rewind(self) -> None:
        self._op("rewind", io.MTREW)

    def seek_eod(self) -> None:
        self._op("space to end of data", io.MTEOM)

    def load(self) -> None:
        self._op("load", io.MTLOAD)

    def unload(self) -> None:
        self._op("unload", io.MTOFFL)

    def erase(self) -> None:
        self._op("erase", io.MTERASE, 1)

    def set_block_size(self, size: int) -> None:
        self._op("set block size", io.MTSETBLK, size)

    # -- data ---------------------------------------------------------------
    def write_record(self, data: bytes | bytearray | memoryview) -> None:
        n = self._write("write", data)
        if n is None:
            if not self._ew_reported:
                self._ew_reported = True
                raise EarlyWarning(f"write {self.path}: early warning, end of medium is near; "
                                   "the record was not written")
            n = self._write("write after early warning", data)   # st lets the next one through
            if n is None:
                raise EndOfMedium(f"write {self.path}: end of medium; the record was not written")
        if n != len(data):
            err = EndOfMedium(f"write {self.path}: end of medium after {n} of "
                              f"{len(data)} bytes; the record is incomplete")
            err.written = n  # type: ignore[attr-defined]
            raise err

    def _write(self, what: str, data: bytes | bytearray | memoryview) -> int | None:
        """Bytes written, or None for ENOSPC; EIO after early warning is the physical end."""
        try:
            return self._f.write(data) or 0
        except OSError as e:
            if e.errno == errno.ENOSPC:
                return None
            _check_protect(e, what, self.path)
            if e.errno == errno.EIO and self._ew_reported:
                raise EndOfMedium(f"{what} {self.path}: end of medium; "
                                  "the record was not written") from e
            if e.errno == errno.EINVAL:
                raise UsageError(f"{what} {self.path}: record size {len(data)} not accepted "
                                 "by the drive (block size or block limits)") from e
            with device_op(what, self.path):
                raise

    def read_record(self, size: int) -> bytes:
        buf = bytearray(size)
        try:
            n = self._f.readinto(buf) or 0
        except OSError as e:
            if e.errno == errno.ENOMEM:
                raise MediumError(f"read {self.path}: the record is larger than {size} bytes "
                                  "(it was skipped)") from e
            if e.errno == errno.EIO and self.status().eod:
                raise EndOfData(f"read {self.path}: end of data") from e
            with device_op("read", self.path):
                raise
        if n == 0 and self.status().eod:
            raise EndOfData(f"read {self.path}: end of data")
        return bytes(buf[:n])

    def close(self) -> None:
        with device_op("close", self.path):
            self._f.close()   # st writes the filemark after a write here; check it

    def __enter__(self) -> StTape:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
