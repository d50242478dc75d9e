"""The `blockxfer` command: parse, call one library function, print.

Errors raised on purpose (BlockxferError) become one line on stderr and the
error's exit code; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, redirect_stdout
from typing import Any, BinaryIO, TextIO

from blockxfer import __version__, cli_devices, cli_endpoint, cli_serve, remote
from blockxfer.errors import BlockxferError, DeviceError, UsageError
from blockxfer.handles import init_volume, open_volume, split_target
from blockxfer.progress import Progress
from blockxfer.tape import Tape
from blockxfer.transport.local import stdout_errors
from blockxfer.units import human, parse_size
from blockxfer.volume.check import check_volume
from blockxfer.volume.layout import MAX_BLOCK, MIN_BLOCK

CHUNK = 8 << 20


def _print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def _need_snapshot(target: str) -> tuple[str, str]:
    path, snap = split_target(target)
    if snap is None:
        raise UsageError(f"{target!r}: name the snapshot as PATH@NAME")
    return path, snap


# -- commands -------------------------------------------------------------------------------
def cmd_init(a: argparse.Namespace) -> int:
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
        print(f"{a.path}: volume {vol.uuid}, {human(vol.nblocks * vol.block_size)} in "
              f"{vol.nblocks} blocks of {vol.block_size}, virtual disk {human(vol.virtual_size)}")
    return 0


def cmd_info(a: argparse.Namespace) -> int:
    info = remote.info(a.path)                 # a server owns the volume: ask it
    if info is None:
        with open_volume(a.path) as vol:
            info = vol.info()
    if a.json:
        _print_json(info)
    else:
        for k, v in info.items():
            print(f"{k:14} {v}")
    return 0


class _InputChunks:
    """Standard input in chunks of `size`, read on a thread so reading overlaps the
    volume's writes. The thread reads the raw descriptor (os.read), never the
    buffered sys.stdin: a thread blocked inside the buffered reader when the
    command fails made the interpreter abort at exit ("Fatal Python error")."""

    def __init__(self, fd: int, size: int) -> None:
        self._fd, self._size = fd, size
        self._q: queue.Queue[bytes | OSError | None] = queue.Queue(maxsize=3)
        self._stop = threading.Event()
        threading.Thread(target=self._run, name="stdin", daemon=True).start()

    def __iter__(self) -> Iterator[bytes]:
        while (chunk := self._q.get()) is not None:
            if isinstance(chunk, OSError):
                raise DeviceError(f"read standard input: {chunk.strerror}") from chunk
            yield chunk

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        try:
            while chunk := self._fill():
                self._put(chunk)
            self._put(None)
        except OSError as e:             # handed to the main thread
            self._put(e)

    def _fill(self) -> bytes:
        parts, n = [], 0
        while n < self._size and (part := os.read(self._fd, self._size - n)):
            parts.append(part)
            n += len(part)
        return b"".join(parts)

    def _put(self, item: bytes | OSError | None) -> None:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue


def cmd_write(a: argparse.Namespace) -> int:
    if sys.stdin.isatty():
        raise UsageError("write takes its data on standard input; redirect a file or a pipe")
    offset = done = parse_size(a.offset)
    prog = Progress("write")
    failed: BlockxferError | None = None
    with open_volume(a.path, write=True) as vol:
        chunks = _InputChunks(sys.stdin.fileno(), CHUNK)
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
    return 0


def cmd_read(a: argparse.Namespace) -> int:
    path, snap = split_target(a.target)
    if sys.stdout.isatty():
        raise UsageError("read writes binary data; redirect standard output to a file or a pipe")
    out = sys.stdout.buffer
    with open_volume(path) as vol, stdout_errors():
        offset = parse_size(a.offset)
        length = vol.virtual_size - offset if a.length is None else parse_size(a.length)
        prog = Progress("read", length)
        bs = vol.block_size
        head = min(length, -offset % bs)           # unaligned edges go the slow way
        body = (length - head) // bs * bs
        if head:
            out.write(vol.read(offset, head, snapshot=snap))
        for view in vol.iter_read(offset + head, body, snapshot=snap):
            out.write(view)
            prog.add(len(view))
        tail = length - head - body
        if tail:
            out.write(vol.read(offset + head + body, tail, snapshot=snap))
        out.flush()
    prog.finish()
    return 0


def cmd_snapshot(a: argparse.Namespace) -> int:
    path, name = _need_snapshot(a.target)
    r = remote.snapshot(path, name, shadow=a.shadow, master=a.master, freeze=a.freeze)
    if r is not None:
        print(f"{path}@{name}: snapshot {r['id']} at CP {r['generation']}, {r['blocks']} blocks")
        return 0
    if a.freeze:
        raise UsageError(f"--freeze needs the server that exports {path} (blockxfer serve)")
    with open_volume(path, write=True) as vol:
        vol.create_snapshot(name, shadow=a.shadow, master=a.master)
        e = vol.resolve(name)
    print(f"{path}@{name}: snapshot {e.id} at CP {e.generation}, {e.blocks} blocks")
    return 0


def cmd_snapshots(a: argparse.Namespace) -> int:
    listing = remote.snapshots(a.path)
    if listing is None:
        with open_volume(a.path) as vol:
            listing = remote.snapshots_listing(vol)
    rows, pointers = listing["snapshots"], listing["pointers"]
    if a.json:
        _print_json({"snapshots": rows, "pointers": pointers})
        return 0
    print(f"{'NAME':20} {'ID':>5} {'CREATED':20} {'CP':>6} {'BLOCKS':>10}  FLAGS")
    for r in rows:
        flags = ",".join(f for f in ("shadow", "master", "incomplete") if r[f]) or "-"
        print(f"{r['name']:20} {r['id']:>5} {r['created']:20} {r['generation']:>6} "
              f"{r['blocks']:>10}  {flags}")
    for name, target in sorted(pointers.items()):
        print(f"pointer {name} -> {target}")
    return 0


def cmd_destroy(a: argparse.Namespace) -> int:
    path, name = _need_snapshot(a.target)
    if remote.destroy(path, name) is not None:
        print(f"{path}@{name}: destroyed")
        return 0
    with open_volume(path, write=True) as vol:
        vol.destroy_snapshot(name)
    print(f"{path}@{name}: destroyed")
    return 0


def cmd_pointer(a: argparse.Namespace) -> int:
    if not a.delete and not a.snapshot:
        raise UsageError("name the snapshot the pointer should refer to, or give --delete")
    if a.delete and remote.delete_pointer(a.path, a.name) is not None:
        print(f"pointer {a.name} deleted")
        return 0
    if not a.delete and remote.set_pointer(a.path, a.name, a.snapshot) is not None:
        print(f"pointer {a.name} -> {a.snapshot}")
        return 0
    with open_volume(a.path, write=True) as vol:
        if a.delete:
            vol.delete_pointer(a.name)
            print(f"pointer {a.name} deleted")
            return 0
        vol.set_pointer(a.name, a.snapshot)
    print(f"pointer {a.name} -> {a.snapshot}")
    return 0


def cmd_image(a: argparse.Namespace) -> int:
    info = remote.image(a.path, a.expression)
    if info is None:
        with open_volume(a.path) as vol:
            info = remote.image_report(vol, a.expression)
    if a.json:
        _print_json(info)
    else:
        print(f"{info['expression']}: {info['blocks']} blocks, {human(int(info['bytes']))}; "  # type: ignore[call-overload]
              f"top {info['top']}, base {info['base'] or '(none: full image)'}")
    return 0


def cmd_check(a: argparse.Namespace) -> int:
    with open_volume(a.path) as vol:
        report = check_volume(vol)
    if a.json:
        _print_json(report.as_dict())
    else:
        for p in report.problems:
            print(f"problem: {p}")
        print(f"{a.path}: {'clean' if report.clean else f'{len(report.problems)} problems'}; "
              f"{report.roots} roots, {report.blocks_verified} data blocks verified")
    return 0 if report.clean else 1


def _binary_in(path: str | None) -> BinaryIO:
    if path and path != "-":
        try:
            return open(path, "rb")  # noqa: SIM115 - closed by the caller
        except OSError as e:            # a path that cannot be opened: 4 (docs/exit-codes.md)
            raise DeviceError(f"cannot read {path}: {e.strerror}") from e
    if sys.stdin.isatty():
        raise UsageError("give the stream with -i FILE or on standard input")
    return sys.stdin.buffer


def cmd_send(a: argparse.Namespace) -> int:
    from blockxfer.service.session import send_to
    from blockxfer.transport import open_sink
    if a.output and a.destination and a.output != a.destination:
        raise UsageError("give the destination once: as DESTINATION or with -o")
    a.output = a.output or a.destination
    if (a.output or "").startswith("s3://"):
        from blockxfer import cli_store
        return cli_store.send_to_store(a)
    geometry = _geometry(a, a.path)
    prog = Progress("send")
    with open_sink(a.output or a.destination, force=a.force) as sink:
        r = send_to(a.path, a.expression, sink, compress=a.compress, implicit=a.implicit,
                    resume=a.resume, geometry=geometry, progress=prog.add)
    prog.finish()
    far = sink.result
    print(f"sent {r['data_blocks']} blocks in {r['records']} records, {human(r['bytes'])}"
          + (" (through the server)" if r.get("served") else "")
          + (f"; {sink.name} received up to {far['top']!r}" if far and "top" in far else ""),
          file=sys.stderr)
    return 0


def _geometry(a: argparse.Namespace, path: str) -> object:
    """Geometry for striped reads: the md array's own, or --members/--chunk."""
    if a.order == "ascending":
        return None
    from blockxfer.drivers.md import MdGeometry, md_geometry
    if a.members:
        chunk = parse_size(a.chunk)
        return MdGeometry("striped", "raid0", a.members, chunk, 0, (), 0)
    name = os.path.basename(os.path.realpath(path))
    if not name.startswith("md"):
        raise UsageError("--order striped needs an md array or --members K --chunk BYTES")
    return md_geometry(name)


