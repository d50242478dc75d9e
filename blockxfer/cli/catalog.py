"""`blockxfer catalog ...`: what is where (docs/catalog.md). The catalog's part in
`dump`, `restore --snapshot` (without --tape) and `tape erase` is in catalog_tapes."""

from __future__ import annotations

import argparse
import os
import time
from typing import TYPE_CHECKING, Any

from blockxfer.errors import UsageError
from blockxfer.units import human

from .common import TAPE
from .spec import Arg, Command, Report, arg

if TYPE_CHECKING:
    import sqlite3

    from blockxfer.catalog import query


def catalog_arg() -> Arg:
    return arg("--catalog", metavar="PATH", default=None,
               help="the catalog database (default: $BLOCKXFER_CATALOG or "
                    "/var/lib/blockxfer/catalog.db)")


def open_db(a: argparse.Namespace) -> sqlite3.Connection:
    from blockxfer.catalog import hooks
    hooks.use(getattr(a, "catalog", None))
    return hooks.open_catalog()


def _split(spec: str) -> tuple[str | None, str]:
    vol, at, snap = spec.rpartition("@")
    if not at:
        return None, spec
    if not snap:
        raise UsageError(f"{spec!r}: a snapshot name must follow '@'")
    return vol or None, snap


# -- ls and where -----------------------------------------------------------------------------
def _line(img: query.Image) -> str:
    from blockxfer.catalog import query
    where = "; ".join(m.describe() for m in img.media) or "no medium"
    state = "" if img.whole else "  INCOMPLETE"
    size = human(img.bytes) if img.bytes is not None else "?"
    return (f"  {img.kind:5} L{img.level} {img.expression!r:30} {img.blocks:>9} blocks "
            f"{size:>9}  {query.iso(img.written)}  {where}{state}")


def cmd_ls(a: argparse.Namespace) -> Report:
    from blockxfer.catalog import hooks, query
    db = open_db(a)
    imgs = query.images(db, a.volume)
    text: list[str] = []
    last = None
    for img in imgs:
        if img.volume != last:
            text.append(f"volume {img.volume}" + (f" ({img.volume_path})"
                                                  if img.volume_path else ""))
            last = img.volume
        text.append(_line(img))
    return Report({"catalog": hooks.current_path(), "images": [i.as_dict() for i in imgs]},
                  text or [f"{hooks.current_path()}: no images"])


def plan_where(db: sqlite3.Connection, spec: str, target: str | None = None,
               have: frozenset[str] = frozenset()) -> tuple[str, str, list[query.Image]]:
    """The volume's uuid, the snapshot and its chain; the snapshots `target` already
    holds (`have`) end the chain only when it is that volume."""
    from blockxfer.catalog import query
    volume, snap = _split(spec)
    uuid = query.resolve_volume(db, volume, snap)
    if target is None or _uuid_of(target) != uuid:
        have = frozenset()
    return uuid, snap, query.where(db, uuid, snap, have)


def _uuid_of(path: str) -> str | None:
    from blockxfer.errors import BlockxferError
    from blockxfer.handles import open_volume
    if not os.path.exists(path):
        return None
    try:
        with open_volume(path) as vol:
            return str(vol.uuid)
    except BlockxferError:
        return None


def cmd_where(a: argparse.Namespace) -> Report:
    uuid, snap, chain = plan_where(open_db(a), a.snapshot)
    text = [f"{snap} of volume {uuid}: {len(chain)} image{'s' if len(chain) != 1 else ''}, "
            "in this order:"]
    for n, img in enumerate(chain, 1):
        text.append(f"  {n}. {img.kind} L{img.level} {img.expression!r}"
                    + (f" (image {img.number})" if img.number else "")
                    + " on " + "; ".join(m.describe() for m in img.media))
    return Report({"volume": uuid, "snapshot": snap,
                   "steps": [i.as_dict() for i in chain]}, text)


# -- import -----------------------------------------------------------------------------------
def _import_tape(a: argparse.Namespace, db: Any) -> tuple[str, int]:
    from blockxfer.catalog import records
    from blockxfer.transfer.catimport import tape_records
    from blockxfer.transfer.tapeset import list_tape

    from .tapealert import barcode_of
    from .tapedrive import tape_opener
    tape = tape_opener()(a.tape, False)
    try:
        contents = list_tape(tape)
    finally:
        tape.close()
    ref, recs = tape_records(contents, os.path.abspath(a.tape) if os.path.isfile(a.tape)
                             else a.tape, a.barcode or barcode_of(a.tape))
    for rec in recs:
        records.add_image(db, rec)
    records.add_tape(db, ref)       # a labelled tape without images is a medium too
    return f"tape {ref.label!r} (set {ref.set_name!r} #{ref.seq})", len(recs)


