"""Tape commands: dump, restore and `tape create|label|list|status|rewind|eject|erase`.

A new `tape` subcommand is one more `Command` in TAPE_COMMANDS."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from blockxfer.errors import BlockxferError, UsageError
from blockxfer.handles import open_volume
from blockxfer.tape import Tape
from blockxfer.transfer.nexttape import NextTape, TapeSetPolicy, next_tape_finder
from blockxfer.units import human, parse_size

from .common import (
    TAPE,
    dry_run_arg,
    expr_arg,
    image_bytes,
    measure_report,
    parsable_arg,
    progress,
    size_arg,
    volume_arg,
)
from .spec import Arg, Command, OneOf, Report, arg


def _tape_opener() -> Callable[[str, bool], Tape]:
    from blockxfer.drivers.tapes import open_tape_handle
    return lambda path, write: open_tape_handle(path, write=write)


def _load_changer(changer: str, drive: int, tape: str) -> NextTape:
    from blockxfer.drivers.changer import Changer, changer_next_tape, tape_label
    from blockxfer.drivers.tapes import eject_tape
    return changer_next_tape(Changer(changer), drive, tape, eject=eject_tape,
                             label_of=tape_label)


def _ask(tape: str) -> NextTape | None:
    """The operator at a terminal types the next tape's path."""
    if not (sys.stdin.isatty() and sys.stderr.isatty()):
        return None

    def ask(set_name: str, seq: int) -> str:
        print(f"insert tape {seq} of set {set_name!r}, then type its path "
              f"(or press Enter for {tape}): ", end="", file=sys.stderr, flush=True)
        return sys.stdin.readline().strip() or tape
    return ask


def _next_tape(a: argparse.Namespace) -> NextTape | None:
    policy = TapeSetPolicy(a.tape, a.next_tape, a.changer, a.changer_drive,
                           getattr(a, "verify", False))
    return next_tape_finder(policy, load_changer=_load_changer, ask=_ask(a.tape))


def cmd_dump(a: argparse.Namespace) -> Report:
    from blockxfer.drivers.reader import read_runs
    from blockxfer.drivers.tapes import max_record
    from blockxfer.transfer.dump import dump_image
    if a.dry_run:
        return measure_report(a, "dump", a.tape)
    record_size = parse_size(a.record_size)
    limit = max_record(a.tape)                   # READ BLOCK LIMITS: st refuses larger
    if limit and record_size > limit:
        print(f"{a.tape}: the drive takes records of at most {limit} bytes; using that",
              file=sys.stderr)
        record_size = limit
    next_tape = _next_tape(a)
    prog = progress(a, "dump", image_bytes(a.path, a.expression) if not a.quiet else None)
    with open_volume(a.path) as vol:
        res = dump_image(vol, a.expression, a.tape, open_tape=_tape_opener(),  # type: ignore[arg-type]
                         next_tape=next_tape, label=a.label, record_size=record_size,
                         reader=lambda runs: read_runs(vol.dev, runs, vol.block_size),
                         compress=a.compress, progress=prog.add)
    prog.finish()
    text = [f"{a.tape}: image {res.image}, {res.blocks} blocks, {human(res.bytes)}"
            + (f", across tapes {', '.join(res.tapes)}" if len(res.tapes) > 1 else "")]
    if a.verify:
        from blockxfer.transfer.restore import verify_image
        verify_image(a.tape, res.image, open_tape=_tape_opener(),  # type: ignore[arg-type]
                     next_tape=_next_tape(a))
        text.append(f"{a.tape}: image {res.image} read back, every checksum verified")
    return Report({"volume": a.path, "expression": a.expression, "tape": a.tape,
                   "image": res.image, "blocks": res.blocks, "bytes": res.bytes,
                   "tapes": list(res.tapes), "verified": bool(a.verify)}, text)


