"""Object stores: `send ... s3://`, `receive ... s3://`, and `store ls|verify|rm|prune|gc`.

Addresses: a store is `s3://BUCKET[/PREFIX]`; a volume in it
`s3://BUCKET[/PREFIX]/VOLUME`; a snapshot `s3://BUCKET[/PREFIX]/VOLUME@SNAP`.
Endpoint, credentials and region come from the usual AWS variables and files;
`--s3-endpoint` overrides the endpoint (docs/object-store-format.md).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, BinaryIO

from blockxfer.errors import UsageError
from blockxfer.units import human, parse_duration

from .common import progress
from .spec import Arg, Command, Report, arg

if TYPE_CHECKING:
    from blockxfer.transfer.objstore.direct import Check, OrderedReader

STORE, VOLUME_URL, SNAPSHOT_URL = ("s3://BUCKET/PREFIX", "s3://BUCKET/PREFIX/VOLUME",
                                   "s3://BUCKET/PREFIX/VOLUME@SNAP")


def is_store_url(url: str | None) -> bool:
    return bool(url and url.startswith("s3://"))


def _open(url: str, a: argparse.Namespace, *, volume: bool) -> tuple[Any, str, str | None]:
    """The store, the volume name ('' for a store address) and the snapshot name."""
    from blockxfer.transfer.objstore.s3 import open_store
    store, vol, snap = open_store(url, endpoint=getattr(a, "s3_endpoint", None), volume=volume)
    return store, vol or "", snap


def ordered_reader(vol: Any) -> OrderedReader:
    """The direct upload's reads: ascending, DEPTH in flight, checked as they land."""
    from blockxfer.drivers.reader import read_runs
    from blockxfer.transfer.objstore.direct import DEPTH

    def read(runs: list[tuple[int, int]], per: int,
             check: Check | None) -> Iterator[tuple[int, memoryview]]:
        return read_runs(vol.dev, runs, vol.block_size, request_size=per * vol.block_size,
                         depth=DEPTH, ordered=True, check=check)
    return read


def send_to_store(a: argparse.Namespace, url: str) -> Report:
    """`send VOL EXPR s3://BUCKET/PREFIX/VOLUME`: upload the image's stream."""
    from blockxfer.service.session import LocalSession, open_session
    from blockxfer.transfer.objstore.direct import upload_volume
    from blockxfer.transfer.objstore.upload import upload_image
    if a.resume or a.implicit or a.order != "ascending" or a.verify:
        raise UsageError("--resume, --implicit, --order and --verify do not apply to an s3:// "
                         "target (an interrupted upload resumes by running it again; "
                         "'store verify' checks it)")
    store, volume, snap = _open(url, a, volume=True)
    if snap is not None:
        raise UsageError(f"{url}: name the volume only; the snapshot comes from the image")
    retain = time.time() + parse_duration(a.retain) if a.retain else None
    prog = progress(a, "upload")
    with open_session(a.path) as s:          # opened here, or its service streams it
        if isinstance(s, LocalSession):      # read here: no stream encoded and decoded
            res = upload_volume(store, volume, s.vol, a.expression, ordered_reader(s.vol),
                                lock=s.ops.lock, progress=prog.add, retain_until=retain)
        else:
            def produce(out: BinaryIO) -> object:
                return s.send(out, a.expression, compress=False)
            res = upload_image(store, volume, produce, progress=prog.add,
                               retain_until=retain)
    prog.finish()
    where = f"{store.url}/{volume}@{res.snapshot}"
    data = {"volume": a.path, "expression": a.expression, "destination": where,
            "already": res.already, "incremental": res.incremental, "blocks": res.blocks,
            "new_bytes": res.new_bytes, "packs_written": res.packs_written,
            "packs_skipped": res.packs_skipped, "manifest_blocks": res.manifest_blocks,
            "retain_until": int(retain) if retain else None}
    if res.already:
        return Report(data, [f"{where}: already in the store ({res.manifest_blocks} blocks); "
                             "nothing sent"], stderr=True)
    kind = "incremental" if res.incremental else "full"
    return Report(data, [f"{where}: stored {kind} image, {res.blocks} blocks sent, "
                         f"{human(res.new_bytes)} in {res.packs_written} new packs "
                         f"({res.packs_skipped} already there); a restore writes "
                         f"{res.manifest_blocks} blocks"], stderr=True)


def receive_from_store(a: argparse.Namespace, url: str) -> Report:
    """`receive TARGET s3://BUCKET/PREFIX/VOLUME@SNAP`: restore that snapshot alone."""
    from blockxfer.drivers.blockdev import open_device
    from blockxfer.transfer.objstore.restore import restore_snapshot
    store, volume, snap = _open(url, a, volume=True)
    if snap is None:
        raise UsageError(f"{url}: name the snapshot as {SNAPSHOT_URL} (see 'blockxfer store ls')")
    prog = progress(a, "restore")
    res = restore_snapshot(store, volume, snap, a.target, open_device, force=a.force,
                           progress=prog.add)
    prog.finish()
    kind = "only what changed since the snapshot it held" if res.incremental else "full"
    text = [f"{a.target}: received {volume}@{res.top} from {store.url} ({kind}), "
            f"{res.blocks} blocks"]
    text += [f"{a.target}: released {n!r} (the source no longer had it)" for n in res.released]
    text += [f"{a.target}: {n!r} is incomplete here (not all of its blocks were stored)"
             for n in res.incomplete]
    return Report({"volume": a.target, "source": url, "top": res.top,
                   "incremental": res.incremental, "blocks": res.blocks,
                   "resumed": False, "released": list(res.released),
                   "incomplete": list(res.incomplete)}, text)


