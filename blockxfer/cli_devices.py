"""The `devices` and `tape` commands: parse, call one library function, print.

`register(subparsers)` adds them to the main parser (blockxfer/cli.py). Each
handler returns an exit status; user mistakes raise blockxfer errors, which
main() prints as one line.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from blockxfer.errors import UsageError
from blockxfer.units import parse_size


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _print(obj: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(obj, indent=2))
    else:
        for k, v in obj.items():
            print(f"{k:16} {v}")


def cmd_devices(args: argparse.Namespace) -> int:
    from blockxfer.drivers.discovery import discover

    found = discover()
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    print(f"{'DEVICE':16} {'TYPE':9} {'SIZE':>10}  IN USE")
    for b in found["block"]:
        use = ", ".join([f"mounted {m}" for m in b["mountpoints"]] + b["users"]) or "-"
        print(f"{b['path']:16} {b['type']:9} {_human(b['size']):>10}  {use}")
    for t in found["tape"]:
        print(f"{t['path']:16} {'tape':9} {'':>10}  {t['vendor']} {t['model']} "
              f"serial {t['serial'] or '?'} sg {t['sg'] or '-'}")
    for c in found.get("changer", []):
        print(f"{c['path']:16} {'changer':9} {'':>10}  {c['vendor']} {c['model']} "
              f"at {c['address'] or '?'}")
    return 0


def _tape_geometry(capacity: int, early_warning: int | None, record_size: int) -> int:
    """The early-warning zone to create (2% by default), refusing a geometry that
    a dump in records of `record_size` cannot span (docs/tape-format.md)."""
    from blockxfer.transfer.dump import min_capacity, min_early_warning

    least = min_early_warning(record_size)
    if early_warning is None:
        early_warning = max(capacity // 50, least)
    elif early_warning < least:
        raise UsageError(f"an early-warning zone of {_human(early_warning)} cannot hold the end "
                         f"of a tape part in records of {_human(record_size)}: give at least "
                         f"--early-warning {least // 1024}K (or a smaller --record-size)")
    need = min_capacity(record_size, early_warning)
    if capacity < need:
        raise UsageError(f"a tape of {_human(capacity)} with an early-warning zone of "
                         f"{_human(early_warning)} cannot hold a part in records of "
                         f"{_human(record_size)}: give at least --capacity {-(-need // 1024)}K")
    return early_warning


def cmd_tape_create(args: argparse.Namespace) -> int:
    from blockxfer.drivers.vtape import create_virtual_tape

    ew = _tape_geometry(args.capacity, args.early_warning, args.record_size)
    h = create_virtual_tape(args.file, args.capacity, early_warning=ew,
                            locate=not args.no_locate)
    print(f"created virtual tape {args.file}: capacity {_human(h.capacity)}, early warning "
          f"{_human(h.early_warning)} before the end, LOCATE {'no' if args.no_locate else 'yes'}")
    return 0


def cmd_tape_status(args: argparse.Namespace) -> int:
    from blockxfer.drivers.tapes import drive_info, tape_status

    status = tape_status(args.tape).as_dict()
    status["drive"] = drive_info(args.tape)      # INQUIRY, block limits, TapeAlert, barcode
    _print(status, args.json)
    return 0


def cmd_tape_rewind(args: argparse.Namespace) -> int:
    from blockxfer.drivers.tapes import rewind_tape

    st = rewind_tape(args.tape)
    _print(st.as_dict(), args.json) if args.json else print(f"{args.tape}: rewound")
    return 0


def cmd_tape_eject(args: argparse.Namespace) -> int:
    from blockxfer.drivers.tapes import eject_tape

    eject_tape(args.tape)
    print(json.dumps({"ejected": args.tape}) if args.json else f"{args.tape}: unloaded")
    return 0


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


def cmd_tape_erase(args: argparse.Namespace) -> int:
    from blockxfer.drivers.tapes import erase_tape, tape_status
    from blockxfer.errors import VolumeError

    holds = _holds(args.tape)
    if args.dry_run:
        st = tape_status(args.tape)
        plan = {"tape": args.tape, "erases": "everything from the beginning of tape",
                "holds": holds or "nothing (blank or no images)",
                "needs_force": holds is not None, "write_protected": st.write_protected}
        _print(plan, args.json)
        return 0
    if holds is not None and not args.force:
        raise VolumeError(f"{args.tape} holds {holds}; nothing was erased; use --force to "
                          "erase it")
    st = erase_tape(args.tape)
    _print(st.as_dict(), args.json) if args.json else print(f"{args.tape}: erased")
    return 0


def register(subparsers: Any) -> None:
    """Add `devices` and `tape ...` to the main command's subparsers."""
    p = subparsers.add_parser("devices", help="list block devices, tape drives and media changers")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_devices)

    tape = subparsers.add_parser("tape", help="tape drives and virtual tapes")
    sub = tape.add_subparsers(dest="tape_command", required=True)
    c = sub.add_parser("create", help="create a virtual tape file")
    c.add_argument("file")
    c.add_argument("--capacity", type=_size_arg, required=True, help="e.g. 10G")
    c.add_argument("--early-warning", type=_size_arg, default=None, metavar="SIZE",
                   help="size of the early-warning zone before the end (default 2%%, and at "
                        "least what a part's end needs: 2 records + 64K)")
    c.add_argument("--record-size", type=_size_arg, default="256K", metavar="SIZE",
                   help="record size of the dumps it will hold, for the geometry check "
                        "(default 256K, as dump)")
    c.add_argument("--no-locate", action="store_true",
                   help="act like a drive without LOCATE/READ POSITION (tgt)")
    c.set_defaults(func=cmd_tape_create)
    for name, func, text in [("status", cmd_tape_status, "show the drive status"),
                             ("rewind", cmd_tape_rewind, "rewind"),
                             ("eject", cmd_tape_eject, "rewind and unload"),
                             ("erase", cmd_tape_erase, "erase the whole tape")]:
        s = sub.add_parser(name, help=text)
        s.add_argument("tape", metavar="TAPE", help="/dev/nstN or a virtual tape file")
        s.add_argument("--json", action="store_true")
        if name == "erase":
            s.add_argument("--dry-run", action="store_true", help="show the plan only")
            s.add_argument("--force", action="store_true",
                           help="erase a tape that holds images or other data")
        s.set_defaults(func=func)
