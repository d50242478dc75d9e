"""Incremental mirroring, the source side: the base image to a slow medium once,
then on every update the blocks that differ from the base into the increments
directory, trimmed by what the source no longer uses (the patent's "Incremental
Mirroring").

The structure holds D = T - B: T, the blocks of every snapshot the newest mirrored
state keeps (its top `incr.ID.N` and the others the source has), minus B, the
blocks of the base image's snapshots that still exist (and so never changed). A
block of D whose content cannot have changed since the last update (it is in a
snapshot that existed then and still does) is not written again; a block that
left D is punched out. So the structure stays the real difference from the base,
never the sum of the increments (docs/increments.md).

The source keeps two snapshots for this, held with the tag `increments`: the base
(so its blocks are never reused) and the newest mirrored state (so the next update
can tell what changed since). The previous state's snapshot is released and
destroyed once the new state is committed; any `incr.ID.*` snapshot a killed
update left behind is cleaned up by the next one.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from bitarray import bitarray

from blockxfer.checksum import checksum
from blockxfer.device import BlockDevice
from blockxfer.errors import UsageError, VolumeError
from blockxfer.stream import format as sfmt
from blockxfer.stream.send import BlockCheck, Reader, plain_reader
from blockxfer.volume import Volume
from blockxfer.volume.layout import SnapshotEntry

from .base import Medium, Openers, Progress, base_file_top, parse_base, write_base
from .format import PENDING, READY, Meta, Slot, plane_runs
from .store import DATA, Directory, Update, set_bits, settle

TAG = "increments"
log = logging.getLogger(__name__)
Lock = AbstractContextManager[Any]
_openers: Openers | None = None


def use_openers(openers: Openers) -> None:
    """How devices and tapes are opened by path (the wiring hands this in: only it
    may import the drivers)."""
    global _openers
    _openers = openers


def openers() -> Openers:
    if _openers is None:
        raise RuntimeError("blockxfer.transfer.increments: use_openers() was not called")
    return _openers


def snapshot_name(slot: Slot, n: int) -> str:
    return f"incr.{slot.tag}.{n}"


def _regular(vol: Volume) -> list[SnapshotEntry]:
    return [e for e in vol.snapshots() if not e.shadow and not e.incomplete]


def _union(vol: Volume, entries: list[SnapshotEntry], nblocks: int) -> bitarray:
    out = bitarray(nblocks, endian="little")
    out.setall(0)
    for e in entries:
        out |= vol.plane(e.name)[:nblocks]
    return out


def _ref(e: SnapshotEntry) -> sfmt.SnapshotRef:
    return sfmt.SnapshotRef(e.id, e.guid, e.generation, e.flags, e.name)


def _state_header(vol: Volume, top: SnapshotEntry, base: SnapshotEntry,
                  keep: list[SnapshotEntry], held: bitarray, dealloc: int) -> sfmt.Header:
    """The newest state as the receive side needs it: a stream header whose root
    is the top's and whose base is the base image's snapshot."""
    assert top.root is not None
    return sfmt.Header(
        volume_uuid=vol.sb.uuid, block_size=vol.block_size, nblocks=vol.nblocks,
        virtual_blocks=vol.virtual_blocks, first_data_vbn=vol.sb.first_data_vbn,
        next_id=vol.sb.next_id, stream_id=os.urandom(16),
        expression=f"{top.name} - {base.name}", top=_ref(top), base=_ref(base), root=top.root,
        snapshot_set=[_ref(e) for e in keep], image_blocks=held.count(),
        image_digest=checksum(held.tobytes()), dealloc_blocks=dealloc)


def _open_source(path: str, o: Openers) -> Volume:
    dev = o.open_device(path, write=True)
    try:
        return Volume.open(dev)
    except BaseException:
        dev.close()
        raise


def slot_or_none(d: Directory) -> Slot | None:
    """The slot in force; None for a directory whose first update was killed before
    its first header slot was written (both slots still zero)."""
    with open(d.file("header"), "rb") as f:
        if not any(f.read()):
            return None
    return d.slot()


def mirror_update(src_volume_path: str, base_url: str, increments_dir: str, *,
                  progress: Progress = None) -> dict[str, object]:
    """One update of an incremental mirror: the base (first call), else the blocks
    changed since the last mirrored state. Returns what it did (as JSON data)."""
    vol = _open_source(src_volume_path, openers())
    try:
        return update_volume(vol, base_url, increments_dir, progress=progress)
    finally:
        vol.close()


@dataclass(frozen=True)
class _Source:
    """The source volume as an update uses it: `lock` is held for the metadata steps
    (snapshots, holds, planes, the plan), `read` reads the base image's blocks
    outside it (in any order: the stream says where each goes). The increments
    are read in ascending order, which the structure's writer needs."""

    vol: Volume
    lock: Lock
    read: Reader


