"""Volume replication, the destination's side: one pull (`pull_once`), or a loop of them.

The destination starts it (the patent's step 351): it names its whole masters
(newest first), the masters its own destinations need, and, after a cut
connection, the interrupted stream with its resume token and ticket. The source
answers with a plan (full, incremental or current) and the stream
(replicate_source.py). Before anything is received the target is checked
against the plan: a target changed here since its newest master, or one that
must go back to an older master, or a volume that shares no master with the
source, is rolled back (or overwritten by the full image) only with
`rollback`; otherwise the pull is refused with the reason (exit 5) and the
target is untouched. The receive is atomic: a middle host of a tree keeps
serving its newest complete master meanwhile. An incremental is received into
the target held open (`OpenTarget`): by the service that serves it, or by this
pull itself (`host`), which answers its children's pulls on the volume's
control socket while the blocks arrive (blockxfer/service/replication.py).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from typing import Any

from blockxfer.errors import BlockxferError, DeviceBusy, StreamError, VolumeError
from blockxfer.stream.io import ByteSource
from blockxfer.stream.receive import OpenDevice, ReceiveResult, receive_into, receive_stream
from blockxfer.transport import Result, Sessions, Source, open_pull, scheme_of
from blockxfer.volume import Volume
from blockxfer.volume.rewind import rewind_to

from .replicate_state import PullState
from .replicate_target import Target, from_volume, inspect_target

Progress = Callable[[int], None]
BUSY_WAIT = 60.0                 # seconds a pull waits for its target (a child's pull there)
KEEP_SLACK = 30.0                # a repeated pull's connection is kept its interval + this


@dataclass
class OpenTarget:
    """The target volume open in this process, shared with other users under `lock`:
    a served volume (its service runs the pull), or the pull's own volume while it
    receives an incremental and answers its children's pulls (`Host`). Blocks are
    received into VBNs free in the committed state and the root is committed last
    (`receive_into`), so its newest complete master stays readable meanwhile."""

    vol: Volume
    lock: AbstractContextManager[Any]
    owner: str = "the service that serves it ('blockxfer serve')"

    def inspect(self) -> Target:
        t = Target(self.vol.dev.path, exists=True)
        with self.lock:
            from_volume(t, self.vol)
        return t

    def rewind(self, master: str) -> list[str]:
        with self.lock:
            e = self.vol.resolve(master)
            after = [s.name for s in self.vol.snapshots() if s.generation > e.generation]
            self.vol.revert_to_received(master)
        return after

    def receive(self, src: ByteSource, source_hint: str) -> ReceiveResult:
        return receive_into(src, self.vol, lock=self.lock, source_hint=source_hint)


Host = Callable[[str], AbstractContextManager[OpenTarget]]


@dataclass
class PullRecord:
    """One pull, as `replicate pull --json` prints it and `replicate status` keeps it."""

    source: str
    target: str
    name: str
    kind: str = "current"                   # full, incremental, current
    top: str | None = None
    base: str | None = None
    blocks: int = 0
    bytes: int = 0
    seconds: float = 0.0
    rate: float = 0.0                       # bytes per second of stream
    resumed: bool = False
    rolled_back: str | None = None          # the master the target went back to
    discarded: list[str] = field(default_factory=list)
    released: list[str] = field(default_factory=list)
    dropped_holds: list[str] = field(default_factory=list)  # a full image kept the rest
    started: float = 0.0
    elapsed: float = 0.0                    # seconds of the whole pull, ask to record
    dry_run: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def stop_clock(self) -> None:
        """The pull is over (recorded, or a dry run answered): its `elapsed`."""
        self.elapsed = round(time.time() - self.started, 3)


class _Counting:
    """The stream source, counting its bytes (and reporting them as progress)."""

    def __init__(self, src: Source, progress: Progress | None) -> None:
        self._src, self._progress = src, progress
        self.bytes = 0

    def read(self, n: int = -1, /) -> bytes:
        data = self._src.read(n)
        self.bytes += len(data)
        if self._progress and data:
            self._progress(len(data))
        return data


def _request(t: Target, state: PullState, name: str, *, dry_run: bool, compress: bool,
             bwlimit: int | None, resume: bool) -> dict[str, Any]:
    req: dict[str, Any] = {"dest": name, "have": [g.hex() for _, g in t.masters],
                           "needed": [g.hex() for g in t.needed], "dry_run": dry_run,
                           "compress": compress, "bwlimit": bwlimit}
    p, i = state.pending, t.interrupted
    if resume and p and i and p.get("id") == i.stream_id and not dry_run:
        req.update(resume=i.token, ticket=p.get("ticket"),
                   stream={k: p.get(k) for k in ("id", "expression", "top_guid", "base_guid")})
    return req


def _check(t: Target, plan: Result, rollback: bool, source: str) -> tuple[str | None, bool]:
    """What the target must do before it receives the plan: the master to roll back
    to (None: nothing) and whether a full image may overwrite it. Refuses (exit 5)
    what only --rollback allows."""
    kind, base = plan["kind"], plan.get("base")
    if plan.get("resumed"):
        return None, True
    if kind == "full":
        if t.volume and not rollback:
            raise VolumeError(f"{t.path} shares no master with {source} (or the source no "
                              "longer holds it): only a full image would do, which replaces "
                              "what it holds; pull with --rollback to allow that")
        return None, rollback or t.marker
    newest = t.newest_master
    back = t.diverged is not None or newest is None or newest[1].hex() != plan["base_guid"]
    if not back:
        return None, False
    why = t.diverged or (f"its newest master {newest[0] if newest else None!r} is not one the "
                         f"source holds; the newest they share is {base!r}")
    if not rollback:
        raise VolumeError(f"{t.path} cannot take the update from {source}: {why}; pull with "
                          f"--rollback to discard that and go back to master {base!r}")
    return base, False


def pull_once(source: str, target: str, open_device: OpenDevice, *, name: str | None = None,
              rollback: bool = False, bwlimit: int | None = None, dry_run: bool = False,
              compress: bool = True, progress: Progress | None = None,
              opened: OpenTarget | None = None, host: Host | None = None,
              sessions: Sessions | None = None, keep: float = 0.0) -> PullRecord:
    """One pull of the source's newest master into `target` (see the module text).
    `opened`: the target is open in this process (a service's; incrementals only).
    `host`: how this pull holds the target open while it receives an incremental,
    answering its children's pulls meanwhile (a middle host of a tree).
    `sessions`: the connection to the source kept open between pulls (a service's
    schedule), taken from and given back to them; `keep`: the seconds the source is
    asked to keep it open after this pull."""
    name = name or socket.gethostname()
    open_device = _patient(open_device)
    rec = PullRecord(source, target, name, started=time.time(), dry_run=dry_run)
    state = PullState.load(target)
    t = opened.inspect() if opened is not None else inspect_target(target, open_device)
    if t.diverged and not rollback:
        raise VolumeError(f"{target} cannot take updates from {source}: {t.diverged}; pull "
                          "with --rollback to discard the changes made here")
    def ask(resume: bool) -> tuple[Result, Source]:
        req = _request(t, state, name, dry_run=dry_run, compress=compress, bwlimit=bwlimit,
                       resume=resume)
        if sessions is not None and scheme_of(source) in ("ssh", "tls"):
            pull = sessions.pull(source, req, keep)
            return pull.plan, pull
        return open_pull(source, req)
    try:
        plan, src = ask(True)
    except StreamError as e:                 # the source cannot resume that stream: anew
        if not (t.interrupted and state.pending and _stale(e)):
            raise
        state.pending = None
        state.save()
        plan, src = ask(False)
    with src:
        _fill(rec, plan)
        back, force = _check(t, plan, rollback, source)
        if opened is not None and plan["kind"] == "full":
            raise VolumeError(f"{target} is open in {opened.owner}: it takes incremental "
                              f"pulls only, and {source} can only send a full image, which "
                              "would replace what its users see; stop it and pull again")
        if dry_run:
            rec.stop_clock()
            return rec
        if back is not None:
            rec.rolled_back, rec.discarded = back, (
                opened.rewind(back) if opened is not None else _rewind(target, back, open_device))
        if plan["kind"] != "current":
            carry = _carry(state, t, plan)
            apply = _applier(target, open_device, plan, force, carry, rec.source, opened, host)
            _receive(src, target, open_device, state, plan, rec, progress, carry, apply)
    _reached(state, source, name, plan, rec)
    return rec


def _patient(open_device: OpenDevice) -> OpenDevice:
    """`open_device` that waits a while for a target another process holds: on a
    middle host of a tree, a child's pull holds it while it is answered."""
    def opener(path: str, **kw: Any) -> Any:
        deadline = time.monotonic() + BUSY_WAIT
        while True:
            try:
                return open_device(path, **kw)
            except DeviceBusy:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.25)
    return opener


