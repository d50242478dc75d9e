"""Volume commands: init, info, write, read, snapshot, snapshots, destroy,
pointer, image, check."""

from __future__ import annotations

import argparse
import os
import stat
import sys
from collections.abc import Callable
from typing import BinaryIO

from blockxfer import remote
from blockxfer.errors import BlockxferError, UsageError
from blockxfer.handles import init_volume, open_volume, split_target
from blockxfer.transport.local import stdout_errors
from blockxfer.units import human, parse_size
from blockxfer.volume import Volume
from blockxfer.volume.check import check_volume
from blockxfer.volume.layout import MAX_BLOCK, MIN_BLOCK

from .common import expr_arg, need_snapshot, progress, snapshot_arg, volume_arg
from .spec import Command, Report, arg
from .stdin import InputChunks

CHUNK = 8 << 20
SPARSE_WINDOW = 1 << 30          # virtual bytes whose extents `read` looks up at once


def cmd_init(a: argparse.Namespace) -> Report:
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
    info = remote.info(a.path)                 # a server owns the volume: ask it
    if info is None:
        with open_volume(a.path) as vol:
            info = vol.info()
    return Report(info, [f"{k:14} {v}" for k, v in info.items()])


def cmd_write(a: argparse.Namespace) -> Report:
    if sys.stdin.isatty():
        raise UsageError("write takes its data on standard input; redirect a file or a pipe")
    offset = done = parse_size(a.offset)
    prog = progress(a, "write")
    failed: BlockxferError | None = None
    with open_volume(a.path, write=True) as vol:
        chunks = InputChunks(sys.stdin.fileno(), CHUNK)
        try:
            for chunk in chunks:
                vol.write(done, chunk)
                done += len(chunk)
                prog.add(len(chunk))
        except BlockxferError as e:
            failed = e                   # what came before it is committed on the way out
        finally:
            chunks.stop()
        vol.commit()
    prog.finish()
    if failed is not None:
        raise type(failed)(f"{failed}; {human(done - offset)} ({done - offset} bytes) from "
                           f"offset {offset} were written and committed, the rest was "
                           "not") from failed
    return Report({"volume": a.path, "offset": offset, "bytes": done - offset})


def cmd_read(a: argparse.Namespace) -> Report:
    path, snap = split_target(a.target)
    if sys.stdout.isatty():
        raise UsageError("read writes binary data; redirect standard output to a file or a pipe")
    out = sys.stdout.buffer
    with open_volume(path) as vol, stdout_errors():
        offset = parse_size(a.offset)
        length = vol.virtual_size - offset if a.length is None else parse_size(a.length)
        prog = progress(a, "read", length)
        if _fresh_file(out.fileno()):
            _read_sparse(vol, out, offset, length, snap, prog.add)
        else:
            _read_range(vol, out, offset, length, snap, prog.add)
        out.flush()
    prog.finish()
    return Report({"volume": path, "snapshot": snap, "offset": offset, "bytes": length},
                  stderr=True)


def _read_range(vol: Volume, out: BinaryIO, offset: int, length: int, snap: str | None,
                add: Callable[[int], None]) -> None:
    bs = vol.block_size
    head = min(length, -offset % bs)           # unaligned edges go the slow way
    body = (length - head) // bs * bs
    if head:
        out.write(vol.read(offset, head, snapshot=snap))
    for view in vol.iter_read(offset + head, body, snapshot=snap):
        out.write(view)
        add(len(view))
    tail = length - head - body
    if tail:
        out.write(vol.read(offset + head + body, tail, snapshot=snap))


def _fresh_file(fd: int) -> bool:
    """Is standard output a regular file with nothing at or after its position (as
    `> file` leaves it)? Then skipping over a hole leaves zeros, and a sparse file."""
    try:
        st = os.fstat(fd)
        return stat.S_ISREG(st.st_mode) and os.lseek(fd, 0, os.SEEK_CUR) >= st.st_size
    except OSError:
        return False


def _read_sparse(vol: Volume, out: BinaryIO, offset: int, length: int, snap: str | None,
                 add: Callable[[int], None]) -> None:
    """Unmapped ranges become holes in the output file: seek over them, and set the
    file's size at the end (a trailing hole is no write at all)."""
    end = offset + length
    for start in range(offset, end, SPARSE_WINDOW):      # map lookups in bounded pieces
        for off, n, mapped in vol.extents(start, min(SPARSE_WINDOW, end - start), snap):
            if mapped:
                _read_range(vol, out, off, n, snap, add)
                continue
            out.seek(n, os.SEEK_CUR)
            add(n)
    out.flush()
    os.ftruncate(out.fileno(), out.tell())