def cmd_receive(a: argparse.Namespace) -> int:
    from blockxfer.drivers.blockdev import open_device
    from blockxfer.stream.receive import receive_stream
    from blockxfer.transport import SourceRequest, is_volume_url, open_source
    if a.input and a.source and a.input != a.source:
        raise UsageError("give the source once: as SOURCE or with -i")
    url = a.input = a.input or a.source
    if (url or "").startswith("s3://"):
        from blockxfer import cli_store
        return cli_store.receive_from_store(a)
    if a.image and not (url and is_volume_url(url)):
        raise UsageError("--image pulls from a volume: give an ssh:// or tls:// SOURCE")
    prog = Progress("receive")
    with open_source(url, SourceRequest(a.image, a.resume)) as src:
        res = receive_stream(src, a.target, open_device, force=a.force,
                             seekable=src.seekable(), progress=prog.add)
        src.finish()
    prog.finish()
    kind = "incremental" if res.incremental else "full"
    print(f"{a.target}: received {kind} image up to {res.top!r}, {res.blocks} blocks"
          + (" (resumed)" if res.resumed else ""))
    for name in res.released:
        print(f"{a.target}: released {name!r} (the source no longer has it)")
    for name in res.incomplete:
        print(f"{a.target}: {name!r} is incomplete here (not all of its blocks were sent)")
    return 0


