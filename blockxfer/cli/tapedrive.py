"""`blockxfer tape create|label|list|status|rewind|eject|erase`: tapes and drives.

A new `tape` subcommand is one more `Command` in TAPE_COMMANDS."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from blockxfer.errors import UsageError
from blockxfer.tape import Tape
from blockxfer.units import human, parse_size

from .common import TAPE, size_arg
from .spec import Arg, Command, Report, arg
from .tapealert import barcode_of, drive_lines


def catalog_barcode(set_id: str, seq: int) -> str | None:
    """The barcode the catalog recorded for this tape of its set (a dump through a
    changer), for drives that cannot read the cartridge's memory."""
    from blockxfer.catalog import hooks, pools
    from blockxfer.errors import BlockxferError
    if not hooks.exists():
        return None
    try:
        db = hooks.open_catalog()
    except BlockxferError:
        return None
    try:
        state = pools.tape_state(db, set_id, seq)
    finally:
        db.close()
    return state.barcode if state else None


def tape_opener() -> Callable[[str, bool], Tape]:
    from blockxfer.drivers.tapes import open_tape_handle
    return lambda path, write: open_tape_handle(path, write=write)


def cmd_tape_label(a: argparse.Namespace) -> Report:
    from blockxfer.transfer.tapeset import label_tape
    tape = tape_opener()(a.tape, True)
    try:
        label = label_tape(tape, a.name, set_name=a.set, force=a.force,
                           record_size=parse_size(a.record_size))
    finally:
        tape.close()
    return Report({"tape": a.tape, "serial": label.serial, "seq": label.seq,
                   "set": label.set_name},
                  [f"{a.tape}: labelled {label.serial!r}, tape {label.seq} of set "
                   f"{label.set_name!r}"])


def cmd_tape_list(a: argparse.Namespace) -> Report:
    from blockxfer.transfer.tapeset import list_tape
    tape = tape_opener()(a.tape, False)
    try:
        contents = list_tape(tape)
    finally:
        tape.close()
    lab = contents.label
    rows = [i.as_dict() for i in contents.images]
    barcode = barcode_of(a.tape) or catalog_barcode(lab.set_id.hex(), lab.seq)
    text = [f"{a.tape}: {lab.serial!r}, tape {lab.seq} of set {lab.set_name!r}, "
            f"records of {lab.record_size} bytes" + (f", barcode {barcode}" if barcode else "")]
    for r in rows:
        state = "complete" if r["complete"] else ("continues" if r["continues"] else "INCOMPLETE")
        text.append(f"  {r['image']:>3}  file {r['file']:>3}  {r['level']:11} "
                    f"{r['expression']!r:32} {r['blocks']:>10} blocks  {r['written']}  {state}")
    return Report({"label": {"serial": lab.serial, "set": lab.set_name, "seq": lab.seq,
                             "record_size": lab.record_size, "set_id": lab.set_id.hex(),
                             "barcode": barcode},
                   "images": rows}, text)


