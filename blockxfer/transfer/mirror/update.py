"""One mirror update: the patent's steps 333-335 (timer hit, incremental volume
copy, image stream to the destination), made restartable.

Order of durable steps on the source, each safe to be killed after:
  1. the update is recorded as pending (its snapshot name and stream id);
  2. the snapshot is taken, cutting the mark-on-allocate buffers at its CP;
  3. it is held (tag `mirror`), so nothing destroys it while it is needed;
  4. the stream goes to the destination, which commits atomically at its end;
  5. the mirror state names the new snapshot as the destination's;
  6. the previous snapshot is released and destroyed.
A restart finds the pending update and finishes it: a destination that already
holds its snapshot is not sent it again; one holding part of it (its plane of
received blocks) gets the rest. The first update sends the full image.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from blockxfer.errors import BlockxferError, StreamError, UsageError, VolumeError
from blockxfer.stream.send import Reader, SendPlan, plain_reader, stream_plan
from blockxfer.volume import Volume
from blockxfer.volume.tracking import Changes

from . import state
from .plan import plan_changes, plan_planes, resume_plan
from .state import PREFIX, TAG, Last, MirrorState, Pending
from .target import Found, Target, UrlTarget

log = logging.getLogger("blockxfer.mirror")
Clock = Callable[[], float]
Lock = AbstractContextManager[Any]
_OURS = re.compile(re.escape(PREFIX) + r"(\d+)$")


def run_update(vol: Volume, target: Target, *, reader: Reader | None = None,
               progress: Callable[[int], None] | None = None,
               clock: Clock = time.time, lock: Lock | None = None) -> dict[str, Any]:
    """One update of the mirror configured on `vol` (open for writing) into `target`;
    what it did, as `mirror update --json` prints it. A failure is recorded in the
    mirror state (for `mirror status`) and raised.

    `lock` is the volume lock of a service that shares `vol` with NBD clients: the
    source's metadata steps (state, snapshot, hold, plan, release) run under it,
    the stream runs outside it (the mirror snapshot's hold keeps its blocks put),
    so the clients keep writing during an update."""
    guard = lock if lock is not None else nullcontext()
    with guard:
        st = state.load(vol, vol.dev.path)
    if st.incremental_mode:
        raise UsageError(f"{vol.dev.path} mirrors incrementally (--increments); its updates "
                         "run through transfer.increments")
    t0 = clock()
    try:
        return _update(vol, st, target, reader or plain_reader(vol), progress, clock, t0,
                       guard)
    except BlockxferError as e:
        st.failed(str(e), clock())
        with guard:
            vol.forget_cut()       # the next update subtracts planes, then tracks again
            try:
                state.save(vol, st)
            except BlockxferError as again:
                log.warning("could not record the failure in %s: %s", vol.dev.path, again)
        raise


def _update(vol: Volume, st: MirrorState, target: Target, reader: Reader,
            progress: Callable[[int], None] | None, clock: Clock, t0: float,
            guard: Lock) -> dict[str, Any]:
    retry = st.pending is not None or st.fails > 0     # a remote one is looked at then
    with guard:
        tidy(vol, st)
        top, changes = _begin(vol, st)
        e = vol.resolve(top)
    assert st.pending is not None
    found = target.look(thorough=retry)
    if found is not None and found.newest == e.guid:
        got: dict[str, Any] = {"blocks": 0, "resumed": False}
        sent, kind, plan = None, "already there", None
    else:
        with guard:
            plan, kind = _plan(vol, st, changes, found)
        if st.guid is not None and target.discard_local_changes(bytes.fromhex(st.guid)):
            log.info("%s: discarded what was written there since %s", target.name, st.snap)
        compress = isinstance(target, UrlTarget)     # a store decodes it right here
        try:
            got = target.receive(lambda sink: stream_plan(plan, sink, reader,
                                                          compress=compress,
                                                          progress=progress),
                                 force=st.pending.full and st.force)
        except (StreamError, VolumeError):
            if found is not None or not target.holds_newest(top, e.guid):
                raise
            got, kind = {"blocks": 0, "resumed": False}, "already there"
        sent = got.get("stats")
    old = st.snap
    st.snap, st.guid, st.pending = top, e.guid.hex(), None
    st.last = Last(t=round(clock(), 3), snap=top, cp=e.generation,
                   created=round(e.created / 1e9, 3), bytes=sent.bytes if sent else 0,
                   blocks=sent.data_blocks if sent else 0,
                   freed=plan.header.dealloc_blocks if plan else 0,
                   dur=round(clock() - t0, 3), kind=kind)
    st.err, st.err_t, st.fails = None, None, 0
    with guard:
        state.save(vol, st)
        if old is not None and old != top:
            _drop(vol, old)
    log.info("%s -> %s: %s up to %s, %d blocks, %d bytes in %.2f s", vol.dev.path,
             target.name, kind, top, st.last.blocks, st.last.bytes, st.last.dur)
    return {"volume": vol.dev.path, "destination": target.name, "snapshot": top,
            "cp": e.generation, "kind": kind, "blocks": st.last.blocks,
            "bytes": st.last.bytes, "freed": st.last.freed, "seconds": st.last.dur,
            "resumed": bool(got.get("resumed"))}


def _begin(vol: Volume, st: MirrorState) -> tuple[str, Changes | None]:
    """The update's snapshot: the pending one (taken, or to be taken, before a
    restart), or a new one, which cuts the mark-on-allocate buffers."""
    names = set(vol.snapshot_names())
    if st.pending is None:
        while f"{PREFIX}{st.seq}" in names:
            st.seq += 1
        st.pending = Pending(f"{PREFIX}{st.seq}", os.urandom(16).hex(), st.snap is None)
        st.seq += 1
        state.save(vol, st)
    top, changes = st.pending.top, None
    if top not in names:
        changes = vol.snapshot_changes(top)
    if TAG not in vol.holds().get(top, set()):
        vol.hold(top, TAG)
    return top, changes


def _plan(vol: Volume, st: MirrorState, changes: Changes | None,
          found: Found | None) -> tuple[SendPlan, str]:
    assert st.pending is not None
    sid = bytes.fromhex(st.pending.sid)
    if st.snap is None:
        plan, kind = plan_planes(vol, st.pending.top, None, sid), "full"
    else:
        if found is not None and st.guid is not None and \
                bytes.fromhex(st.guid) not in found.snapshots:
            raise VolumeError(f"the destination no longer holds {st.snap} (the mirror's last "
                              "snapshot); start the mirror again with --force for a full image")
        if changes is not None and changes.base == st.snap:
            plan, kind = plan_changes(vol, changes, sid), "incremental (mark-on-allocate)"
            plan.header.stream_id = sid
        else:
            plan = plan_planes(vol, st.pending.top, st.snap, sid)
            kind = "incremental (plane difference)"
    if found is not None and found.pending == sid and found.received is not None:
        plan = resume_plan(plan, found.received)
        kind += ", resumed"
    return plan, kind


def tidy(vol: Volume, st: MirrorState) -> None:
    """Release and destroy the mirror's snapshots it no longer needs (left by a kill
    between steps 5 and 6)."""
    keep = {st.snap, st.pending.top if st.pending else None}
    holds = vol.holds()
    for name in vol.snapshot_names():
        m = _OURS.match(name)
        if m and name not in keep and int(m.group(1)) < st.seq \
                and holds.get(name, {TAG}) <= {TAG}:
            _drop(vol, name)


def _drop(vol: Volume, name: str) -> None:
    try:
        if TAG in vol.holds().get(name, set()):
            vol.release(name, TAG)
        vol.destroy_snapshot(name)
    except BlockxferError as e:      # a pointer or a send still uses it: the next update
        log.warning("%s: kept %s for now: %s", vol.dev.path, name, e)


def forget_mirror(vol: Volume) -> list[str]:
    """Drop the mirror: release its holds, destroy the snapshots only it held, and
    remove its state; the names destroyed."""
    gone = []
    for name, tags in vol.holds().items():
        if TAG in tags and name.startswith(PREFIX):
            vol.release(name, TAG)
            if tags == {TAG}:
                vol.destroy_snapshot(name)
                gone.append(name)
    state.forget(vol)
    return gone
