"""Reintegration (the patent's "Reintegration of Incremental Mirror"): the base
image restored from its slow medium, then the increments placed over it through
the volume's receiver, then the newest state's root committed. The result is the
source's newest mirrored state, byte for byte, with its snapshots.

Everything that can be checked is checked before the target is touched: the
increments (every block against its checksum) and the base's identity. The base
restore is the ordinary restore or receive; the increments are one atomic
receive on top of it (a kill leaves the target at the base, and running the same
reintegrate again goes on from there without restoring the base twice).
"""

from __future__ import annotations

import os
import time

from blockxfer.errors import FormatError, StreamError, VolumeError
from blockxfer.stream.receive import incoming
from blockxfer.volume import Volume

from .base import Openers, check_base, parse_base, restore_base
from .format import Meta, Slot, plane_runs
from .mirror import openers
from .store import DATA, Blocks, Directory


def _load(increments_dir: str) -> tuple[Directory, Slot, Meta]:
    d = Directory(increments_dir)
    slot, meta = d.state()
    if meta is None:
        raise VolumeError(f"{increments_dir} holds no complete base yet (the first mirror "
                          "update did not finish); run the mirror update again")
    return d, slot, meta


def _verify(d: Directory, slot: Slot, meta: Meta, o: Openers) -> None:
    """Read every held block and check it, before anything is written."""
    data = o.open_device(d.file(DATA))
    try:
        for _ in Blocks(d, slot, meta, data).read(plane_runs(meta.present)):
            pass
    finally:
        data.close()


def _target_state(target: str, slot: Slot, meta: Meta, o: Openers) -> str:
    """'new', 'current' (holds the newest state), 'base' (holds exactly the base:
    only the increments are left to do) or 'other'."""
    if not os.path.exists(target):
        return "new"
    dev = o.open_device(target)
    try:
        try:
            vol = Volume.open(dev, writable=False)
        except (FormatError, VolumeError):
            return "other"
        try:
            if vol.sb.uuid != slot.volume_uuid:
                return "other"
            if vol.generation == meta.header.root.generation:
                return "current"
            base = next((e for e in vol.snapshots() if e.guid == slot.base_guid), None)
            if base is not None and not base.incomplete and vol.generation == base.generation:
                return "base"
            return "other"
        finally:
            vol.io.close()
    finally:
        dev.close()


def reintegrate_plan(target: str, base_url: str, increments_dir: str) -> dict[str, object]:
    """What `reintegrate` would do (nothing is written; the increments are checked)."""
    o = openers()
    d, slot, meta = _load(increments_dir)
    medium = parse_base(base_url, o.is_tape)
    where = check_base(medium, slot, o)
    _verify(d, slot, meta, o)
    state = _target_state(target, slot, meta, o)
    return _summary(target, slot, meta, where, state, dry_run=True)


def _summary(target: str, slot: Slot, meta: Meta, where: str, state: str, *,
             dry_run: bool) -> dict[str, object]:
    h = meta.header
    return {"target": target, "base": where, "base_snapshot": slot.base_name,
            "increments": slot.updates, "snapshot": h.top.name,
            "generation": h.root.generation, "blocks": meta.present.count(),
            "bytes": meta.present.count() * slot.block_size,
            "snapshots": sorted(s.name for s in h.snapshot_set),
            "base_restored": state not in ("base", "current"),
            "up_to_date": state == "current", "dry_run": dry_run}


def reintegrate(target: str, base_url: str, increments_dir: str, *,
                force: bool = False) -> dict[str, object]:
    """Restore the base onto `target`, then the increments, then commit the newest
    root. `force` lets the base overwrite a target that holds something else."""
    o = openers()
    started = time.monotonic()
    d, slot, meta = _load(increments_dir)
    medium = parse_base(base_url, o.is_tape)
    where = check_base(medium, slot, o)
    _verify(d, slot, meta, o)
    state = _target_state(target, slot, meta, o)
    if state == "other" and not force:
        raise VolumeError(f"{target} already holds data (not this volume's base); use "
                          "--force to overwrite it")
    if state in ("new", "other"):
        restore_base(medium, slot, target, o, force=force, progress=None)
    if state != "current" and meta.header.top.guid != slot.base_guid:
        _apply(d, slot, meta, target, o)
    out = _summary(target, slot, meta, where, state, dry_run=False)
    out["seconds"] = round(time.monotonic() - started, 3)
    return out


def _apply(d: Directory, slot: Slot, meta: Meta, target: str, o: Openers) -> None:
    """The increments as one receive over the base: blocks placed at their VBNs,
    the deallocations handed over, the newest root committed last."""
    h = meta.header
    dev = o.open_device(target, write=True)
    try:
        vol = Volume.open(dev)
    except BaseException:
        dev.close()
        raise
    data = o.open_device(d.file(DATA))
    try:
        base = next((e for e in vol.snapshots() if e.guid == slot.base_guid), None)
        if base is None or base.incomplete or vol.generation != base.generation:
            raise StreamError(f"{target} does not hold the base {slot.base_name!r} as it was "
                              "restored; run reintegrate with --force to restore it again")
        r = vol.receiver(incoming(h))
        try:
            r.begin(resume=False)
            for vbn, view in Blocks(d, slot, meta, data).read(plane_runs(meta.present)):
                r.place(vbn, len(view) // slot.block_size, view, f"{d.path} block {vbn}")
            r.apply_deallocations(meta.dealloc)
            r.commit()
        finally:
            r.close()
    finally:
        data.close()
        vol.close()
