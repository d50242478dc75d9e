"""`blockxfer mirror start|status|stop|update`: volume mirroring (docs/mirroring.md).

`mirror start` records the mirror in the source volume (local property `mirror`)
and runs its timer loop: in the foreground with `--foreground`, else as a
detached daemon (pid file and log under /run/blockxfer, or $BLOCKXFER_RUN_DIR).
Each update opens the source for its duration only. A served source's mirror
runs in its service instead (blockxfer/service/mirrors.py): every subcommand then
goes through the control socket. The loop and the update
are library functions (`blockxfer.transfer.mirror`) the service can call too.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from typing import Any

from blockxfer.errors import (
    BlockxferError,
    DeviceBusy,
    DeviceError,
    NotFound,
    UsageError,
    VolumeError,
)
from blockxfer.units import human, parse_duration

from . import mirror_daemon as daemon
from .common import dry_run_arg, parsable_arg, progress, syslog_arg, volume_arg
from .mirror_daemon import daemon_pid, run_foreground
from .mirror_source import increments, mirror_target, refuse_served, service, update_once
from .spec import Command, Report, arg

log = logging.getLogger("blockxfer.mirror")
BUSY_WAIT = 600.0                 # seconds `mirror update` waits for the daemon's update


# -- the commands ------------------------------------------------------------------------
def parse_interval(text: str) -> float:
    try:
        return parse_duration(text)
    except UsageError as e:
        raise UsageError(f"--interval: {e}") from e


def cmd_start(a: argparse.Namespace) -> Report:
    if a.daemon_child:                # spawned by `mirror start`: the configuration is saved
        every = _configured(a.path).every
        run_foreground(a.path, every)
        return Report({"volume": a.path, "stopped": True})
    return _start(a)


def _configured(src: str) -> Any:
    from blockxfer.handles import open_volume
    from blockxfer.transfer.mirror import load
    with open_volume(src) as vol:
        return load(vol, src)


def _start(a: argparse.Namespace) -> Report:
    from blockxfer.handles import open_volume
    from blockxfer.transfer.mirror import MirrorState, load_if_any, save
    every = parse_interval(a.interval)
    if (a.base is None) != (a.increments is None):
        raise UsageError("incremental mirroring needs both --base URL and --increments DIR")
    if a.increments is None and a.destination is None:
        raise UsageError("give the DESTINATION to mirror to (a volume path or device, "
                         "ssh://, tls://), or --base and --increments")
    if a.increments is not None:
        increments()
    else:
        mirror_target(a.destination, a.s3_endpoint)  # an unknown scheme is refused now
        if os.path.realpath(a.destination) == os.path.realpath(a.path):
            raise UsageError(f"{a.destination} is the source itself; mirror to another "
                             "volume")
    pid = daemon_pid(a.path)
    if pid is not None:
        raise VolumeError(f"the mirror of {a.path} is already running (pid {pid}); "
                          f"'blockxfer mirror stop {a.path}' first")
    served = service(a.path)
    if served is not None:
        return _start_served(a, served, every)
    dest = a.destination or a.increments
    with open_volume(a.path, write=True) as vol:
        st = load_if_any(vol)
        if st is not None and (st.dest != dest or st.incr != a.increments):
            if not a.force:
                raise UsageError(f"{a.path} already mirrors to {st.dest}; stop it with "
                                 f"'blockxfer mirror stop {a.path} --forget' first, or "
                                 "give --force to replace it")
            st = None
        if st is None:
            st = MirrorState(dest=dest, base_url=a.base, incr=a.increments)
        st.every, st.force, st.stopped = every, a.force or st.force, False
        st.ep = a.s3_endpoint or st.ep
        save(vol, st)
    if not a.foreground:
        return _spawned(a)
    run_foreground(a.path, every)
    return Report({"volume": a.path, "destination": dest, "interval": every,
                   "pid": os.getpid(), "stopped": True, "served": False},
                  [f"{a.path}: mirror stopped"])


def _start_served(a: argparse.Namespace, served: Any, every: float) -> Report:
    """The mirror of a served volume runs in its service (job `mirror`); an
    incremental one's base and directory are named to it by absolute path."""
    if a.foreground:
        raise UsageError(f"{a.path} is served: its service runs the mirror (no --foreground)")
    incr = dict(base=_absolute_base(a.base), increments=os.path.abspath(a.increments)) \
        if a.increments is not None else {}
    r: dict[str, Any] = served.call("mirror", op="start", dest=a.destination,
                                    interval=every, force=a.force, endpoint=a.s3_endpoint,
                                    **incr)
    return Report(r, [f"{a.path}: mirroring to {r.get('destination')} every {a.interval} in "
                      f"its service (pid {r.get('pid')})"])


def _absolute_base(url: str) -> str:
    """The base as the service (another working directory) finds it: `tape:` and
    `file:` keep their prefix, a bare path becomes absolute."""
    for prefix in ("tape:", "file:"):
        if url.startswith(prefix):
            return prefix + os.path.abspath(url[len(prefix):])
    return url if not url or "://" in url else os.path.abspath(url)