def _complete_snapshots(path: str) -> set[str]:
    import os
    if not os.path.exists(path):
        return set()
    try:
        with open_volume(path) as vol:
            return {e.name for e in vol.snapshots() if not e.flags & 4 and not e.shadow}
    except BlockxferError:
        return set()


def _restore_vbns(a: argparse.Namespace) -> Report:
    from blockxfer.drivers.blockdev import open_device
    from blockxfer.transfer.restore import restore_range
    try:
        first, _, last = a.vbns.partition("-")
        lo, hi = int(first), int(last or first)
    except ValueError as e:
        raise UsageError(f"--vbns takes FIRST-LAST block numbers, not {a.vbns!r}") from e
    if a.image is None:
        raise UsageError("--vbns needs --image N (see 'tape list')")
    part = restore_range(a.tape, a.target, a.image, lo, hi,  # type: ignore[arg-type]
                         open_tape=_tape_opener(), open_device=open_device, force=a.force)
    return Report({"volume": a.target, "tape": a.tape, "image": a.image, "first": lo,
                   "last": hi, "blocks": part.blocks, "records_read": part.records_read},
                  [f"{a.target}: wrote {part.blocks} blocks ({lo}-{hi}) from image {a.image}, "
                   f"reading {part.records_read} tape records"])


def _restore_only(a: argparse.Namespace) -> Report:
    from blockxfer.drivers.blockdev import open_device
    from blockxfer.transfer.snaprestore import restore_snapshot_only
    if a.image is None:
        raise UsageError("--only needs --image N (see 'tape list')")
    res, records = restore_snapshot_only(a.tape, a.target, a.image, a.only,
                                         open_tape=_tape_opener(), open_device=open_device,
                                         force=a.force)
    return Report({"volume": a.target, "tape": a.tape, "image": a.image, "top": res.top,
                   "blocks": res.blocks, "records_read": records},
                  [f"{a.target}: restored snapshot {res.top!r} alone from image {a.image}, "
                   f"{res.blocks} blocks, reading {records} tape records"])


def cmd_restore(a: argparse.Namespace) -> Report:
    from blockxfer.drivers.blockdev import open_device
    from blockxfer.transfer.restore import restore_images
    if a.vbns:
        return _restore_vbns(a)
    if a.only:
        return _restore_only(a)
    have = _complete_snapshots(a.target)
    if a.dry_run:
        return _restore_plan(a, have)
    next_tape = _next_tape(a)
    prog = progress(a, "restore")
    steps = restore_images(a.tape, a.target, open_tape=_tape_opener(),  # type: ignore[arg-type]
                           open_device=open_device, next_tape=next_tape, image=a.image,
                           snapshot=a.snapshot, force=a.force, target_has=have.__contains__,
                           progress=prog.add)
    prog.finish()
    text, images = [], []
    for st in steps:
        r = st.result
        text.append(f"{a.target}: restored image {st.image} up to {r.top!r}, {r.blocks} blocks")
        text += [f"{a.target}: {name!r} is incomplete here" for name in r.incomplete]
        images.append({"image": st.image, "top": r.top, "blocks": r.blocks,
                       "incomplete": list(r.incomplete)})
    return Report({"volume": a.target, "tape": a.tape, "images": images}, text)


def _restore_plan(a: argparse.Namespace, have: set[str]) -> Report:
    """restore -n: the images a restore would apply and their sizes, from the index."""
    from blockxfer.transfer.restore import plan_restore
    chain = plan_restore(a.tape, open_tape=_tape_opener(), image=a.image,  # type: ignore[arg-type]
                         snapshot=a.snapshot, target_has=have.__contains__)
    sizes = [i.index.total if i.index else 0 for i in chain]
    text = [f"would restore image {i.number} ({i.descriptor.expression!r}, "
            f"{'incremental' if i.descriptor.base else 'full'}) into {a.target}: "
            f"{i.descriptor.blocks} blocks, {human(n)} on tape"
            for i, n in zip(chain, sizes, strict=True)]
    return Report({"dry_run": True, "volume": a.target, "tape": a.tape,
                   "images": [i.as_dict() for i in chain], "bytes": sum(sizes)}, text)


