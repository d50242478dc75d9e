"""The source's side of a replication pull (the patent's steps 351-355).

A destination names its newest master (and the other masters it holds whole,
newest first) and asks for an update. The source takes its newest master (the
`master` pointer when it names a master, else the newest master snapshot) and
the newest master the two have in common: the stream is the incremental from
that common master to its newest one (step 354), the full image of its newest
master when they share none or the source no longer holds it (step 355), or
nothing when the destination is already there. Before the plan is answered
the destination is recorded (replicate_registry) and the masters it needs are
held; a resumed pull is checked against its ticket (replicate_ticket). The
volume is opened by the caller (the service's endpoint), which also speaks the
wire: `ready(plan)` answers the plan and returns where the stream goes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass
from typing import Any

from blockxfer.errors import DeviceError, StreamError, UsageError, VolumeError
from blockxfer.stream.send import Reader, SendPlan, plan_send, stream_plan
from blockxfer.transport.base import ByteSink, Result
from blockxfer.volume import Volume
from blockxfer.volume.layout import SnapshotEntry

from . import replicate_registry as registry
from . import replicate_ticket as tickets
from .replicate_limit import Limited, TokenBucket
from .replicate_ticket import ResumeRefused

MASTER_POINTER = "master"
MAX_HAVE = 256
Ready = Callable[[Result], ByteSink]


@dataclass(frozen=True)
class PullRequest:
    """What a destination asks for (the wire request, checked)."""

    dest: str
    identity: str
    have: tuple[bytes, ...] = ()           # its whole masters, newest first
    needed: tuple[bytes, ...] = ()         # masters its own destinations still need
    resume: str | None = None
    ticket: str | None = None
    stream: dict[str, Any] | None = None   # the interrupted stream a resume continues
    dry_run: bool = False
    compress: bool = True
    bwlimit: int | None = None

    @classmethod
    def from_wire(cls, req: dict[str, Any], identity: str) -> PullRequest:
        dest = req.get("dest")
        if not isinstance(dest, str) or not dest or len(dest) > 64 or not dest.isprintable():
            raise UsageError("the pull names no destination (a printable name of up to "
                             "64 characters)")
        guids, needed = _guids(req.get("have")), _guids(req.get("needed"))
        resume, ticket, stream = req.get("resume"), req.get("ticket"), req.get("stream")
        if resume is not None and (not isinstance(resume, str) or not isinstance(stream, dict)):
            raise UsageError("a resumed pull names its token and its stream")
        bw = req.get("bwlimit")
        if bw is not None and (not isinstance(bw, int) or bw <= 0):
            raise UsageError("the pull's bandwidth limit is not a positive integer")
        return cls(dest, identity, guids, needed, resume,
                   ticket if isinstance(ticket, str) else None,
                   stream if isinstance(stream, dict) else None, bool(req.get("dry_run")),
                   bool(req.get("compress", True)), bw)


def _guids(items: object) -> tuple[bytes, ...]:
    if items is None:
        return ()
    if not isinstance(items, list) or len(items) > MAX_HAVE:
        raise UsageError("the pull's list of masters is malformed")
    try:
        return tuple(bytes.fromhex(g) for g in items)
    except (TypeError, ValueError) as e:
        raise UsageError("the pull's list of masters is malformed") from e


def masters(vol: Volume) -> list[SnapshotEntry]:
    """The masters this volume holds whole, oldest first."""
    return sorted((e for e in vol.snapshots() if e.master and not e.shadow
                   and not e.incomplete and e.root is not None), key=lambda e: e.generation)


def newest_master(vol: Volume) -> SnapshotEntry:
    whole = masters(vol)
    target = vol.catalog.pointers.get(MASTER_POINTER)
    pointed = next((e for e in whole if e.id == target), None)
    if pointed is not None:
        return pointed
    if not whole:
        raise VolumeError(f"{vol.dev.path} has no master snapshot to replicate; take one "
                          "with 'blockxfer snapshot --master VOLUME@NAME'")
    return whole[-1]


def common_master(vol: Volume, top: SnapshotEntry,
                  have: tuple[bytes, ...]) -> SnapshotEntry | None:
    """The newest master the destination holds that this volume still holds whole
    and that is not newer than `top` (step 353)."""
    mine = {e.guid: e for e in masters(vol) if e.generation <= top.generation}
    found = [mine[g] for g in have if g in mine]
    return max(found, key=lambda e: e.generation) if found else None


@dataclass
class Decision:
    kind: str                               # full, incremental, current
    top: SnapshotEntry
    base: SnapshotEntry | None
    expression: str
    plan: SendPlan | None


def decide(vol: Volume, req: PullRequest) -> Decision:
    if req.resume is not None:
        return _resumed(vol, req)
    top = newest_master(vol)
    base = common_master(vol, top, req.have)
    if base is not None and base.guid == top.guid:
        return Decision("current", top, base, top.name, None)
    expression = top.name if base is None else f"{top.name} - {base.name}"
    plan = plan_send(vol, expression)
    return Decision("full" if base is None else "incremental", top, base, expression, plan)


def _resumed(vol: Volume, req: PullRequest) -> Decision:
    """A resume continues exactly the stream its ticket names, or is refused."""
    s = req.stream or {}
    try:
        stream_id = bytes.fromhex(str(s.get("id")))
        top_guid = bytes.fromhex(str(s.get("top_guid")))
        base_guid = bytes.fromhex(str(s["base_guid"])) if s.get("base_guid") else None
        expression = str(s.get("expression"))
    except ValueError as e:
        raise ResumeRefused(f"{req.identity}: resume refused: its stream is malformed") from e
    key = tickets.secret(vol, create=False)
    if not tickets.valid(key, req.ticket, vol.sb.uuid, req.dest, stream_id, expression,
                         top_guid, base_guid):
        raise ResumeRefused(f"{req.identity}: resume refused: the ticket does not match "
                               f"the stream, volume and destination it names ({req.dest})")
    by_guid = {e.guid: e for e in vol.snapshots()}
    top, base = by_guid.get(top_guid), by_guid.get(base_guid) if base_guid else None
    if top is None or (base_guid is not None and base is None):
        raise StreamError(f"{vol.dev.path} no longer holds the snapshots of the interrupted "
                          "stream; pull again without resuming")
    plan = plan_send(vol, expression, resume=req.resume)
    if plan.header.stream_id != stream_id or plan.header.top.guid != top_guid or (
            (plan.header.base.guid if plan.header.base else None) != base_guid):
        raise ResumeRefused(f"{req.identity}: resume refused: the token names another "
                               "stream than its ticket")
    return Decision("full" if base is None else "incremental", top, base, expression, plan)


def _check_owner(vol: Volume, req: PullRequest) -> None:
    """A destination name first registered by a certificate stays that certificate's:
    another peer may not move its holds or use its tickets under that name. (An ssh
    identity is only the client's address, which may change, so it binds nothing.)"""
    prev = registry.load(vol).get(req.dest)
    if prev is None or prev.id.startswith("ssh "):
        return
    if prev.id.split("@")[0] != req.identity.split("@")[0]:
        raise ResumeRefused(f"{req.identity}: destination {req.dest!r} is registered to "
                            f"{prev.id.split('@')[0]!r} on this source; pull under another "
                            "--name, or 'blockxfer replicate forget' it here first")


def _needs(vol: Volume, d: Decision, req: PullRequest) -> set[str]:
    """The masters held for this destination: its base and top, and those its own
    destinations still need from it (step 352: a middle host of a tree keeps its
    children's bases alive at its parent, since its receives follow the parent's
    catalog)."""
    keep = {d.top.name} | ({d.base.name} if d.base else set())
    return keep | {e.name for e in masters(vol) if e.guid in req.needed}


def _unconfirmed(vol: Volume, prev: registry.Destination | None,
                 req: PullRequest) -> set[str]:
    """What stays held for this destination beyond what the request needs when it
    confirms no master as new as the one last sent to it: the destination may hold
    that one already (its pull committed it, then was cut or killed before the next
    confirmed it), or the request is a stale one (a killed pull's, answered late,
    after the next pull's), whose `needed` may be older too. So the holds it had
    stay, until a pull names that master or a newer one."""
    if prev is None or prev.s is None:
        return set()
    kept = masters(vol)
    gen = {e.guid: e.generation for e in kept}
    sent = next((e for e in kept if e.name == prev.s), None)
    newest = gen.get(req.have[0]) if req.have else None
    if sent is None or (newest is not None and newest >= sent.generation):
        return set()
    tag = registry.hold_tag(req.dest)
    return {sent.name} | {n for n, tags in vol.holds().items() if tag in tags}


def _confirmed(vol: Volume, prev: registry.Destination | None,
               req: PullRequest) -> tuple[str, bytes] | None:
    """The newest master the destination has confirmed: the one its request names,
    unless an earlier request confirmed a newer one still kept here, which makes this
    request a stale one answered late: the registry's "confirmed" never moves back."""
    kept = masters(vol)
    named = next((e for e in kept if req.have and e.guid == req.have[0]), None)
    before = next((e for e in kept if prev is not None and prev.mg is not None
                   and registry.short(e.guid) == prev.mg), None)
    if before is not None and named is not None and before.generation > named.generation:
        named = before
    return None if named is None else (named.name, named.guid)


def serve_pull(vol: Volume, req: PullRequest, ready: Ready, reader: Reader,
               lock: AbstractContextManager[Any] | None = None) -> Result:
    """Answer one pull on the open volume: record, hold, plan, stream. With `lock`
    (a service's volume lock; a pull's own while it receives) the metadata work is
    done under it and the stream outside it, its snapshots held against destroy."""
    with ExitStack() as held:
        with lock or nullcontext():
            info, d = _plan(vol, req)
            if info["stream"]:       # held before the lock goes: a receive committing
                assert d.plan is not None     # meanwhile may not release them
                held.enter_context(vol.holding(d.plan.tops))
        out = ready(info)
        if not info["stream"]:
            return {}
        assert d.plan is not None
        if req.bwlimit:
            out = Limited(out, TokenBucket(req.bwlimit))
        t0 = time.monotonic()
        try:
            stats = stream_plan(d.plan, out, reader, compress=req.compress)
        except OSError as e:                  # the destination went away: it resumes later
            raise DeviceError(f"{req.identity}: the destination stopped reading the stream "
                              f"({e.strerror or e})") from e
    with lock or nullcontext():
        registry.finished(vol, req.dest, stats.bytes, time.monotonic() - t0)
    return {"records": stats.records, "data_blocks": stats.data_blocks, "bytes": stats.bytes}


def _plan(vol: Volume, req: PullRequest) -> tuple[Result, Decision]:
    """Check, decide, record the destination and move its holds: the plan's answer."""
    _check_owner(vol, req)
    d = decide(vol, req)
    if not req.dry_run:
        prev = registry.load(vol).get(req.dest)
        confirmed = _confirmed(vol, prev, req)
        sent = _unconfirmed(vol, prev, req)
        registry.contact(vol, req.dest, req.identity, confirmed, d.top.name)
        registry.hold_only(vol, req.dest, _needs(vol, d, req) | sent)
    info: Result = {"kind": d.kind, "top": d.top.name, "top_guid": d.top.guid.hex(),
                    "base": d.base.name if d.base else None,
                    "base_guid": d.base.guid.hex() if d.base else None,
                    "expression": d.expression, "resumed": req.resume is not None,
                    "stream": d.plan is not None and not req.dry_run}
    if d.plan is not None:
        h = d.plan.header
        info.update(blocks=int(d.plan.plane.count()), block_size=vol.block_size,
                    stream_id=h.stream_id.hex())
        if not req.dry_run:
            key = tickets.secret(vol, create=True)
            assert key is not None
            info["ticket"] = tickets.ticket(key, vol.sb.uuid, req.dest, h.stream_id,
                                            d.expression, d.top.guid,
                                            d.base.guid if d.base else None)
    return info, d