@contextmanager
def _stream_input(path: str | None) -> Iterator[BinaryIO]:
    f = _binary_in(path)
    try:
        yield f
    finally:
        if f is not sys.stdin.buffer:
            f.close()


def cmd_inspect(a: argparse.Namespace) -> int:
    from blockxfer.stream.inspect import inspect_stream
    with _stream_input(a.stream) as f:
        info = inspect_stream(f)
    if a.json:
        _print_json(info)
    else:
        for k, v in info.items():
            print(f"{k:16} {v}")
    return 0


def cmd_verify(a: argparse.Namespace) -> int:
    from blockxfer.stream.inspect import inspect_stream
    with _stream_input(a.stream) as f:
        info = inspect_stream(f)
    print(f"{a.stream or 'stream'}: ok, {info['records']} records, {info['data_blocks']} blocks, "
          f"digest verified")
    return 0


def _tape_opener() -> Callable[[str, bool], Tape]:
    from blockxfer.drivers.tapes import open_tape_handle
    return lambda path, write: open_tape_handle(path, write=write)


def _next_tape(a: argparse.Namespace) -> Callable[[str, int], str] | None:
    """How the next tape of a set is found: a changer, a command, else the terminal."""
    import subprocess
    if getattr(a, "changer", None):
        from blockxfer.drivers.changer import Changer, changer_next_tape, tape_label
        from blockxfer.drivers.tapes import eject_tape
        if a.next_tape:
            raise UsageError("give --changer or --next-tape, not both")
        if getattr(a, "verify", False):
            # the drive ends on the set's last tape; verify reads from the first
            raise UsageError("--verify does not work with --changer yet; load the first tape "
                             "and run 'blockxfer restore' or 'tape list' to check the image")
        return changer_next_tape(Changer(a.changer), a.changer_drive, a.tape,
                                 eject=eject_tape, label_of=tape_label,
                                 **cli_devices.changer_tapes_args(a, cmd_restore))
    if a.next_tape:
        def run(set_name: str, seq: int) -> str:
            env = dict(os.environ, BLOCKXFER_TAPE_SET=set_name, BLOCKXFER_TAPE_SEQ=str(seq))
            r = subprocess.run(a.next_tape, shell=True, env=env, capture_output=True, text=True)
            path = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
            if r.returncode != 0 or not path:
                raise UsageError(f"--next-tape command gave no tape for {set_name} #{seq} "
                                 f"(exit {r.returncode}): {r.stderr.strip()[:200]}")
            return path
        return run
    if sys.stdin.isatty() and sys.stderr.isatty():
        def ask(set_name: str, seq: int) -> str:
            print(f"insert tape {seq} of set {set_name!r}, then type its path "
                  f"(or press Enter for {a.tape}): ", end="", file=sys.stderr, flush=True)
            return sys.stdin.readline().strip() or a.tape
        return ask
    return None


