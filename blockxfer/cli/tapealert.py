"""What the drive says around a dump or restore: compression before, TapeAlert and
barcodes after (mhvtl and real drives; a virtual tape or tgt says nothing)."""

from __future__ import annotations

import sys
from typing import Any

from blockxfer.errors import DeviceError

from .spec import Arg, arg


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


def set_barcodes(next_tape: object) -> dict[int, str]:
    """After a dump through a changer: the barcode of each tape of the set it used."""
    used = getattr(next_tape, "used", None)
    return dict(sorted(used.items())) if used else {}


def drive_lines(drive: dict[str, Any] | None) -> list[str]:
    """`tape status` lines for what the drive says over SCSI (none for a virtual tape)."""
    if drive is None:
        return [f"{'drive':16} no SCSI information (virtual tape, or no sg node)"]

    def known(v: object, unit: str = "") -> object:
        return "not reported" if v is None else f"{v}{unit}"

    alerts = drive.get("tape_alert_text")
    rows = [("drive", f"{drive['vendor']} {drive['product']} {drive['revision']} "
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
    return [f"{k:16} {v}" for k, v in rows]


def changer_tapes_arg() -> Arg:
    return arg("--changer-tapes", metavar="BARCODES", default=None,
               help="with --changer: the tapes to use for the set's next tapes, by barcode "
                    "or pool pattern, comma-separated and tried in order (e.g. "
                    "BXC002L5,BXC003L5 or 'BXP*'; default: the next full slot)")


def compression_arg() -> Arg:
    return arg("--compression", choices=["on", "off"], default=None,
               help="switch the drive's own compression first (default: leave it); "
                    "'tape status' shows it")
