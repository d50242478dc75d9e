"""The mirror of a served volume, run by its service (docs/mirroring.md).

While `blockxfer serve` owns a volume, `blockxfer mirror start|update|stop|status`
come here over the control socket (command `mirror`, argument `op`), and the
schedule is the service's job `mirror`. The configuration and progress stay in
the volume (local property `mirror`), so a service started on a volume with a
mirror picks it up and finishes an interrupted update first; `mirror stop`
records that the mirror is stopped, so a restart leaves it so.

An update is the library's `run_update` on the open volume with the service's
volume lock: the metadata steps hold the lock, the stream does not, so NBD
clients keep writing. One update runs at a time (the job's or an operator's
`mirror update`, which waits for the job's and then runs its own).

An incremental mirror (`--base`, `--increments`: transfer/increments) runs the
same way: its configuration is the same property, its progress is in the
increments directory and the snapshots it holds in the volume, and its update
takes the lock for the snapshot, holds and plan only.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from blockxfer.errors import BlockxferError, DeviceBusy, NotFound, UsageError, VolumeError
from blockxfer.transfer.mirror import MirrorState, Target, load, load_if_any, run_update, save
from blockxfer.transfer.mirror.state import KEY
from blockxfer.transfer.mirror.status import would_send
from blockxfer.transfer.mirror.update import forget_mirror

from .control import ControlServer
from .jobs import Jobs
from .ops import Progress, Result, VolumeOps

log = logging.getLogger("blockxfer.mirror")

JOB = "mirror"
OpenTarget = Callable[[str, str | None], Target]     # (destination, S3 endpoint)
Wire = Callable[[], None]       # hands transfer.increments the drivers' openers


class ServedMirror:
    def __init__(self, ops: VolumeOps, jobs: Jobs, open_target: OpenTarget | None,
                 wire_increments: Wire | None = None) -> None:
        self.ops, self.jobs, self._open_target = ops, jobs, open_target
        self._wire = wire_increments
        self._one = threading.Lock()          # one update at a time
        self._stopping = threading.Event()
        self.updating = False

    @property
    def path(self) -> str:
        return self.ops.path

    def install(self, ctl: ControlServer) -> None:
        ctl.register("mirror", self.control, progress=True)

    def resume(self) -> None:
        """Schedule the mirror the volume holds (unless stopped): its first update
        runs as soon as the service serves, finishing one a restart interrupted."""
        try:
            with self.ops.lock:
                st = load_if_any(self.ops.vol)
        except BlockxferError as e:            # serving goes on; `mirror status` says why
            log.warning("%s: the mirror is not run: %s", self.path, e)
            return
        if st is not None and not st.stopped:
            self._schedule(st.every)
            log.info("mirroring %s to %s every %g s", self.path, st.dest, st.every)

    def control(self, progress: Progress, op: str, dest: str | None = None,
                interval: float | None = None, force: bool = False, forget: bool = False,
                dry_run: bool = False, endpoint: str | None = None, base: str | None = None,
                increments: str | None = None) -> Result:
        if op == "start":
            if (base is None) != (increments is None):
                raise UsageError("incremental mirroring needs both --base URL and "
                                 "--increments DIR")
            if not (dest or increments) or not interval:
                raise UsageError("mirror start: give the destination and the interval")
            if increments is not None:
                return self.start_incremental(str(base), increments, float(interval),
                                              bool(force))
            return self.start(str(dest), float(interval), bool(force), endpoint)
        if op == "update":
            return self.measure() if dry_run else self.update(progress)
        if op == "stop":
            return self.stop(bool(forget))
        if op == "status":
            return self.status()
        raise UsageError(f"mirror: unknown operation {op!r}")

    def _target(self, dest: str, endpoint: str | None) -> Target:
        if self._open_target is None:
            raise VolumeError(f"the server of {self.path} was started without mirroring")
        return self._open_target(dest, endpoint)

    def _increments(self) -> Any:
        if self._wire is None:
            raise VolumeError(f"the server of {self.path} was started without incremental "
                              "mirroring")
        self._wire()
        from blockxfer.transfer import increments
        return increments

    def _schedule(self, every: float) -> None:
        self.jobs.remove(JOB, timeout=0)
        self.jobs.add(JOB, every, self.update, first=0.0, from_start=True)

    def start(self, dest: str, every: float, force: bool, endpoint: str | None) -> Result:
        self._target(dest, endpoint)           # an unknown scheme is refused now
        self._record(MirrorState(dest=dest), every, force, endpoint)
        return self._started(dest, every)

    def start_incremental(self, base: str, increments: str, every: float,
                          force: bool) -> Result:
        """The base to a slow medium once, then the increments into a directory;
        the paths are the service's (the client made them absolute)."""
        self._increments()
        self._record(MirrorState(dest=increments, base_url=base, incr=increments), every,
                     force, None)
        return self._started(increments, every)

    def _record(self, new: MirrorState, every: float, force: bool,
                endpoint: str | None) -> None:
        vol = self.ops.vol
        with self._one, self.ops.lock:         # after an update in flight (it saves the state)
            st = load_if_any(vol)
            if st is not None and (st.dest != new.dest or st.incr != new.incr):
                if not force:
                    raise UsageError(f"{self.path} already mirrors to {st.dest}; stop it with "
                                     f"'blockxfer mirror stop {self.path} --forget' first, or "
                                     "give --force to replace it")
                st = None
            st = st or new
            st.every, st.force, st.stopped = every, force or st.force, False
            st.ep = endpoint or st.ep
            save(vol, st)

    def _started(self, dest: str, every: float) -> Result:
        self._schedule(every)
        return {"volume": self.path, "destination": dest, "interval": every,
                "pid": os.getpid(), "served": True}

    def update(self, progress: Progress = None) -> Result:
        """One update now (after the one in flight, if any)."""
        vol = self.ops.vol
        with self._one:
            with self.ops.lock:
                st = load(vol, self.path)
            self.updating = True
            try:
                if st.incremental_mode:
                    return self._update_incremental(st, progress)
                return run_update(vol, self._target(st.dest, st.ep),
                                  progress=self._cut_short(progress),
                                  reader=self.ops.reader_for(vol, None), lock=self.ops.lock)
            finally:
                self.updating = False

    def _update_incremental(self, st: MirrorState, progress: Progress) -> Result:
        """The increments library's update on the open volume, under the lock for its
        metadata steps; a stop in the middle leaves the directory at its previous
        state (it is crash-safe), finished by the next update."""
        assert st.base_url is not None and st.incr is not None
        vol = self.ops.vol
        result: Result = self._increments().update_volume(
            vol, st.base_url, st.incr, progress=self._cut_short(progress),
            lock=self.ops.lock, reader=self.ops.reader_for(vol, None))
        log.info("%s -> %s: %s, %s blocks", self.path, st.incr, result.get("kind"),
                 result.get("blocks"))
        return {"volume": self.path, "destination": st.incr, **result}

    def cancel(self) -> None:
        """The service is stopping: an update in flight ends at its next block (it is
        resumed when the service starts again), before the volume is closed."""
        self._stopping.set()

    def _cut_short(self, progress: Progress) -> Progress:
        def step(n: int) -> None:
            if self._stopping.is_set():
                raise DeviceBusy(f"{self.path}: its service is stopping; the mirror update "
                                 "resumes when it starts again")
            if progress is not None:
                progress(n)
        return step

    def measure(self) -> Result:
        with self.ops.lock:
            return {"volume": self.path, **would_send(self.ops.vol,
                                                      load(self.ops.vol, self.path))}

    def stop(self, forget: bool) -> Result:
        """Unschedule the job (an update in flight ends first), and record that the
        mirror is stopped, or with `forget` drop it and its snapshots."""
        vol = self.ops.vol
        job = self.jobs.remove(JOB, timeout=0)
        with self._one, self.ops.lock:
            st = load(vol, self.path)
            destroyed: list[str] = []
            if forget:
                destroyed = forget_mirror(vol)
            else:
                st.stopped = True
                save(vol, st)
        if job is None and not forget:
            raise NotFound(f"the service of {self.path} runs no mirror")
        return {"volume": self.path, "pid": os.getpid(), "stopped": job is not None,
                "forgotten": forget, "destroyed": destroyed, "served": True}

    def status(self) -> Result:
        """The mirror state as the volume holds it, and the job's runtime; the client
        looks at the destination itself."""
        vol = self.ops.vol
        with self.ops.lock:
            raw = vol.get_property(KEY)
            generation = vol.generation
        if raw is None:
            raise NotFound(f"{self.path} has no mirror; start one with 'blockxfer mirror "
                           f"start {self.path} DEST'")
        job = self.jobs.get(JOB)
        runtime: dict[str, Any] = {
            "pid": os.getpid(), "running": job is not None, "updating": self.updating,
            "next": job.next_run if job is not None else None}
        return {"state": raw.decode(), "generation": generation, "runtime": runtime,
                "job": job.status() if job is not None else None}


