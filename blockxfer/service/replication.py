"""Replication in a process that holds a volume open: a served volume's service, or a
pull's own process while it receives (a middle host answering its children).

While a volume is open in one process nobody else may open it, so that process
answers what replication needs on its control socket (docs/replication.md):

    replicate_source        (pipe write end) request, identity; asks "plan"
                            -> {"records", "data_blocks", "bytes"} of the stream, or {}
    replicate_destinations  -> {"destinations": [...]}
    replicate_forget        dest -> {"released": [...]}
    replicate_pull          source, name, rollback, bwlimit, compress, dry_run
                            -> the pull's record
    replicate_schedule      op (set, clear, show), every, source, name, rollback,
                            bwlimit, compress -> the schedule, or null

`replicate_source` is the source side of a pull (what `stdio-serve` or `tls-serve`
runs): the plan goes back as the question `plan` (the endpoint answers the
destination with it), the stream then into the pipe. The registry and the holds
change in this process, under the volume lock; the stream is read outside it.

`replicate_pull` pulls into this volume (a served replica): incrementals only,
received into the open volume while its NBD clients go on. The schedule (a
`replicate pull --every` on a served target) is the local property
`replicate.pull`, run by the job `replicate pull` of the service.

`hosting(path)` is the pull's side of a tree: while `replicate pull` receives an
incremental into a volume nobody serves, it holds the volume open and answers on
its control socket like a service (every volume command, and these), so a
child's pull proceeds meanwhile and is sent the newest *complete* master.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

from blockxfer.errors import BlockxferError, DeviceBusy, DeviceError, UsageError
from blockxfer.transport import wire

from .control import Answer, Ask, ControlServer, bind_control, socket_path
from .ops import Result, VolumeOps

log = logging.getLogger("blockxfer.service.replication")

SCHEDULE = "replicate.pull"          # local property: the scheduled pull into this volume
JOB = "replicate pull"
OUT_BUFFER = 1 << 20
PIPE_CHUNK = 1 << 20
OPEN_WAIT = 60.0                     # seconds a pull waits for its target held elsewhere
HOST_DRAIN = 120.0                   # seconds a pull waits for the children it answers


def _no_device(*args: Any, **kwargs: Any) -> Any:
    raise UsageError("the volume is open in this process; it is not opened again")


class ReplicationCommands:
    """The replication commands of one open volume (and, in a service, its schedule)."""

    def __init__(self, ops: VolumeOps, jobs: Any = None, owner: str | None = None) -> None:
        self.ops, self.jobs = ops, jobs
        self.owner = owner or "the service that serves it ('blockxfer serve')"
        self._job: Any = None
        self._sessions: Any = None           # the scheduled source's connection, kept
        self._sessions_lock = threading.Lock()
        self._watching = False

    def install(self, ctl: ControlServer) -> None:
        ctl.register("replicate_source", self.source, fds=1, asks=True)
        ctl.register("replicate_destinations", self.destinations)
        ctl.register("replicate_forget", self.forget)
        ctl.register("replicate_pull", self.pull, progress=True)
        ctl.register("replicate_schedule", self.schedule)
        scheduled = self._scheduled() if hasattr(self.ops.vol, "get_property") else None
        if self.jobs is not None and scheduled is not None:    # kept from an earlier run
            self._ensure_job(float(scheduled["every"]))

    # -- the source side ----------------------------------------------------------------
    def source(self, fd: int, ask: Ask, request: dict[str, Any], identity: str) -> Result:
        from blockxfer.transfer.replicate_source import PullRequest, serve_pull
        pull = PullRequest.from_wire(request, identity)
        ops = self.ops
        out = os.fdopen(fd, "wb", buffering=OUT_BUFFER)

        def ready(plan: Result) -> Any:
            ask("plan", plan=plan)
            return out
        try:
            r = serve_pull(ops.vol, pull, ready, ops.reader_for(ops.vol, None), lock=ops.lock)
            out.flush()
            return r
        except OSError as e:
            raise DeviceError(f"{identity}: the destination stopped reading the stream "
                              f"({e.strerror or e})") from e
        finally:
            with contextlib.suppress(OSError):   # closes the descriptor even if the
                out.close()                       # flush fails

    def destinations(self) -> Result:
        from blockxfer.transfer.replicate_registry import listing
        with self.ops.lock:
            return {"destinations": listing(self.ops.vol)}

    def forget(self, dest: str) -> Result:
        from blockxfer.transfer.replicate_registry import forget
        with self.ops.lock:
            return {"released": forget(self.ops.vol, str(dest))}

    # -- pulls into this volume ---------------------------------------------------------
    def pull(self, progress: Any, source: str, name: str | None = None,
             rollback: bool = False, bwlimit: int | None = None, compress: bool = True,
             dry_run: bool = False) -> Result:
        from blockxfer.transfer.replicate import OpenTarget, pull_once
        opened = OpenTarget(self.ops.vol, self.ops.lock, self.owner)
        keep, sessions = self._session_for(str(source))
        rec = pull_once(str(source), self.ops.path, _no_device, name=name,
                        rollback=bool(rollback), bwlimit=bwlimit, compress=bool(compress),
                        dry_run=bool(dry_run), progress=progress, opened=opened,
                        sessions=sessions, keep=keep)
        return rec.as_dict()

    def _session_for(self, source: str) -> tuple[float, Any]:
        """A pull from the scheduled source uses the connection kept for the schedule
        (and keeps it an interval and some more); other pulls open their own. The
        channels end with the schedule and with the service's jobs."""
        entry = self._scheduled() if self.jobs is not None else None
        if entry is None or entry.get("source") != source:
            return 0.0, None
        from blockxfer.transfer.replicate import KEEP_SLACK
        from blockxfer.transport import Sessions
        with self._sessions_lock:
            if self._sessions is None:
                self._sessions = Sessions()
                if self._job is not None and not self._watching:
                    self._watching = True
                    threading.Thread(target=self._end_sessions, daemon=True,
                                     name="replicate-sessions").start()
            return float(entry["every"]) + KEEP_SLACK, self._sessions

    def _end_sessions(self) -> None:
        self._job.stop.wait()                    # the service stops its jobs
        self._close_sessions()

    def _close_sessions(self) -> None:
        with self._sessions_lock:
            sessions, self._sessions = self._sessions, None
        if sessions is not None:
            sessions.close()

    def schedule(self, op: str = "show", every: float | None = None, source: str | None = None,
                 name: str | None = None, rollback: bool = False, bwlimit: int | None = None,
                 compress: bool = True) -> Result | None:
        if self.jobs is None:
            raise UsageError(f"{self.ops.path} is open in {self.owner}, which runs no "
                             "schedules")
        if op == "set":
            if not source or not every or float(every) <= 0:
                raise UsageError("a scheduled pull names its source and a positive interval")
            entry = {"source": source, "name": name, "every": float(every),
                     "rollback": bool(rollback), "bwlimit": bwlimit, "compress": bool(compress)}
            before = self._scheduled()
            with self.ops.lock:
                self.ops.vol.set_property(SCHEDULE, json.dumps(entry).encode())
            if before is not None and before.get("source") != source:
                self._close_sessions()           # kept for the source no longer pulled
            self._ensure_job(float(every))
        elif op == "clear":
            with self.ops.lock:
                self.ops.vol.set_property(SCHEDULE, None)
            self._close_sessions()               # the source's session ends with it
        elif op != "show":
            raise UsageError(f"replicate_schedule: unknown operation {op!r}")
        return self._scheduled()

    def _scheduled(self) -> dict[str, Any] | None:
        raw = self.ops.vol.get_property(SCHEDULE)
        try:
            entry = json.loads(raw) if raw else None
        except ValueError:
            return None
        return entry if isinstance(entry, dict) else None

    def _ensure_job(self, every: float) -> None:
        """The job runs the schedule the property holds (none: it does nothing); a
        new interval takes effect after the run in progress."""
        if self._job is None:
            self._job = self.jobs.add(JOB, every, self._tick)
        self._job.every_seconds = every

    def _tick(self) -> object:
        entry = self._scheduled()
        if entry is None:
            return None
        rec = self.pull(None, entry["source"], entry.get("name"), bool(entry.get("rollback")),
                        entry.get("bwlimit"), bool(entry.get("compress", True)))
        log.info("replicate pull from %s: %s up to %s, %d bytes", entry["source"],
                 rec["kind"], rec["top"], rec["bytes"])
        return rec