def cmd_ls(a: argparse.Namespace) -> Report:
    from blockxfer.transfer.objstore.maintain import listing
    store, _, _ = _open(a.store, a, volume=False)
    info = listing(store)
    vols: list[dict[str, Any]] = info["volumes"]  # type: ignore[assignment]
    text = [f"{info['store']}: {len(vols)} volumes, {info['packs']} packs, "
            f"{human(int(info['pack_bytes']))} stored"]  # type: ignore[call-overload]
    for v in vols:
        text.append(f"{v['volume']}  (volume {v['uuid']}, blocks of {v['block_size']})")
        text += [f"  {s['name']:24} {'incr' if s['incremental'] else 'full'}  "
                 f"{human(s['bytes']):>10} restored  {human(s['new_bytes']):>10} added"
                 for s in v["snapshots"]]
    return Report(dict(info), text)


def cmd_verify(a: argparse.Namespace) -> Report:
    from blockxfer.transfer.objstore.maintain import verify_store
    store, _, _ = _open(a.store, a, volume=False)
    rep = verify_store(store, a.volume)
    text = [f"problem: {p}" for p in rep.problems]
    text.append(f"{store.url}: {'clean' if not rep.problems else f'{len(rep.problems)} problems'}"
                f"; {rep.snapshots} snapshots, {rep.blocks} blocks verified")
    return Report({"store": store.url, "clean": not rep.problems, "problems": list(rep.problems),
                   "snapshots": rep.snapshots, "blocks": rep.blocks}, text,
                  code=0 if not rep.problems else 1)


def cmd_gc(a: argparse.Namespace) -> Report:
    from blockxfer.transfer.objstore.maintain import collect_garbage
    store, _, _ = _open(a.store, a, volume=False)
    if not 0 <= a.repack_below <= 1:
        raise UsageError(f"--repack-below {a.repack_below}: give a fraction from 0 to 1")
    rep = collect_garbage(store, grace=a.grace, dry_run=a.dry_run, repack_below=a.repack_below)
    verb = "would delete" if a.dry_run else "deleted"
    pk = rep.repack
    problems = list(pk.problems) if pk else []
    data = {"store": store.url, "dry_run": a.dry_run, "packs_deleted": rep.packs_deleted,
            "bytes_deleted": rep.bytes_deleted, "manifests_deleted": rep.manifests_deleted,
            "packs_kept": rep.packs_kept, "young": rep.young,
            "packs_repacked": pk.packs_repacked if pk else 0,
            "bytes_copied": pk.bytes_copied if pk else 0,
            "manifests_rewritten": pk.manifests_rewritten if pk else 0,
            "problems": problems}
    text = [f"problem: {p}" for p in problems]
    if pk and pk.packs_repacked:
        text.append(f"{store.url}: {'would repack' if a.dry_run else 'repacked'} "
                    f"{pk.packs_repacked} mostly unused packs ({human(pk.bytes_copied)} copied, "
                    f"{human(pk.bytes_freed)} to free once they age past the grace period)")
    text.append(f"{store.url}: {verb} {rep.packs_deleted} packs ({human(rep.bytes_deleted)}) "
                f"and {rep.manifests_deleted} manifests; {rep.packs_kept} packs in use, "
                f"{rep.young} unreferenced objects younger than the grace period kept")
    return Report(data, text, code=1 if problems else 0)


def cmd_recover(a: argparse.Namespace) -> Report:
    from blockxfer.transfer.objstore.maintain import recover_catalog
    store, volume, snap = _open(a.volume, a, volume=True)
    if snap is not None:
        raise UsageError(f"{a.volume}: recover takes a volume, not a snapshot")
    rep = recover_catalog(store, volume, force=a.force)
    names = [s.name for s in rep.catalog.snaps()]
    text = [f"skipped: {p}" for p in rep.skipped]
    text.append(f"{store.url}/{volume}: catalog rebuilt from {len(names)} manifests: "
                f"{', '.join(names)}")
    return Report({"store": store.url, "volume": volume, "snapshots": names,
                   "skipped": list(rep.skipped)}, text)


def cmd_rm(a: argparse.Namespace) -> Report:
    from blockxfer.transfer.objstore.maintain import remove_snapshots
    store, volume, snap = _open(a.snapshot, a, volume=True)
    if snap is None:
        raise UsageError(f"{a.snapshot}: name the snapshot as {SNAPSHOT_URL}")
    remove_snapshots(store, volume, [snap])
    return Report({"store": store.url, "volume": volume, "removed": [snap]},
                  [f"{store.url}/{volume}@{snap}: removed (its blocks go at the next "
                   "'store gc')"])


