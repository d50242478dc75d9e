"""Server side of a stream endpoint: answer `wire` requests against local volumes.

`blockxfer stdio-serve` answers on its standard input and output (the far end of
`ssh://`, fit for a forced command in `authorized_keys`); `blockxfer tls-serve`
on each accepted TLS connection. Both hand the connection to `serve_session`
with a `Policy`: which volume may be named (a forced command pins one) and which
operations are allowed. A refused request is answered with the reason and
logged; it never touches a volume.

A connection carries one request, or a session of them: a request that asks
`keep` (a replication destination's service, pulling on a schedule) is granted
up to `max_keep` seconds, and after its result the server waits that long for the
next request on the same connection (EOF or the idle time ends it). Each request
is checked by the policy on its own and opens (and closes) its volume on its
own, exactly as on a new connection; an error ends the session.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from blockxfer.errors import BlockxferError, DeviceBusy, DeviceError, UsageError
from blockxfer.transport import wire
from blockxfer.transport.base import Result

if TYPE_CHECKING:
    from blockxfer.volume import Volume

log = logging.getLogger("blockxfer.endpoint")

OPERATIONS = ("send", "receive", "replicate")
# a mirror pushing here (transfer/mirror) also looks, and rolls local writes back:
# allowed to whoever may receive
MIRROR_OPS = {"inspect": "receive", "revert": "receive"}
REPLICATE_WAIT = 60.0                # seconds a pull waits for the volume (another pull, a receive)
MAX_KEEP = 600.0                     # default longest idle time a session is granted
# arms the idle timeout while the next request is awaited: TimeoutError when it passes
Idle = Callable[[float], AbstractContextManager[None]]


class PermissionDenied(DeviceError):
    """The peer asked for something its key or certificate does not allow."""


@dataclass(frozen=True)
class Policy:
    """What one peer may do: the volumes it may name (None: any) and the operations."""

    volumes: frozenset[str] | None = None
    allow: frozenset[str] = field(default_factory=lambda: frozenset(OPERATIONS))
    denied: str | None = None            # set: refuse every request with this reason

    def check(self, op: object, volume: object, peer: str) -> tuple[str, str]:
        if self.denied:
            raise PermissionDenied(f"{peer}: {self.denied}")
        if op not in OPERATIONS and op not in MIRROR_OPS:
            raise UsageError(f"unknown operation {op!r}; this endpoint does "
                             f"{', '.join(OPERATIONS)}")
        if not isinstance(volume, str) or not volume:
            raise UsageError("the request names no volume")
        if MIRROR_OPS.get(str(op), op) not in self.allow:
            raise PermissionDenied(f"{peer} may not {op} here (allowed: "
                                   f"{', '.join(sorted(self.allow)) or 'nothing'})")
        if self.volumes is not None and os.path.realpath(volume) not in {
                os.path.realpath(v) for v in self.volumes}:
            raise PermissionDenied(f"{peer} may not use {volume}: this key or certificate "
                                   "is for another volume")
        return str(op), volume


def preload() -> None:
    """Import what answering any request needs (the volume with numpy, the stream
    codecs, replication), before the request is read: the peer sends it only once
    its own start-up is done, so these imports, most of this side's start-up, run
    meanwhile instead of after it (stdio-serve is one process per request)."""
    import blockxfer.drivers.reader
    import blockxfer.handles
    import blockxfer.service.replication
    import blockxfer.service.session
    import blockxfer.transfer.replicate_source  # noqa: F401


def serve_request(r: wire.Reader, w: wire.Writer, policy: Policy,
                  peer: str) -> BlockxferError | None:
    """Answer one request (no session is granted); the error it ended with, if any
    (also sent to the peer and logged)."""
    return serve_session(r, w, policy, peer, max_keep=0.0, idle=None)


def serve_session(r: wire.Reader, w: wire.Writer, policy: Policy, peer: str, *,
                  max_keep: float, idle: Idle | None) -> BlockxferError | None:
    """Answer the first request, then, while each one asked `keep` and was granted
    it, the next ones on the same connection until EOF, an error or `idle` time
    without a request. The error the session ended with, if any."""
    kept, count = 0.0, 0
    while True:
        waiting = idle(kept) if count and idle is not None else contextlib.nullcontext()
        try:
            with waiting:
                req = wire.read_request(r)
        except wire.Closed as e:
            if not count:
                return _refuse(w, e, peer)
            log.info("%s: session closed after %d requests", peer, count)
            return None
        except TimeoutError:
            log.info("%s: session idle for %g s after %d requests: closed", peer, kept, count)
            return None
        except BlockxferError as e:
            return _refuse(w, e, peer)
        count += 1
        err, kept = _answer(r, w, policy, peer, req, max_keep)
        if err is not None or kept <= 0 or idle is None:
            return err


def _answer(r: wire.Reader, w: wire.Writer, policy: Policy, peer: str, req: dict[str, Any],
            max_keep: float) -> tuple[BlockxferError | None, float]:
    """One request: its error, or the idle time granted until the next one (0: none)."""
    try:
        op, volume = policy.check(req.get("op"), req.get("volume"), peer)
        log.info("%s: %s %s", peer, op, volume)
        if op == "replicate":
            result = _replicate(w, volume, req, peer)
        elif op in MIRROR_OPS:
            result = _mirror_op(op, volume, req)
        else:
            result = _receive(r, w, volume, req) if op == "receive" else _send(w, volume, req)
    except BlockxferError as e:
        return _refuse(w, e, peer), 0.0
    keep = req.get("keep")
    granted = 0.0
    if isinstance(keep, int | float) and not isinstance(keep, bool) and keep > 0:
        granted = float(min(keep, max_keep))
    wire.write_status(w, {**result, "kept": granted} if granted > 0 else result)
    log.info("%s: done %s", peer, result)
    return None, granted


def _refuse(w: wire.Writer, e: BlockxferError, peer: str) -> BlockxferError:
    log.warning("%s: refused or failed: %s", peer, e)
    with contextlib.suppress(OSError):   # the peer is gone: the log has it
        wire.write_status(w, error=e)
    return e


def _receive(r: wire.Reader, w: wire.Writer, volume: str, req: dict[str, Any]) -> Result:
    from blockxfer.service.session import receive_to
    wire.write_status(w, {"ready": True})
    frames = wire.FrameReader(r, "the sender")
    res = receive_to(volume, frames, force=bool(req.get("force")),   # also into a served one
                     source_hint="(the sender)")
    frames.drain()
    return {"top": res.top, "incremental": res.incremental, "blocks": res.blocks,
            "released": res.released, "incomplete": res.incomplete, "resumed": res.resumed}


def _mirror_op(op: str, volume: str, req: dict[str, Any]) -> Result:
    """A mirror's questions about its destination here: what it holds (`inspect`,
    with the plane an interrupted receive placed, so the update resumes block by
    block), and `revert` to the mirror's last snapshot `guid` (local writes are
    discarded, as for a local destination). A volume `blockxfer serve` owns is
    asked through its service (service/mirrordest.py), which answers the same."""
    from blockxfer.drivers.blockdev import open_device
    from blockxfer.transfer.mirror.target import LocalTarget, found_from_dict, found_to_dict

    from .session import server_for
    guid = req.get("guid")
    if op == "revert" and not isinstance(guid, str):
        raise UsageError("revert: the request names no snapshot guid")
    client = server_for(volume)
    if client is not None:
        if op == "inspect":               # the plane within the wire's limit again
            return found_to_dict(found_from_dict(client.call("mirror_inspect")))
        return dict(client.call("mirror_revert", guid=guid))
    target = LocalTarget(volume, open_device)
    if op == "inspect":
        return found_to_dict(target.look())
    try:
        return {"discarded": target.discard_local_changes(bytes.fromhex(str(guid)))}
    except ValueError as e:
        raise UsageError(f"revert: {guid!r} is not a snapshot guid") from e


class _ReadyOnFirstByte:
    """Says "ready" just before the first stream byte, so a send refused while it
    plans (bad expression or token) is answered with the reason instead."""

    def __init__(self, w: wire.Writer) -> None:
        self._w = w
        self.frames: wire.FrameWriter | None = None

    def write(self, data: bytes | bytearray | memoryview, /) -> int:
        if self.frames is None:
            wire.write_status(self._w, {"ready": True})
            self.frames = wire.FrameWriter(self._w)
        return self.frames.write(data)

    def flush(self) -> None:
        """Frames go out as they fill."""


def _send(w: wire.Writer, volume: str, req: dict[str, Any]) -> Result:
    from blockxfer.service.session import send_to
    expression, resume = req.get("expression"), req.get("resume")
    if not isinstance(expression, str) or not expression:
        raise UsageError("the request names no image expression")
    if resume is not None and not isinstance(resume, str):
        raise UsageError("the resume token must be a string")
    out = _ReadyOnFirstByte(w)
    try:
        return send_to(volume, expression, out, compress=bool(req.get("compress", True)),
                       resume=resume)
    finally:
        if out.frames is not None:
            out.frames.end()                 # then the status says whether it was whole


def _replicate(w: wire.Writer, volume: str, req: dict[str, Any], peer: str) -> Result:
    """A replication pull (blockxfer/transfer/replicate_source.py): the plan is the
    "ready" answer, the stream follows when the plan has one. A volume another
    process holds open (`blockxfer serve`, or a pull receiving into it on a middle
    host of a tree) is answered by that process, through its control socket."""
    from blockxfer.service.control import ServerNotRunning
    from blockxfer.service.replication import answer_from_holder
    from blockxfer.service.session import server_for
    from blockxfer.transfer.replicate_source import PullRequest
    identity = _identity(peer)
    PullRequest.from_wire(req, identity)          # a malformed pull is refused here
    deadline = time.monotonic() + REPLICATE_WAIT
    while True:
        client = server_for(volume)
        if client is not None:
            try:
                return answer_from_holder(client, w, req, identity)
            except ServerNotRunning:     # it let go meanwhile (a pull ended): open it here
                if time.monotonic() > deadline:
                    raise
                continue
        with contextlib.ExitStack() as stack:
            vol = _try_open(stack, volume, deadline)
            if vol is not None:
                return _replicate_here(w, vol, req, identity)
        time.sleep(0.25)


def _replicate_here(w: wire.Writer, vol: Volume, req: dict[str, Any], identity: str) -> Result:
    from blockxfer.drivers.reader import read_runs
    from blockxfer.transfer.replicate_source import PullRequest, serve_pull
    frames: list[wire.FrameWriter] = []      # set when the plan has a stream

    def ready(plan: Result) -> wire.FrameWriter:
        wire.write_status(w, plan)
        out = wire.FrameWriter(w)
        if plan.get("stream"):
            frames.append(out)
        return out
    try:
        return serve_pull(vol, PullRequest.from_wire(req, identity), ready,
                          lambda runs: read_runs(vol.dev, runs, vol.block_size))
    finally:
        if frames:
            with contextlib.suppress(OSError):   # the peer is gone: the log has it
                frames[0].end()          # then the status says whether it was whole


def _identity(peer: str) -> str:
    """Who authenticated: the certificate's name for TLS, the client address for ssh."""
    if peer == "ssh peer":
        client = os.environ.get("SSH_CLIENT", "").split(" ")[0]
        return f"ssh {client}" if client else "ssh (local)"
    return peer


def _try_open(stack: contextlib.ExitStack, path: str, deadline: float) -> Volume | None:
    """The volume opened for writing, or None while another process holds it (a
    pull receiving a full image, a command) and the deadline has not passed."""
    from blockxfer.handles import open_volume
    try:
        return stack.enter_context(open_volume(path, write=True))
    except DeviceBusy:
        if time.monotonic() > deadline:
            raise
        return None