def cmd_dump(a: argparse.Namespace) -> int:
    from blockxfer.drivers.reader import read_runs
    from blockxfer.drivers.tapes import max_record
    from blockxfer.transfer.dump import dump_image
    record_size = parse_size(a.record_size)
    limit = max_record(a.tape)                   # READ BLOCK LIMITS: st refuses larger
    if limit and record_size > limit:
        print(f"{a.tape}: the drive takes records of at most {limit} bytes; using that",
              file=sys.stderr)
        record_size = limit
    cli_devices.set_compression(a.tape, a.compression)
    prog = Progress("dump")
    next_tape = _next_tape(a)
    with open_volume(a.path) as vol:
        res = dump_image(vol, a.expression, a.tape, open_tape=_tape_opener(),  # type: ignore[arg-type]
                         next_tape=next_tape, label=a.label, record_size=record_size,
                         reader=lambda runs: read_runs(vol.dev, runs, vol.block_size),
                         progress=prog.add)
    prog.finish()
    print(f"{a.tape}: image {res.image}, {res.blocks} blocks, {human(res.bytes)}"
          + (f", across tapes {', '.join(res.tapes)}" if len(res.tapes) > 1 else ""))
    cli_devices.print_set_barcodes(a.tape, next_tape)
    if a.verify:
        from blockxfer.transfer.restore import verify_image
        verify_image(a.tape, res.image, open_tape=_tape_opener(),  # type: ignore[arg-type]
                     next_tape=_next_tape(a))
        print(f"{a.tape}: image {res.image} read back, every checksum verified")
    return cli_devices.report_tape_alerts(a.tape, "dump")


def _complete_snapshots(path: str) -> set[str]:
    if not os.path.exists(path):
        return set()
    try:
        with open_volume(path) as vol:
            return {e.name for e in vol.snapshots() if not e.incomplete and not e.shadow}
    except BlockxferError:
        return set()


