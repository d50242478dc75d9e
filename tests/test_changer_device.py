"""Spanning through a real media changer with mtx (the test bed's mhvtl library and
tgt SMC changer): a dump fills the first slot's tape, the changer loads the next
slot's, and a restore asks for them in order the same way. Scratch tapes: they are
overwritten. BLOCKXFER_TEST_CHANGER_DRIVE is the changer's number of the drive
(default 0)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from blockxfer.drivers.changer import Changer, changer_next_tape
from blockxfer.drivers.discovery import changers
from blockxfer.drivers.tapes import eject_tape
from blockxfer.transfer.tapeset import label_tape, list_tape
from tests import clihelp
from tests.test_stream import snapshot_contents
from tests.test_tape_dump import LEVELS, dump, opener, restore, src  # noqa: F401

pytestmark = [pytest.mark.device,
              pytest.mark.skipif(not (os.environ.get("BLOCKXFER_TEST_CHANGER")
                                      and os.environ.get("BLOCKXFER_TEST_CHANGER_TAPE")),
                                 reason="no changer: set BLOCKXFER_TEST_CHANGER=/dev/sgN and "
                                 "BLOCKXFER_TEST_CHANGER_TAPE=/dev/nstN (its drive "
                                 "BLOCKXFER_TEST_CHANGER_DRIVE, default 0; scratch tapes in "
                                 "slots 1, 2 and the last full slot)")]
CHANGER = os.environ.get("BLOCKXFER_TEST_CHANGER", "")
DRIVE = os.environ.get("BLOCKXFER_TEST_CHANGER_TAPE", "")
INDEX = int(os.environ.get("BLOCKXFER_TEST_CHANGER_DRIVE") or 0)


def _load(changer: Changer, slot: int) -> None:
    """Put slot `slot`'s tape in the test's drive (whatever was there back in its slot)."""
    d = changer.status().drive(INDEX)
    if d.full and d.source == slot:
        return
    if d.full:
        eject_tape(DRIVE)
        changer.unload(d.source or slot, INDEX)
    changer.load(slot, INDEX)


def test_discovery_finds_the_changer() -> None:
    assert CHANGER in [c.path for c in changers()]
    st = Changer(CHANGER).status()
    assert len(st.drives) >= 1 and len(st.slots) >= 2


def test_dump_spans_through_the_changer_and_restores(src: tuple[str, dict[str, bytes]],  # noqa: F811
                                                     tmp_path: Path) -> None:
    path, contents = src
    changer = Changer(CHANGER)
    for slot in (2, 1):                  # scratch: slot 2 blank-ish, slot 1 a fresh set
        _load(changer, slot)
        t = opener(DRIVE, True)
        try:
            if slot == 2:
                t.rewind()
                t.write_filemarks(1)     # no label at BOT: taken as blank
            else:
                label_tape(t, "CHG-SPAN", force=True)
        finally:
            t.close()
    nt = changer_next_tape(changer, INDEX, DRIVE, eject=eject_tape, label_of=tape_label())
    res = dump(path, LEVELS[0], DRIVE, next_tape=nt)
    assert len(res.tapes) == 2 and nt.slot == 2
    second = list_tape(opener(DRIVE, False))
    assert (second.label.set_name, second.label.seq) == ("CHG-SPAN", 2)
    _load(changer, 1)
    target = str(tmp_path / "r.img")
    restore(DRIVE, target,
            next_tape=changer_next_tape(changer, INDEX, DRIVE, eject=eject_tape,
                                        label_of=tape_label()))
    assert snapshot_contents(target)["june3"] == contents["june3"]
    assert changer.status().drive(INDEX).source == 2


def _cli(*argv: str) -> subprocess.CompletedProcess[str]:
    """The command, forked from this process (tests/clihelp.py: no start-up under TCG)."""
    return clihelp.run(argv, text=True, timeout=600)


def test_cli_dump_and_restore_choose_tapes_by_barcode(src: tuple[str, dict[str, bytes]],  # noqa: F811
                                                      tmp_path: Path) -> None:
    """`--changer-tapes`: the dump continues on the named barcode (the last full slot,
    not the next one) and prints the set's barcodes; `tape list` shows the barcode
    when the cartridge memory has it; the restore finds the tape in a pool ('*')."""
    path, contents = src
    changer = Changer(CHANGER)
    _load(changer, 1)
    full = [s for s in changer.status().slots if s.full and s.barcode and not s.import_export]
    last = max(full, key=lambda s: s.number)
    _load(changer, last.number)
    t = opener(DRIVE, True)
    try:
        t.rewind()
        t.write_filemarks(1)          # blank enough: no label at BOT
    finally:
        t.close()
    _load(changer, 1)
    t = opener(DRIVE, True)
    try:
        label_tape(t, "BARCODES", force=True)
    finally:
        t.close()
    base = ["--tape", DRIVE, "--changer", CHANGER, "--changer-drive", str(INDEX)]
    r = _cli("dump", path, "june*", *base, "--changer-tapes", str(last.barcode))
    assert r.returncode == 0, r.stderr
    assert "tapes of the set by barcode: 1 " in r.stdout and f"2 {last.barcode}" in r.stdout
    assert changer.status().drive(INDEX).source == last.number
    listed = _cli("tape", "list", DRIVE)
    assert listed.returncode == 0, listed.stderr
    if os.environ.get("BLOCKXFER_TEST_TAPE_KIND") == "mhvtl":     # MAM: tgt has none
        assert f"barcode {last.barcode}" in listed.stdout
    _load(changer, 1)
    target = str(tmp_path / "r.img")
    r = _cli("restore", target, *base, "--changer-tapes", "*")
    assert r.returncode == 0, r.stderr
    assert changer.status().drive(INDEX).source == last.number
    assert snapshot_contents(target)["june9"] == contents["june9"]


def tape_label() -> Callable[[str], tuple[str, int] | None]:
    """The changer's label reader over the drivers' tape opener (what the CLI wires)."""
    from blockxfer.cli.tapedrive import tape_opener
    from blockxfer.transfer.tapeset import label_reader
    return label_reader(tape_opener())