def _snapshot_report(path: str, name: str, id: int, generation: int, blocks: int) -> Report:
    return Report({"volume": path, "snapshot": name, "id": id, "generation": generation,
                   "blocks": blocks},
                  [f"{path}@{name}: snapshot {id} at CP {generation}, {blocks} blocks"])


def cmd_snapshot(a: argparse.Namespace) -> Report:
    path, name = need_snapshot(a.target)
    r = remote.snapshot(path, name, shadow=a.shadow, master=a.master, freeze=a.freeze)
    if r is not None:
        return _snapshot_report(path, name, r["id"], r["generation"], r["blocks"])
    if a.freeze:
        raise UsageError(f"--freeze needs the server that exports {path} (blockxfer serve)")
    with open_volume(path, write=True) as vol:
        vol.create_snapshot(name, shadow=a.shadow, master=a.master)
        e = vol.resolve(name)
    return _snapshot_report(path, name, e.id, e.generation, e.blocks)


def cmd_snapshots(a: argparse.Namespace) -> Report:
    listing = remote.snapshots(a.path)
    if listing is None:
        with open_volume(a.path) as vol:
            listing = remote.snapshots_listing(vol)
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
    path, name = need_snapshot(a.target)
    listing = remote.snapshots(path)
    if listing is not None:                                  # served
        pointer = name in listing["pointers"] and name not in {
            r["name"] for r in listing["snapshots"]}
        if pointer:
            remote.delete_pointer(path, name)
        else:
            remote.destroy(path, name)
    else:
        with open_volume(path, write=True) as vol:
            pointer = name in vol.pointers and name not in {e.name for e in vol.snapshots()}
            if pointer:
                vol.delete_pointer(name)
            else:
                vol.destroy_snapshot(name)
    if pointer:
        return Report({"volume": path, "pointer": name, "snapshot": None, "deleted": True},
                      [f"pointer {name} deleted"])
    return Report({"volume": path, "destroyed": name}, [f"{path}@{name}: destroyed"])


def _holds(path: str, op: str, snapshot: str | None = None, tag: str | None = None) -> Report:
    r = remote.holds(path, op, snapshot, tag)
    if r is None:
        with open_volume(path, write=op != "list") as vol:
            r = remote.holds_change(vol, op, snapshot, tag)
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
    if not a.delete and not a.snapshot:
        raise UsageError("name the snapshot the pointer should refer to, or give --delete")
    if a.delete:
        if remote.delete_pointer(a.path, a.name) is None:
            with open_volume(a.path, write=True) as vol:
                vol.delete_pointer(a.name)
        return Report({"volume": a.path, "pointer": a.name, "snapshot": None, "deleted": True},
                      [f"pointer {a.name} deleted"])
    if remote.set_pointer(a.path, a.name, a.snapshot) is None:
        with open_volume(a.path, write=True) as vol:
            vol.set_pointer(a.name, a.snapshot)
    return Report({"volume": a.path, "pointer": a.name, "snapshot": a.snapshot,
                   "deleted": False}, [f"pointer {a.name} -> {a.snapshot}"])


def cmd_image(a: argparse.Namespace) -> Report:
    info = remote.image(a.path, a.expression)
    if info is None:
        with open_volume(a.path) as vol:
            info = remote.image_report(vol, a.expression)
    size = human(int(str(info["bytes"])))
    return Report(info, [f"{info['expression']}: {info['blocks']} blocks, {size}; "
                         f"top {info['top']}, base {info['base'] or '(none: full image)'}"])


def cmd_check(a: argparse.Namespace) -> Report:
    with open_volume(a.path) as vol:
        report = check_volume(vol)
    text = [f"problem: {p}" for p in report.problems]
    text.append(f"{a.path}: {'clean' if report.clean else f'{len(report.problems)} problems'}; "
                f"{report.roots} roots, {report.blocks_verified} data blocks verified, "
                f"{report.log_records} intent log records")
    return Report(report.as_dict(), text, code=0 if report.clean else 1)


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
            "exports it).",
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
            "Take a snapshot of the volume (a CP that stays). Names are free text; a name "
            "with '-' is one name, while 'a - b' with spaces is an image expression.",
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
