"""The object-store commands: `send ... -o s3://`, `receive ... -i s3://`, `store ...`.

Addresses: a store is `s3://BUCKET[/PREFIX]`; a volume in it
`s3://BUCKET[/PREFIX]/VOLUME`; a snapshot `s3://BUCKET[/PREFIX]/VOLUME@SNAP`.
Endpoint, credentials and region come from the usual AWS variables and files;
`--s3-endpoint` overrides the endpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, BinaryIO

from blockxfer.errors import UsageError
from blockxfer.progress import Progress
from blockxfer.units import human


def _open(url: str, a: argparse.Namespace, *, volume: bool) -> tuple[Any, str, str | None]:
    """The store, the volume name ('' for a store address) and the snapshot name."""
    from blockxfer.transfer.objstore.s3 import open_store
    store, vol, snap = open_store(url, endpoint=getattr(a, "s3_endpoint", None), volume=volume)
    return store, vol or "", snap


def _print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def send_to_store(a: argparse.Namespace) -> int:
    """`send VOL EXPR -o s3://BUCKET/PREFIX/VOLUME`: upload the image's stream."""
    from blockxfer import remote
    from blockxfer.handles import open_volume
    from blockxfer.transfer.objstore.upload import upload_image
    if a.resume or a.implicit or a.order != "ascending":
        raise UsageError("--resume, --implicit and --order do not apply to an s3:// target "
                         "(an interrupted upload resumes by running it again)")
    store, volume, snap = _open(a.output, a, volume=True)
    if snap is not None:
        raise UsageError(f"{a.output}: name the volume only; the snapshot comes from the image")
    prog = Progress("upload")
    if remote.server_for(a.path) is not None:  # the serving process streams it

        def produce(out: BinaryIO) -> object:
            return remote.send(a.path, a.expression, out.fileno(), compress=False,
                               implicit=False, resume=None)
        res = upload_image(store, volume, produce, progress=prog.add)
    else:
        from blockxfer.stream.send import send_image
        with open_volume(a.path) as vol:
            # ascending reads: each chunk then arrives whole, as one blob
            def produce(out: BinaryIO) -> object:
                return send_image(vol, a.expression, out, compress=False)
            res = upload_image(store, volume, produce, progress=prog.add)
    prog.finish()
    where = f"{store.url}/{volume}@{res.snapshot}"
    if res.already:
        print(f"{where}: already in the store ({res.manifest_blocks} blocks); nothing sent",
              file=sys.stderr)
        return 0
    kind = "incremental" if res.incremental else "full"
    print(f"{where}: stored {kind} image, {res.blocks} blocks sent, {human(res.new_bytes)} in "
          f"{res.packs_written} new packs ({res.packs_skipped} already there); a restore "
          f"writes {res.manifest_blocks} blocks", file=sys.stderr)
    return 0


def receive_from_store(a: argparse.Namespace) -> int:
    """`receive TARGET -i s3://BUCKET/PREFIX/VOLUME@SNAP`: restore that snapshot alone."""
    from blockxfer.drivers.blockdev import open_device
    from blockxfer.transfer.objstore.restore import restore_snapshot
    store, volume, snap = _open(a.input, a, volume=True)
    if snap is None:
        raise UsageError(f"{a.input}: name the snapshot as s3://BUCKET/PREFIX/VOLUME@SNAP "
                         "(see 'blockxfer store ls')")
    prog = Progress("restore")
    res = restore_snapshot(store, volume, snap, a.target, open_device, force=a.force,
                           progress=prog.add)
    prog.finish()
    kind = "only what changed since the snapshot it held" if res.incremental else "full"
    print(f"{a.target}: received {volume}@{res.top} from {store.url} ({kind}), "
          f"{res.blocks} blocks")
    for name in res.released:
        print(f"{a.target}: released {name!r} (the source no longer had it)")
    for name in res.incomplete:
        print(f"{a.target}: {name!r} is incomplete here (not all of its blocks were stored)")
    return 0


def cmd_ls(a: argparse.Namespace) -> int:
    from blockxfer.transfer.objstore.maintain import listing
    store, _, _ = _open(a.store, a, volume=False)
    info = listing(store)
    if a.json:
        _print_json(info)
        return 0
    vols: list[dict[str, Any]] = info["volumes"]  # type: ignore[assignment]
    print(f"{info['store']}: {len(vols)} volumes, {info['packs']} packs, "
          f"{human(int(info['pack_bytes']))} stored")  # type: ignore[call-overload]
    for v in vols:
        print(f"{v['volume']}  (volume {v['uuid']}, blocks of {v['block_size']})")
        for s in v["snapshots"]:
            kind = "incr" if s["incremental"] else "full"
            print(f"  {s['name']:24} {kind}  {human(s['bytes']):>10} restored  "
                  f"{human(s['new_bytes']):>10} added")
    return 0


