"""The media changer: `mtx status` parsing on captured outputs, mtx errors as one
line, the changer's next_tape choosing slots, discovery from a captured sysfs, and
dump/restore spanning tapes through a fake library of virtual tapes (in-process
and as an `mtx` script on PATH behind the CLI)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from blockxfer import cli
from blockxfer.drivers.changer import (
    Changer,
    ChangerStatus,
    Drive,
    Slot,
    changer_next_tape,
    parse_status,
)
from blockxfer.drivers.discovery import changers
from blockxfer.drivers.vtape import create_virtual_tape
from blockxfer.errors import DeviceError, EndOfMedium, FormatError, VolumeError
from blockxfer.transfer.tapeset import label_tape, list_tape
from tests.fake_mtx import FakeMtx, make_library
from tests.test_stream import snapshot_contents
from tests.test_tape_dump import LEVELS, dump, opener, restore, src  # noqa: F401

DATA = Path(__file__).parent / "data"
MiB = 1 << 20


# -- parsing and errors ------------------------------------------------------------------------
def test_parse_status_with_barcodes_and_import_export() -> None:
    st = parse_status((DATA / "mtx" / "status-msl.txt").read_text())
    assert st.drives == [Drive(0, True, 2, "A00002L8"), Drive(1, False, None, None)]
    assert st.slots[0] == Slot(1, True, "A00001L8")
    assert st.slots[1] == Slot(2, False, None)
    assert st.slots[5] == Slot(6, True, "A00006L8", import_export=True)
    assert [s.number for s in st.slots if s.full] == [1, 3, 4, 6]


def test_parse_status_of_tgt_changer() -> None:
    """Captured in the test bed: tgt pads volume tags with spaces to 32 bytes."""
    st = parse_status((DATA / "mtx" / "status-tgt.txt").read_text())
    assert st.drives == [Drive(0, False, None, None)]
    assert [(s.number, s.barcode) for s in st.slots] == [
        (1, "CHG001L8"), (2, "CHG002L8"), (3, "CHG003L8")]


def test_parse_status_without_barcodes() -> None:
    st = parse_status((DATA / "mtx" / "status-notags.txt").read_text())
    assert st.drives == [Drive(0, True, None, None)]
    assert [(s.number, s.full, s.barcode) for s in st.slots] == [
        (1, True, None), (2, False, None), (3, True, None)]


def test_parse_status_of_something_else() -> None:
    with pytest.raises(DeviceError, match="no drives and no slots"):
        parse_status("mtx: Request Sense: Long Report=yes\n")


def scripted(*answers: tuple[int, str, str]) -> tuple[Callable[[list[str]], tuple[int, str, str]],
                                                     list[list[str]]]:
    calls: list[list[str]] = []
    queue = list(answers)

    def run(args: list[str]) -> tuple[int, str, str]:
        calls.append(args)
        return queue.pop(0)
    return run, calls


def test_mtx_error_is_one_line_naming_the_changer() -> None:
    run, calls = scripted((1, "Loading media from Storage Element 2 into drive 0...",
                           "mtx: Request Sense: Sense Key=Illegal Request\n"
                           "Source Element Address 1001 is Empty\n"))
    with pytest.raises(DeviceError) as e:
        Changer("/dev/sg3", run=run).load(2, 0)
    assert calls == [["-f", "/dev/sg3", "load", "2", "0"]]
    msg = str(e.value)
    assert "\n" not in msg
    assert msg == "changer /dev/sg3: mtx load 2 0: Source Element Address 1001 is Empty"


def test_mtx_missing_device_and_missing_program(monkeypatch: pytest.MonkeyPatch) -> None:
    run, _ = scripted((1, "", "cannot open SCSI device '/dev/sg9' - No such file or directory"))
    with pytest.raises(DeviceError, match="/dev/sg9.*No such file"):
        Changer("/dev/sg9", run=run).status()
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(DeviceError, match="apt install mtx"):
        Changer("/dev/sg9").status()


# -- choosing the next slot --------------------------------------------------------------------
class Library:
    """An in-memory changer for the slot-choice tests (no tapes behind it)."""

    def __init__(self, drive: Drive, slots: list[Slot]):
        self.st = ChangerStatus([drive], slots)
        self.moves: list[str] = []
        self.device = "/dev/sg7"

    def status(self) -> ChangerStatus:
        return self.st

    def _set(self, drive: Drive, slot: Slot) -> None:
        self.st = ChangerStatus([drive], [slot if s.number == slot.number else s
                                          for s in self.st.slots])

    def unload(self, slot: int, drive: int) -> None:
        d = self.st.drives[0]
        self.moves.append(f"unload {slot}")
        self._set(Drive(0, False, None, None), Slot(slot, True, d.barcode))

    def load(self, slot: int, drive: int) -> None:
        s = next(x for x in self.st.slots if x.number == slot)
        self.moves.append(f"load {slot}")
        self._set(Drive(0, True, slot, s.barcode), Slot(slot, False, None))


def _slots(*tags: str | None) -> list[Slot]:
    return [Slot(n, t is not None, t or None) for n, t in enumerate(tags, 1)]


def test_next_full_slot_after_the_one_unloaded_skipping_cleaning() -> None:
    lib = Library(Drive(0, True, 2, "A2"), _slots("A1", None, "CLN01", "A4"))
    ejected: list[str] = []
    nt = changer_next_tape(lib, 0, "/dev/nst0", eject=ejected.append)
    assert nt("weekly", 2) == "/dev/nst0"
    assert lib.moves == ["unload 2", "load 4"] and nt.slot == 4
    assert ejected == ["/dev/nst0"]
    with pytest.raises(EndOfMedium, match="no full slot after slot 4 for tape 3 of set 'weekly'"):
        nt("weekly", 3)


def test_barcode_mapping_wins_over_slot_order() -> None:
    lib = Library(Drive(0, True, 1, "A1"), _slots(None, "A2", "A3"))
    nt = changer_next_tape(lib, 0, "/dev/nst0",
                           barcodes={("weekly", 2): "A3"})
    nt("weekly", 2)
    assert lib.moves == ["unload 1", "load 3"]
    with pytest.raises(EndOfMedium, match="no slot holds B9, tape 3"):
        changer_next_tape(lib, 0, "/dev/nst0",
                          barcodes={("weekly", 3): "B9"})("weekly", 3)


def test_empty_drive_takes_the_first_full_slot() -> None:
    lib = Library(Drive(0, False, None, None), _slots(None, "A2", "A3"))
    changer_next_tape(lib, 0, "/dev/nst0")("s", 2)
    assert lib.moves == ["load 2"]


def test_refused_tape_names_its_slot() -> None:
    lib = Library(Drive(0, True, 1, "A1"), _slots(None, "A2"))
    nt = changer_next_tape(lib, 0, "/dev/nst0",
                           label_of=lambda path: ("monthly", 5))
    with pytest.raises(VolumeError, match=r"changer /dev/sg7 slot 2 \(A2\) holds tape 5 of set "
                       r"'monthly', not tape 2 of set 'weekly'"):
        nt("weekly", 2)
    blank = changer_next_tape(lib, 0, "/dev/nst0", label_of=lambda path: None)
    lib.st = ChangerStatus([Drive(0, True, 1, "A1")], _slots(None, "A2"))
    assert blank("weekly", 2) == "/dev/nst0"


def test_pool_of_barcodes_skips_tapes_of_other_sets() -> None:
    """--changer-tapes 'B*': the pool's tapes in slot order; a tape of another set is
    put back and the next tried; the barcodes used are recorded for the set."""
    lib = Library(Drive(0, True, 1, "A1"), _slots(None, "B2", "X3", "B4"))
    labels = {"B2": ("monthly", 1), "B4": None}

    def label_of(path: str) -> tuple[str, int] | None:
        return labels[lib.status().drive(0).barcode or ""]
    nt = changer_next_tape(lib, 0, "/dev/nst0", label_of=label_of,
                           tapes=["B*"])
    assert nt("weekly", 2) == "/dev/nst0"
    assert lib.moves == ["unload 1", "load 2", "unload 2", "load 4"]
    assert nt.used == {1: "A1", 2: "B4"}


def test_pool_tape_that_is_not_a_blockxfer_tape_is_skipped() -> None:
    lib = Library(Drive(0, True, 1, "A1"), _slots(None, "B2", "B3"))

    def label_of(path: str) -> tuple[str, int] | None:
        if lib.status().drive(0).barcode == "B2":
            raise FormatError("/dev/nst0 holds data that is not a blockxfer tape")
        return ("weekly", 2)
    nt = changer_next_tape(lib, 0, "/dev/nst0", label_of=label_of,
                           tapes=["B*"], restore=True)
    nt("weekly", 2)
    assert lib.moves[-1] == "load 3" and nt.used[2] == "B3"


def test_barcode_list_for_a_restore_wants_the_labelled_tape() -> None:
    """A restore from a list of barcodes: a blank tape is not tape 2 of the set."""
    lib = Library(Drive(0, True, 1, "A1"), _slots(None, "B2", "B3"))
    labels = {"B2": None, "B3": ("weekly", 2)}

    def label_of(path: str) -> tuple[str, int] | None:
        return labels[lib.status().drive(0).barcode or ""]
    nt = changer_next_tape(lib, 0, "/dev/nst0", label_of=label_of,
                           tapes=["B2", "B3"], restore=True)
    nt("weekly", 2)
    assert lib.moves[-1] == "load 3" and nt.used[2] == "B3"
    labels["B3"] = None
    lib2 = Library(Drive(0, True, 1, "A1"), _slots(None, "B2", "B3"))
    lib = lib2
    nt2 = changer_next_tape(lib2, 0, "/dev/nst0", label_of=label_of,
                            tapes=["B2", "B3"], restore=True)
    with pytest.raises(EndOfMedium, match=r"none of the tapes B2,B3 holds tape 2 of set "
                       r"'weekly' \(tried B2 \(blank\), B3 \(blank\)\)"):
        nt2("weekly", 2)


# -- discovery -----------------------------------------------------------------------------------
def test_changers_from_captured_sysfs() -> None:
    found = changers(sysfs=DATA / "sys")
    assert [c.as_dict() for c in found] == [
        {"path": "/dev/sg1", "address": "0:0:1:0", "vendor": "STGT", "model": "VIRTUAL-CHANGER"}]
    assert changers(sysfs=DATA / "nonexistent") == []


# -- dump and restore through a fake library of virtual tapes ------------------------------------
def _library(tmp_path: Path, n: int, first_loaded: bool = True) -> tuple[Path, str, list[str]]:
    tapes = [str(tmp_path / f"T{i}.vtape") for i in range(1, n + 1)]
    for t in tapes:
        create_virtual_tape(t, 5 * MiB, early_warning=1 * MiB)
    drive = str(tmp_path / "drive0")
    state = tmp_path / "library.json"
    make_library(state, [drive], [(t, f"BX{i:04d}L8") for i, t in enumerate(tapes, 1)])
    if first_loaded:
        FakeMtx(state)(["-f", "/dev/sg5", "load", "1", "0"])
    return state, drive, tapes


def test_dump_spans_two_tapes_through_the_changer_and_restores(src: tuple[str, dict[str, bytes]],  # noqa: F811
                                                               tmp_path: Path) -> None:
    path, contents = src
    state, drive, tapes = _library(tmp_path, 3)
    mtx = FakeMtx(state)
    changer = Changer("/dev/sg5", run=mtx)
    res = dump(path, LEVELS[0], drive, label="weekly",
               next_tape=changer_next_tape(changer, 0, drive, label_of=tape_label()))
    assert len(res.tapes) == 2
    assert changer.status().drive(0).source == 2
    second = list_tape(opener(tapes[1], False))
    assert (second.label.set_name, second.label.seq) == ("weekly", 2)
    # restore: the first tape back in the drive, the changer brings the second
    changer.unload(2, 0)
    changer.load(1, 0)
    target = str(tmp_path / "r.img")
    restore(drive, target, next_tape=changer_next_tape(changer, 0, drive, label_of=tape_label()))
    assert snapshot_contents(target)["june3"] == contents["june3"]
    assert [c[2:] for c in mtx.calls if c[2] != "status"][-2:] == [["unload", "1", "0"],
                                                                   ["load", "2", "0"]]


def test_restore_refuses_a_tape_of_another_set_naming_the_slot(src: tuple[str, dict[str, bytes]],  # noqa: F811
                                                               tmp_path: Path) -> None:
    path, _ = src
    state, drive, tapes = _library(tmp_path, 3)
    changer = Changer("/dev/sg5", run=FakeMtx(state))
    t = opener(tapes[1], True)
    label_tape(t, "OTHER")
    t.close()
    with pytest.raises(VolumeError, match=r"slot 2 \(BX0002L8\) holds tape 1 of set 'OTHER'"):
        dump(path, LEVELS[0], drive, label="weekly",
             next_tape=changer_next_tape(changer, 0, drive, label_of=tape_label()))


def test_cli_dump_and_restore_with_changer(src: tuple[str, dict[str, bytes]], tmp_path: Path,  # noqa: F811
                                           monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    path, contents = src
    state, drive, _ = _library(tmp_path, 3)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    mtx = bindir / "mtx"
    repo = Path(__file__).resolve().parent.parent
    mtx.write_text(f"#!/bin/sh\ncd {repo} && exec {sys.executable} -m tests.fake_mtx \"$@\"\n")
    mtx.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_MTX_STATE", str(state))
    assert cli.main(["dump", path, LEVELS[0], "--tape", drive, "--label", "weekly",
                     "--changer", "/dev/sg5"]) == 0
    assert "across tapes" in capsys.readouterr().out
    assert cli.main(["dump", path, LEVELS[0], "--tape", drive, "--changer", "/dev/sg5",
                     "--verify"]) == 2
    assert "--verify" in capsys.readouterr().err
    changer = Changer("/dev/sg5")
    changer.unload(2, 0)
    changer.load(1, 0)
    target = str(tmp_path / "r.img")
    assert cli.main(["restore", target, "--tape", drive, "--changer", "/dev/sg5",
                     "--changer-drive", "0"]) == 0
    assert snapshot_contents(target)["june3"] == contents["june3"]
    assert cli.main(["restore", target, "--tape", drive, "--changer", "/dev/sg5",
                     "--next-tape", "echo x"]) == 2


def test_cli_changer_tapes_by_barcode(src: tuple[str, dict[str, bytes]], tmp_path: Path,  # noqa: F811
                                      monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """`--changer-tapes`: the dump continues on the named barcode (not the next slot)
    and says which barcodes the set holds; the restore finds that tape by barcode."""
    path, contents = src
    state, drive, _ = _library(tmp_path, 3)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    mtx = bindir / "mtx"
    repo = Path(__file__).resolve().parent.parent
    mtx.write_text(f"#!/bin/sh\ncd {repo} && exec {sys.executable} -m tests.fake_mtx \"$@\"\n")
    mtx.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_MTX_STATE", str(state))
    assert cli.main(["dump", path, LEVELS[0], "--tape", drive, "--label", "weekly",
                     "--changer", "/dev/sg5", "--changer-tapes", "BX0003L8"]) == 0
    assert "tapes of the set by barcode: 1 BX0001L8, 2 BX0003L8" in capsys.readouterr().out
    changer = Changer("/dev/sg5")
    changer.unload(3, 0)
    changer.load(1, 0)
    target = str(tmp_path / "r.img")
    assert cli.main(["restore", target, "--tape", drive, "--changer", "/dev/sg5",
                     "--changer-tapes", "BX0002L8,BX0003L8"]) == 0
    assert snapshot_contents(target)["june3"] == contents["june3"]
    assert changer.status().drive(0).source == 3


def tape_label() -> Callable[[str], tuple[str, int] | None]:
    """The changer's label reader over the drivers' tape opener (what the CLI wires)."""
    from blockxfer.cli.tapedrive import tape_opener
    from blockxfer.transfer.tapeset import label_reader
    return label_reader(tape_opener())