def _spawned(a: argparse.Namespace) -> Report:
    pid, log_file = daemon.spawn(a.path, a.syslog)
    dest = a.destination or a.increments
    return Report({"volume": a.path, "destination": dest,
                   "interval": parse_interval(a.interval), "pid": pid,
                   "pid_file": daemon.run_file(a.path, "pid"), "log": log_file,
                   "served": False},
                  [f"{a.path}: mirroring to {dest} every {a.interval} (pid {pid}, "
                   f"log {log_file})"])


def _measure_update(path: str) -> Report:
    """`mirror update -n`: what the next update would send, from the planes."""
    from blockxfer.handles import open_volume
    from blockxfer.transfer.mirror import load
    from blockxfer.transfer.mirror.status import would_send
    with open_volume(path) as vol:
        data = {"volume": path, **would_send(vol, load(vol, path))}
    return _measured(data)


def _measured(d: dict[str, Any]) -> Report:
    return Report(d, [f"would send a {d['kind']} image of {d['volume']} to {d['destination']}: "
                      f"{d['blocks']} blocks, {human(d['bytes'])}, and free "
                      f"{d['deallocated_blocks']} blocks there (the snapshot the update "
                      "takes adds what the next CP writes)"])


def cmd_update(a: argparse.Namespace) -> Report:
    served = service(a.path)
    if a.dry_run:
        if served is not None:
            return _measured(served.call("mirror", op="update", dry_run=True))
        return _measure_update(a.path)
    prog = progress(a, "mirror update")
    deadline = time.monotonic() + BUSY_WAIT
    while True:
        try:
            if served is not None:     # the service's update (after one in flight)
                r = served.call("mirror", op="update", progress=prog.add, timeout=None)
            else:
                r = update_once(a.path, progress=prog.add)
            break
        except DeviceBusy:        # the daemon's update (or a pull) holds it: wait for it
            if daemon_pid(a.path) is None or time.monotonic() > deadline:
                raise
            time.sleep(0.2)
            served = service(a.path)
    prog.finish()
    text = [f"{a.path} -> {r.get('destination')}: {r.get('kind')} up to "
            f"{r.get('snapshot')}, {r.get('blocks')} blocks, {r.get('bytes')} bytes in "
            f"{r.get('seconds')} s"]
    return Report(r, text)


def cmd_status(a: argparse.Namespace) -> Report:
    from blockxfer.handles import open_volume
    from blockxfer.transfer.mirror import MirrorState, load
    from blockxfer.transfer.mirror.status import describe, status_lines
    served = service(a.path)
    job, held = None, None
    if served is not None:          # the state as the volume holds it, the job's runtime
        got = served.call("mirror", op="status")
        st, generation = MirrorState.unpack(got["state"].encode()), got["generation"]
        runtime, job, held = got["runtime"], got["job"], got.get("held_by")
        if held is not None:        # a pull holds it: any daemon's runtime is its own
            served, runtime = None, daemon.runtime(a.path)
    else:
        runtime = daemon.runtime(a.path)
        try:
            with open_volume(a.path) as vol:
                st = load(vol, a.path)
                generation = vol.generation
        except DeviceError:         # an update holds it: the state its daemon last published
            if not (runtime and runtime.get("running") and runtime.get("state")):
                raise
            st = MirrorState.unpack(runtime["state"].encode())
            generation = runtime.get("generation")
    found = None
    if not st.incremental_mode:
        try:
            found = mirror_target(st.dest, st.ep).look(thorough=True)
        except BlockxferError as e:       # busy (an update runs) or gone: say so
            log.info("could not look at %s: %s", st.dest, e)
    d = describe(st, generation, found, runtime)
    d["served"], d["job"], d["held_by"] = served is not None, job, held
    if job and job.get("last_error") and not d["error"]:
        d["error"] = job["last_error"]        # a failure outside the update's own record
    if runtime and runtime.get("error") and not d["error"]:
        d["error"], d["error_time"] = runtime["error"], runtime.get("last_end")  # the daemon's
    d["increments_status"] = increments().mirror_status(st.incr) \
        if st.incremental_mode and st.incr is not None else None
    d["volume"] = a.path
    return Report(d, status_lines(d, a.path))


def cmd_stop(a: argparse.Namespace) -> Report:
    served = service(a.path)
    held = None
    if served is not None:
        r: dict[str, Any] = served.call("mirror", op="stop", forget=a.forget, timeout=None)
        held = r.get("held_by")      # a pull holds it: the stop is recorded, the daemon
        if held is None:             # (if any) is stopped below
            return _stopped_served(a, r)
    pid = daemon_pid(a.path)
    if pid is not None:
        daemon.stop(a.path, pid)
    forgot = _forget(a.path) if a.forget else []
    if pid is not None and not a.forget and held is None:
        daemon.mark_stopped(a.path)
    if pid is None and not a.forget and held is None:
        raise NotFound(f"no mirror daemon runs for {a.path}")
    text = [f"{a.path}: mirror daemon (pid {pid}) stopped" if pid else
            f"{a.path}: no mirror daemon was running"]
    if held is not None:
        text.append(f"{a.path}: recorded as stopped by {held}")
    if a.forget:
        text.append(f"{a.path}: mirror forgotten; destroyed {', '.join(forgot) or 'nothing'}")
    return Report({"volume": a.path, "pid": pid, "stopped": pid is not None,
                   "forgotten": a.forget, "destroyed": forgot, "served": False,
                   "held_by": held}, text)


