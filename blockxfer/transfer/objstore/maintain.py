"""Looking after a store: list, verify, remove and prune snapshots, collect garbage.

Every manifest is complete on its own (an upload merges its base's manifest), so
no snapshot's restore needs another snapshot's manifest: removing one only
drops its catalog entry. The blocks stay in packs until `gc` finds no manifest
of any catalog naming a pack and the pack is older than the grace period (an
upload running meanwhile may be about to name it).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from blockxfer.errors import BlockxferError, FormatError, NotFound, UsageError, VolumeError
from blockxfer.stream.format import Header

from . import format as fmt
from .packer import GRACE
from .repack import RepackReport, repack
from .restore import WORKERS, Fetch, blob_blocks, plan_fetches
from .store import Catalog, SnapshotRecord, Store


def listing(store: Store) -> dict[str, object]:
    """Volumes, their snapshots, and what the packs hold (for `store ls`)."""
    vols = []
    for name in store.volumes():
        cat = store.need_catalog(name)
        vols.append({"volume": name, "uuid": cat.uuid.hex(), "block_size": cat.block_size,
                     "nblocks": cat.nblocks, "generation": cat.generation,
                     "snapshots": [{"name": s.name, "cp": s.cp, "blocks": s.blocks,
                                    "bytes": s.blocks * cat.block_size,
                                    "new_bytes": s.new_bytes,
                                    "incremental": s.base is not None,
                                    "uploaded": s.uploaded,
                                    "retain_until": s.retain_until} for s in cat.snaps()]})
    packs = list(store.all_objects("packs"))
    return {"store": store.url, "volumes": vols, "packs": len(packs),
            "pack_bytes": sum(p.size for p in packs)}


@dataclass
class VerifyReport:
    snapshots: int = 0
    blocks: int = 0
    problems: list[str] = field(default_factory=list)


def verify_store(store: Store, volume: str | None = None) -> VerifyReport:
    """Every snapshot's manifest, and every blob any of them names, read once and
    checked (checksums, chunk, mask): a blob shared by ten snapshots is read once."""
    rep = VerifyReport()
    entries: list[fmt.Entry] = []
    users: dict[tuple[bytes, int], list[str]] = {}
    sizes: dict[str, int] = {}
    for name in [volume] if volume else store.volumes():
        for s in store.need_catalog(name).snaps():
            try:
                man = store.manifest(name, s)
                Header.unpack(man.stream_header)
            except BlockxferError as e:
                rep.problems.append(f"{name}@{s.name}: {e}")
                continue
            rep.snapshots += 1
            rep.blocks += man.blocks
            sizes[f"{name}@{s.name}"] = man.block_size
            for ent in man.entries:
                users.setdefault((ent.pack, ent.offset), []).append(f"{name}@{s.name}")
            entries += man.entries
    block_size = next(iter(sizes.values()), 4096)
    for f, raw in _tolerant(store, plan_fetches(entries)):
        for b in f.blobs:
            try:
                if isinstance(raw, BlockxferError):
                    raise raw
                for _ in blob_blocks(f, raw, b, block_size, store):
                    pass
            except BlockxferError as e:
                who = ", ".join(sorted(set(users.get((f.pack, b.offset), []))))
                rep.problems.append(f"{who}: {e}")
    return rep


def _tolerant(store: Store, plan: list[Fetch]) -> Iterator[tuple[Fetch, bytes | BlockxferError]]:
    """Each fetch's bytes, or the error that stopped it (verify goes on)."""
    def get(f: Fetch) -> bytes | BlockxferError:
        try:
            return store.o.get(store.pack_key(f.pack), f.start, f.end)
        except BlockxferError as e:
            return e
    with ThreadPoolExecutor(WORKERS, thread_name_prefix="bx-verify") as pool:
        ahead: deque[tuple[Fetch, Future[bytes | BlockxferError]]] = deque()
        for f in plan:                     # a window of WORKERS: bounded memory
            ahead.append((f, pool.submit(get, f)))
            if len(ahead) > WORKERS:
                g, fut = ahead.popleft()
                yield g, fut.result()
        while ahead:
            g, fut = ahead.popleft()
            yield g, fut.result()


def remove_snapshots(store: Store, volume: str, names: list[str]) -> Catalog:
    def drop(cat: Catalog | None) -> Catalog:
        if cat is None:
            raise NotFound(f"{store.url} holds no volume {volume!r}")
        missing = [n for n in names if cat.find(name=n) is None]
        if missing:
            raise NotFound(f"{store.url}/{volume} holds no snapshot {missing[0]!r}")
        now = time.time()
        for s in cat.snaps():
            if s.name in names and s.retained(now):
                raise VolumeError(f"{store.url}/{volume}@{s.name} is retained by object lock "
                                  f"until {_date(s.retain_until)}; it can be removed after that")
        cat.snapshots = [s for s in cat.snaps() if s.name not in names]
        return cat
    return store.commit(volume, drop)


def _date(unix: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(unix or 0))


def prune_plan(cat: Catalog, keep_last: int, keep: list[str]) -> list[str]:
    """Names to remove: all but the newest `keep_last`, those named in `keep` and
    those still under retention. The newest always stays: the next incremental
    upload needs it as its base."""
    if keep_last < 1:
        raise UsageError("--keep-last must be at least 1: the newest snapshot is the base "
                         "of the next incremental upload")
    import fnmatch
    snaps, now = cat.snaps(), time.time()
    stay = {s.name for s in snaps[-keep_last:]} | {s.name for s in snaps if s.retained(now)}
    stay |= {s.name for s in snaps if any(fnmatch.fnmatchcase(s.name, k) for k in keep)}
    return [s.name for s in snaps if s.name not in stay]