def _stale(e: StreamError) -> bool:
    """The source's answer that the interrupted stream can no longer be resumed (its
    snapshots are gone, or the token is for another image): pull anew."""
    return any(s in str(e) for s in ("no longer holds the snapshots",
                                     "belongs to another image"))


def _fill(rec: PullRecord, plan: Result) -> None:
    rec.kind, rec.top, rec.base = plan["kind"], plan.get("top"), plan.get("base")
    rec.resumed = bool(plan.get("resumed"))
    rec.blocks = int(plan.get("blocks") or 0)


def _rewind(target: str, master: str, open_device: OpenDevice) -> list[str]:
    dev = open_device(target, write=True)
    try:
        return rewind_to(dev, master)
    finally:
        dev.close()


@dataclass
class Carry:
    props: dict[str, str] = field(default_factory=dict)     # hex values
    held: list[Any] = field(default_factory=list)           # (name, guid hex, tags)


def _carry(state: PullState, t: Target, plan: Result) -> Carry:
    """What a full image keeps of the volume it overwrites: its local properties (a
    middle host's registry of destinations, their holds, its ticket secret) and
    its holds by name. Taken from the volume before it is overwritten, and kept in
    the pending stream, so an interrupted full receive (the old volume gone
    already) still carries them when it resumes or starts over."""
    if plan["kind"] != "full":
        return Carry()
    if not t.volume:
        old = state.pending or {}
        return Carry(dict(old.get("carry") or {}), [tuple(h) for h in old.get("held") or []])
    return Carry({k: v.hex() for k, v in t.props.items()}, list(t.held))


