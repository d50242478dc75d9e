"""One tape conformance suite, modelled on Bareos `btape test`.

It runs unchanged on the virtual tape (with and without LOCATE) in every
`make test`, and on a real st drive when BLOCKXFER_TEST_TAPE=/dev/nstN is set
(the test bed). It writes from BOT: only give it a scratch tape. A drive
without a capability skips the tests that need it, saying so. Fill tests on a
drive need a small medium: set BLOCKXFER_TEST_TAPE_FILL=/dev/nstM to a small
scratch tape (or =1 when the main one is small), and
BLOCKXFER_TEST_TAPE_HARD_EOM=1 when it has a physical end of medium (tgt has
none). BLOCKXFER_TEST_TAPE_WP=/dev/nstM names a write-protected scratch drive.

Drive defects that no adapter can hide are found by `probe_defects` on the
drive itself, once per session; a test that needs the behaviour skips with the
defect as its reason. The virtual tape must show none.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from blockxfer.drivers.tapedefects import (
    BSF_OVERSHOOT,
    FSR_CROSSES_FILEMARK,
    probe_defects,
)
from blockxfer.drivers.tapes import open_tape_handle
from blockxfer.drivers.vtape import create_virtual_tape
from blockxfer.errors import EndOfMedium, MediumError, WriteProtected
from blockxfer.tape import EarlyWarning, EndOfData, Tape

REC = 4096
DRIVE = os.environ.get("BLOCKXFER_TEST_TAPE")
NO_HARD_EOM = ("BLOCKXFER_TEST_TAPE_HARD_EOM is not set: the drive has no physical end of "
               "medium to run into (tgt SSC emulation defect, research §2.4: no VOLUME "
               "OVERFLOW, writes past early warning go on until the host disk fills)")


def record(file: int, n: int, size: int = REC) -> bytes:
    head = f"file {file} record {n};".encode()
    return (head * (size // len(head) + 1))[:size]


class Drive:
    """Opens fresh handles on one medium, like closing and reopening /dev/nstN."""

    def __init__(self, path: str, kind: str):
        self.path, self.kind = path, kind
        self.handles: list[Tape] = []

    def open(self, write: bool = True) -> Tape:
        t = open_tape_handle(self.path, write=write)
        self.handles.append(t)
        return t

    def close_all(self) -> None:
        for t in self.handles:
            with contextlib.suppress(Exception):   # a test may have closed it already
                t.close()


PARAMS = [
    pytest.param("vtape", id="vtape-locate"),
    pytest.param("vtape-nolocate", id="vtape-nolocate"),
    pytest.param("st", id="st", marks=[pytest.mark.device, pytest.mark.skipif(
        not DRIVE, reason="no drive: set BLOCKXFER_TEST_TAPE=/dev/nstN (scratch tape)")]),
]


@pytest.fixture(params=PARAMS)
def drive(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Drive]:
    kind = request.param
    if kind == "st":
        d = Drive(str(DRIVE), kind)
        t = d.open()
        t.rewind()
        t.set_block_size(0)
    else:
        path = str(tmp_path / "t.vtape")
        create_virtual_tape(path, 256 * 1024, early_warning=32 * 1024,
                            locate=kind == "vtape")
        d = Drive(path, kind)
    yield d
    d.close_all()


@pytest.fixture
def tape(drive: Drive) -> Tape:
    t = drive.handles[0] if drive.handles else drive.open()
    t.rewind()
    return t


_DEFECTS: dict[str, dict[str, str]] = {}


@pytest.fixture
def defects(drive: Drive, tape: Tape) -> dict[str, str]:
    """What probe_defects finds on this drive (probed once per session and kind)."""
    if drive.kind not in _DEFECTS:
        _DEFECTS[drive.kind] = probe_defects(tape)
    return _DEFECTS[drive.kind]


def skip_if(defects: dict[str, str], *names: str) -> None:
    for name in names:
        if name in defects:
            pytest.skip(defects[name])


def test_probe_finds_no_defect_on_the_virtual_tape(drive: Drive, defects: dict[str, str]) -> None:
    """The virtual tape and mhvtl (the test bed's default drive) must probe clean."""
    if drive.kind == "st" and os.environ.get("BLOCKXFER_TEST_TAPE_KIND") != "mhvtl":
        pytest.skip("only the virtual tape and mhvtl are known to be free of defects")
    assert defects == {}


def write_files(t: Tape, counts: list[int]) -> None:
    for f, n in enumerate(counts):
        for r in range(n):
            t.write_record(record(f, r))
        t.write_filemarks(1)


def test_rewind_status(tape: Tape) -> None:
    st = tape.status()
    assert st.online and st.bot and st.file == 0 and st.block == 0
    assert st.block_size == 0


def test_write_read_records(tape: Tape) -> None:
    write_files(tape, [20, 20])
    tape.rewind()
    for f in range(2):
        for r in range(20):
            assert tape.read_record(REC) == record(f, r)
        assert tape.read_record(REC) == b""          # the filemark
        assert tape.status().file == f + 1
    with pytest.raises(EndOfData):
        tape.read_record(REC)
    assert tape.status().eod


def test_close_writes_filemark(drive: Drive, tape: Tape) -> None:
    tape.write_record(record(0, 0))
    tape.close()
    t = drive.open()
    t.rewind()
    assert t.read_record(REC) == record(0, 0)
    assert t.read_record(REC) == b""


def test_fsf_bsf(tape: Tape) -> None:
    write_files(tape, [1, 2, 3, 4, 5])
    tape.rewind()
    tape.space_filemarks(1)
    assert tape.status().file == 1
    assert tape.read_record(REC) == record(1, 0)
    tape.space_filemarks(2)
    assert (tape.status().file, tape.read_record(REC)) == (3, record(3, 0))
    tape.rewind()
    tape.space_filemarks(4)
    assert tape.status().file == 4 and tape.status().block == 0
    tape.space_filemarks(-1)                         # before the filemark ending file 3
    assert tape.status().file == 3
    tape.space_filemarks(1)
    assert tape.read_record(REC) == record(4, 0)
    with pytest.raises(EndOfData):
        tape.space_filemarks(2)
    assert tape.status().file == 5 and tape.status().eod


def test_re_read_last_block(tape: Tape, defects: dict[str, str]) -> None:
    """btape re_read_block_test: bsf 1, bsr 1, read gives the last record."""
    skip_if(defects, BSF_OVERSHOOT)
    tape.rewind()
    write_files(tape, [3])
    tape.space_filemarks(-1)
    tape.space_records(-1)
    assert tape.read_record(REC) == record(0, 2)


def test_fsr_bsr(tape: Tape, defects: dict[str, str]) -> None:
    skip_if(defects, FSR_CROSSES_FILEMARK)
    tape.rewind()
    write_files(tape, [5, 1])
    tape.rewind()
    tape.space_records(2)
    assert tape.read_record(REC) == record(0, 2)
    tape.space_records(-2)
    assert tape.read_record(REC) == record(0, 1)
    with pytest.raises(MediumError, match="filemark"):
        tape.space_records(5)
    assert tape.status().file == 1                  # stopped after the filemark
    assert tape.read_record(REC) == record(1, 0)


def test_append_after_eod(drive: Drive, tape: Tape) -> None:
    write_files(tape, [1, 2, 3])
    tape.close()
    t = drive.open()
    t.rewind()
    t.seek_eod()
    assert t.status().file == 3
    t.write_record(record(3, 0))
    t.write_filemarks(1)
    t.rewind()
    t.space_filemarks(3)
    assert t.read_record(REC) == record(3, 0)
    assert t.read_record(REC) == b""
    with pytest.raises(EndOfData):
        t.read_record(REC)


def test_write_mid_tape_truncates(tape: Tape) -> None:
    write_files(tape, [2, 2, 2])
    tape.rewind()
    tape.space_filemarks(1)
    tape.write_record(record(9, 9))
    tape.write_filemarks(1)
    tape.rewind()
    tape.seek_eod()
    assert tape.status().file == 2
    tape.rewind()
    tape.space_filemarks(1)
    assert tape.read_record(REC) == record(9, 9)


def test_position_by_spacing(tape: Tape) -> None:
    """btape position_test, done the way a drive without LOCATE must."""
    write_files(tape, [10, 10])
    for f, r in [(0, 4), (0, 9), (1, 0), (1, 6), (0, 0)]:
        tape.rewind()
        tape.space_filemarks(f)
        tape.space_records(r)
        assert tape.read_record(REC) == record(f, r)


def test_locate_round_trip(tape: Tape) -> None:
    if not tape.can_locate:
        pytest.skip("drive has no LOCATE/READ POSITION")
    positions = []
    for f in range(2):
        for r in range(5):
            positions.append((tape.position(), record(f, r)))
            tape.write_record(record(f, r))
        tape.write_filemarks(1)
    for pos, data in reversed(positions):
        tape.locate(pos)
        assert tape.position() == pos
        assert tape.read_record(REC) == data


def test_no_locate_is_refused_cleanly(tape: Tape) -> None:
    if tape.can_locate:
        pytest.skip("drive has LOCATE")
    with pytest.raises(Exception, match="no LOCATE"):
        tape.locate(3)


def _fill(tape: Tape) -> list[bytes]:
    """Write until early warning; returns the records the tape accepted."""
    written: list[bytes] = []
    for n in range(100_000):
        data = record(0, n)
        try:
            tape.write_record(data)
        except EarlyWarning:
            return written
        written.append(data)
    raise AssertionError("no early warning")


@pytest.fixture
def fill_tape(drive: Drive, tape: Tape) -> Iterator[Tape]:
    """A tape small enough to fill: the virtual one, or BLOCKXFER_TEST_TAPE_FILL."""
    fill = os.environ.get("BLOCKXFER_TEST_TAPE_FILL")
    if drive.kind != "st" or fill == "1":
        yield tape
        return
    if not fill:
        pytest.skip("filling a drive needs a small scratch medium: "
                    "BLOCKXFER_TEST_TAPE_FILL=/dev/nstM (or =1: the main tape is small)")
    small = Drive(fill, "st")
    t = small.open()
    t.rewind()
    t.set_block_size(0)
    yield t
    small.close_all()


def test_early_warning_then_trailer(fill_tape: Tape) -> None:
    tape = fill_tape
    written = _fill(tape)
    assert tape.status().eot
    trailer = [record(7, i) for i in range(3)]
    for data in trailer:                             # st alternates ENOSPC: hidden here
        tape.write_record(data)
    tape.write_filemarks(1)
    tape.rewind()
    got = [tape.read_record(REC) for _ in range(len(written) + len(trailer))]
    assert got == written + trailer                 # nothing lost, nothing doubled
    assert tape.read_record(REC) == b""


def test_end_of_medium(drive: Drive, fill_tape: Tape) -> None:
    if drive.kind == "st" and not os.environ.get("BLOCKXFER_TEST_TAPE_HARD_EOM"):
        pytest.skip(NO_HARD_EOM)
    tape = fill_tape
    written = _fill(tape)
    with pytest.raises(EndOfMedium) as info:
        for n in range(100_000):
            tape.write_record(record(1, n))
            written.append(record(1, n))
    assert not isinstance(info.value, EarlyWarning)
    tape.rewind()                                   # st writes a filemark first if it fits
    for data in written:
        assert tape.read_record(REC) == data
    with contextlib.suppress(EndOfData):
        assert tape.read_record(REC) == b""


def test_record_larger_than_read(tape: Tape) -> None:
    tape.write_record(record(0, 0, 8192))
    tape.write_record(record(0, 1))
    tape.rewind()
    with pytest.raises(MediumError, match="larger"):
        tape.read_record(REC)
    assert tape.read_record(REC) == record(0, 1)     # st skipped the big one


def test_fixed_block_mode(tape: Tape) -> None:
    tape.set_block_size(512)
    try:
        assert tape.status().block_size == 512
        tape.write_record(record(0, 0, 2048))
        tape.write_filemarks(1)
        tape.rewind()
        assert b"".join(tape.read_record(512) for _ in range(4)) == record(0, 0, 2048)
        assert tape.read_record(512) == b""
    finally:
        tape.set_block_size(0)


@pytest.fixture
def protected(drive: Drive, tmp_path: Path) -> Callable[[], Tape]:
    if drive.kind == "st":
        wp = os.environ.get("BLOCKXFER_TEST_TAPE_WP")
        if not wp:
            pytest.skip("no write-protected drive: set BLOCKXFER_TEST_TAPE_WP=/dev/nstM")
        return lambda: open_tape_handle(wp)
    path = str(tmp_path / "wp.vtape")
    create_virtual_tape(path, 64 * 1024, locate=drive.kind == "vtape", write_protect=True)
    return lambda: open_tape_handle(path)


def test_write_protect(protected: Callable[[], Tape]) -> None:
    t = protected()
    try:
        assert t.status().write_protected
        with pytest.raises(WriteProtected):
            t.write_record(record(0, 0))
        with pytest.raises(WriteProtected):
            t.write_filemarks(1)
        t.rewind()
    finally:
        t.close()
