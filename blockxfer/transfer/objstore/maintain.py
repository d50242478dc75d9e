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

from blockxfer.errors import BlockxferError, NotFound, UsageError
from blockxfer.stream.format import Header

from . import format as fmt
from .repack import RepackReport, repack
from .restore import WORKERS, Fetch, blob_blocks, plan_fetches
from .store import Catalog, Store
from .upload import GRACE


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
                                    "uploaded": s.uploaded} for s in cat.snaps()]})
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
        cat.snapshots = [s for s in cat.snaps() if s.name not in names]
        return cat
    return store.commit(volume, drop)


def prune_plan(cat: Catalog, keep_last: int, keep: list[str]) -> list[str]:
    """Names to remove: all but the newest `keep_last` and those named in `keep`.
    The newest always stays: the next incremental upload needs it as its base."""
    if keep_last < 1:
        raise UsageError("--keep-last must be at least 1: the newest snapshot is the base "
                         "of the next incremental upload")
    import fnmatch
    snaps = cat.snaps()
    stay = {s.name for s in snaps[-keep_last:]}
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


def collect_garbage(store: Store, *, grace: float = GRACE, dry_run: bool = False,
                    repack_below: float = 0.0) -> GcReport:
    """Repack packs whose live fraction is below `repack_below` (repack.py), then
    delete packs and manifests no catalog reaches, once older than `grace` seconds."""
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