def install_replication(ops: VolumeOps, ctl: ControlServer, jobs: Any) -> ReplicationCommands:
    """The replication commands (and the scheduled pull) of a service."""
    cmds = ReplicationCommands(ops, jobs)
    cmds.install(ctl)
    return cmds


# -- the endpoint's side: a pull answered by the process that holds the volume ----------------
def answer_from_holder(client: Any, w: wire.Writer, request: dict[str, Any],
                       identity: str) -> Result:
    """Answer a destination's pull (the wire request) through the process that holds
    the volume open: its plan is written as the "ready" status, then the stream it
    writes into a pipe goes out as frames, then the end frame."""
    frames: list[wire.FrameWriter] = []

    def answer(question: str, args: dict[str, Any]) -> Any:
        plan = args.get("plan")
        if question != "plan" or not isinstance(plan, dict):
            raise UsageError(f"unexpected question {question!r} from the volume's holder")
        wire.write_status(w, plan)
        if plan.get("stream"):
            frames.append(wire.FrameWriter(w))
        return True
    try:
        return _through_pipe(client, request, identity, answer, frames)
    finally:
        if frames:
            with contextlib.suppress(OSError):    # the peer is gone: the log has it
                frames[0].end()


def _through_pipe(client: Any, request: dict[str, Any], identity: str, answer: Answer,
                  frames: list[wire.FrameWriter]) -> Result:
    rfd, wfd = os.pipe()
    outcome: dict[str, Any] = {}

    def call() -> None:                         # hands `wfd` over: closed once sent
        try:
            outcome["result"] = client.call("replicate_source", fds=[wfd], handover=True,
                                            timeout=None, answer=answer, request=request,
                                            identity=identity)
        except BlockxferError as e:
            outcome["error"] = e
    t = threading.Thread(target=call, name="replicate-source", daemon=True)
    t.start()
    failed: OSError | None = None
    with os.fdopen(rfd, "rb", buffering=0) as pipe:
        while chunk := pipe.read(PIPE_CHUNK):
            if failed is None:
                try:
                    frames[0].write(chunk)        # the plan came first (the question)
                except OSError as e:              # the destination is gone: drain, so
                    failed = e                    # the holder sees the pipe close
                    break
    t.join()
    if "error" in outcome:
        raise outcome["error"]
    if failed is not None:
        raise DeviceError(f"{identity}: the destination stopped reading the stream "
                          f"({failed.strerror or failed})") from failed
    return dict(outcome.get("result") or {})