def cmd_prune(a: argparse.Namespace) -> Report:
    from blockxfer.transfer.objstore.maintain import prune_plan, remove_snapshots
    store, volume, snap = _open(a.volume, a, volume=True)
    if snap is not None:
        raise UsageError(f"{a.volume}: prune takes a volume, not a snapshot")
    names = prune_plan(store.need_catalog(volume), a.keep_last, a.keep or [])
    if names and not a.dry_run:
        remove_snapshots(store, volume, names)
    text = [f"{store.url}/{volume}@{n}: {'would remove' if a.dry_run else 'removed'}"
            for n in names] or [f"{store.url}/{volume}: nothing to prune"]
    return Report({"store": store.url, "volume": volume, "dry_run": a.dry_run,
                   "removed": list(names)}, text)


def s3_endpoint_arg() -> Arg:
    return arg("--s3-endpoint", metavar="URL",
               help="S3 endpoint (default: AWS_ENDPOINT_URL or the AWS config)")


def _dry_run() -> Arg:
    return arg("-n", "--dry-run", action="store_true", help="say what would go; change nothing")


STORE_COMMANDS = (
    Command("ls", "volumes and snapshots in a store",
            "List the volumes and snapshots in a store, with what each snapshot restores "
            "and what it added.", (f"blockxfer store ls {STORE}",),
            cmd_ls, (arg("store", metavar=STORE, help="the store"), s3_endpoint_arg())),
    Command("verify", "check every manifest and chunk checksum",
            "Read every manifest and every blob any manifest names once and check their "
            "checksums; exit 1 when a problem is found.", (f"blockxfer store verify {STORE}",),
            cmd_verify, (arg("store", metavar=STORE, help="the store"),
                         arg("--volume", metavar="VOLUME", help="only this volume"),
                         s3_endpoint_arg())),
    Command("rm", "remove one snapshot (its manifest) from a store",
            "Remove one snapshot from the store's catalog; its blocks go at the next gc.",
            (f"blockxfer store rm {SNAPSHOT_URL}",),
            cmd_rm, (arg("snapshot", metavar=SNAPSHOT_URL, help="the snapshot to remove"),
                     s3_endpoint_arg())),
    Command("prune", "remove all but the newest snapshots",
            "Remove all but the newest N snapshots of a volume (and those matching --keep).",
            (f"blockxfer store prune {VOLUME_URL} --keep-last 7",),
            cmd_prune, (arg("volume", metavar=VOLUME_URL, help="the volume in the store"),
                        arg("--keep-last", type=int, required=True, metavar="N",
                            help="keep the newest N snapshots (at least 1)"),
                        arg("--keep", action="append", metavar="GLOB",
                            help="also keep snapshots matching this pattern (repeatable)"),
                        _dry_run(), s3_endpoint_arg())),
    Command("recover", "rebuild a volume's lost or damaged catalog from its manifests",
            "Rebuild the catalog of a volume in the store from its manifests (each is "
            "complete and carries its upload's header). Snapshots removed since the last "
            "gc come back. 'store gc' refuses to run while a volume has manifests but no "
            "catalog.",
            (f"blockxfer store recover {VOLUME_URL}",
             f"blockxfer store recover --force {VOLUME_URL}   # replace a damaged catalog"),
            cmd_recover, (arg("volume", metavar=VOLUME_URL, help="the volume in the store"),
                          arg("--force", action="store_true",
                              help="replace a catalog that is there (a damaged one)"),
                          s3_endpoint_arg())),
    Command("gc", "repack and delete packs and manifests no snapshot needs",
            "Repack packs that are mostly unused (their live blobs are copied into new "
            "packs and the manifests naming them rewritten), then delete the packs and "
            "manifests no snapshot in the catalog needs, once older than the grace period.",
            (f"blockxfer store gc {STORE} --dry-run",),
            cmd_gc, (arg("store", metavar=STORE, help="the store"),
                     arg("--grace", type=float, default=6 * 3600, metavar="SECONDS",
                         help="keep unreferenced objects younger than this (default 6 h: a "
                              "running upload may be about to name them)"),
                     arg("--repack-below", type=float, default=0.5, metavar="FRACTION",
                         help="first copy the live blobs of packs less than this fraction "
                              "in use into new packs (default 0.5; 0: never repack)"),
                     _dry_run(), s3_endpoint_arg())),
)

COMMANDS = (
    Command("store", "object-store (s3://) targets: ls, verify, rm, prune, gc, recover",
            "Object stores on S3 (SeaweedFS, Ceph RGW, AWS): incremental forever, any "
            "snapshot restorable alone. send and receive take s3:// URLs.",
            (f"blockxfer send /srv/vol.img june1 {VOLUME_URL}",
             f"blockxfer receive /srv/new.img {SNAPSHOT_URL}", f"blockxfer store ls {STORE}"),
            subcommands=STORE_COMMANDS),
)
