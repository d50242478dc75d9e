"""StTape on a scripted handle that fails like the st driver does."""

from __future__ import annotations

import errno
import os

import pytest

from blockxfer.drivers import ioctls as io
from blockxfer.drivers.st import StTape
from blockxfer.errors import EndOfMedium, MediumError, UsageError, WriteProtected
from blockxfer.tape import EarlyWarning, EndOfData, Tape


class ScriptedTape:
    """One letter per write(): '.' ok, 'h' half written, 'S' ENOSPC, 'E' EIO,
    'P' EACCES, 'I' EINVAL, 'X' the full count returned but nothing written (st past
    the physical end on mhvtl: VOLUME OVERFLOW hidden). ioctls answer from
    `ioctl_errors` (request -> errno); READ POSITION is 7 + the records written."""

    name = "/dev/nst9"

    def __init__(self, script: str, ioctl_errors: dict[int, int] | None = None, gstat: int = 0,
                 files: int | None = None, flags_eod: bool = True):
        self.script = list(script)
        self.written: list[bytes] = []
        self.ops: list[tuple[int, int]] = []
        self.ioctl_errors = ioctl_errors or {}
        self.gstat = gstat
        # files: filemarks before end of data (MTFSF beyond them fails with EIO);
        # flags_eod: st then shows GMT_EOD (a drive with BLANK CHECK), else a bare EIO (tgt)
        self.files, self.flags_eod, self.file = files, flags_eod, 0
        self.bad_fsf = 0                             # this many MTFSF fail with a medium error

    def write(self, data: bytes) -> int:
        step = self.script.pop(0)
        codes = {"S": errno.ENOSPC, "E": errno.EIO, "P": errno.EACCES, "I": errno.EINVAL}
        if step in codes:
            raise OSError(codes[step], os.strerror(codes[step]))
        if step == "X":
            return len(data)
        n = len(data) // 2 if step == "h" else len(data)
        self.written.append(bytes(data[:n]))
        return n

    def readinto(self, buf: bytearray) -> int:
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    def fileno(self) -> int:
        return 99

    def close(self) -> None:
        pass

    def ioctl(self, fd: int, request: int, arg: bytes) -> bytes:
        assert fd == 99
        if request in self.ioctl_errors:
            code = self.ioctl_errors[request]
            raise OSError(code, os.strerror(code))
        if request == io.MTIOCTOP:
            op, count = io.MTOP.unpack(arg)
            self.ops.append((op, count))
            if op == io.MTREW:
                self.file = 0
            elif op == io.MTEOM and self.files is not None:
                self.file = self.files
            elif op == io.MTFSF and self.bad_fsf:
                self.bad_fsf -= 1
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            elif op == io.MTFSF and self.files is not None:
                if self.file + count > self.files:
                    self.file = self.files
                    if self.flags_eod:
                        self.gstat |= io.GMT_EOD
                    raise OSError(errno.EIO, os.strerror(errno.EIO))
                self.file += count
            return arg
        if request == io.MTIOCGET:
            return io.MTGET.pack(0x72, 0, 0, self.gstat, 0, 0, 0)
        return io.MTPOS.pack(7 + len(self.written))


def tape(script: str, **kw) -> tuple[StTape, ScriptedTape]:
    f = ScriptedTape(script, **kw)
    return StTape(f, ioctl=f.ioctl), f


def test_is_a_tape() -> None:
    assert isinstance(tape("")[0], Tape)


def test_early_warning_once_then_alternation_hidden() -> None:
    t, f = tape(".S.S.S.")
    t.write_record(b"a")
    with pytest.raises(EarlyWarning):
        t.write_record(b"b")                      # not written
    t.write_record(b"b")                          # S then . : retried
    t.write_record(b"c")
    t.write_record(b"d")                          # ends on the last '.'
    assert f.written == [b"a", b"b", b"c", b"d"]
    assert t.status().eot


def test_physical_end_after_early_warning() -> None:
    t, f = tape("SSEE")
    with pytest.raises(EarlyWarning):
        t.write_record(b"x")
    with pytest.raises(EndOfMedium) as info:
        t.write_record(b"x")
    assert not isinstance(info.value, EarlyWarning)
    with pytest.raises(EndOfMedium, match="end of medium"):
        t.write_record(b"x")
    assert f.written == []