def cmd_restore(a: argparse.Namespace) -> int:
    from blockxfer.drivers.blockdev import open_device
    from blockxfer.transfer.restore import restore_images
    if a.vbns:
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
        print(f"{a.target}: wrote {part.blocks} blocks ({lo}-{hi}) from image {a.image}, "
              f"reading {part.records_read} tape records")
        return 0
    if a.only:
        from blockxfer.transfer.snaprestore import restore_snapshot_only
        if a.image is None:
            raise UsageError("--only needs --image N (see 'tape list')")
        res, records = restore_snapshot_only(a.tape, a.target, a.image, a.only,
                                             open_tape=_tape_opener(), open_device=open_device,
                                             force=a.force)
        print(f"{a.target}: restored snapshot {res.top!r} alone from image {a.image}, "
              f"{res.blocks} blocks, reading {records} tape records")
        return 0
    have = _complete_snapshots(a.target)
    prog = Progress("restore")
    steps = restore_images(a.tape, a.target, open_tape=_tape_opener(),  # type: ignore[arg-type]
                           open_device=open_device, next_tape=_next_tape(a), image=a.image,
                           snapshot=a.snapshot, force=a.force, target_has=have.__contains__,
                           progress=prog.add)
    prog.finish()
    for st in steps:
        r = st.result
        print(f"{a.target}: restored image {st.image} up to {r.top!r}, {r.blocks} blocks")
        for name in r.incomplete:
            print(f"{a.target}: {name!r} is incomplete here")
    return cli_devices.report_tape_alerts(a.tape, "restore")


def cmd_tape_label(a: argparse.Namespace) -> int:
    from blockxfer.transfer.tapeset import label_tape
    tape = _tape_opener()(a.tape, True)
    try:
        label = label_tape(tape, a.name, set_name=a.set, force=a.force,  # type: ignore[arg-type]
                           record_size=parse_size(a.record_size))
    finally:
        tape.close()  # type: ignore[attr-defined]
    print(f"{a.tape}: labelled {label.serial!r}, tape {label.seq} of set {label.set_name!r}")
    return 0


def cmd_tape_list(a: argparse.Namespace) -> int:
    from blockxfer.transfer.tapeset import list_tape
    tape = _tape_opener()(a.tape, False)
    try:
        contents = list_tape(tape)  # type: ignore[arg-type]
    finally:
        tape.close()  # type: ignore[attr-defined]
    lab = contents.label
    rows = [i.as_dict() for i in contents.images]
    barcode = cli_devices.barcode_of(a.tape)
    if a.json:
        _print_json({"label": {"serial": lab.serial, "set": lab.set_name, "seq": lab.seq,
                               "record_size": lab.record_size, "set_id": lab.set_id.hex(),
                               "barcode": barcode},
                     "images": rows})
        return 0
    print(f"{a.tape}: {lab.serial!r}, tape {lab.seq} of set {lab.set_name!r}, "
          f"records of {lab.record_size} bytes" + (f", barcode {barcode}" if barcode else ""))
    for r in rows:
        state = "complete" if r["complete"] else ("continues" if r["continues"] else "INCOMPLETE")
        print(f"  {r['image']:>3}  file {r['file']:>3}  {r['level']:11} {r['expression']!r:32} "
              f"{r['blocks']:>10} blocks  {r['written']}  {state}")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from blockxfer.demo import run_demo
    return run_demo(a.dir)


