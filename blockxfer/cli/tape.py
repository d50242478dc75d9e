"""Tape commands: dump and restore, and the `tape` group (blockxfer/cli/tapedrive.py)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from blockxfer.errors import BlockxferError, UsageError
from blockxfer.units import human, parse_size

from .catalog import catalog_arg
from .catalog_tapes import (
    check_pool,
    note_dump_barcodes,
    pool_arg,
    restore_by_catalog,
    set_barcodes_of,
)
from .common import (
    TAPE,
    dry_run_arg,
    expr_arg,
    image_bytes,
    measure_report,
    parsable_arg,
    progress,
    volume_arg,
)
from .spec import Arg, Command, OneOf, Report, arg
from .tapealert import (
    changer_tapes_arg,
    compression_arg,
    report_tape_alerts,
    set_barcodes,
    set_compression,
)
from .tapedrive import TAPE_COMMANDS, tape_opener

if TYPE_CHECKING:
    from blockxfer.transfer.nexttape import NextTape


def _changer_loader(a: argparse.Namespace) -> Callable[[str, int, str], NextTape]:
    """Loads the set's next tapes through the changer, by barcode or pool when
    --changer-tapes names them; a restore skips blank or foreign tapes."""
    def load(changer: str, drive: int, tape: str) -> NextTape:
        from blockxfer.drivers.changer import Changer, changer_next_tape, parse_tapes
        from blockxfer.drivers.tapes import eject_tape
        from blockxfer.transfer.tapeset import label_reader
        restore = a.command == "restore"
        return changer_next_tape(Changer(changer), drive, tape, eject=eject_tape,
                                 label_of=label_reader(tape_opener()),
                                 tapes=parse_tapes(a.changer_tapes), restore=restore,
                                 barcodes=set_barcodes_of(a, tape) if restore else None)
    return load


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
    from blockxfer.transfer.nexttape import TapeSetPolicy, next_tape_finder
    policy = TapeSetPolicy(a.tape, a.next_tape, a.changer, a.changer_drive,
                           getattr(a, "verify", False))
    return next_tape_finder(policy, load_changer=_changer_loader(a), ask=_ask(a.tape))


def cmd_dump(a: argparse.Namespace) -> Report:
    from blockxfer.catalog import hooks
    from blockxfer.drivers.tapes import max_record
    from blockxfer.service.session import open_session
    if a.dry_run:
        return measure_report(a, "dump", a.tape)
    record_size = parse_size(a.record_size)
    limit = max_record(a.tape)                   # READ BLOCK LIMITS: st refuses larger
    if limit and record_size > limit:
        print(f"{a.tape}: the drive takes records of at most {limit} bytes; using that",
              file=sys.stderr)
        record_size = limit
    set_compression(a.tape, a.compression)
    hooks.use(a.catalog)
    check_pool(a)
    next_tape = _next_tape(a)
    prog = progress(a, "dump", image_bytes(a.path, a.expression) if not a.quiet else None)
    with open_session(a.path) as s:
        res = s.dump(a.expression, a.tape, open_tape=tape_opener(), next_tape=next_tape,
                     label=a.label, record_size=record_size, compress=a.compress,
                     progress=prog.add)
    prog.finish()
    text = [f"{a.tape}: image {res['image']}, {res['blocks']} blocks, {human(res['bytes'])}"
            + (f", across tapes {', '.join(res['tapes'])}" if len(res["tapes"]) > 1 else "")
            + (" (through the server)" if s.served else "")]
    barcodes = set_barcodes(next_tape)
    # TapeAlert first: reading the flags clears them, and the catalog's barcode lookup
    # asks the drive too (its MAM, with the log page)
    alerts = report_tape_alerts(a.tape, "dump")
    note_dump_barcodes(a, res["set_id"], res["seq"], len(res["tapes"]), barcodes)
    if barcodes:
        text.append(f"{a.tape}: tapes of the set by barcode: "
                    + ", ".join(f"{seq} {code}" for seq, code in barcodes.items()))
    if a.verify:
        from blockxfer.transfer.restore import verify_image
        verify_image(a.tape, res["image"], open_tape=tape_opener(),
                     next_tape=_next_tape(a))
        text.append(f"{a.tape}: image {res['image']} read back, every checksum verified")
        hooks.note_verified("tape", res["image_id"], int(time.time()))
    return Report({"volume": a.path, "expression": a.expression, "tape": a.tape,
                   "image": res["image"], "blocks": res["blocks"], "bytes": res["bytes"],
                   "tapes": res["tapes"], "barcodes": barcodes, "verified": bool(a.verify),
                   "served": s.served},
                  text, code=alerts)


def _complete_snapshots(path: str) -> set[str]:
    import os

    from blockxfer.service.session import open_session
    if not os.path.exists(path):
        return set()
    try:
        with open_session(path) as s:
            rows = s.snapshots()["snapshots"]
    except BlockxferError:
        return set()
    return {r["name"] for r in rows if not r["incomplete"] and not r["shadow"]}


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
    part = restore_range(a.tape, a.target, a.image, lo, hi,
                         open_tape=tape_opener(), open_device=open_device, force=a.force)
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
                                         open_tape=tape_opener(), open_device=open_device,
                                         force=a.force)
    return Report({"volume": a.target, "tape": a.tape, "image": a.image, "top": res.top,
                   "blocks": res.blocks, "records_read": records},
                  [f"{a.target}: restored snapshot {res.top!r} alone from image {a.image}, "
                   f"{res.blocks} blocks, reading {records} tape records"])


def cmd_restore(a: argparse.Namespace) -> Report:
    from blockxfer.service.session import restore_to
    if a.dry_run and (a.vbns or a.only):     # never let -n fall through to a write
        raise UsageError("--dry-run plans whole-image restores; leave out --vbns and --only "
                         "(or -n); nothing was written")
    if a.tape is None:                       # the catalog says which media, in order
        return restore_by_catalog(a, _complete_snapshots(a.target))
    if a.vbns:
        return _restore_vbns(a)
    if a.only:
        return _restore_only(a)
    have = _complete_snapshots(a.target)
    if a.dry_run:
        return _restore_plan(a, have)
    next_tape = _next_tape(a)
    prog = progress(a, "restore")
    steps = restore_to(a.target, a.tape, open_tape=tape_opener(), next_tape=next_tape,
                       image=a.image, snapshot=a.snapshot, force=a.force,
                       target_has=have.__contains__, progress=prog.add)
    prog.finish()
    text, images = [], []
    for st in steps:
        r = st.result
        text.append(f"{a.target}: restored image {st.image} up to {r.top!r}, {r.blocks} blocks")
        text += [f"{a.target}: {name!r} is incomplete here" for name in r.incomplete]
        images.append({"image": st.image, "top": r.top, "blocks": r.blocks,
                       "incomplete": list(r.incomplete)})
    return Report({"volume": a.target, "tape": a.tape, "images": images}, text,
                  code=report_tape_alerts(a.tape, "restore"))


def _restore_plan(a: argparse.Namespace, have: set[str]) -> Report:
    """restore -n: the images a restore would apply and their sizes, from the index."""
    from blockxfer.transfer.restore import plan_restore
    chain = plan_restore(a.tape, open_tape=tape_opener(), image=a.image,
                         snapshot=a.snapshot, target_has=have.__contains__)
    sizes = [i.index.total if i.index else 0 for i in chain]
    text = [f"would restore image {i.number} ({i.descriptor.expression!r}, "
            f"{'incremental' if i.descriptor.base else 'full'}) into {a.target}: "
            f"{i.descriptor.blocks} blocks, {human(n)} on tape"
            for i, n in zip(chain, sizes, strict=True)]
    return Report({"dry_run": True, "volume": a.target, "tape": a.tape,
                   "images": [i.as_dict() for i in chain], "bytes": sum(sizes)}, text)


def _tape_option(required: bool = True) -> Arg:
    return arg("--tape", required=required, metavar=TAPE,
               help="/dev/nstN or a virtual tape file (the first tape of a set)"
               + ("" if required else "; without it, --snapshot restores from the media "
                  "the catalog names ('catalog where')"))


def _set_args() -> tuple[Arg, ...]:
    return (arg("--next-tape", metavar="COMMAND",
                help="run when the next tape of the set is needed; it prints the tape's "
                     "path ($BLOCKXFER_TAPE_SET and $BLOCKXFER_TAPE_SEQ say which)"),
            arg("--changer", metavar="/dev/sgN",
                help="media changer (mtx) that loads the next tape of the set into --tape"),
            arg("--changer-drive", type=int, default=0, metavar="N",
                help="the changer's drive number of --tape (default 0)"),
            changer_tapes_arg())



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
             compression_arg(),
             arg("--no-compress", dest="compress", action="store_false",
                 help="do not zstd-compress data records (default: each one that shrinks)"),
             dry_run_arg("print the image's exact size and an estimate after compression"),
             *_set_args(), catalog_arg(), pool_arg(), parsable_arg())),
    Command("restore", "restore an image (and the images it needs) from tape",
            "Restore an image from TAPE into VOLUME, bases first; or, with --only or "
            "--vbns, part of one image. A refused or interrupted restore leaves the "
            "target as it was.",
            ("blockxfer restore /srv/new.img --tape /dev/nst0 --snapshot june3",
             "blockxfer restore /srv/new.img --snapshot /srv/vol.img@june7  # as the catalog says",
             "blockxfer restore -n /srv/new.img --tape /dev/nst0 --snapshot june3  # the plan",
             "blockxfer restore /srv/new.img --tape t.vtape --image 2",
             "blockxfer restore /srv/vol.img --tape t.vtape --image 1 --vbns 100-199"),
            cmd_restore,
            (arg("target", metavar="VOLUME", help="the volume (or new volume) to restore into"),
             _tape_option(required=False),
             OneOf((arg("--image", type=int, metavar="N",
                        help="image number (see 'tape list')"),
                    arg("--snapshot", metavar="[VOLUME@]SNAPSHOT",
                        help="restore up to this snapshot, bases first (without --tape: "
                             "from the media the catalog names)"))),
             arg("--only", metavar="SNAPSHOT",
                 help="partial restore: just this snapshot's blocks from --image N"),
             arg("--vbns", metavar="FIRST-LAST",
                 help="partial restore: only these blocks, in place, by the location table"),
             arg("--force", action="store_true", help="overwrite what the target holds"),
             dry_run_arg("print the images it would apply, bases first, with their sizes"),
             *_set_args(), catalog_arg(), arg("--s3-endpoint", metavar="URL", default=None,
                                              help="S3 endpoint of a catalogued object store "
                                                   "(default: AWS_ENDPOINT_URL)"),
             parsable_arg())),
    Command("tape", "tape drives and virtual tapes",
            "Tape drives and virtual tapes: create, label, list, status, rewind, eject, "
            "erase.",
            ("blockxfer tape create t.vtape --capacity 1G", "blockxfer tape list t.vtape"),
            subcommands=TAPE_COMMANDS),
)
