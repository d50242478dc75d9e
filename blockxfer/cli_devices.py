"""The `devices` and `tape` commands: parse, call one library function, print.

`register(subparsers)` adds them to the main parser (blockxfer/cli.py). Each
handler returns an exit status; user mistakes raise blockxfer errors, which
main() prints as one line.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from blockxfer.errors import DeviceError, UsageError
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
    drive = drive_info(args.tape)   # INQUIRY, block limits, TapeAlert, compression, MAM
    if args.json:
        status["drive"] = drive
        _print(status, True)
        return 0
    _print(status, False)
    for k, v in _drive_lines(drive):
        print(f"{k:16} {v}")
    return 0


def _drive_lines(drive: dict[str, Any] | None) -> list[tuple[str, object]]:
    """`tape status` lines for what the drive says over SCSI (none for a virtual tape)."""
    if drive is None:
        return [("drive", "no SCSI information (virtual tape, or no sg node)")]

    def known(v: object, unit: str = "") -> object:
        return "not reported" if v is None else f"{v}{unit}"

    alerts = drive.get("tape_alert_text")
    return [("drive", f"{drive['vendor']} {drive['product']} {drive['revision']} "
                      f"serial {drive['serial'] or '?'} ({drive['sg']})"),
            ("block limits", f"{drive['min_block']}..{drive['max_block']} bytes"
             if drive.get("max_block") else "not reported"),
            ("compression", known(drive.get("compression"))),
            ("tape alerts", "not reported" if alerts is None else "; ".join(alerts) or "none"),
            ("barcode", known(drive.get("barcode"))),
            ("medium serial", known(drive.get("medium_serial"))),
            ("remaining", known(drive.get("remaining_mib"), " MiB")),
            ("capacity", known(drive.get("capacity_mib"), " MiB")),
            ("load count", known(drive.get("load_count")))]


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


def report_tape_alerts(tape: str, what: str) -> int:
    """After a dump or restore: one stderr line per TapeAlert flag that matters.
    Critical flags (media, write/read failure, write protect, clean now, hardware)
    give exit status 4 although `what` finished; warnings leave the status 0."""
    from blockxfer.drivers.tapes import tape_alerts

    try:
        alerts = tape_alerts(tape)
    except DeviceError as e:
        print(f"blockxfer: warning: {tape}: could not read the TapeAlert flags after the "
              f"{what} ({e})", file=sys.stderr)
        return 0
    rc = 0
    for flag, severity, text in alerts:
        if severity == "C":
            print(f"blockxfer: {tape}: the {what} finished, but the drive raised TapeAlert "
                  f"{flag}, {text}", file=sys.stderr)
            rc = DeviceError.exit_code
        elif severity == "W":
            print(f"blockxfer: warning: {tape}: TapeAlert {flag}, {text}", file=sys.stderr)
    return rc


def set_compression(tape: str, mode: str | None) -> None:
    """`dump --compression on|off`: switch the drive before writing (None: leave it)."""
    if mode is None:
        return
    from blockxfer.drivers.tapes import set_compression as set_drive

    set_drive(tape, mode == "on")


def add_changer_tapes_arg(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--changer-tapes", metavar="BARCODES", default=None,
                    help="with --changer: the tapes to use for the set's next tapes, by "
                         "barcode or pool pattern, comma-separated and tried in order "
                         "(e.g. BXC002L5,BXC003L5 or 'BXP*'; default: the next full slot)")


def changer_tapes_args(args: argparse.Namespace, restore_cmd: Any) -> dict[str, Any]:
    """The barcode choice of `--changer-tapes` for `changer_next_tape`."""
    from blockxfer.drivers.changer import parse_tapes

    return {"tapes": parse_tapes(getattr(args, "changer_tapes", None)),
            "restore": getattr(args, "func", None) is restore_cmd}


def barcode_of(tape: str) -> str | None:
    """The loaded cartridge's barcode from its memory (MAM), for `tape list`; None when
    the drive has none to tell (virtual tape, tgt) or cannot be asked."""
    from blockxfer.drivers.tapes import drive_info

    try:
        info = drive_info(tape)
    except DeviceError:
        return None
    code = info.get("barcode") if info else None
    return code if isinstance(code, str) else None


def print_set_barcodes(tape: str, next_tape: object) -> None:
    """After a dump through a changer: the barcode of each tape of the set it used."""
    used = getattr(next_tape, "used", None)
    if used:
        print(f"{tape}: tapes of the set by barcode: "
              + ", ".join(f"{seq} {code}" for seq, code in sorted(used.items())))


def add_compression_arg(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--compression", choices=["on", "off"], default=None,
                    help="switch the drive's own compression first (default: leave it); "
                         "'tape status' shows it")


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