# -- a pull holding its target open while it receives (a middle host of a tree) ---------------
@contextlib.contextmanager
def hosting(path: str) -> Iterator[Any]:
    """Hold the volume at `path` open and answer on its control socket (every volume
    command, and replication's) until the block ends; then wait for the commands
    still running (a child's pull being streamed) and close. Yields the
    `OpenTarget` the pull receives into."""
    from blockxfer.transfer.replicate import OpenTarget

    from .commands import VolumeCommands
    from .mirrors import HeldMirror
    from .session import parallel_reader
    with _open_patiently(path) as vol:
        lock = threading.Lock()
        ops = VolumeOps(vol, lock, reader_for=parallel_reader)
        ctl = ControlServer()
        VolumeCommands(ops).install(ctl)
        owner = f"the pull (pid {os.getpid()}) receiving into it"
        ReplicationCommands(ops, owner=owner).install(ctl)
        HeldMirror(ops, owner).install(ctl)      # `mirror status` answered meanwhile
        sock = _bind(path)
        if sock is None:                         # the pull goes on; children wait for it
            yield OpenTarget(vol, lock, owner)
            return
        accepting = threading.Thread(target=_accept, args=(sock, ctl), daemon=True,
                                     name="replicate-host")
        accepting.start()
        try:
            yield OpenTarget(vol, lock, owner)
        finally:
            _stop_accepting(sock, path)
            accepting.join(5)
            if not ctl.wait_idle(HOST_DRAIN):
                log.warning("closing %s with %d commands still running", path, ctl.running())


def _bind(path: str) -> socket.socket | None:
    try:
        return bind_control(path)
    except (OSError, BlockxferError) as e:
        log.warning("%s: not answering other commands during the pull: %s", path, e)
        return None


@contextlib.contextmanager
def _open_patiently(path: str) -> Iterator[Any]:
    """The volume opened for writing, waiting a while for another process holding it
    (a child's pull answered from it before this pull began)."""
    from blockxfer.handles import open_volume
    deadline = time.monotonic() + OPEN_WAIT
    with contextlib.ExitStack() as stack:
        while True:
            try:
                vol = stack.enter_context(open_volume(path, write=True))
                break
            except DeviceBusy:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.25)
        yield vol


def _accept(sock: socket.socket, ctl: ControlServer) -> None:
    while True:
        try:
            conn, _ = sock.accept()
        except OSError:
            return                              # closed: the pull is done
        ctl.start_connection(conn)


def _stop_accepting(sock: socket.socket, path: str) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
    with contextlib.suppress(OSError):
        os.unlink(socket_path(path))