# -- parser ---------------------------------------------------------------------------------
def _changer_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--changer", metavar="/dev/sgN",
                    help="media changer (mtx) that loads the next tape of the set into --tape")
    sp.add_argument("--changer-drive", type=int, default=0, metavar="N",
                    help="the changer's drive number of --tape (default 0)")
    cli_devices.add_changer_tapes_arg(sp)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="blockxfer", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"blockxfer {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    Handler = Callable[[argparse.Namespace], int]

    def cmd(name: str, fn: Handler, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(func=fn)
        return sp

    sp = cmd("init", cmd_init, "create a volume on a file or block device")
    sp.add_argument("path")
    sp.add_argument("--size", help="create the file with this size (e.g. 1G)")
    sp.add_argument("--block-size", default="4096", help="block size, 4K to 1M (default 4096)")
    sp.add_argument("--virtual-size", help="size of the virtual disk (default 90%% of the space)")
    sp.add_argument("--force", action="store_true", help="overwrite a leftover volume or data")

    sp = cmd("info", cmd_info, "show a volume's geometry and usage")
    sp.add_argument("path")
    sp.add_argument("--json", action="store_true")

    sp = cmd("write", cmd_write, "write standard input into the virtual disk, then commit")
    sp.add_argument("path")
    sp.add_argument("--offset", default="0")

    sp = cmd("read", cmd_read, "read the virtual disk (or PATH@SNAPSHOT) to standard output")
    sp.add_argument("target", metavar="PATH[@SNAP]")
    sp.add_argument("--offset", default="0")
    sp.add_argument("--length")

    sp = cmd("snapshot", cmd_snapshot, "take a snapshot")
    sp.add_argument("target", metavar="PATH@NAME")
    sp.add_argument("--shadow", action="store_true", help="blocks stay reusable (a base only)")
    sp.add_argument("--master", action="store_true", help="a replication anchor")
    sp.add_argument("--freeze", metavar="MOUNTPOINT",
                    help="freeze this mounted file system around the snapshot (needs serve)")

    sp = cmd("snapshots", cmd_snapshots, "list snapshots and pointers")
    sp.add_argument("path")
    sp.add_argument("--json", action="store_true")

    sp = cmd("destroy", cmd_destroy, "destroy a snapshot")
    sp.add_argument("target", metavar="PATH@NAME")

    sp = cmd("pointer", cmd_pointer, "set or delete a named pointer to a snapshot")
    sp.add_argument("path")
    sp.add_argument("name")
    sp.add_argument("snapshot", nargs="?")
    sp.add_argument("--delete", action="store_true")

    sp = cmd("image", cmd_image, "evaluate an image expression such as 'june5 + june4 - june3'")
    sp.add_argument("path")
    sp.add_argument("expression")
    sp.add_argument("--json", action="store_true")

    sp = cmd("check", cmd_check, "verify every structure and block checksum")
    sp.add_argument("path")
    sp.add_argument("--json", action="store_true")

    sp = cmd("demo", cmd_demo, "run the main job end to end on a file-backed volume")
    sp.add_argument("--dir", default="/tmp/blockxfer-demo")

    sp = cmd("send", cmd_send, "write the stream of an image to a file, a host or stdout")
    sp.add_argument("path")
    sp.add_argument("expression")
    sp.add_argument("destination", nargs="?", metavar="DESTINATION",
                    help="a path, -, ssh://[user@]host/PATH or tls://host:port/PATH "
                    "(a volume there receives it; default: standard output)")
    sp.add_argument("-o", "--output", metavar="DESTINATION", help="the same as DESTINATION")
    sp.add_argument("--force", action="store_true",
                    help="let a far-side receive overwrite what its target holds")
    sp.add_argument("--order", choices=["ascending", "striped"], default="ascending")
    sp.add_argument("--members", type=int, help="striped: members of the array")
    sp.add_argument("--chunk", default="512K", help="striped: chunk size (default 512K)")
    sp.add_argument("--no-compress", dest="compress", action="store_false",
                    help="do not zstd-compress data records (default: each one that shrinks)")
    sp.add_argument("--resume", metavar="TOKEN", help="send only what an interrupted receive lacks")
    sp.add_argument("--implicit", action="store_true",
                    help="send the image bitmap first; data records carry ordinals, not VBNs")

    sp = cmd("receive", cmd_receive, "apply a stream to a volume, or make one from a full stream")
    sp.add_argument("target")
    sp.add_argument("source", nargs="?", metavar="SOURCE",
                    help="a stream file, -, or a volume as ssh://[user@]host/PATH or "
                    "tls://host:port/PATH with --image (default: standard input)")
    sp.add_argument("-i", "--input", metavar="SOURCE", help="the same as SOURCE")
    sp.add_argument("--image", metavar="EXPR",
                    help="the image to pull from a volume SOURCE, e.g. 'june5 - june4'")
    sp.add_argument("--resume", metavar="TOKEN",
                    help="pull only what an interrupted receive lacks (volume SOURCE)")
    sp.add_argument("--force", action="store_true", help="overwrite what the target holds")

    sp = cmd("inspect", cmd_inspect, "describe a stream: header, snapshots, counts, VBN ranges")
    sp.add_argument("stream", nargs="?")
    sp.add_argument("--json", action="store_true")

    sp = cmd("verify", cmd_verify, "check every checksum and the digest of a stream")
    sp.add_argument("stream", nargs="?")

    sp = cmd("dump", cmd_dump, "write an image to tape after its last image")
    sp.add_argument("path")
    sp.add_argument("expression")
    sp.add_argument("--tape", required=True, help="/dev/nstN or a virtual tape file")
    sp.add_argument("--label", help="name for a blank tape (default: generated)")
    sp.add_argument("--record-size", default="256K", help="tape record size (default 256K)")
    sp.add_argument("--next-tape", metavar="COMMAND",
                    help="run when the next tape is needed; it prints the tape's path")
    sp.add_argument("--verify", action="store_true", help="read the image back and check it")
    cli_devices.add_compression_arg(sp)
    _changer_args(sp)

    sp = cmd("restore", cmd_restore, "restore an image (and the images it needs) from tape")
    sp.add_argument("target")
    sp.add_argument("--tape", required=True)
    pick = sp.add_mutually_exclusive_group()
    pick.add_argument("--image", type=int, help="image number (see 'tape list')")
    pick.add_argument("--snapshot", help="restore up to this snapshot, bases first")
    sp.add_argument("--only", metavar="SNAPSHOT",
                    help="partial restore: just this snapshot's blocks from --image N")
    sp.add_argument("--vbns", metavar="FIRST-LAST",
                    help="partial restore: only these blocks, in place, by the location table")
    sp.add_argument("--next-tape", metavar="COMMAND")
    sp.add_argument("--force", action="store_true", help="overwrite what the target holds")
    _changer_args(sp)

    cli_devices.register(sub)
    tape_sub = next(a for a in sub.choices["tape"]._actions
                    if isinstance(a, argparse._SubParsersAction))
    sp = tape_sub.add_parser("label", help="label a tape as the first of a new set")
    sp.add_argument("tape")
    sp.add_argument("name")
    sp.add_argument("--set", help="set (pool) name (default: the label)")
    sp.add_argument("--record-size", default="256K")
    sp.add_argument("--force", action="store_true", help="relabel a tape holding images")
    sp.set_defaults(func=cmd_tape_label)
    sp = tape_sub.add_parser("list", help="the images on a tape")
    sp.add_argument("tape")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_tape_list)
    cli_serve.register(sub)
    sub.choices["serve"].set_defaults(func=cmd_serve)
    cli_endpoint.register(sub)
    from blockxfer import cli_store
    cli_store.register(sub)
    return p


def cmd_serve(a: argparse.Namespace) -> int:
    return int(a.cmd_serve(a, lambda path: open_volume(path, write=not a.read_only)))


class _GuardedStdout:
    """sys.stdout whose write errors (a full disk, /dev/full) are one line naming
    standard output; the binary commands guard sys.stdout.buffer themselves."""

    def __init__(self, text: TextIO) -> None:
        self._text = text

    def write(self, s: str) -> int:
        with stdout_errors():
            return self._text.write(s)

    def flush(self) -> None:
        with stdout_errors():
            self._text.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._text, name)


def _drop_stdout() -> None:
    """Point standard output at /dev/null so the interpreter's last flush of what
    is still buffered does not report the closed pipe again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with redirect_stdout(_GuardedStdout(sys.stdout)):  # type: ignore[type-var]
            code = int(args.func(args))
            sys.stdout.flush()
        return code
    except BlockxferError as e:
        print(f"blockxfer: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:        # the reader went away (| head): quiet, as cat is
        _drop_stdout()
        return 141
    except KeyboardInterrupt:
        print("blockxfer: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
