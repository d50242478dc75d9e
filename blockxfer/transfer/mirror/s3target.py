"""A mirror into an object store: `s3://BUCKET[/PREFIX]/VOLUME` (docs/mirroring.md,
the layout in docs/object-store-format.md).

Each update is an upload of the update's image stream (`objstore.upload`): the
first a full image, each later one the incremental from the mirror's previous
snapshot, which the store holds by then, so only the changed chunks travel and
the new snapshot's manifest is merged from its base's (deallocations drop blocks
from it). The catalog, written last, commits it: a killed update leaves the
store at the previous snapshot, and running it again skips the packs already
written (they are named by their content). The store can be looked at (its
catalog), so an update the store committed before the source recorded it is
recognised and not sent again.
"""

from __future__ import annotations

from typing import Any

from blockxfer.errors import UsageError
from blockxfer.stream.io import ByteSink

from .target import Found, WriteStream


class StoreTarget:
    def __init__(self, url: str, endpoint: str | None = None) -> None:
        from blockxfer.transfer.objstore.s3 import open_store
        self.name = self.url = url
        store, volume, snap = open_store(url, endpoint=endpoint, volume=True)
        if volume is None or snap is not None:
            raise UsageError(f"{url}: a mirror goes to a volume of the store: "
                             "s3://BUCKET[/PREFIX]/VOLUME (no @SNAPSHOT)")
        self.store, self.volume = store, volume

    def look(self, thorough: bool = False) -> Found:
        cat = self.store.catalog(self.volume)
        if cat is None:
            return Found()
        snaps = cat.snaps()
        newest = max(snaps, key=lambda r: r.cp, default=None)
        return Found(True, cat.uuid, {r.guid: r.name for r in snaps},
                     newest.guid if newest is not None else None)

    def discard_local_changes(self, guid: bytes) -> bool:
        return False              # nothing writes into a store's snapshots

    def holds_newest(self, name: str, guid: bytes) -> bool:
        return self.look().newest == guid

    def receive(self, write: WriteStream, *, force: bool) -> dict[str, Any]:
        from blockxfer.transfer.objstore.upload import upload_image
        sent: dict[str, Any] = {}

        def produce(out: ByteSink) -> None:
            sent["stats"] = write(out)
        res = upload_image(self.store, self.volume, produce)
        return {"top": res.snapshot, "blocks": res.blocks, "resumed": res.packs_skipped > 0,
                "stats": sent.get("stats"), "new_bytes": res.new_bytes}
