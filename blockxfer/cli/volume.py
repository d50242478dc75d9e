"""Volume commands: init, info, write, read, snapshot, snapshots, destroy,
pointer, image, check."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from blockxfer.errors import UsageError
from blockxfer.units import human, parse_size

from .common import expr_arg, need_snapshot, progress, snapshot_arg, volume_arg
from .spec import Command, Report, arg


def cmd_init(a: argparse.Namespace) -> Report:
    from blockxfer.handles import init_volume
    from blockxfer.volume.layout import MAX_BLOCK, MIN_BLOCK
    size = parse_size(a.size) if a.size else None
    vsize = parse_size(a.virtual_size) if a.virtual_size else None
    block_size = parse_size(a.block_size)
    if not MIN_BLOCK <= block_size <= MAX_BLOCK or block_size & (block_size - 1):
        raise UsageError(f"--block-size {a.block_size}: use a power of two from 4K to 1M")
    created = not os.path.exists(a.path)
    try:
        vol = init_volume(a.path, size=size, block_size=block_size, force=a.force,
                          virtual_size=vsize)
    except BaseException:
        if created and os.path.isfile(a.path):     # a refused init leaves nothing behind
            os.unlink(a.path)
        raise
    with vol:
        data = {"volume": a.path, "uuid": str(vol.uuid), "blocks": vol.nblocks,
                "block_size": vol.block_size, "bytes": vol.nblocks * vol.block_size,
                "virtual_size": vol.virtual_size}
    return Report(data, [f"{a.path}: volume {data['uuid']}, {human(data['bytes'])} in "
                         f"{data['blocks']} blocks of {data['block_size']}, virtual disk "
                         f"{human(data['virtual_size'])}"])


def cmd_info(a: argparse.Namespace) -> Report:
    from blockxfer.service.session import open_session
    with open_session(a.path) as s:            # a server owns the volume: it answers
        info = s.info()
    return Report(info, info_lines(info))


def info_lines(info: dict[str, Any]) -> list[str]:
    """`info` for people, like `qemu-img info`: sizes with units and the byte or
    block count beside them, the commit time as a date (--json keeps the numbers)."""
    bs = info.get("block_size") or 1
    shown: dict[str, Callable[[Any], str]] = {
        "blocks": lambda n: f"{n} ({human(n * bs)})",
        "virtual_size": lambda n: f"{human(n)} ({n} bytes)",
        "used_blocks": lambda n: f"{n} ({human(n * bs)})",
        "free_blocks": lambda n: f"{n} ({human(n * bs)})",
        "pointers": lambda d: ", ".join(f"{k} -> {v}" for k, v in d.items()) or "-",
        "committed": _when,
        "server": _server,
    }
    return [f"{k:14} {shown[k](v) if k in shown and v is not None else v}"
            for k, v in info.items()]


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _server(srv: dict[str, Any]) -> str:
    """The serving process in one line: who, exports, its jobs and their next run."""
    mode = "read-only" if srv.get("read_only") else "read-write"
    exports = ", ".join(repr(e) if e == "" else e for e in srv.get("exports", [])) or "-"
    jobs = "; ".join(f"{j['name']} every {j['every_seconds']:g} s, next {_when(j['next_run'])}"
                     + (f", last error: {j['last_error']}" if j.get("last_error") else "")
                     for j in srv.get("jobs", []) if j.get("next_run") is not None)
    return (f"pid {srv.get('pid')}, {mode}, {srv.get('clients', 0)} clients, "
            f"exports {exports}" + (f"; jobs: {jobs}" if jobs else ""))


def cmd_write(a: argparse.Namespace) -> Report:
    from blockxfer.service.session import open_session
    if sys.stdin.isatty():
        raise UsageError("write takes its data on standard input; redirect a file or a pipe")
    offset = parse_size(a.offset)
    prog = progress(a, "write")
    with open_session(a.path, write=True) as s:
        r = s.write(sys.stdin.fileno(), offset, progress=prog.add)
    prog.finish()
    return Report({"volume": a.path, "offset": offset, "bytes": r["bytes"]})


def cmd_read(a: argparse.Namespace) -> Report:
    from blockxfer.handles import split_target
    from blockxfer.service.session import open_session
    from blockxfer.transport.local import stdout_errors
    path, snap = split_target(a.target)
    if sys.stdout.isatty():
        raise UsageError("read writes binary data; redirect standard output to a file or a pipe")
    offset = parse_size(a.offset)
    length = None if a.length is None else parse_size(a.length)
    with open_session(path) as s, stdout_errors():
        total = length if length is not None else max(s.info()["virtual_size"] - offset, 0)
        prog = progress(a, "read", total)
        r = s.read(sys.stdout.buffer, offset, total, snap, progress=prog.add)
        sys.stdout.buffer.flush()
    prog.finish()
    return Report({"volume": path, "snapshot": snap, "offset": offset, "bytes": r["bytes"]},
                  stderr=True)


def _snapshot_report(path: str, name: str, id: int, generation: int, blocks: int) -> Report:
    return Report({"volume": path, "snapshot": name, "id": id, "generation": generation,
                   "blocks": blocks},
                  [f"{path}@{name}: snapshot {id} at CP {generation}, {blocks} blocks"])


def cmd_snapshot(a: argparse.Namespace) -> Report:
    from blockxfer.service.session import open_session
    path, name = need_snapshot(a.target)
    with open_session(path, write=True) as s:
        r = s.snapshot(name, shadow=a.shadow, master=a.master, freeze=a.freeze)
    return _snapshot_report(path, name, r["id"], r["generation"], r["blocks"])


def cmd_snapshots(a: argparse.Namespace) -> Report:
    from blockxfer.service.session import open_session
    with open_session(a.path) as s:
        listing = s.snapshots()
    rows, pointers = listing["snapshots"], listing["pointers"]
    text = [f"{'NAME':20} {'ID':>5} {'CREATED':20} {'CP':>6} {'BLOCKS':>10}  FLAGS"]
    for r in rows:
        flags = ",".join(f for f in ("shadow", "master", "incomplete") if r[f]) or "-"
        text.append(f"{r['name']:20} {r['id']:>5} {r['created']:20} {r['generation']:>6} "
                    f"{r['blocks']:>10}  {flags}")
    text += [f"pointer {name} -> {target}" for name, target in sorted(pointers.items())]
    return Report({"snapshots": rows, "pointers": pointers}, text)


def cmd_destroy(a: argparse.Namespace) -> Report:
    """Destroy a snapshot, or delete a pointer when NAME is one (one verb for what
    VOLUME@NAME names). The write open comes first, so a device in use is refused
    before anything is read from it."""
    from blockxfer.service.session import open_session
    path, name = need_snapshot(a.target)
    with open_session(path, write=True) as s:
        r = s.destroy(name)
    if r["pointer"]:
        return Report({"volume": path, "pointer": name, "snapshot": None, "deleted": True},
                      [f"pointer {name} deleted"])
    return Report({"volume": path, "destroyed": name}, [f"{path}@{name}: destroyed"])


def _holds(path: str, op: str, snapshot: str | None = None, tag: str | None = None) -> Report:
    from blockxfer.service.session import open_session
    with open_session(path, write=op != "list") as s:
        r = s.holds(op, snapshot, tag)
    rows = [f"{name:24} {', '.join(tags)}" for name, tags in r["holds"].items()]
    return Report({"volume": path, **r}, rows or [f"{path}: no holds"])


def cmd_hold(a: argparse.Namespace) -> Report:
    path, name = need_snapshot(a.target)
    report = _holds(path, "hold", name, a.tag)
    report.text = [f"{path}@{name}: held by {a.tag}"]
    return report


def cmd_release(a: argparse.Namespace) -> Report:
    path, name = need_snapshot(a.target)
    report = _holds(path, "release", name, a.tag)
    report.text = [f"{path}@{name}: hold {a.tag} released"]
    return report


def cmd_holds(a: argparse.Namespace) -> Report:
    return _holds(a.path, "list")


def cmd_pointer(a: argparse.Namespace) -> Report:
    from blockxfer.service.session import open_session
    if not a.delete and not a.snapshot:
        raise UsageError("name the snapshot the pointer should refer to, or give --delete")
    with open_session(a.path, write=True) as s:
        s.pointer(a.name, a.snapshot, delete=a.delete)
    if a.delete:
        return Report({"volume": a.path, "pointer": a.name, "snapshot": None, "deleted": True},
                      [f"pointer {a.name} deleted"])
    return Report({"volume": a.path, "pointer": a.name, "snapshot": a.snapshot,
                   "deleted": False}, [f"pointer {a.name} -> {a.snapshot}"])


def cmd_image(a: argparse.Namespace) -> Report:
    from blockxfer.service.session import open_session
    with open_session(a.path) as s:
        info = s.image(a.expression)
    size = human(int(str(info["bytes"])))
    return Report(info, [f"{info['expression']}: {info['blocks']} blocks, {size}; "
                         f"top {info['top']}, base {info['base'] or '(none: full image)'}"])


def cmd_check(a: argparse.Namespace) -> Report:
    from blockxfer.service.session import open_session
    with open_session(a.path) as s:
        report = s.check()
    problems = report["problems"]
    text = [f"problem: {p}" for p in problems]
    text.append(f"{a.path}: {'clean' if report['clean'] else f'{len(problems)} problems'}; "
                f"{report['roots']} roots, {report['blocks_verified']} data blocks verified, "
                f"{report.get('log_records', 0)} intent log records")
    return Report(report, text, code=0 if report["clean"] else 1)


COMMANDS = (
    Command("init", "create a volume on a file or block device",
            "Create a volume: a write-anywhere virtual disk with snapshots, on a block "
            "device or a file (created with --size). A device that holds data is refused "
            "unless --force.",
            ("blockxfer init /srv/vol.img --size 10G   # a file-backed volume",
             "blockxfer init /dev/md0 --block-size 64K  # on an md array"),
            cmd_init,
            (volume_arg("the block device or file to make a volume of"),
             arg("--size", metavar="SIZE", help="create the file with this size (e.g. 1G)"),
             arg("--block-size", default="4096", metavar="SIZE",
                 help="block size, a power of two from 4K to 1M (default 4096)"),
             arg("--virtual-size", metavar="SIZE",
                 help="size of the virtual disk (default 90%% of the space)"),
             arg("--force", action="store_true", help="overwrite a leftover volume or data"))),
    Command("info", "show a volume's geometry and usage",
            "Show a volume's geometry, usage and current CP (asks the server when one "
            "exports it: then also its clients, exports and scheduled jobs).",
            ("blockxfer info /srv/vol.img",
             "blockxfer info /srv/vol.img --json | jq .free_blocks"),
            cmd_info, (volume_arg(),)),
    Command("write", "write standard input into the virtual disk, then commit",
            "Write standard input into the virtual disk at --offset and commit a CP at "
            "the end; on an error, what was written before it is committed.",
            ("blockxfer write /srv/vol.img < disk.raw",
             "dd if=/dev/sda bs=1M | blockxfer write /srv/vol.img --offset 1M"),
            cmd_write,
            (volume_arg(),
             arg("--offset", default="0", metavar="SIZE",
                 help="byte offset in the virtual disk (default 0)"))),
    Command("read", "read the virtual disk or a snapshot to standard output",
            "Read the live virtual disk (VOLUME) or a snapshot (VOLUME@SNAPSHOT) to "
            "standard output.",
            ("blockxfer read /srv/vol.img@june1 > june1.raw",
             "blockxfer read /srv/vol.img --offset 1M --length 4K | xxd | head"),
            cmd_read,
            (snapshot_arg("the volume (live data) or one of its snapshots", "VOLUME[@SNAPSHOT]"),
             arg("--offset", default="0", metavar="SIZE", help="where to start (default 0)"),
             arg("--length", metavar="SIZE", help="how much (default: to the end)"))),
    Command("snapshot", "take a snapshot",
            "Take a snapshot of the volume (a CP that stays). A name is letters, digits and "
            ". _ : ; '-' is refused, since 'a - b' is a difference in image expressions "
            "(names received from elsewhere keep theirs).",
            ("blockxfer snapshot /srv/vol.img@june1",
             "blockxfer snapshot /srv/vol.img@base --shadow   # only a base for increments",
             "blockxfer snapshot /dev/md0@daily --freeze /mnt/data   # needs 'serve'"),
            cmd_snapshot,
            (snapshot_arg("the volume and the new snapshot's name"),
             arg("--shadow", action="store_true",
                 help="a shadow snapshot: its blocks stay reusable (a base only)"),
             arg("--master", action="store_true", help="a replication anchor"),
             arg("--freeze", metavar="MOUNTPOINT",
                 help="freeze this mounted file system around the snapshot (needs serve)"))),
    Command("snapshots", "list snapshots and pointers",
            "List a volume's snapshots (name, id, time, CP, blocks, flags) and pointers.",
            ("blockxfer snapshots /srv/vol.img",
             "blockxfer snapshots /srv/vol.img --json | jq -r '.snapshots[].name'"),
            cmd_snapshots, (volume_arg(),)),
    Command("destroy", "destroy a snapshot or a pointer",
            "Destroy a snapshot (the blocks only it held become free at the next CP), or "
            "delete a pointer when NAME is one.",
            ("blockxfer destroy /srv/vol.img@june1",
             "blockxfer destroy /srv/vol.img@last-sent   # a pointer: the same as "
             "'pointer --delete'"),
            cmd_destroy,
            (snapshot_arg("the snapshot (or pointer) to destroy"),)),
    Command("hold", "keep a snapshot from being destroyed (like 'zfs hold')",
            "Put a hold tagged TAG on a snapshot: neither 'destroy' nor a retention policy "
            "removes it until every hold is released. Mirrors and replication hold the "
            "snapshots they need the same way.",
            ("blockxfer hold keep-for-audit /srv/vol.img@june1",),
            cmd_hold,
            (arg("tag", metavar="TAG", help="a name for the hold (1..128 characters)"),
             snapshot_arg("the snapshot to hold"))),
    Command("release", "release a hold on a snapshot",
            "Remove the hold tagged TAG from a snapshot; when no hold is left it may be "
            "destroyed again.",
            ("blockxfer release keep-for-audit /srv/vol.img@june1",),
            cmd_release,
            (arg("tag", metavar="TAG", help="the hold's tag"),
             snapshot_arg("the held snapshot"))),
    Command("holds", "list the holds on a volume's snapshots",
            "List each held snapshot with the tags holding it.",
            ("blockxfer holds /srv/vol.img --json",),
            cmd_holds, (volume_arg(),)),
    Command("pointer", "set or delete a named pointer to a snapshot",
            "Set a named pointer (like a tag: 'last-sent') to a snapshot, or delete it. "
            "Image expressions may name pointers where they name snapshots.",
            ("blockxfer pointer /srv/vol.img last-sent june3",
             "blockxfer pointer /srv/vol.img last-sent --delete"),
            cmd_pointer,
            (volume_arg(),
             arg("name", metavar="POINTER", help="the pointer's name"),
             arg("snapshot", nargs="?", metavar="SNAPSHOT", help="the snapshot it refers to"),
             arg("--delete", action="store_true", help="delete the pointer"))),
    Command("image", "evaluate an image expression such as 'june5 + june4 - june3'",
            "Evaluate an image expression without sending it: its top, base and size in "
            "blocks and bytes.",
            ("blockxfer image /srv/vol.img june5            # a full image",
             "blockxfer image /srv/vol.img 'june5 - june3'  # an increment"),
            cmd_image, (volume_arg(), expr_arg())),
    Command("check", "verify every structure and block checksum",
            "Verify every structure of the volume and the checksum of every data block; "
            "exit 1 when problems are found.",
            ("blockxfer check /srv/vol.img",
             "blockxfer check /srv/vol.img --json | jq .problems"),
            cmd_check, (volume_arg(),)),
)