def _import_library(a: argparse.Namespace, db: Any) -> tuple[str, int, list[str]]:
    """Every cartridge of a changer, one after another through --tape (its drive):
    loaded, its label and images read, its barcode from the changer's inventory,
    put back in its slot. Blank and foreign cartridges are named and skipped."""
    from blockxfer.catalog import records
    from blockxfer.drivers.changer import CLEANING_PREFIX, Changer
    from blockxfer.drivers.tapes import eject_tape
    from blockxfer.errors import FormatError
    from blockxfer.transfer.catimport import tape_records
    from blockxfer.transfer.tapeset import list_tape

    from .tapedrive import tape_opener
    changer = Changer(a.changer)
    status = changer.status()
    if status.drive(a.changer_drive).full:
        raise UsageError(f"drive {a.changer_drive} of {a.changer} holds a tape: unload it first "
                         f"(mtx -f {a.changer} unload); nothing was read")
    n, skipped = 0, []
    for slot in status.slots:
        if not slot.full or slot.import_export or (slot.barcode or "").startswith(
                CLEANING_PREFIX):
            continue
        changer.load(slot.number, a.changer_drive)
        try:
            tape = tape_opener()(a.tape, False)
            try:
                contents = list_tape(tape)
            finally:
                tape.close()
        except FormatError as e:
            skipped.append(f"slot {slot.number} ({slot.barcode or 'no barcode'}): {e}")
        else:
            ref, recs = tape_records(contents, a.tape, slot.barcode)
            for rec in recs:
                records.add_image(db, rec)
            records.add_tape(db, ref)
            n += len(recs)
        finally:
            eject_tape(a.tape)
            changer.unload(slot.number, a.changer_drive)
    return f"changer {a.changer}", n, skipped


def cmd_import(a: argparse.Namespace) -> Report:
    from blockxfer.catalog import hooks, records
    db = open_db(a)
    if (a.tape is None) == (a.medium is None):
        raise UsageError("give one medium: --tape TAPE, a stream FILE or s3://BUCKET/PREFIX")
    skipped: list[str] = []
    if a.changer is not None:
        if a.tape is None:
            raise UsageError("--changer needs --tape DRIVE: the changer's drive to read with")
        what, n, skipped = _import_library(a, db)
    elif a.tape is not None:
        what, n = _import_tape(a, db)
    elif a.medium.startswith("s3://"):
        from blockxfer.transfer.catimport import store_records
        from blockxfer.transfer.objstore.s3 import open_store
        store, _, _ = open_store(a.medium, endpoint=a.s3_endpoint)
        recs = list(store_records(store))
        for rec in recs:
            records.add_image(db, rec)
        what, n = f"store {store.url}", len(recs)
    else:
        from blockxfer.transfer.catimport import file_record
        records.add_image(db, file_record(a.medium))
        what, n = f"file {os.path.abspath(a.medium)}", 1
    return Report({"catalog": hooks.current_path(), "medium": what, "images": n,
                   "skipped": skipped},
                  [f"{hooks.current_path()}: {what}: {n} image{'s' if n != 1 else ''} recorded",
                   *(f"  skipped {s}" for s in skipped)])


# -- pools and expiry -------------------------------------------------------------------------
def cmd_pool_create(a: argparse.Namespace) -> Report:
    from blockxfer.catalog import pools
    seconds = pools.parse_retention(a.retention)
    pools.create_pool(open_db(a), a.name, seconds)
    return Report({"pool": a.name, "retention": seconds},
                  [f"pool {a.name!r}: images on its tapes are kept {a.retention}"])


def cmd_pool_assign(a: argparse.Namespace) -> Report:
    from blockxfer.catalog import pools
    done = pools.assign(open_db(a), a.pool, a.tapes)
    return Report({"pool": a.pool, "tapes": done},
                  [f"pool {a.pool!r}: {', '.join(done)}"])


def cmd_pool_ls(a: argparse.Namespace) -> Report:
    from blockxfer.catalog import pools
    rows = pools.pools(open_db(a))
    return Report({"pools": rows}, [f"{r['name']:20} retention {r['retention'] // 86400}d "
                                    f"{r['retention'] % 86400}s, {r['tapes']} tapes"
                                    for r in rows] or ["no pools"])


def cmd_expired(a: argparse.Namespace) -> Report:
    from blockxfer.catalog import pools
    now = time.time()
    tapes = pools.expired_tapes(open_db(a), now)
    return Report({"tapes": [t.as_dict(now) for t in tapes]},
                  [f"{t.label:20} set {t.set_name!r} #{t.seq}"
                   + (f" barcode {t.barcode}" if t.barcode else "")
                   + f" pool {t.pool}: expired, may be recycled ('blockxfer tape erase')"
                   for t in tapes] or ["no expired tapes"])


