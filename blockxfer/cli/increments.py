"""`blockxfer reintegrate` and `blockxfer increments status`: an incremental
mirror's base and increments brought back together, and what the increments
directory holds (the `mirror` commands that write it are in their own module)."""

from __future__ import annotations

import argparse
import os
import stat

from blockxfer.errors import UsageError
from blockxfer.units import human

from .spec import Command, Report, arg

BASE = "URL"          # tape:/dev/nstN, a virtual tape file, or a stream file
DIR = "DIR"


def _is_tape(path: str) -> bool:
    """An st node, or a regular file that is a virtual tape (its magic)."""
    from blockxfer.drivers.vtape import MAGIC
    try:
        mode = os.stat(path).st_mode
        if stat.S_ISCHR(mode):
            return True
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def wire() -> None:
    """Hand the library the drivers' openers (only the wiring may import them);
    the mirror commands call this too."""
    from blockxfer.drivers.blockdev import open_device
    from blockxfer.drivers.tapes import open_tape_handle
    from blockxfer.transfer.increments import Openers, use_openers
    use_openers(Openers(open_device, lambda path, write: open_tape_handle(path, write=write),
                        _is_tape))


def cmd_reintegrate(a: argparse.Namespace) -> Report:
    from blockxfer.transfer.increments import reintegrate, reintegrate_plan
    wire()
    if a.dry_run:
        data = reintegrate_plan(a.target, a.base, a.increments)
        steps = ("restore the base from " + str(data["base"]) + ", then "
                 if data["base_restored"] else "")
        line = (f"{a.target} is already at {data['snapshot']!r}" if data["up_to_date"] else
                f"would {steps}place {data['blocks']} blocks ({human(int(str(data['bytes'])))}) "
                f"from {a.increments} and commit {data['snapshot']!r} into {a.target}")
        return Report(data, [line])
    data = reintegrate(a.target, a.base, a.increments, force=a.force)
    if data["up_to_date"]:
        text = [f"{a.target}: already at {data['snapshot']!r}; nothing to do"]
    else:
        text = [f"{a.target}: reintegrated up to {data['snapshot']!r}: "
                + (f"base from {data['base']}, " if data["base_restored"] else "base already "
                   "here, ")
                + f"{data['blocks']} blocks from {a.increments}; snapshots "
                + ", ".join(str(s) for s in data["snapshots"])]  # type: ignore[attr-defined]
    return Report(data, text)


def cmd_status(a: argparse.Namespace) -> Report:
    from blockxfer.transfer.increments import mirror_status
    data = mirror_status(a.dir)
    if data["state"] == "none":
        raise UsageError(f"{a.dir} holds no increments (no header file); give the "
                         "directory the first mirror update created")
    if data["state"] == "empty":
        return Report(data, [f"{a.dir}: the first update is writing the base (or was "
                             "stopped before it began); run the mirror update again"])
    if data["state"] != "ready":
        return Report(data, [f"{a.dir}: base {data['base']} not written yet (the first "
                             "update did not finish); run the mirror update again"])
    size, changed = int(str(data["structure_bytes"])), int(str(data["changed_bytes"]))
    text = [f"{a.dir}: base {data['base_snapshot']!r} on {data['base']}, "
            f"{data['updates']} updates, newest {data['newest_snapshot']!r}",
            f"{a.dir}: {human(size)} on disk for {human(changed)} changed since the base "
            f"({data['held_blocks']} blocks"
            + (f", {size / changed:.3f}x" if changed else "") + "); "
            f"{human(int(str(data['written_bytes'])))} written by all updates"]
    return Report(data, text)


STATUS = Command(
    "status", "what an increments directory holds, and its size against the changes",
    "Show the base, the number of updates, the newest mirrored snapshot and the "
    "structure's size on disk against the real changed set (the blocks that differ "
    "from the base). Reads only DIR.",
    ("blockxfer increments status /srv/incr",
     "blockxfer increments status /srv/incr --json"),
    cmd_status, (arg("dir", metavar=DIR, help="the increments directory"),))

COMMANDS = (
    Command("reintegrate", "restore an incremental mirror: its base, then its increments",
            "Restore the base image (from its tape or file) onto VOLUME, then the "
            "increments from DIR, then commit the newest mirrored state: VOLUME becomes "
            "that state byte for byte, with its snapshots. The increments and the base "
            "are checked before VOLUME is touched; a VOLUME that already holds the base "
            "(an interrupted reintegrate) gets only the increments.",
            ("blockxfer reintegrate /srv/back.img --base tape:/dev/nst0 --increments /srv/incr",
             "blockxfer reintegrate /srv/back.img --base /srv/base.bxs --increments /srv/incr",
             "blockxfer reintegrate -n /dev/md0 --base t.vtape --increments /srv/incr  # plan"),
            cmd_reintegrate,
            (arg("target", metavar="VOLUME", help="the volume (or new volume file) to rebuild"),
             arg("--base", required=True, metavar=BASE,
                 help="the base image: tape:/dev/nstN, a virtual tape file, or a stream file"),
             arg("--increments", required=True, metavar=DIR,
                 help="the increments directory the mirror updates wrote"),
             arg("--force", action="store_true",
                 help="let the base overwrite a VOLUME that holds something else"),
             arg("-n", "--dry-run", action="store_true",
                 help="check the base and the increments and print what would be done; "
                      "write nothing"))),
    Command("increments", "incremental mirror directories: status",
            "The directory of an incremental mirror: a sparse, checksummed structure of "
            "the blocks that differ from the base (docs/increments.md).",
            ("blockxfer increments status /srv/incr",),
            subcommands=(STATUS,)),
)