def update_volume(vol: Volume, base_url: str, increments_dir: str, *,
                  progress: Progress = None, lock: Lock | None = None,
                  reader: Reader | None = None) -> dict[str, object]:
    """`mirror_update` on a volume the caller holds open for writing (a service
    that owns it). `lock` is that service's volume lock: the metadata steps run
    under it, the blocks are read outside it (the snapshots being read are held),
    so NBD clients keep writing; `reader` reads the base image's runs of blocks
    (the service's parallel reader)."""
    o = openers()
    src = _Source(vol, lock if lock is not None else nullcontext(), reader or plain_reader(vol))
    d = Directory(increments_dir)
    started = time.monotonic()
    if not d.exists():
        _refuse_written_base(parse_base(base_url, o.is_tape))   # before anything is made
        d.create()
    slot = slot_or_none(d)
    if slot is None or slot.state == PENDING:
        out = _first(d, slot, src, base_url, o, progress)
    else:
        _same_base(slot, base_url, o)
        out = _increment(d, slot, src, o, progress)
    out["seconds"] = round(time.monotonic() - started, 3)
    return out


def _same_base(slot: Slot, base_url: str, o: Openers) -> None:
    given, kept = parse_base(base_url, o.is_tape), parse_base(slot.base_url, o.is_tape)
    if given != kept:
        raise UsageError(f"these increments were built on the base {slot.base_url}, not "
                         f"{base_url}; give that base or start a new directory")


# -- the first update: the base ----------------------------------------------------------
def _first(d: Directory, slot: Slot | None, src: _Source, base_url: str, o: Openers,
           progress: Progress) -> dict[str, object]:
    medium = parse_base(base_url, o.is_tape)
    vol = src.vol
    if slot is None:
        _refuse_written_base(medium)
        dir_id = os.urandom(16)
        slot = Slot(1, PENDING, dir_id, vol.sb.uuid, vol.block_size, vol.nblocks,
                    base_url, f"incr.{dir_id.hex()[:8]}.0")
        d.write_slot(slot)              # a kill from here on resumes with this name
    else:
        _same_base(slot, base_url, o)
        _same_volume(slot, vol)
    return _write_base(d, slot, src, medium, o, progress)


def _refuse_written_base(medium: Medium) -> None:
    if medium.kind == "file" and os.path.exists(medium.path):
        raise UsageError(f"the base {medium.path} already exists; give a new file "
                         "(the base is written once)")


def _same_volume(slot: Slot, vol: Volume) -> None:
    if vol.sb.uuid != slot.volume_uuid:
        raise VolumeError(f"{vol.dev.path} is not the volume these increments mirror; give that "
                          "volume or start a new directory")


