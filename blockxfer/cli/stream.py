"""Stream commands: send, receive, inspect, verify."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO

from blockxfer.errors import BlockxferError, DeviceError, UsageError
from blockxfer.units import human, parse_size

from .catalog import catalog_arg
from .common import (
    dry_run_arg,
    expr_arg,
    image_bytes,
    measure_report,
    parsable_arg,
    progress,
    volume_arg,
)
from .spec import Command, Report, arg
from .store import is_store_url, receive_from_store, s3_endpoint_arg, send_to_store


def cmd_send(a: argparse.Namespace) -> Report:
    from blockxfer.catalog import hooks
    from blockxfer.service.session import send_to
    from blockxfer.transport import is_volume_url, local_path, open_sink
    if a.output and a.destination and a.output != a.destination:
        raise UsageError("give the destination once: as DESTINATION or with -o")
    url = a.output or a.destination
    if a.dry_run:
        return measure_report(a, "send", url or "standard output")
    hooks.use(a.catalog)
    if is_store_url(url):
        return send_to_store(a, str(url))
    if a.retain:
        raise UsageError("--retain makes an object-store copy immutable: give an s3:// "
                         "destination")
    if a.verify and (url in (None, "-") or is_volume_url(url)):
        raise UsageError("--verify reads a stream file back: give -o FILE (a volume "
                         "destination checks every record as it receives)")
    if (path := local_path(url)) is not None:
        from blockxfer.handles import refuse_volume_output
        refuse_volume_output(path)
    with open_sink(url, force=a.force) as sink:    # first: a far side starts up meanwhile
        geometry = _geometry(a, a.path)
        # the data size: the stream is a little larger (headers) or smaller (compression)
        prog = progress(a, "send", image_bytes(a.path, a.expression) if not a.quiet else None)
        r = send_to(a.path, a.expression, sink, compress=a.compress, implicit=a.implicit,
                    resume=a.resume, geometry=geometry, progress=prog.add)
    prog.finish()
    image_id = note_stream_file(url, a.path)
    far = sink.result
    data: dict[str, Any] = {"volume": a.path, "expression": a.expression,
                            "destination": sink.name, "blocks": r["data_blocks"],
                            "records": r["records"], "bytes": r["bytes"],
                            "served": bool(r.get("served")), "far": far, "verified": False}
    text = [f"sent {r['data_blocks']} blocks in {r['records']} records, {human(r['bytes'])}"
            + (" (through the server)" if r.get("served") else "")
            + (f"; {sink.name} received up to {far['top']!r}" if far and "top" in far else "")]
    if a.verify:
        from blockxfer.stream.inspect import inspect_stream
        with _stream_input(url) as f:
            inspect_stream(f)              # every record checksum and the digest
        data["verified"] = True
        if image_id:
            hooks.note_verified("file", image_id, int(time.time()))
        text.append(f"{url}: read back, every checksum and the digest verified")
    return Report(data, text, stderr=True)


def note_stream_file(url: str | None, volume: str) -> str | None:
    """`send -o FILE`: the catalog records the stream file (a warning if it cannot);
    returns its image id."""
    if url in (None, "-") or "://" in str(url) or not os.path.isfile(str(url)):
        return None
    from blockxfer.catalog import hooks
    from blockxfer.transfer.catimport import file_record
    try:
        rec = file_record(str(url))
    except BlockxferError as e:
        print(f"blockxfer: warning: catalog: {url}: {e}", file=sys.stderr)
        return None
    if "://" not in volume:
        rec.volume_path = volume if volume.startswith("/dev/") else os.path.abspath(volume)
    hooks.note_image(rec)
    return rec.image_id


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


def cmd_receive(a: argparse.Namespace) -> Report:
    from blockxfer.service.session import receive_to
    from blockxfer.transport import SourceRequest, is_volume_url, open_source
    if a.status:
        return _receive_status(a.target)
    if a.input and a.source and a.input != a.source:
        raise UsageError("give the source once: as SOURCE or with -i")
    url = a.input or a.source
    if is_store_url(url) and not a.dry_run:
        return receive_from_store(a, str(url))
    if a.image and not (url and is_volume_url(url)):
        raise UsageError("--image pulls from a volume: give an ssh:// or tls:// SOURCE")
    if a.dry_run:
        return _receive_plan(a, url)
    prog = progress(a, "receive")
    with open_source(url, SourceRequest(a.image, a.resume)) as src:
        res = receive_to(a.target, src, force=a.force, seekable=src.seekable(),
                         progress=prog.add)
        src.finish()
    prog.finish()
    kind = "incremental" if res.incremental else "full"
    text = [f"{a.target}: received {kind} image up to {res.top!r}, {res.blocks} blocks"
            + (" (resumed)" if res.resumed else "")]
    text += [f"{a.target}: released {n!r} (the source no longer has it)" for n in res.released]
    text += [f"{a.target}: {n!r} is incomplete here (not all of its blocks were sent)"
             for n in res.incomplete]
    return Report({"volume": a.target, "source": url or "-", "top": res.top,
                   "incremental": res.incremental, "blocks": res.blocks,
                   "resumed": res.resumed, "released": list(res.released),
                   "incomplete": list(res.incomplete)}, text)


def _receive_status(target: str) -> Report:
    """receive --status: an interrupted receive and its resume token (like ZFS's
    receive_resume_token), or that there is none."""
    from blockxfer.drivers.blockdev import open_device
    from blockxfer.transfer.replicate_target import inspect_target
    i = inspect_target(target, open_device).interrupted
    if i is None:
        return Report({"volume": target, "interrupted": None},
                      [f"{target}: no interrupted receive"])
    kind = "full image over the device" if i.full else "incremental into the volume"
    return Report({"volume": target, "interrupted": i.as_dict()},
                  [f"{target}: interrupted receive of stream {i.stream_id} ({kind}), "
                   f"{i.received} of {i.blocks} blocks kept", f"resume token: {i.token}"])


def _receive_plan(a: argparse.Namespace, url: str | None) -> Report:
    """receive -n: read the stream whole (every checksum) and say what it would do
    to the target, touching nothing."""
    from blockxfer.service.session import open_session
    from blockxfer.stream.inspect import inspect_stream
    from blockxfer.transport import is_volume_url
    if url and is_volume_url(url):
        raise UsageError("--dry-run reads a stream: give a stream file or standard input "
                         "(for a volume SOURCE, run 'blockxfer image' there)")
    with _stream_input(url) as f:
        info = inspect_stream(f)
    exists = os.path.exists(a.target)
    has: set[str] = set()
    if exists:
        with open_session(a.target) as s:
            has = {r["name"] for r in s.snapshots()["snapshots"]}
    base = info.get("base")
    data = {"dry_run": True, "volume": a.target, "source": url or "-", "kind": info["kind"],
            "top": info["top"], "base": base, "blocks": info["data_blocks"],
            "bytes": info["bytes"], "target_exists": exists,
            "base_present": base is None or base in has}
    where = "an existing volume" if exists else "a new volume"
    line = (f"would receive {info['kind']} image up to {info['top']!r} into {a.target} "
            f"({where}): {info['data_blocks']} blocks, {human(int(str(info['bytes'])))} of stream")
    if base is not None and base not in has:
        line += f"; the target lacks its base {base!r}, so it would be refused"
    return Report(data, [line])


def _binary_in(path: str | None) -> BinaryIO:
    if path and path != "-":
        try:
            return open(path, "rb")  # noqa: SIM115 - closed by the caller
        except OSError as e:            # a path that cannot be opened: 4 (docs/exit-codes.md)
            raise DeviceError(f"cannot read {path}: {e.strerror}") from e
    if sys.stdin.isatty():
        raise UsageError("give the stream with -i FILE or on standard input")
    return sys.stdin.buffer


@contextmanager
def _stream_input(path: str | None) -> Iterator[BinaryIO]:
    f = _binary_in(path)
    try:
        yield f
    finally:
        if f is not sys.stdin.buffer:
            f.close()


def cmd_inspect(a: argparse.Namespace) -> Report:
    from blockxfer.stream.inspect import inspect_stream
    with _stream_input(a.stream) as f:
        info = inspect_stream(f)
    return Report(info, [f"{k:16} {v}" for k, v in info.items()])


def cmd_verify(a: argparse.Namespace) -> Report:
    from blockxfer.stream.inspect import inspect_stream
    with _stream_input(a.stream) as f:
        info = inspect_stream(f)
    return Report({"stream": a.stream or "-", "ok": True, "records": info["records"],
                   "blocks": info["data_blocks"]},
                  [f"{a.stream or 'stream'}: ok, {info['records']} records, "
                   f"{info['data_blocks']} blocks, digest verified"])


STREAM_ARG = arg("stream", nargs="?", metavar="SOURCE",
                 help="the stream file (default: standard input)")

COMMANDS = (
    Command("send", "write the stream of an image to a file, a host or stdout",
            "Write the stream of an image (VOLUME 'EXPR') to DESTINATION: a file, "
            "standard output, or a volume on another host by URL (ssh://, tls://; "
            "see 'blockxfer help transports'). Nothing is written before the image "
            "is planned.",
            ("blockxfer send /srv/vol.img june1 -o june1.stream      # a full image",
             "blockxfer send -n /srv/vol.img 'june3 - june1'        # its size, sends nothing",
             "blockxfer send /srv/vol.img 'june3 - june1' | ssh b blockxfer receive "
             "/srv/copy.img",
             "blockxfer send /srv/vol.img 'june3 - june1' ssh://backup/srv/copy.img"),
            cmd_send,
            (volume_arg(), expr_arg(),
             arg("destination", nargs="?", metavar="DESTINATION",
                 help="a path, -, ssh://[user@]host/PATH or tls://host:port/PATH "
                      "(a volume there receives it), s3://BUCKET/PREFIX/VOLUME (an object "
                      "store; default: standard output)"),
             arg("-o", "--output", metavar="DESTINATION", help="the same as DESTINATION"),
             arg("--force", action="store_true",
                 help="let a far-side receive overwrite what its target holds"),
             arg("--order", choices=["ascending", "striped"], default="ascending",
                 help="read order: ascending block numbers (default) or striped across "
                      "an md array's members"),
             arg("--members", type=int, metavar="N", help="striped: members of the array"),
             arg("--chunk", default="512K", metavar="SIZE",
                 help="striped: chunk size (default 512K)"),
             arg("--no-compress", dest="compress", action="store_false",
                 help="do not zstd-compress data records (default: each one that shrinks)"),
             arg("--resume", metavar="TOKEN",
                 help="send only what an interrupted receive lacks"),
             arg("--implicit", action="store_true",
                 help="send the image bitmap first; data records carry ordinals, not VBNs"),
             arg("--verify", action="store_true",
                 help="read the stream file back and check every checksum and its digest"),
             dry_run_arg("print the image's exact size and an estimate after compression"),
             arg("--retain", metavar="DURATION",
                 help="s3:// only: keep every object this snapshot's restore needs "
                      "immutable (S3 object lock) for DURATION, e.g. 30d; store rm and "
                      "prune keep it until then"),
             s3_endpoint_arg(), catalog_arg(), parsable_arg())),
    Command("receive", "apply a stream to a volume, or make one from a full stream",
            "Apply a stream from SOURCE to VOLUME (a full stream makes the volume), or "
            "pull an image from a volume on another host with --image. A refused or "
            "interrupted receive leaves the target as it was.",
            ("blockxfer receive /srv/copy.img -i june1.stream",
             "blockxfer receive /srv/copy.img < increment.stream",
             "blockxfer receive -n /srv/copy.img -i increment.stream   # check, change nothing",
             "blockxfer receive /srv/copy.img ssh://prod/srv/vol.img --image 'june3 - june1'"),
            cmd_receive,
            (arg("target", metavar="VOLUME", help="the volume (or new volume) to receive into"),
             arg("source", nargs="?", metavar="SOURCE",
                 help="a stream file, -, a volume as ssh://[user@]host/PATH or "
                      "tls://host:port/PATH with --image, or a stored snapshot "
                      "s3://BUCKET/PREFIX/VOLUME@SNAP (default: standard input)"),
             arg("-i", "--input", metavar="SOURCE", help="the same as SOURCE"),
             arg("--image", metavar="EXPR",
                 help="the image to pull from a volume SOURCE, e.g. 'june5 - june4'"),
             arg("--resume", metavar="TOKEN",
                 help="pull only what an interrupted receive lacks (volume SOURCE)"),
             arg("--force", action="store_true", help="overwrite what the target holds"),
             arg("--status", action="store_true",
                 help="show VOLUME's interrupted receive and its resume token; receive nothing"),
             dry_run_arg("check the whole stream and say what it would do to VOLUME"),
             s3_endpoint_arg(), parsable_arg())),
    Command("inspect", "describe a stream: header, snapshots, counts, VBN ranges",
            "Describe a stream without applying it: header, snapshots, record counts and "
            "block ranges.",
            ("blockxfer inspect june1.stream",
             "blockxfer send /srv/vol.img june1 | blockxfer inspect --json"),
            cmd_inspect, (STREAM_ARG,)),
    Command("verify", "check every checksum and the digest of a stream",
            "Read a whole stream and check every record checksum and its digest; exit 3 "
            "when it is damaged.",
            ("blockxfer verify june1.stream",),
            cmd_verify, (STREAM_ARG,)),
)