def _stopped_served(a: argparse.Namespace, r: dict[str, Any]) -> Report:
    text = [f"{a.path}: mirror stopped in its service (pid {r['pid']})" if r["stopped"]
            else f"{a.path}: its service was not running the mirror"]
    if a.forget:
        text.append(f"{a.path}: mirror forgotten; destroyed "
                    f"{', '.join(r['destroyed']) or 'nothing'}")
    return Report(r, text)


def _forget(src: str) -> list[str]:
    from blockxfer.handles import open_volume
    from blockxfer.transfer.mirror.update import forget_mirror
    refuse_served(src)
    with open_volume(src, write=True) as vol:
        return forget_mirror(vol)


SRC = volume_arg("the source volume (its block device or file)")
MIRROR_COMMANDS = (
    Command("start", "mirror a volume to another, updating it on a timer",
            "Send a full image of VOLUME to DESTINATION, then an incremental every "
            "--interval, chosen by the mark-on-allocate planes (or, after a restart, "
            "the plane difference). The destination commits each update atomically. "
            "The mirror's state lives in VOLUME; it runs as a daemon unless "
            "--foreground, or in the volume's service when 'blockxfer serve' owns it.",
            ("blockxfer mirror start /srv/vol.img /srv/copy.img --interval 30s",
             "blockxfer mirror start /dev/md0 ssh://backup/srv/copy.img --interval 5m",
             "blockxfer mirror start /srv/vol.img s3://backups/site1/vol --interval 1h",
             "blockxfer mirror start /srv/vol.img --base tape:/dev/nst0 --increments "
             "/srv/incr"),
            cmd_start,
            (SRC, arg("destination", nargs="?", metavar="DESTINATION",
                      help="the mirror: a volume path or device, ssh://[user@]host/PATH, "
                           "tls://host:port/PATH or s3://BUCKET[/PREFIX]/VOLUME"),
             arg("--interval", default="10s", metavar="DURATION",
                 help="time between updates: 30s, 5m, 1h (default 10s)"),
             arg("--foreground", action="store_true",
                 help="run the loop in this process until SIGTERM or SIGINT"),
             arg("--force", action="store_true",
                 help="let the first full image overwrite what DESTINATION holds, or "
                      "replace this volume's existing mirror"),
             arg("--base", metavar="URL",
                 help="incremental mirroring: where the base image goes (tape:, a file)"),
             arg("--increments", metavar="DIR",
                 help="incremental mirroring: the sparse structure of increments"),
             arg("--s3-endpoint", metavar="URL",
                 help="an s3:// DESTINATION's endpoint (default: AWS_ENDPOINT_URL or the "
                      "AWS config of the process running the mirror)"),
             syslog_arg(),
             arg("--daemon-child", action="store_true", help=argparse.SUPPRESS)),
            log_level="info"),
    Command("status", "the mirror's last update, lag, next update and errors",
            "Show the last update (time, CP, bytes, blocks, duration), the lag (time and "
            "CPs behind), the next update, errors, and whether the destination is "
            "consistent.",
            ("blockxfer mirror status /srv/vol.img",
             "blockxfer mirror status /srv/vol.img --json"),
            cmd_status, (SRC,)),
    Command("stop", "stop the mirror's daemon (and with --forget, the mirror)",
            "Stop the mirror daemon of VOLUME (an update in flight is abandoned and "
            "resumed by the next start). With --forget, also drop the mirror's state and "
            "snapshots from VOLUME; the destination keeps what it has.",
            ("blockxfer mirror stop /srv/vol.img",
             "blockxfer mirror stop /srv/vol.img --forget"),
            cmd_stop,
            (SRC, arg("--forget", action="store_true",
                      help="also remove the mirror's configuration and snapshots"))),
    Command("update", "run one mirror update now",
            "Run one update of the mirror configured on VOLUME now, in this process "
            "(waiting while the daemon's update holds the volume).",
            ("blockxfer mirror update /srv/vol.img",
             "blockxfer mirror update -n /srv/vol.img   # what it would send, from the planes"),
            cmd_update, (SRC, dry_run_arg("print what the update would send; change nothing"),
                         parsable_arg())),
)

COMMANDS = (
    Command("mirror", "volume mirroring: a destination kept up to date on a timer",
            "Keep a copy of a volume up to date: a full image, then incrementals on a "
            "timer (docs/mirroring.md).",
            ("blockxfer mirror start /srv/vol.img /srv/copy.img --interval 30s",
             "blockxfer mirror status /srv/vol.img"),
            subcommands=MIRROR_COMMANDS),
)