def cmd_verify(a: argparse.Namespace) -> int:
    from blockxfer.transfer.objstore.maintain import verify_store
    store, _, _ = _open(a.store, a, volume=False)
    rep = verify_store(store, a.volume)
    for p in rep.problems:
        print(f"problem: {p}")
    print(f"{store.url}: {'clean' if not rep.problems else f'{len(rep.problems)} problems'}; "
          f"{rep.snapshots} snapshots, {rep.blocks} blocks verified")
    return 0 if not rep.problems else 1


def cmd_gc(a: argparse.Namespace) -> int:
    from blockxfer.transfer.objstore.maintain import collect_garbage
    store, _, _ = _open(a.store, a, volume=False)
    rep = collect_garbage(store, grace=a.grace, dry_run=a.dry_run)
    verb = "would delete" if a.dry_run else "deleted"
    print(f"{store.url}: {verb} {rep.packs_deleted} packs ({human(rep.bytes_deleted)}) and "
          f"{rep.manifests_deleted} manifests; {rep.packs_kept} packs in use, {rep.young} "
          "unreferenced objects younger than the grace period kept")
    return 0


def cmd_rm(a: argparse.Namespace) -> int:
    from blockxfer.transfer.objstore.maintain import remove_snapshots
    store, volume, snap = _open(a.snapshot, a, volume=True)
    if snap is None:
        raise UsageError(f"{a.snapshot}: name the snapshot as s3://BUCKET/PREFIX/VOLUME@SNAP")
    remove_snapshots(store, volume, [snap])
    print(f"{store.url}/{volume}@{snap}: removed (its blocks go at the next 'store gc')")
    return 0


def cmd_prune(a: argparse.Namespace) -> int:
    from blockxfer.transfer.objstore.maintain import prune_plan, remove_snapshots
    store, volume, snap = _open(a.volume, a, volume=True)
    if snap is not None:
        raise UsageError(f"{a.volume}: prune takes a volume, not a snapshot")
    names = prune_plan(store.need_catalog(volume), a.keep_last, a.keep or [])
    for n in names:
        print(f"{store.url}/{volume}@{n}: {'would remove' if a.dry_run else 'removed'}")
    if names and not a.dry_run:
        remove_snapshots(store, volume, names)
    if not names:
        print(f"{store.url}/{volume}: nothing to prune")
    return 0


def add_s3_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--s3-endpoint", metavar="URL",
                    help="S3 endpoint (default: AWS_ENDPOINT_URL or the AWS config)")


def register(sub: Any) -> None:
    """`store ...`, and --s3-endpoint on send and receive."""
    for name in ("send", "receive"):
        add_s3_args(sub.choices[name])
    p = sub.add_parser("store", help="object-store (s3://) targets: ls, verify, rm, prune, gc",
                       description=__doc__.splitlines()[0])
    ssub = p.add_subparsers(dest="store_command", required=True, metavar="STORE_COMMAND")

    def cmd(name: str, fn: Any, help: str, arg: str, metavar: str) -> argparse.ArgumentParser:
        sp = ssub.add_parser(name, help=help, description=help)
        sp.add_argument(arg, metavar=metavar)
        add_s3_args(sp)
        sp.set_defaults(func=fn)
        return sp

    sp = cmd("ls", cmd_ls, "volumes and snapshots in a store", "store", "s3://BUCKET/PREFIX")
    sp.add_argument("--json", action="store_true")
    sp = cmd("verify", cmd_verify, "check every manifest and chunk checksum", "store",
             "s3://BUCKET/PREFIX")
    sp.add_argument("--volume", help="only this volume")
    cmd("rm", cmd_rm, "remove one snapshot (its manifest) from a store", "snapshot",
        "s3://BUCKET/PREFIX/VOLUME@SNAP")
    sp = cmd("prune", cmd_prune, "remove all but the newest snapshots", "volume",
             "s3://BUCKET/PREFIX/VOLUME")
    sp.add_argument("--keep-last", type=int, required=True, metavar="N",
                    help="keep the newest N snapshots (at least 1)")
    sp.add_argument("--keep", action="append", metavar="GLOB",
                    help="also keep snapshots matching this name pattern (repeatable)")
    sp.add_argument("--dry-run", action="store_true")
    sp = cmd("gc", cmd_gc, "delete packs and manifests no snapshot needs", "store",
             "s3://BUCKET/PREFIX")
    sp.add_argument("--grace", type=float, default=6 * 3600, metavar="SECONDS",
                    help="keep unreferenced objects younger than this (default 6 h: a "
                         "running upload may be about to name them)")
    sp.add_argument("--dry-run", action="store_true")