def _write_base(d: Directory, slot: Slot, src: _Source, medium: Medium, o: Openers,
                progress: Progress) -> dict[str, object]:
    vol = src.vol
    with src.lock:
        names = {e.name for e in vol.snapshots()}
        if slot.base_name not in names:
            vol.create_snapshot(slot.base_name)
        base = vol.resolve(slot.base_name)
        if TAG not in vol.holds().get(base.name, set()):
            vol.hold(base.name, TAG)
        carried = [base] + [e for e in _regular(vol) if e.guid != base.guid]
        listed = vol.snapshots()        # as the base state holds them (not later ones)
    expression = " + ".join(e.name for e in carried)
    if medium.kind == "file" and base_file_top(medium.path) == base.guid:
        image, set_id = 0, bytes(16)       # written whole before a kill: keep it
    else:
        image, set_id = write_base(vol, expression, medium, o, progress, lock=src.lock,
                                   reader=src.read)
    data = o.open_device(d.file(DATA), write=True, create_size=vol.nblocks * vol.block_size)
    try:
        empty = bitarray(vol.nblocks, endian="little")
        empty.setall(0)
        with src.lock:
            header = _state_header(vol, base, base, listed, empty, 0)
        meta = Meta(slot.seq + 1, header, [e.guid for e in carried], empty,
                    np.zeros(0, np.uint64))
        length, ck = d.write_meta(meta)
        slot = replace(slot, seq=slot.seq + 1, state=READY, base_guid=base.guid,
                       base_set=set_id, base_image=image, meta_id=meta.meta_id,
                       meta_len=length, meta_check=ck, updated=time.time_ns())
        d.write_slot(slot)
    finally:
        data.close()
    return {"kind": "base", "directory": d.path, "base": slot.base_url,
            "base_snapshot": base.name, "base_image": image, "expression": expression,
            "snapshot": base.name, "blocks": 0, "punched": 0, "held_blocks": 0,
            "structure_bytes": d.allocated_bytes()}


# -- later updates: the increments ---------------------------------------------------------
def _increment(d: Directory, slot: Slot, src: _Source, o: Openers,
               progress: Progress) -> dict[str, object]:
    _same_volume(slot, src.vol)
    meta = d.meta(slot)
    data = o.open_device(d.file(DATA), write=True)    # exclusive: one updater at a time
    try:
        slot = settle(d, slot, meta, data)            # finish what a killed update committed
        return _update(d, slot, meta, src, data, progress)
    finally:
        data.close()


def _ours(slot: Slot, name: str) -> bool:
    return name.startswith(f"incr.{slot.tag}.")


def _droppable(vol: Volume, name: str) -> bool:
    """Nobody but us needs it: no other hold, no pointer names it."""
    return vol.holds().get(name, set()) <= {TAG} and name not in vol.pointers.values()


def _drop(vol: Volume, name: str) -> bool:
    """Release our hold on `name` and destroy it unless someone else still needs it
    (then it stays, and the next update keeps it in the mirrored state)."""
    if TAG in vol.holds().get(name, set()):
        vol.release(name, TAG)
    if not _droppable(vol, name):
        return False
    try:
        vol.destroy_snapshot(name)
    except VolumeError as e:
        log.warning("keeping snapshot %s: %s", name, e)
        return False
    return True


def _cleanup(vol: Volume, slot: Slot, keep: set[str]) -> None:
    """Snapshots a killed update took or failed to destroy."""
    for e in vol.snapshots():
        if _ours(slot, e.name) and e.name not in keep:
            _drop(vol, e.name)


@dataclass
class _Plan:
    """What one update writes, punches and commits (all decided from the planes)."""

    top: SnapshotEntry
    base: SnapshotEntry
    drop: SnapshotEntry | None             # the previous state's snapshot, destroyed after
    kept: list[SnapshotEntry]              # the regular snapshots the new state keeps
    wanted: bitarray                       # the blocks the new state holds
    write: bitarray                        # those that may have changed since the last state
    dealloc: bitarray                      # base - top
    header: sfmt.Header