@dataclass
class GcReport:
    packs_deleted: int = 0
    bytes_deleted: int = 0
    manifests_deleted: int = 0
    packs_kept: int = 0
    young: int = 0                         # unreferenced but within the grace period
    deleted: list[str] = field(default_factory=list)
    repack: RepackReport | None = None


def orphans(store: Store, grace: float) -> list[str]:
    """Volumes with manifests older than `grace` but no catalog: lost catalogs (an
    upload writes its manifest a moment before its first catalog)."""
    head, now = store.key("volumes") + "/", time.time()
    have = set(store.volumes())
    return sorted({i.key[len(head):].split("/")[0] for i in store.o.list(head)
                   if i.key.endswith(".manifest") and now - i.mtime >= grace} - have)


def collect_garbage(store: Store, *, grace: float = GRACE, dry_run: bool = False,
                    repack_below: float = 0.0) -> GcReport:
    """Repack packs whose live fraction is below `repack_below` (repack.py), then
    delete packs and manifests no catalog reaches, once older than `grace` seconds.
    Refused while a volume's catalog is missing: its blocks would all look unused."""
    lost = orphans(store, grace)
    if lost:
        raise VolumeError(f"{store.url}/{lost[0]} has snapshots but no catalog; gc would "
                          f"delete them: run 'blockxfer store recover {store.url}/{lost[0]}' "
                          "first")
    packed = repack(store, below=repack_below, dry_run=dry_run) if repack_below > 0 else None
    live_packs: set[str] = set()
    live_manifests: set[str] = set()
    for name in store.volumes():
        for s in store.need_catalog(name).snaps():
            live_manifests.add(s.manifest)
            live_packs |= {store.pack_key(p) for p in store.manifest(name, s).packs()}
    rep, now = GcReport(), time.time()
    retired = {i.key.rsplit("/", 1)[-1]: i for i in store.all_objects("retired")}
    packs = list(store.all_objects("packs"))
    dead = [(i, "pack") for i in packs if i.key not in live_packs]
    dead += [(i, "manifest") for i in store.all_objects("volumes")
             if i.key.endswith(".manifest") and i.key not in live_manifests]
    rep.packs_kept = len(live_packs)
    present = {i.key.rsplit("/", 1)[-1] for i in packs}
    for name, mark in retired.items():          # markers of packs gone (or never repacked)
        if name not in present and not dry_run:
            store.o.delete(mark.key)
    for info, kind in dead:
        mark = retired.get(info.key.rsplit("/", 1)[-1]) if kind == "pack" else None
        if now - max(info.mtime, mark.mtime if mark else 0) < grace:
            rep.young += 1          # (a restore may have read a manifest naming it)
            continue
        if not dry_run:
            store.o.delete(info.key)
            if mark is not None:
                store.o.delete(mark.key)
        rep.deleted.append(info.key)
        if kind == "pack":
            rep.packs_deleted += 1
            rep.bytes_deleted += info.size
        else:
            rep.manifests_deleted += 1
    rep.repack = packed
    return rep


@dataclass
class RecoverReport:
    catalog: Catalog
    skipped: list[str] = field(default_factory=list)    # damaged manifests


def recover_catalog(store: Store, volume: str, *, force: bool = False) -> RecoverReport:
    """Rebuild a volume's lost (or, with `force`, damaged) catalog from its manifests:
    each is complete on its own and carries its upload's stream header. Snapshots
    removed since the last gc come back (their manifests were still there)."""
    where = f"{store.url}/{volume}"
    try:
        if store.catalog(volume) is not None and not force:
            raise VolumeError(f"{where} has a catalog; recover rebuilds a missing one "
                              "(--force replaces it)")
    except FormatError:
        if not force:
            raise VolumeError(f"{where}: its catalog is damaged; run 'blockxfer store "
                              f"recover --force {where}' to rebuild it") from None
    rep = RecoverReport(Catalog(volume, bytes(16), 0, 0, 0, 1, []))
    newest: dict[bytes, tuple[float, SnapshotRecord]] = {}
    for info in store.all_objects("volumes", volume, "manifests"):
        try:
            rec, man = _record_of(store, info.key)
        except BlockxferError as e:
            rep.skipped.append(f"{info.key}: {e}")
            continue
        if rep.catalog.uuid not in (bytes(16), man.volume_uuid):
            rep.skipped.append(f"{info.key}: another volume's manifest")
            continue
        c = rep.catalog
        c.uuid, c.block_size, c.nblocks, c.chunk_blocks = (man.volume_uuid, man.block_size,
                                                           man.nblocks, man.chunk_blocks)
        if rec.guid not in newest or info.mtime > newest[rec.guid][0]:
            newest[rec.guid] = (info.mtime, rec)      # a repack's manifest is the newer
    if not newest:
        raise NotFound(f"{where}: no readable manifest to rebuild a catalog from")
    rep.catalog.snapshots = [r for _, r in newest.values()]
    store.o.put(store.catalog_key(volume), rep.catalog.pack(), if_none_match=not force)
    return rep


def _record_of(store: Store, key: str) -> tuple[SnapshotRecord, fmt.Manifest]:
    from blockxfer.checksum import checksum
    raw = store.o.get(key)
    named = key.rsplit("-", 1)[-1].removesuffix(".manifest")
    if f"{checksum(raw):016x}" != named:
        raise FormatError(f"{key} is damaged: its checksum is not the one in its name")
    man = fmt.Manifest.unpack(raw, key)
    h = Header.unpack(man.stream_header)
    return SnapshotRecord(h.top.name, h.top.guid, h.top.id, h.top.generation, key,
                          checksum(raw), man.blocks, 0, h.base.guid if h.base else None,
                          man.created), man