Apply = Callable[[ByteSource], ReceiveResult]


def _applier(target: str, open_device: OpenDevice, plan: Result, force: bool, carry: Carry,
             hint: str, opened: OpenTarget | None, host: Host | None) -> Apply:
    """How the stream is received: into the volume open here, into the volume this
    pull holds open while it answers its children (an incremental), or by path."""
    if opened is not None:
        return lambda src: opened.receive(src, hint)
    if host is not None and plan["kind"] == "incremental":
        def hosted(src: ByteSource) -> ReceiveResult:
            with host(target) as o:
                return o.receive(src, hint)
        return hosted
    props = {k: bytes.fromhex(v) for k, v in carry.props.items()} if carry.props else None
    return lambda src: receive_stream(src, target, open_device, force=force,
                                      source_hint=hint, carry=props)


def _receive(src: Source, target: str, open_device: OpenDevice, state: PullState,
             plan: Result, rec: PullRecord, progress: Progress | None,
             carry: Carry, apply: Apply) -> None:
    """Receive the plan's stream; the pending stream (with its ticket, and what a
    full image carries over) is recorded first, so a cut one resumes on the next
    pull."""
    state.pending = {"id": plan["stream_id"], "expression": plan["expression"],
                     "top": plan["top"], "top_guid": plan["top_guid"],
                     "base_guid": plan.get("base_guid"), "ticket": plan.get("ticket"),
                     "source": rec.source}
    if carry.props or carry.held:
        state.pending.update(carry=carry.props, held=carry.held)
    state.save()
    counted = _Counting(src, progress)
    t0 = time.monotonic()
    try:
        res = apply(counted)
        src.finish()
    except BlockxferError as e:
        cause = e.__cause__ if isinstance(e.__cause__, BlockxferError | OSError) else e
        raise type(e)(f"{target}: the pull of {plan['top']!r} from {rec.source} stopped: "
                      f"{_first_clause(cause)}; the next pull resumes it") from e
    rec.seconds = round(time.monotonic() - t0, 3)
    rec.bytes = counted.bytes
    rec.rate = round(rec.bytes / rec.seconds, 1) if rec.seconds else 0.0
    rec.blocks, rec.released = res.blocks, list(res.released)
    if carry.held:
        rec.dropped_holds = _dropped(target, open_device, carry.held)


def _dropped(target: str, open_device: OpenDevice, held: list[Any]) -> list[str]:
    """The holds a full image could not keep: their snapshots are gone here (or no
    longer whole), as `NAME (TAG, ...)`."""
    dev = open_device(target, write=False)
    try:
        vol = Volume.open(dev, writable=False)
        try:
            kept = {e.guid.hex() for e in vol.snapshots() if e.name in vol.holds()}
        finally:
            vol.io.close()
    finally:
        dev.close()
    return [f"{name} ({', '.join(tags)})" for name, guid, tags in held if guid not in kept]


def _first_clause(e: BaseException) -> str:
    return str(e).split("; resume with")[0]


def _reached(state: PullState, source: str, name: str, plan: Result, rec: PullRecord) -> None:
    state.source, state.name, state.pending = source, name, None
    state.master = plan.get("top")
    rec.stop_clock()
    state.record(rec.as_dict())
    state.save()


def pull_every(source: str, target: str, open_device: OpenDevice, interval: float, *,
               report: Callable[[PullRecord | BlockxferError], None], **options: Any) -> None:
    """Pull now and then every `interval` seconds, in the foreground, until
    interrupted; a failed pull is reported and the next one tries again (and
    resumes what it cut). The connection to the source is kept open between pulls
    (the far side ends it after its idle time; a closed one is replaced)."""
    sessions = Sessions()
    try:
        while True:
            t0 = time.monotonic()
            try:
                report(pull_once(source, target, open_device, sessions=sessions,
                                 keep=interval + KEEP_SLACK, **options))
            except BlockxferError as e:
                report(e)
            time.sleep(max(0.0, interval - (time.monotonic() - t0)))
    finally:
        sessions.close()