class HeldMirror:
    """The `mirror` command of a process that holds the volume open without serving
    it: a `replicate pull` receiving into it (service/replication.py's `hosting`).
    It runs no mirror, but the volume's mirror must not look unknown meanwhile:
    `status` and `update -n` are answered from the volume, `stop` records the stop
    (the client stops the daemon itself); `start`, `update` and `stop --forget`,
    which take snapshots or destroy them while the pull receives, are refused with
    what to do."""

    def __init__(self, ops: VolumeOps, owner: str) -> None:
        self.ops, self.owner = ops, owner

    @property
    def path(self) -> str:
        return self.ops.path

    def install(self, ctl: ControlServer) -> None:
        ctl.register("mirror", self.control, progress=True)

    def control(self, progress: Progress, op: str, forget: bool = False,
                dry_run: bool = False, **ignored: Any) -> Result:
        vol = self.ops.vol
        if op == "status":
            with self.ops.lock:
                raw, generation = vol.get_property(KEY), vol.generation
            if raw is None:
                raise NotFound(f"{self.path} has no mirror; start one with 'blockxfer mirror "
                               f"start {self.path} DEST' once {self.owner} ends")
            return {"state": raw.decode(), "generation": generation, "runtime": None,
                    "job": None, "held_by": self.owner}
        if op == "update" and dry_run:
            with self.ops.lock:
                return {"volume": self.path, **would_send(vol, load(vol, self.path))}
        if op == "stop" and not forget:
            with self.ops.lock:
                st = load(vol, self.path)
                st.stopped = True
                save(vol, st)
            return {"volume": self.path, "recorded": True, "held_by": self.owner}
        what = "mirror stop --forget" if op == "stop" else f"mirror {op}"
        raise DeviceBusy(f"{self.path} is open in {self.owner}, which runs no mirror: run "
                         f"'blockxfer {what} {self.path}' again when it ends")