def _plan(slot: Slot, meta: Meta, vol: Volume) -> _Plan:
    """Take the new state's snapshot and decide what changes: the new state holds
    the kept snapshots' blocks minus those of the base image's surviving snapshots;
    a held block in a snapshot that existed last time and still does is unchanged."""
    prev = meta.header.top
    by_guid = {e.guid: e for e in vol.snapshots()}
    base = by_guid.get(slot.base_guid)
    if base is None:
        raise VolumeError(f"the base snapshot {slot.base_name!r} is gone from the source, so "
                          "these increments cannot continue; start a new directory")
    _cleanup(vol, slot, {base.name, prev.name})
    n = slot.updates + 1
    while snapshot_name(slot, n) in vol.snapshot_names():
        n += 1
    vol.create_snapshot(snapshot_name(slot, n))
    vol.hold(snapshot_name(slot, n), TAG)
    top = vol.resolve(snapshot_name(slot, n))
    old = by_guid.get(prev.guid)
    drop = old if (old is not None and old.guid != base.guid and _ours(slot, old.name)
                   and _droppable(vol, old.name)) else None
    regular = _regular(vol)
    kept = [e for e in regular if drop is None or e.guid != drop.guid]
    nb = vol.nblocks
    was = {s.guid for s in meta.header.snapshot_set} | {prev.guid}
    base_set = set(meta.base_guids)
    wanted = _union(vol, kept, nb) & ~_union(vol, [e for e in regular if e.guid in base_set],
                                             nb)
    unchanged = _union(vol, [e for e in regular if e.guid in was], nb) & meta.present
    dealloc = vol.plane(base.name)[:nb] & ~vol.plane(top.name)[:nb]
    keep = [e for e in vol.snapshots() if drop is None or e.guid != drop.guid]
    return _Plan(top, base, drop, kept, wanted, wanted & ~unchanged, dealloc,
                 _state_header(vol, top, base, keep, wanted, dealloc.count()))


def _block_check(vol: Volume, p: _Plan) -> BlockCheck:
    """The checksums the kept snapshots' maps keep for the blocks to be copied: a
    damaged block of the source stops the update before anything commits."""
    only = bitarray(len(vol.active.bits), endian="little")
    only.setall(0)
    only[:len(p.write)] = p.write
    vbns, cks = vol.data_checksums([e.name for e in p.kept], None, only)
    return BlockCheck(vbns, cks, vol.block_size)


def _update(d: Directory, slot: Slot, meta: Meta, src: _Source, data: BlockDevice,
            progress: Progress) -> dict[str, object]:
    vol = src.vol
    upd = Update(d, slot, meta.present, data, slot.seq + 1)
    try:
        with ExitStack() as held:
            with src.lock:                    # the plan; then the kept snapshots' blocks
                p = _plan(slot, meta, vol)    # stay put while they are read, unlocked
                held.enter_context(vol.holding(p.kept))
                check = _block_check(vol, p)
            n = int(p.top.name.rsplit(".", 1)[1])
            for vbn, view in plain_reader(vol)(plane_runs(p.write)):
                check.verify(vbn, view)
                upd.put(vbn, view)
                if progress:
                    progress(len(view))
        new_meta = Meta(slot.seq + 1, p.header, meta.base_guids, p.wanted,
                        _merge_checks(meta, p.wanted, upd), dealloc=list(plane_runs(p.dealloc)))
        slot = upd.commit(new_meta, replace(slot, seq=slot.seq + 1, present=p.wanted.count(),
                                            updates=n, written=slot.written + upd.blocks,
                                            updated=time.time_ns()))
    finally:
        upd.abandon()
    slot = settle(d, slot, new_meta, data)
    with src.lock:
        dropped = _drop(vol, p.drop.name) if p.drop is not None else False
    return {"kind": "increment", "directory": d.path, "base": slot.base_url,
            "base_snapshot": p.base.name, "snapshot": p.top.name, "update": n,
            "blocks": upd.blocks, "bytes": upd.blocks * vol.block_size,
            "punched": (meta.present & ~p.wanted).count(), "held_blocks": p.wanted.count(),
            "released": p.drop.name if p.drop is not None and dropped else None,
            "structure_bytes": d.allocated_bytes()}


def _merge_checks(meta: Meta, wanted: bitarray, upd: Update) -> np.ndarray:
    """The checksums of the new state's blocks: those written now, the rest kept."""
    new_v = set_bits(wanted)
    old_v = set_bits(meta.present)
    wv, wc = upd.written()
    out = np.empty(len(new_v), dtype=np.uint64)
    fresh = np.isin(new_v, wv)
    out[fresh] = wc[np.searchsorted(wv, new_v[fresh])]
    at = np.searchsorted(old_v, new_v[~fresh])
    assert np.array_equal(old_v[at], new_v[~fresh]), "a kept block the state did not hold"
    out[~fresh] = meta.checks[at]
    return out


__all__ = ["mirror_update", "openers", "slot_or_none", "update_volume", "use_openers"]