def cmd_tape_label(a: argparse.Namespace) -> Report:
    from blockxfer.transfer.tapeset import label_tape
    tape = _tape_opener()(a.tape, True)
    try:
        label = label_tape(tape, a.name, set_name=a.set, force=a.force,  # type: ignore[arg-type]
                           record_size=parse_size(a.record_size))
    finally:
        tape.close()  # type: ignore[attr-defined]
    return Report({"tape": a.tape, "serial": label.serial, "seq": label.seq,
                   "set": label.set_name},
                  [f"{a.tape}: labelled {label.serial!r}, tape {label.seq} of set "
                   f"{label.set_name!r}"])


def cmd_tape_list(a: argparse.Namespace) -> Report:
    from blockxfer.transfer.tapeset import list_tape
    tape = _tape_opener()(a.tape, False)
    try:
        contents = list_tape(tape)  # type: ignore[arg-type]
    finally:
        tape.close()  # type: ignore[attr-defined]
    lab = contents.label
    rows = [i.as_dict() for i in contents.images]
    text = [f"{a.tape}: {lab.serial!r}, tape {lab.seq} of set {lab.set_name!r}, "
            f"records of {lab.record_size} bytes"]
    for r in rows:
        state = "complete" if r["complete"] else ("continues" if r["continues"] else "INCOMPLETE")
        text.append(f"  {r['image']:>3}  file {r['file']:>3}  {r['level']:11} "
                    f"{r['expression']!r:32} {r['blocks']:>10} blocks  {r['written']}  {state}")
    return Report({"label": {"serial": lab.serial, "set": lab.set_name, "seq": lab.seq,
                             "record_size": lab.record_size, "set_id": lab.set_id.hex()},
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
    status["drive"] = drive_info(a.tape)      # INQUIRY, block limits, TapeAlert, barcode
    return Report(status, _lines(status))


def cmd_tape_rewind(a: argparse.Namespace) -> Report:
    from blockxfer.drivers.tapes import rewind_tape

    return Report(rewind_tape(a.tape).as_dict(), [f"{a.tape}: rewound"])


def cmd_tape_eject(a: argparse.Namespace) -> Report:
    from blockxfer.drivers.tapes import eject_tape

    eject_tape(a.tape)
    return Report({"ejected": a.tape}, [f"{a.tape}: unloaded"])


def _holds(path: str) -> str | None:
    """What erasing would lose: None for a blank tape or a blockxfer label without
    images, else a description (images, or data that is not a blockxfer tape)."""
    from blockxfer.drivers.tapes import open_tape
    from blockxfer.errors import FormatError
    from blockxfer.transfer.tapeset import list_tape, read_label

    with open_tape(path, write=False) as t:
        try:
            label = read_label(t)
            if label is None:
                return None
            images = list_tape(t).images
        except FormatError:
            return "data that is not a readable blockxfer tape"
    if not images:
        return None
    return (f"{len(images)} image{'s' if len(images) > 1 else ''} (label {label.serial!r}, "
            f"set {label.set_name!r})")


def cmd_tape_erase(a: argparse.Namespace) -> Report:
    from blockxfer.drivers.tapes import erase_tape, tape_status
    from blockxfer.errors import VolumeError

    holds = _holds(a.tape)
    if a.dry_run:
        st = tape_status(a.tape)
        plan = {"tape": a.tape, "erases": "everything from the beginning of tape",
                "holds": holds or "nothing (blank or no images)",
                "needs_force": holds is not None, "write_protected": st.write_protected}
        return Report(plan, _lines(plan))
    if holds is not None and not a.force:
        raise VolumeError(f"{a.tape} holds {holds}; nothing was erased; use --force to "
                          "erase it")
    return Report(erase_tape(a.tape).as_dict(), [f"{a.tape}: erased"])


def tape_arg(help: str = "/dev/nstN or a virtual tape file") -> Arg:
    return arg("tape", metavar=TAPE, help=help)


def _tape_option() -> Arg:
    return arg("--tape", required=True, metavar=TAPE,
               help="/dev/nstN or a virtual tape file (the first tape of a set)")


def _set_args() -> tuple[Arg, ...]:
    return (arg("--next-tape", metavar="COMMAND",
                help="run when the next tape of the set is needed; it prints the tape's "
                     "path ($BLOCKXFER_TAPE_SET and $BLOCKXFER_TAPE_SEQ say which)"),
            arg("--changer", metavar="/dev/sgN",
                help="media changer (mtx) that loads the next tape of the set into --tape"),
            arg("--changer-drive", type=int, default=0, metavar="N",
                help="the changer's drive number of --tape (default 0)"))


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
                 help="erase a tape that holds images or other data"))),
)

