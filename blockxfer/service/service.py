"""One process owns a served volume: its CP timer, NBD exports, control socket and jobs.

`Service(volume, path, ...)` composes the NBD server (`blockxfer.nbd.server`,
which only speaks NBD) with the control socket (`control`, answering the volume
commands of `commands` under the NBD server's volume lock) and the scheduled
jobs (`jobs`). `run()` serves until `stop()` (a signal handler may call it),
then stops the jobs, lets the NBD connections answer what they read, waits a
while for control commands still running, and commits.

What needs the drivers (freezing a file system, opening a tape, the parallel
reader) is handed in by the wiring (`blockxfer.cli.serve`).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from blockxfer.nbd.server import Server
from blockxfer.nbd.tls import TlsPolicy

from .commands import OpenTape, VolumeCommands
from .control import ControlServer, bind_control
from .jobs import Jobs
from .mirrordest import DestinationCommands
from .mirrors import OpenTarget, ServedMirror, Wire
from .ops import Freezer, ReaderFor, Result, VolumeOps
from .replication import install_replication

log = logging.getLogger("blockxfer.service")

DRAIN_CONTROL = 60.0          # seconds a stopping service waits for control commands
POLICY_EVERY = 60.0           # seconds between runs of the snapshot schedule


class Service:
    def __init__(self, volume: Any, path: str, *, read_only: bool = False,
                 tls: TlsPolicy | None = None, freezer: Freezer | None = None,
                 open_tape: OpenTape | None = None, reader_for: ReaderFor | None = None,
                 open_target: OpenTarget | None = None,
                 wire_increments: Wire | None = None) -> None:
        self.path, self.volume = path, volume
        self.nbd = Server(volume, read_only=read_only, tls=tls)
        extra: dict[str, Any] = {"reader_for": reader_for} if reader_for else {}
        self.ops = VolumeOps(volume, self.nbd.vol.lock, freezer=freezer,
                             server_info=self.status, **extra)
        self.control = ControlServer()
        VolumeCommands(self.ops, open_tape).install(self.control)
        self.jobs = Jobs()
        # replication: the source side of pulls, pulls into this volume, their schedule
        self.replication = install_replication(self.ops, self.control, self.jobs)
        if not read_only:              # a policy set later (policy set) takes effect too
            self.jobs.add("policy", POLICY_EVERY, self._policy_tick)
        self._mirror(open_target, wire_increments)
        DestinationCommands(self.ops).install(self.control)   # a mirror into this volume

    def _policy_tick(self) -> object:
        """The snapshot schedule, if the volume has one (docs/policies.md)."""
        if self.volume.get_property("policy") is None:
            return None
        r = self.ops.policy("run")
        if r.get("taken") or r.get("pruned"):
            log.info("policy: took %s, destroyed %s", r.get("taken"), r.get("pruned"))
        return r

    def _mirror(self, open_target: OpenTarget | None, wire: Wire | None) -> None:
        """The volume's mirror runs here (job `mirror`, control command `mirror`);
        one the volume holds is picked up now (service/mirrors.py)."""
        self.mirror = ServedMirror(self.ops, self.jobs, open_target, wire)
        self.mirror.install(self.control)
        if hasattr(self.volume, "get_property"):
            self.mirror.resume()

    def listen(self, spec: str) -> None:
        """An NBD listener: `unix:PATH` or `tcp:HOST:PORT`."""
        self.nbd.listen(spec)

    def serve_control(self) -> None:
        """Answer the other commands on the volume's control socket."""
        self.nbd.add_listener(bind_control(self.path), self.control.start_connection)

    def status(self) -> Result:
        """What `info` shows of the service: pid, NBD clients and exports, jobs."""
        return {"pid": os.getpid(), **self.nbd.stats(), "jobs": self.jobs.status(),
                "commands_running": self.control.running()}

    def run(self) -> None:
        """Serve until `stop()`; then stop the jobs, drain NBD, wait for control
        commands in flight (up to DRAIN_CONTROL seconds) and commit."""
        if hasattr(self.volume, "start_cp_timer") and getattr(self.volume, "writable", True):
            self.volume.start_cp_timer()
        self.jobs.start()
        try:
            self.nbd.serve_forever()
        finally:
            self.mirror.cancel()           # a long mirror update must not outlive the volume
            self.jobs.stop()
            if not self.control.wait_idle(DRAIN_CONTROL):
                log.warning("stopping with %d control commands still running",
                            self.control.running())
            self.nbd.vol.call("commit")

    def stop(self) -> None:
        self.nbd.stop()