def _tape_geometry(capacity: int, early_warning: int | None, record_size: int) -> int:
    """The early-warning zone to create (2% by default), refusing a geometry that
    a dump in records of `record_size` cannot span (docs/tape-format.md)."""
    from blockxfer.transfer.dump import min_capacity, min_early_warning

    least = min_early_warning(record_size)
    if early_warning is None:
        early_warning = max(capacity // 50, least)
    elif early_warning < least:
        raise UsageError(f"an early-warning zone of {human(early_warning)} cannot hold the end "
                         f"of a tape part in records of {human(record_size)}: give at least "
                         f"--early-warning {least // 1024}K (or a smaller --record-size)")
    need = min_capacity(record_size, early_warning)
    if capacity < need:
        raise UsageError(f"a tape of {human(capacity)} with an early-warning zone of "
                         f"{human(early_warning)} cannot hold a part in records of "
                         f"{human(record_size)}: give at least --capacity {-(-need // 1024)}K")
    return early_warning


def cmd_tape_create(a: argparse.Namespace) -> Report:
    from blockxfer.drivers.vtape import create_virtual_tape

    ew = _tape_geometry(a.capacity, a.early_warning, a.record_size)
    h = create_virtual_tape(a.file, a.capacity, early_warning=ew, locate=not a.no_locate)
    return Report({"tape": a.file, "capacity": h.capacity, "early_warning": h.early_warning,
                   "locate": not a.no_locate},
                  [f"created virtual tape {a.file}: capacity {human(h.capacity)}, early warning "
                   f"{human(h.early_warning)} before the end, LOCATE "
                   f"{'no' if a.no_locate else 'yes'}"])


def _lines(obj: dict[str, Any]) -> list[str]:
    return [f"{k:16} {v}" for k, v in obj.items()]


def cmd_tape_status(a: argparse.Namespace) -> Report:
    from blockxfer.drivers.tapes import drive_info, tape_status

    status = tape_status(a.tape).as_dict()
    drive = drive_info(a.tape)   # INQUIRY, block limits, TapeAlert, compression, MAM
    return Report({**status, "drive": drive}, _lines(status) + drive_lines(drive))


def cmd_tape_rewind(a: argparse.Namespace) -> Report:
    from blockxfer.drivers.tapes import rewind_tape

    return Report(rewind_tape(a.tape).as_dict(), [f"{a.tape}: rewound"])


def cmd_tape_eject(a: argparse.Namespace) -> Report:
    from blockxfer.drivers.tapes import eject_tape

    eject_tape(a.tape)
    return Report({"ejected": a.tape}, [f"{a.tape}: unloaded"])


def _holds(path: str) -> tuple[str | None, tuple[str, int] | None]:
    """What erasing would lose: None for a blank tape or a blockxfer label without
    images, else a description (images, or data that is not a blockxfer tape); and
    the tape's (set id, sequence) when it has a label, for the catalog. The tape is
    read once, so a refused erase leaves it where this read left it."""
    from blockxfer.drivers.tapes import open_tape
    from blockxfer.errors import FormatError
    from blockxfer.transfer.tapeset import list_tape, read_label

    with open_tape(path, write=False) as t:
        try:
            label = read_label(t)
            if label is None:
                return None, None
            images = list_tape(t).images
        except FormatError:
            return "data that is not a readable blockxfer tape", None
    key = (label.set_id.hex(), label.seq)
    if not images:
        return None, key
    return (f"{len(images)} image{'s' if len(images) > 1 else ''} (label {label.serial!r}, "
            f"set {label.set_name!r})"), key


def cmd_tape_erase(a: argparse.Namespace) -> Report:
    from blockxfer.drivers.tapes import erase_tape, tape_status
    from blockxfer.errors import VolumeError

    from .catalog_tapes import erase_check, forget_erased
    holds, label = _holds(a.tape)
    expired = False if a.dry_run else erase_check(a, label)   # unexpired images: refused
    if a.dry_run:
        st = tape_status(a.tape)
        plan = {"tape": a.tape, "erases": "everything from the beginning of tape",
                "holds": holds or "nothing (blank or no images)",
                "needs_force": holds is not None, "write_protected": st.write_protected}
        return Report(plan, _lines(plan))
    if holds is not None and not a.force and not expired:
        raise VolumeError(f"{a.tape} holds {holds}; nothing was erased; use --force to "
                          "erase it")
    status = erase_tape(a.tape).as_dict()
    if label is not None:                    # its images are gone: the catalog forgets them
        forget_erased(a, *label)
    return Report(status, [f"{a.tape}: erased" + (" (expired in its pool: recycled)"
                                                 if expired else "")])


def tape_arg(help: str = "/dev/nstN or a virtual tape file") -> Arg:
    return arg("tape", metavar=TAPE, help=help)


TAPE_COMMANDS = (
    Command("create", "create a virtual tape file",
            "Create a virtual tape: a file that behaves as a tape drive with a cartridge "
            "(records, file marks, early warning, end of medium).",
            ("blockxfer tape create t.vtape --capacity 10G",),
            cmd_tape_create,
            (arg("file", metavar=TAPE, help="the virtual tape file to create"),
             arg("--capacity", type=size_arg, required=True, metavar="SIZE",
                 help="the tape's capacity, e.g. 10G"),
             arg("--early-warning", type=size_arg, default=None, metavar="SIZE",
                 help="size of the early-warning zone before the end (default 2%%, and at "
                      "least what a part's end needs: 2 records + 64K)"),
             arg("--record-size", type=size_arg, default="256K", metavar="SIZE",
                 help="record size of the dumps it will hold, for the geometry check "
                      "(default 256K, as dump)"),
             arg("--no-locate", action="store_true",
                 help="act like a drive without LOCATE/READ POSITION (tgt)"))),
    Command("label", "label a tape as the first of a new set",
            "Write a label on a tape, making it the first tape of a new set (pool). A tape "
            "that holds images is refused unless --force.",
            ("blockxfer tape label /dev/nst0 weekly-01 --set weekly",),
            cmd_tape_label,
            (tape_arg(), arg("name", metavar="LABEL", help="the tape's label (serial)"),
             arg("--set", metavar="NAME", help="set (pool) name (default: the label)"),
             arg("--record-size", default="256K", metavar="SIZE",
                 help="record size of the set's dumps (default 256K)"),
             arg("--force", action="store_true", help="relabel a tape holding images"))),
    Command("list", "the images on a tape",
            "List a tape's label and the images on it: number, file, level, expression, "
            "blocks, time and whether each is complete.",
            ("blockxfer tape list /dev/nst0", "blockxfer tape list t.vtape --json"),
            cmd_tape_list, (tape_arg(),)),
    Command("status", "show the drive status",
            "Show the drive's status: position, flags, INQUIRY, block limits, TapeAlert.",
            ("blockxfer tape status /dev/nst0",), cmd_tape_status, (tape_arg(),)),
    Command("rewind", "rewind", "Rewind the tape.",
            ("blockxfer tape rewind /dev/nst0",), cmd_tape_rewind, (tape_arg(),)),
    Command("eject", "rewind and unload", "Rewind and unload the tape.",
            ("blockxfer tape eject /dev/nst0",), cmd_tape_eject, (tape_arg(),)),
    Command("erase", "erase the whole tape",
            "Erase the whole tape. A tape that holds images or foreign data is refused "
            "unless --force; --dry-run shows what would be lost.",
            ("blockxfer tape erase /dev/nst0 --dry-run", "blockxfer tape erase t.vtape --force"),
            cmd_tape_erase,
            (tape_arg(),
             arg("-n", "--dry-run", action="store_true", help="show the plan only"),
             arg("--force", action="store_true",
                 help="erase a tape that holds images or other data"),
             arg("--catalog", metavar="PATH", default=None,
                 help="the catalog whose retention decides (default: $BLOCKXFER_CATALOG or "
                      "/var/lib/blockxfer/catalog.db)"))),
)