def test_physical_end_hidden_by_st_is_found_by_read_position() -> None:
    """mhvtl past its physical end: st returns the count (alternating with ENOSPC as
    in the early-warning zone) but the position does not move: EndOfMedium."""
    t, f = tape(".S.SX")
    t.write_record(b"a")
    with pytest.raises(EarlyWarning):
        t.write_record(b"b")
    t.write_record(b"b")                           # checked: the position moved
    with pytest.raises(EndOfMedium, match="physical end of medium") as info:
        t.write_record(b"c")                       # S then X: st said written, it is not
    assert not isinstance(info.value, EarlyWarning)
    assert f.written == [b"a", b"b"]
    assert t.status().block == 2                   # only what is on tape is counted


def test_no_read_position_no_check() -> None:
    """A drive without READ POSITION (tgt) has no physical end to hide: no check."""
    t, f = tape(".S.", ioctl_errors={io.MTIOCPOS: errno.EIO})
    t.write_record(b"a")
    with pytest.raises(EarlyWarning):
        t.write_record(b"b")
    t.write_record(b"b")
    assert f.written == [b"a", b"b"]


def test_short_write_is_reported() -> None:
    t, _ = tape("h")
    with pytest.raises(EndOfMedium, match="2 of 4 bytes") as info:
        t.write_record(b"abcd")
    assert info.value.written == 2  # type: ignore[attr-defined]  # set by the driver


def test_write_protect_and_bad_size() -> None:
    t, _ = tape("PI")
    with pytest.raises(WriteProtected):
        t.write_record(b"x")
    with pytest.raises(UsageError, match="block limits"):
        t.write_record(b"x")


def test_read_smaller_than_record() -> None:
    t, _ = tape("")
    with pytest.raises(MediumError, match="larger than 10"):
        t.read_record(10)


def test_locate_probed_not_assumed() -> None:
    t, _ = tape("", ioctl_errors={io.MTIOCPOS: errno.EIO})
    assert not t.can_locate and t.status().position is None
    with pytest.raises(UsageError, match="no LOCATE"):
        t.locate(5)
    t2, f2 = tape("")
    assert t2.can_locate and t2.position() == 7
    t2.locate(3)
    assert f2.ops == [(io.MTSEEK, 3)]


def test_ops_send_mtioctop() -> None:
    t, f = tape("")
    t.rewind()
    t.space_filemarks(-2)
    t.space_records(3)
    t.write_filemarks(2)
    t.set_block_size(0)
    assert f.ops == [(io.MTREW, 1), (io.MTBSF, 2), (io.MTFSR, 3), (io.MTWEOF, 2),
                     (io.MTSETBLK, 0)]


FAST_EOM = (io.MTSETDRVBUFFER, io.MT_ST_SETBOOLEANS | io.MT_ST_FAST_MTEOM)


def test_seek_eod_counts_files_itself() -> None:
    t, f = tape("", files=2)
    t.seek_eod()
    assert f.ops == [FAST_EOM, (io.MTFSF, 1), (io.MTFSF, 1), (io.MTFSF, 1), (io.MTEOM, 1)]
    st = t.status()
    assert (st.file, st.block, st.eod) == (2, -1, True)


def test_seek_eod_on_a_drive_that_does_not_flag_eod() -> None:
    """tgt: SPACE into EOD is a bare EIO; a second SPACE at EOD (the probe) says so."""
    t, f = tape("", files=3, flags_eod=False)
    t.seek_eod()
    assert f.ops[-4:] == [FAST_EOM, (io.MTEOM, 1), (io.MTFSF, 1), (io.MTEOM, 1)]
    assert t.status().file == 3
    with pytest.raises(EndOfData):                  # probed once: no second probe
        t.space_filemarks(1)
    assert f.ops[-1] == (io.MTFSF, 1)


def test_space_eio_mid_tape_is_a_medium_error_on_a_flagging_drive() -> None:
    """A bare EIO is end of data only on a drive that the probe shows never flags it."""
    t, f = tape("", files=5)
    t.rewind()
    f.bad_fsf = 1                                    # one medium error, no EOD flag
    with pytest.raises(MediumError) as info:
        t.space_filemarks(1)
    assert not isinstance(info.value, EndOfData)
    assert f.ops[-4:] == [(io.MTFSF, 1), FAST_EOM, (io.MTEOM, 1), (io.MTFSF, 1)]   # probe
    assert t.status().file == -1                     # position lost


def test_status_bits() -> None:
    g = io.GMT_BOT | io.GMT_ONLINE | io.GMT_WR_PROT
    st = tape("", gstat=g)[0].status()
    assert st.bot and st.online and st.write_protected and not st.eod


def test_eio_on_op_is_medium_error() -> None:
    t, _ = tape("", ioctl_errors={io.MTIOCTOP: errno.EIO})
    with pytest.raises(MediumError):
        t.rewind()
