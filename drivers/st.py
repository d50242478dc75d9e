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

Past the physical end st may not say so at all: measured on mhvtl (LTO-5,
variable blocks), every write the drive answers with VOLUME OVERFLOW + EOM (sense
4d/00/02) still returns the full count to user space, alternating with ENOSPC
exactly as in the early-warning zone, with the same MTIOCGET bits (GMT_EOT, then
GMT_EOD) and mt_erreg 0; only READ POSITION shows that the tape did not move.
So once early warning was reported, every write on a drive that can READ
POSITION is checked: a record that did not move the position was not written,
and that is `EndOfMedium`.

File and block numbers are counted here, not taken from st: st's own count is
only as good as the residuals the drive reports, and emulated drives (tgt
1.0.85, research §2.6) report none at end of data, so st's MTEOM leaves file
8388607 behind and a read after the last filemark returns a full-size block of
nothing. So filemarks are spaced one at a time, end of data is recognised from
st's EOD/EOT state after every read (not by "read until two zeros"), and
MTEOM runs with MT_ST_FAST_MTEOM after the files were counted. Whether the
drive flags end of data when SPACE runs into it is probed once, at end of data.
"""

from __future__ import annotations

import contextlib
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
        self._file: int | None = None       # own count; None: not yet taken from st
        self._block = -1                    # -1: unknown
        self._at_eod = False
        self._block_size: int | None = None
        self._space_eod_flagged: bool | None = None   # probed at end of data

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

    def _mtget(self) -> tuple[int, int, int, int]:
        """(gstat, fileno, blkno, block size) as st reports them."""
        with device_op("status", self.path):
            try:
                raw = self._ioctl(self._f.fileno(), io.MTIOCGET, bytes(io.MTGET.size))
            except OSError as e:
                if e.errno == errno.ENOTTY:       # a character device, but not st
                    raise DeviceError(f"{self.path} is not a tape drive (it does not answer "
                                      "the st driver's MTIOCGET); give /dev/nstN or a "
                                      "virtual tape file") from e
                raise
        _type, _part, dsreg, gstat, _erreg, fileno, blkno = io.MTGET.unpack(raw)
        return gstat & 0xFFFFFFFF, fileno, blkno, dsreg & io.MT_ST_BLKSIZE_MASK

    def _where(self) -> tuple[int, int]:
        """Own (file, block); the first call starts from st's count."""
        if self._file is None:
            _g, self._file, self._block, self._block_size = self._mtget()
        return self._file, self._block

    def _moved(self, file: int, block: int, *, eod: bool = False) -> None:
        self._file, self._block, self._at_eod = file, block, eod

    def _next_file(self, n: int = 1) -> None:
        file, _ = self._where()
        self._moved(file + n if file >= 0 else -1, 0)

    def _add_blocks(self, n: int) -> None:
        self._where()
        self._at_eod = False
        if self._block >= 0:
            self._block += n

    def status(self) -> TapeStatus:
        gstat, _f, _b, block_size = self._mtget()
        file, block = self._where()

        def bit(b: int) -> bool:
            return bool(gstat & b)

        return TapeStatus(
            online=bit(io.GMT_ONLINE), bot=(file, block) == (0, 0),
            eof=block == 0 and file > 0,
            eot=bit(io.GMT_EOT) or self._ew_reported, eod=bit(io.GMT_EOD) or self._at_eod,
            write_protected=bit(io.GMT_WR_PROT), file=file, block=block,
            block_size=block_size,
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
        self._moved(-1, -1)

    def _need_locate(self, what: str) -> None:
        if not self.can_locate:
            raise UsageError(f"{what} {self.path}: the drive has no LOCATE/READ POSITION; "
                             "position by filemarks and records")

    def write_filemarks(self, count: int = 1) -> None:
        self._op("write filemark", io.MTWEOF, count)
        self._next_file(count)

    def space_filemarks(self, count: int) -> None:
        # Forward one filemark at a time: a drive without residuals (tgt) leaves
        # st unable to say how many it crossed before end of data.
        for _ in range(count):
            self._fsf_one()
        if count < 0:
            self._bsf(-count)

    def _fsf_one(self) -> None:
        self._where()
        try:
            self._op("space filemarks", io.MTFSF, 1)
        except MediumError as e:
            if self._ran_into_eod():
                self._moved(self._file if self._file is not None else -1, -1, eod=True)
                raise EndOfData(f"space filemarks {self.path}: ran into end of data") from e
            self._moved(-1, -1)
            raise
        self._next_file()

    def _ran_into_eod(self) -> bool:
        """After a forward SPACE failed with EIO: was it end of data?"""
        if self._mtget()[0] & io.GMT_EOD:
            return True             # the drive said BLANK CHECK/EOD and st flagged it
        if self._space_eod_flagged is None:
            self._space_eod_flagged = self._probe_space_eod()
        # A drive that never flags it (tgt: NO SENSE 00/05) leaves only a bare EIO.
        return not self._space_eod_flagged

    def _probe_space_eod(self) -> bool:
        """Go to end of data and space on: does st flag EOD there?"""
        self._fast_eom()
        self._op("space to end of data", io.MTEOM)
        try:
            self._op("space filemarks", io.MTFSF, 1)
        except MediumError:
            return bool(self._mtget()[0] & io.GMT_EOD)
        return True     # spaced past end of data: treat failures as real errors

    def _bsf(self, count: int) -> None:
        file, _ = self._where()
        try:
            self._op("space filemarks", io.MTBSF, count)
        except MediumError as e:
            if self._mtget()[0] & io.GMT_BOT:
                self._moved(0, 0)
                raise EndOfData(f"space filemarks {self.path}: ran into beginning of tape") from e
            self._moved(-1, -1)
            raise
        self._moved(file - count if file >= count else -1, -1)   # before the filemark

    def space_records(self, count: int) -> None:
        if not count:
            return
        file, block = self._where()
        _g, st_file, _b, _bs = self._mtget()
        forward = count > 0
        try:
            self._op("space records", io.MTFSR if forward else io.MTBSR, abs(count))
        except MediumError as e:
            gstat, st_after, st_block, _bs = self._mtget()
            if gstat & io.GMT_EOD:
                self._moved(file, -1, eod=True)
                raise EndOfData(f"space records {self.path}: ran into end of data") from e
            if not forward and gstat & io.GMT_BOT:
                self._moved(0, 0)
                raise EndOfData(f"space records {self.path}: ran into beginning of tape") from e
            crossed = (st_after == st_file + 1 or (st_file < 0 and st_block == 0)) if forward \
                else st_after == st_file - 1
            if not crossed:
                self._moved(-1, -1)
                raise
            # st stops after the filemark going forward, before it going back
            if forward:
                self._next_file()
            else:
                self._moved(file - 1 if file > 0 else -1, -1)
            raise MediumError(f"space records {self.path}: crossed a filemark "
                              f"(now file {self._file} block {self._block})") from e
        if forward:
            self._add_blocks(count)
        else:
            self._moved(file, block + count if block >= -count else -1)

    def rewind(self) -> None:
        self._op("rewind", io.MTREW)
        self._moved(0, 0)

    def seek_eod(self) -> None:
        """Count the files up to end of data, then land on it (MTEOM)."""
        if self._where()[0] < 0:
            self.rewind()
        self._fast_eom()
        while True:
            try:
                self._fsf_one()
            except EndOfData:
                break
        self._op("space to end of data", io.MTEOM)
        self._moved(self._file if self._file is not None else -1, -1, eod=True)

    def _fast_eom(self) -> None:
        """MT_ST_FAST_MTEOM: MTEOM goes straight to EOD instead of st counting files
        with MTFSF 0x7fffff (the count is kept here). Needs CAP_SYS_ADMIN; best effort."""
        with contextlib.suppress(DeviceError):
            self._op("set drive options", io.MTSETDRVBUFFER,
                     io.MT_ST_SETBOOLEANS | io.MT_ST_FAST_MTEOM)

    def load(self) -> None:
        self._op("load", io.MTLOAD)
        self._moved(0, 0)

    def unload(self) -> None:
        self._op("unload", io.MTOFFL)
        self._moved(0, 0)

    def erase(self) -> None:
        self._op("erase", io.MTERASE, 1)

    def set_compression(self, on: bool) -> None:
        """Drive compression through st's MTCOMPRESSION (mode page 0x0F DCE)."""
        try:
            self._op("set compression", io.MTCOMPRESSION, 1 if on else 0)
        except DeviceError as e:
            # st answers EIO when page 0x0F says the drive cannot compress (DCC=0)
            raise DeviceError(f"{self.path}: the drive cannot switch compression "
                              f"{'on' if on else 'off'} ({e})") from e

    def set_block_size(self, size: int) -> None:
        self._op("set block size", io.MTSETBLK, size)
        self._block_size = size

    # -- data ---------------------------------------------------------------
    def _blocks_in(self, nbytes: int) -> int:
        if self._block_size is None:
            self._block_size = self._mtget()[3]
        return nbytes // self._block_size if self._block_size else 1

    def write_record(self, data: bytes | bytearray | memoryview) -> None:
        if self._ew_reported and self.can_locate:
            self._write_checked(data)
            return
        n = self._write("write", data)
        if n is None:
            if not self._ew_reported:
                self._ew_reported = True
                raise EarlyWarning(f"write {self.path}: early warning, end of medium is near; "
                                   "the record was not written")
            n = self._write("write after early warning", data)   # st lets the next one through
            if n is None:
                raise EndOfMedium(f"write {self.path}: end of medium; the record was not written")
        self._add_blocks(self._blocks_in(n) if n else 0)
        if n != len(data):
            err = EndOfMedium(f"write {self.path}: end of medium after {n} of "
                              f"{len(data)} bytes; the record is incomplete")
            err.written = n  # type: ignore[attr-defined]
            raise err

    def _write_checked(self, data: bytes | bytearray | memoryview) -> None:
        """A write past early warning, checked with READ POSITION (see the module doc)."""
        with device_op("read position", self.path):
            before = self._read_position()
        n = self._write("write after early warning", data)
        if n is None:                  # st's alternation: the next write goes to the drive
            n = self._write("write after early warning", data)
            if n is None:
                raise EndOfMedium(f"write {self.path}: end of medium; the record was not written")
        with device_op("read position", self.path):
            moved = self._read_position() - before
        blocks = self._blocks_in(n) if n else 0
        if moved < blocks:
            self._add_blocks(max(moved, 0))
            raise EndOfMedium(f"write {self.path}: physical end of medium (the drive took "
                              f"{max(moved, 0)} of {blocks} blocks; READ POSITION stayed at "
                              f"{before + max(moved, 0)}); the record was not written")
        self._add_blocks(blocks)
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
        """One record, b"" at a filemark; EndOfData at end of data.

        st's EOD/EOT state is checked after every read: a drive that answers a
        read at end of data with EOM sense but no residual (tgt) makes st hand
        back `size` bytes that were never read.
        """
        self._where()
        if self._at_eod:
            raise EndOfData(f"read {self.path}: end of data")
        buf = bytearray(size)
        try:
            n = self._f.readinto(buf) or 0
        except OSError as e:
            if e.errno == errno.ENOMEM:
                self._add_blocks(1)
                raise MediumError(f"read {self.path}: the record is larger than {size} bytes "
                                  "(it was skipped)") from e
            if e.errno == errno.EIO and self._mtget()[0] & io.GMT_EOD:
                self._at_eod = True
                raise EndOfData(f"read {self.path}: end of data") from e
            with device_op("read", self.path):
                raise
        gstat = self._mtget()[0]
        if gstat & io.GMT_EOD or (n and gstat & io.GMT_EOT):
            self._at_eod = True
            raise EndOfData(f"read {self.path}: end of data")
        if n == 0:
            self._next_file()
            return b""
        self._add_blocks(self._blocks_in(n))
        return bytes(buf[:n])

    def close(self) -> None:
        with device_op("close", self.path):
            self._f.close()   # st writes the filemark after a write here; check it

    def __enter__(self) -> StTape:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
