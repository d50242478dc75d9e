"""The object-store leg of `blockxfer demo` (called by blockxfer/demo.py): an embedded
SeaweedFS on 127.0.0.1, a full upload then increments, a restore of one snapshot
alone, verify, prune and gc; the server is stopped by pid at the end."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import BinaryIO

from blockxfer.stream.receive import OpenDevice
from blockxfer.stream.send import send_image
from blockxfer.units import human
from blockxfer.volume import Volume

from .maintain import collect_garbage, prune_plan, remove_snapshots, verify_store
from .restore import restore_snapshot
from .s3 import S3Objects, client_for
from .servers import start_seaweedfs
from .store import Store
from .upload import upload_image


def _sender(vol: Volume, expr: str) -> Callable[[BinaryIO], object]:
    return lambda out: send_image(vol, expr, out, compress=False)


def run_objstore_leg(path: str, snapshots: list[str], directory: str,
                     say: Callable[[str], None], open_device: OpenDevice) -> bool:
    """Upload `snapshots` of the volume at `path` (oldest first: the first full, each
    next one as an increment), restore the middle one alone, verify, prune, gc.
    True when the restored snapshot is identical and the store verifies clean."""
    with start_seaweedfs(os.path.join(directory, "seaweedfs")) as srv:
        say(f"SeaweedFS weed mini on {srv.endpoint} (127.0.0.1, telemetry off, pid {srv.pid})")
        c = client_for(srv.endpoint, srv.access_key, srv.secret_key, srv.region)
        store = Store(S3Objects(c, srv.bucket), "demo", srv.url("demo"))
        vol = Volume.open(open_device(path), writable=False)
        try:
            for i, name in enumerate(snapshots):
                expr = name if i == 0 else f"{name} - {snapshots[i - 1]}"
                res = upload_image(store, "vol", _sender(vol, expr))
                say(f"send {expr!r} -o {store.url}/vol: {res.blocks} blocks, "
                    f"{human(res.new_bytes)} stored")
            pick = snapshots[len(snapshots) // 2]
            want = vol.read(0, vol.virtual_size, snapshot=pick)
        finally:
            vol.close()
        copy = os.path.join(directory, "from-s3.img")
        if os.path.exists(copy):
            os.unlink(copy)
        restore_snapshot(store, "vol", pick, copy, open_device)
        got = Volume.open(open_device(copy), writable=False)
        try:
            same = got.read(0, got.virtual_size, snapshot=pick) == want
        finally:
            got.close()
        say(f"receive {copy} -i {store.url}/vol@{pick}: {'identical' if same else 'DIFFERS'}")
        names = prune_plan(store.need_catalog("vol"), 2, [])
        remove_snapshots(store, "vol", names)
        gc = collect_garbage(store, grace=0)
        rep = verify_store(store)
        say(f"prune --keep-last 2 removed {', '.join(names) or 'nothing'}; gc deleted "
            f"{gc.manifests_deleted} manifests, {gc.packs_deleted} packs; verify "
            f"{'clean' if not rep.problems else rep.problems}")
    return same and not rep.problems