COMMANDS = (
    Command("dump", "write an image to tape after its last image",
            "Write an image (VOLUME 'EXPR') to TAPE after the images already on it, "
            "continuing on the next tape of the set when one fills.",
            ("blockxfer dump /srv/vol.img june1 --tape /dev/nst0 --verify   # level 0",
             "blockxfer dump -n /srv/vol.img june1 --tape /dev/nst0  # its size, writes nothing",
             "blockxfer dump /srv/vol.img 'june3 - june1' --tape /dev/nst0  # an increment",
             "blockxfer dump /srv/vol.img june1 --tape /dev/nst0 --changer /dev/sg5"),
            cmd_dump,
            (volume_arg(), expr_arg(), _tape_option(),
             arg("--label", metavar="LABEL", help="name for a blank tape (default: generated)"),
             arg("--record-size", default="256K", metavar="SIZE",
                 help="tape record size (default 256K)"),
             arg("--verify", action="store_true", help="read the image back and check it"),
             arg("--no-compress", dest="compress", action="store_false",
                 help="do not zstd-compress data records (default: each one that shrinks)"),
             dry_run_arg("print the image's exact size and an estimate after compression"),
             *_set_args(), parsable_arg())),
    Command("restore", "restore an image (and the images it needs) from tape",
            "Restore an image from TAPE into VOLUME, bases first; or, with --only or "
            "--vbns, part of one image. A refused or interrupted restore leaves the "
            "target as it was.",
            ("blockxfer restore /srv/new.img --tape /dev/nst0 --snapshot june3",
             "blockxfer restore -n /srv/new.img --tape /dev/nst0 --snapshot june3  # the plan",
             "blockxfer restore /srv/new.img --tape t.vtape --image 2",
             "blockxfer restore /srv/vol.img --tape t.vtape --image 1 --vbns 100-199"),
            cmd_restore,
            (arg("target", metavar="VOLUME", help="the volume (or new volume) to restore into"),
             _tape_option(),
             OneOf((arg("--image", type=int, metavar="N",
                        help="image number (see 'tape list')"),
                    arg("--snapshot", metavar="SNAPSHOT",
                        help="restore up to this snapshot, bases first"))),
             arg("--only", metavar="SNAPSHOT",
                 help="partial restore: just this snapshot's blocks from --image N"),
             arg("--vbns", metavar="FIRST-LAST",
                 help="partial restore: only these blocks, in place, by the location table"),
             arg("--force", action="store_true", help="overwrite what the target holds"),
             dry_run_arg("print the images it would apply, bases first, with their sizes"),
             *_set_args(), parsable_arg())),
    Command("tape", "tape drives and virtual tapes",
            "Tape drives and virtual tapes: create, label, list, status, rewind, eject, "
            "erase.",
            ("blockxfer tape create t.vtape --capacity 1G", "blockxfer tape list t.vtape"),
            subcommands=TAPE_COMMANDS),
)
