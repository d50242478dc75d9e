"""StTape on a scripted handle that fails like the st driver does."""

from __future__ import annotations

import errno
import os

import pytest

from blockxfer.drivers import ioctls as io
from blockxfer.drivers.st import StTape
from blockxfer.errors import EndOfMedium, MediumError, UsageError, WriteProtected
from blockxfer.tape import EarlyWarning, Tape


class ScriptedTape:
    """One letter per write(): '.' ok, 'h' half written, 'S' ENOSPC, 'E' EIO,
    'P' EACCES, 'I' EINVAL. ioctls answer from `ioctl_errors` (request -> errno)."""

    name = "/dev/nst9"

    def __init__(self, script: str, ioctl_errors: dict[int, int] | None = None, gstat: int = 0):
        self.script, self.written, self.ops = list(script), [], []
        self.ioctl_errors = ioctl_errors or {}
        self.gstat = gstat

    def write(self, data: bytes) -> int:
        step = self.script.pop(0)
        codes = {"S": errno.ENOSPC, "E": errno.EIO, "P": errno.EACCES, "I": errno.EINVAL}
        if step in codes:
            raise OSError(codes[step], os.strerror(codes[step]))
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
            self.ops.append(io.MTOP.unpack(arg))
            return arg
        if request == io.MTIOCGET:
            return io.MTGET.pack(0x72, 0, 0, self.gstat, 0, 0, 0)
        return io.MTPOS.pack(7)


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


def test_short_write_is_reported() -> None:
    t, _ = tape("h")
    with pytest.raises(EndOfMedium, match="2 of 4 bytes") as info:
        t.write_record(b"abcd")
    assert info.value.written == 2  # type: ignore[attr-defined]


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
    t.seek_eod()
    t.set_block_size(0)
    assert f.ops == [(io.MTREW, 1), (io.MTBSF, 2), (io.MTFSR, 3), (io.MTWEOF, 2),
                     (io.MTEOM, 1), (io.MTSETBLK, 0)]


def test_status_bits() -> None:
    g = io.GMT_BOT | io.GMT_ONLINE | io.GMT_WR_PROT
    st = tape("", gstat=g)[0].status()
    assert st.bot and st.online and st.write_protected and not st.eod


def test_eio_on_op_is_medium_error() -> None:
    t, _ = tape("", ioctl_errors={io.MTIOCTOP: errno.EIO})
    with pytest.raises(MediumError):
        t.rewind()
