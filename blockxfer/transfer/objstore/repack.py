"""Repacking: copy the live blobs of packs that are mostly garbage into new packs.

Removing snapshots leaves packs whose blobs no manifest names any more; `gc`
deletes a pack only when *nothing* in it is named. A pack with a few live blobs
among much garbage (what the manifests show: the bytes of blobs no entry names)
is repacked instead: its live blobs go into new packs, as they are when every
block in them is still taken by some manifest, else rebuilt with only the taken
blocks; each manifest that named them is written anew pointing at the new places
(and checksums), and a catalog commit swaps the manifests in. Only then is the old
pack *retired* (a marker object under `retired/`), and `gc` deletes it once
both it is unreferenced and the marker is older than the grace period, so a
restore that read the old manifest just before the swap still finds its blobs.

An upload that merged a base manifest read before the swap names old packs; its
commit is refused (the base's manifest changed) and running it again uses the
new manifest, so no committed manifest ever names a deleted pack.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field, replace

from bitarray import bitarray

from blockxfer.errors import BlockxferError, FormatError

from . import format as fmt
from .packer import Packer
from .store import Catalog, SnapshotRecord, Store

REPACK_BELOW = 0.5            # repack a pack whose live bytes are below this fraction


@dataclass
class RepackReport:
    packs_repacked: int = 0
    bytes_copied: int = 0
    bytes_freed: int = 0                    # what gc deletes once the old packs age out
    manifests_rewritten: int = 0
    problems: list[str] = field(default_factory=list)


@dataclass
class _Blob:
    length: int
    check: int
    block_size: int
    taken: bitarray                         # blocks some manifest takes from it

    def live_bytes(self) -> int:
        """Its bytes times the share of its blocks still taken. The blob's own block
        count is not in any manifest; its length tells it for data that did not
        compress and overstates the share for data that did (so such a blob looks
        more alive than it is: a repack is only ever skipped, never wrong)."""
        own = (self.length - fmt.BLOB.size - len(self.taken) // 8 - 8) // self.block_size
        return self.length if own <= 0 else min(self.length,
                                                self.length * self.taken.count() // own)


@dataclass
class _Users:
    """Who names a pack: its live blobs by offset, and (volume, manifest key)s."""

    blobs: dict[int, _Blob] = field(default_factory=dict)
    records: set[tuple[str, str]] = field(default_factory=set)


# (old pack, offset) -> (new pack, offset, length, check)
Moves = dict[tuple[bytes, int], tuple[bytes, int, int, int]]


def retired_key(store: Store, pack_key: str) -> str:
    return store.key("retired", pack_key.rsplit("/", 1)[-1])


def repack(store: Store, *, below: float = REPACK_BELOW, dry_run: bool = False) -> RepackReport:
    """Repack every pack whose live fraction is below `below` (0 repacks nothing)."""
    rep = RepackReport()
    users, manifests = _who_names_what(store)
    sizes = {i.key: i.size for i in store.all_objects("packs")}
    header = len(fmt.pack_header())
    chosen: dict[bytes, _Users] = {}
    for pid, u in users.items():
        size = sizes.get(store.pack_key(pid))
        live = sum(b.live_bytes() for b in u.blobs.values())
        if size is not None and live < below * (size - header):
            chosen[pid] = u
            rep.bytes_freed += size - header - live
    if dry_run or not chosen:
        rep.packs_repacked = len(chosen)
        return rep
    moved = _copy_live_blobs(store, chosen, rep)
    if not moved:
        return rep
    for volume, keys in _by_volume(chosen).items():
        rep.manifests_rewritten += _swap_manifests(store, volume, keys, manifests, moved)
    for pid in {p for p, _ in moved}:
        store.o.put(retired_key(store, store.pack_key(pid)), b"")
        rep.packs_repacked += 1
    return rep


def _who_names_what(store: Store) -> tuple[dict[bytes, _Users], dict[str, fmt.Manifest]]:
    """The packs manifests name, without those a retained (object-locked) snapshot
    names: its manifest must stay the one the lock protects."""
    users: dict[bytes, _Users] = defaultdict(_Users)
    manifests: dict[str, fmt.Manifest] = {}
    locked: set[bytes] = set()
    now = time.time()
    for volume in store.volumes():
        for rec in store.need_catalog(volume).snaps():
            man = store.manifest(volume, rec)
            if rec.retained(now):
                locked |= set(man.packs())
            manifests[rec.manifest] = man
            for e in man.entries:
                u = users[e.pack]
                b = u.blobs.setdefault(e.offset, _Blob(e.length, e.check, man.block_size,
                                                       e.mask.copy()))
                b.taken |= e.mask
                u.records.add((volume, rec.manifest))
    return {p: u for p, u in users.items() if p not in locked}, manifests


def _copy_live_blobs(store: Store, chosen: dict[bytes, _Users], rep: RepackReport) -> Moves:
    """Where every live blob of the chosen packs went. A pack with a damaged blob is
    left as it is (and reported): repacking must not spread damage."""
    packer = Packer(store)
    places: list[tuple[tuple[bytes, int], int]] = []       # old place, index in packer
    try:
        for pid, u in sorted(chosen.items()):
            blobs = _live_blobs(store, pid, u, rep)
            if blobs is None:
                continue
            for off, blob in blobs:
                places.append(((pid, off), packer.count))
                packer.add_blob(blob, fmt.blob_check(blob))
                rep.bytes_copied += len(blob)
        packer.finish()
    except BaseException:
        packer.abort()
        raise
    out: Moves = {}
    for old, i in places:
        e = packer.entries[i]
        out[old] = (e.pack, e.offset, e.length, e.check)
    return out


def _live_blobs(store: Store, pid: bytes, u: _Users,
                rep: RepackReport) -> list[tuple[int, bytes]] | None:
    """(offset, the blob to store instead) for each live blob of pack `pid`: checked,
    and trimmed to the blocks some manifest still takes."""
    try:
        raw = store.o.get(store.pack_key(pid))
    except BlockxferError as e:
        rep.problems.append(f"pack {pid.hex()}: {e}")
        return None
    out = []
    for off, b in sorted(u.blobs.items()):
        blob = raw[off:off + b.length]
        what = f"pack {pid.hex()}: the blob at {off}"
        try:
            if fmt.blob_check(blob) != b.check:
                raise FormatError(f"{what} is not the one the manifests name")
            chunk, mask, data = fmt.open_blob(blob, b.block_size, what)
        except FormatError as e:
            rep.problems.append(f"{e}; pack kept as it is (run 'blockxfer store verify')")
            return None
        if b.taken != mask:
            blob = _trimmed(chunk, mask, data, b)
        out.append((off, blob))
    return out


def _trimmed(chunk: int, mask: bitarray, data: bytes | memoryview, b: _Blob) -> bytes:
    """The blob with only the blocks in `b.taken` (a subset of `mask`)."""
    keep = bytearray()
    for i, vbn in enumerate(mask.search(1)):
        if b.taken[vbn]:
            keep += data[i * b.block_size:(i + 1) * b.block_size]
    return fmt.make_blob(chunk, b.taken, bytes(keep))


def _by_volume(chosen: dict[bytes, _Users]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = defaultdict(set)
    for u in chosen.values():
        for volume, key in u.records:
            out[volume].add(key)
    return out


def _swap_manifests(store: Store, volume: str, keys: set[str],
                    manifests: dict[str, fmt.Manifest],
                    moved: Moves) -> int:
    """Write the rewritten manifests, then commit a catalog naming them; a record
    whose manifest changed meanwhile keeps its own."""
    new: dict[str, tuple[str, int]] = {}
    for key in sorted(keys):
        man = manifests[key]
        entries = [_moved(e, moved) for e in man.entries]
        if entries == man.entries:
            continue
        new[key] = store.put_manifest(volume, replace(man, entries=entries))

    def swap(cat: Catalog | None) -> Catalog:
        if cat is None:
            raise FormatError(f"{store.url}/{volume}: the catalog vanished during a repack")
        cat.snapshots = [_renamed(s, new) for s in cat.snaps()]
        return cat
    if new:
        store.commit(volume, swap)
    return len(new)


def _moved(e: fmt.Entry, moved: Moves) -> fmt.Entry:
    to = moved.get((e.pack, e.offset))
    if to is None:
        return e
    pack, offset, length, check = to
    return replace(e, pack=pack, offset=offset, length=length, check=check)


def _renamed(s: SnapshotRecord, new: dict[str, tuple[str, int]]) -> SnapshotRecord:
    if s.manifest not in new:
        return s
    key, check = new[s.manifest]
    return replace(s, manifest=key, manifest_check=check)