# -- the catalog's part in dump, restore and tape erase ----------------------------------------
COMMANDS = (
    Command("catalog", "what is where: images on tapes, files and object stores",
            "The catalog of every image written to tape, stream file or object store "
            "(SQLite; docs/catalog.md): list it, ask which media a restore needs, rebuild "
            "it from the media, and keep tape pools with a retention.",
            ("blockxfer catalog ls", "blockxfer catalog where /srv/vol.img@june7"),
            subcommands=(
                Command("ls", "every image and where it is",
                        "List every image the catalog knows, by volume, oldest first, with "
                        "its level and its media (tape label, set, barcode and file; "
                        "stream file; object store).",
                        ("blockxfer catalog ls", "blockxfer catalog ls --volume /srv/vol.img"),
                        cmd_ls,
                        (arg("--volume", metavar="VOLUME", default=None,
                             help="only this volume (its path or uuid)"), catalog_arg())),
                Command("where", "the media a restore of a snapshot needs, in order",
                        "Which images, on which media and in which order, a restore of "
                        "VOLUME@SNAPSHOT needs: the shortest chain (a level 0 and the "
                        "increments on top, or one object-store snapshot), across tape "
                        "sets, files and stores.",
                        ("blockxfer catalog where /srv/vol.img@june7",
                         "blockxfer catalog where june7 --json   # one volume has june7"),
                        cmd_where,
                        (arg("snapshot", metavar="[VOLUME@]SNAPSHOT",
                             help="the snapshot (VOLUME: its path or uuid as the catalog "
                                  "knows it)"), catalog_arg())),
                Command("import", "rebuild the catalog from a medium",
                        "Record what a medium holds, read from the medium itself: a tape's "
                        "label, descriptors and indexes (no data is read), a stream file's "
                        "header, or every snapshot of an object store.",
                        ("blockxfer catalog import --tape /dev/nst0",
                         "blockxfer catalog import --tape /dev/nst0 --changer /dev/sg5  # all",
                         "blockxfer catalog import /backup/june3.bs",
                         "blockxfer catalog import s3://backups/site1"),
                        cmd_import,
                        (arg("medium", nargs="?", default=None, metavar="FILE|s3://URL",
                             help="a stream file, or an object store s3://BUCKET/PREFIX"),
                         arg("--tape", metavar=TAPE, default=None,
                             help="the tape to read (/dev/nstN or a virtual tape file)"),
                         arg("--barcode", metavar="CODE", default=None,
                             help="the tape's barcode (default: from the cartridge's MAM)"),
                         arg("--changer", metavar="/dev/sgN", default=None,
                             help="read every cartridge of this changer through --tape (its "
                                  "drive), barcodes from its inventory"),
                         arg("--changer-drive", type=int, default=0, metavar="N",
                             help="the changer's drive number of --tape (default 0)"),
                         arg("--s3-endpoint", metavar="URL", default=None,
                             help="S3 endpoint (default: AWS_ENDPOINT_URL)"),
                         catalog_arg())),
                Command("pool", "tape media pools and their retention",
                        "Pools of tapes (a pool per purpose) with a retention: a tape "
                        "expires when every image on it is older than its pool's retention.",
                        ("blockxfer catalog pool create weekly --retention 30d",),
                        subcommands=(
                            Command("create", "create a pool",
                                    "Create a pool whose tapes keep their images RETENTION.",
                                    ("blockxfer catalog pool create weekly --retention 30d",),
                                    cmd_pool_create,
                                    (arg("name", metavar="POOL", help="the pool's name"),
                                     arg("--retention", required=True, metavar="TIME",
                                         help="how long images are kept: 30d, 12h, 2w, 1y"),
                                     catalog_arg())),
                            Command("assign", "put tapes in a pool",
                                    "Put tapes in a pool, named by label, barcode or set "
                                    "name (every tape of the set).",
                                    ("blockxfer catalog pool assign weekly BXC001L8 weekly-2",),
                                    cmd_pool_assign,
                                    (arg("pool", metavar="POOL", help="the pool"),
                                     arg("tapes", nargs="+", metavar="TAPE",
                                         help="label, barcode or set name"),
                                     catalog_arg())),
                            Command("ls", "the pools", "List the pools and their retention.",
                                    ("blockxfer catalog pool ls",), cmd_pool_ls,
                                    (catalog_arg(),)))),
                Command("expired", "tapes past their pool's retention",
                        "List the tapes of pools whose every image is past the pool's "
                        "retention: they may be recycled ('tape erase' needs no --force).",
                        ("blockxfer catalog expired",), cmd_expired, (catalog_arg(),)))),
)
