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
import contextlib
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from blockxfer.errors import (
    BlockxferError,
    DeviceBusy,
    DeviceError,
    NotFound,
    UsageError,
    VolumeError,
)
from blockxfer.units import human

from .common import dry_run_arg, parsable_arg, progress, syslog_arg, volume_arg
from .spec import Command, Report, arg

log = logging.getLogger("blockxfer.mirror")
START_WAIT = 30.0                 # seconds `mirror start` waits for the daemon's pid file
STOP_WAIT = 60.0
BUSY_WAIT = 600.0                 # seconds `mirror update` waits for the daemon's update


# -- where the daemon keeps its pid, log and runtime status ------------------------------
def _run_file(src: str, ext: str) -> str:
    from blockxfer.drivers.owner import run_dir
    key = hashlib.sha1(os.path.realpath(src).encode()).hexdigest()[:16]
    return os.path.join(run_dir(), f"mirror-{key}.{ext}")


def _write_atomic(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def daemon_pid(src: str) -> int | None:
    """The pid of the running mirror daemon of `src`, if one runs."""
    try:
        with open(_run_file(src, "pid")) as f:
            pid = int(f.read().split()[0])
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().split(b"\0")
    except (OSError, ValueError, IndexError):
        return None
    return pid if b"mirror" in cmd and b"start" in cmd else None


def _alive(pid: int) -> bool:
    """Is the process there and not a zombie (a detached daemon's parent may be a
    container's init that never reaps)?"""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _runtime(src: str) -> dict[str, Any] | None:
    try:
        with open(_run_file(src, "json")) as f:
            d: dict[str, Any] = json.load(f)
    except (OSError, ValueError):
        return None
    d["running"] = daemon_pid(src) == d.get("pid")
    return d


# -- opening the source and the destination -----------------------------------------------
def _refuse_served(src: str) -> None:
    """The unserved path opens the volume itself; a served one went to its service
    before (this catches a service started meanwhile). A `replicate pull` holding
    the volume while it receives is waited for (busy: the daemon's next tick, or
    `mirror update` while the daemon runs, tries again)."""
    client = _service(src)
    if client is None:
        return
    if _is_pull(client):
        raise DeviceBusy(f"{src} is open in a 'replicate pull' receiving into it; the "
                         "mirror updates when it ends")
    raise VolumeError(f"{src} is served by 'blockxfer serve', which owns it and runs "
                      "its mirror: use 'blockxfer mirror' commands on it again")


def _is_pull(client: Any) -> bool:
    """Is the process holding the volume a pull (service/replication.py's `hosting`),
    not a service? Only a service reports itself (`server`) in `info`."""
    try:
        return "server" not in client.call("info")
    except BlockxferError:                 # it let go meanwhile
        return False


def _service(src: str) -> Any:
    """The control client of the service owning `src`, or None."""
    from blockxfer.service.session import server_for
    return server_for(src)


def mirror_target(dest: str, endpoint: str | None = None) -> Any:
    """The destination `dest` opened with the drivers (also for the service);
    `endpoint` is an s3:// destination's. A local volume that `blockxfer serve`
    owns is reached through its service (looked at, rolled back, received into)."""
    from blockxfer.drivers.blockdev import open_device
    from blockxfer.transfer.mirror import open_target
    from blockxfer.transfer.mirror.target import LocalTarget
    target = open_target(dest, open_device, endpoint)
    if isinstance(target, LocalTarget):
        client = _service(dest)
        if client is not None:
            from blockxfer.service.mirrordest import ServedTarget
            return ServedTarget(dest, client)
    return target



def _increments() -> Any:
    """The incremental-mirroring library, handed the drivers' openers."""
    from blockxfer.transfer import increments

    from .increments import wire
    wire()
    return increments


Publish = Callable[[bytes | None, int], None]


def update_once(src: str, progress: Callable[[int], None] | None = None,
                publish: Publish | None = None) -> dict[str, Any]:
    """One update of the mirror configured on `src`, whichever kind it is;
    `publish(state, generation)` hears the mirror state it leaves in the volume."""
    from blockxfer.drivers.reader import read_runs
    from blockxfer.handles import open_volume
    from blockxfer.transfer.mirror import load, run_update
    from blockxfer.transfer.mirror.state import KEY
    _refuse_served(src)
    with open_volume(src, write=True) as vol:
        st = load(vol, src)
        if not st.incremental_mode:
            try:
                return run_update(vol, mirror_target(st.dest, st.ep), progress=progress,
                                  reader=lambda runs: read_runs(vol.dev, runs, vol.block_size))
            finally:
                if publish is not None:
                    publish(vol.get_property(KEY), vol.generation)
    assert st.base_url is not None and st.incr is not None
    result: dict[str, Any] = _increments().mirror_update(src, st.base_url, st.incr,
                                                         progress=progress)
    return {"volume": src, "destination": st.incr, **result}


# -- the commands ------------------------------------------------------------------------
def parse_interval(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    t = text.strip().lower()
    try:
        value = float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        value = -1
    if not value > 0:
        raise UsageError(f"--interval {text!r}: give a duration such as 30s, 5m or 1h")
    return value


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
        _increments()
    else:
        mirror_target(a.destination, a.s3_endpoint)  # an unknown scheme is refused now
        if os.path.realpath(a.destination) == os.path.realpath(a.path):
            raise UsageError(f"{a.destination} is the source itself; mirror to another "
                             "volume")
    pid = daemon_pid(a.path)
    if pid is not None:
        raise VolumeError(f"the mirror of {a.path} is already running (pid {pid}); "
                          f"'blockxfer mirror stop {a.path}' first")
    served = _service(a.path)
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
        return _spawn(a)
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


def _spawn(a: argparse.Namespace) -> Report:
    """Start the loop as a detached process and wait until it runs."""
    log_file = _run_file(a.path, "log")
    os.makedirs(os.path.dirname(log_file), exist_ok=True)
    cmd = [sys.executable, "-m", "blockxfer.cli", "mirror", "start", a.path,
           "--foreground", "--daemon-child", "--log-level", "info"]
    if a.syslog:
        cmd += ["--syslog", a.syslog]
    with open(log_file, "ab") as err:
        child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=err, start_new_session=True, close_fds=True)
    deadline = time.monotonic() + START_WAIT
    while time.monotonic() < deadline:
        if daemon_pid(a.path) == child.pid:
            break
        if child.poll() is not None:
            raise VolumeError(f"the mirror daemon of {a.path} stopped at once: "
                              f"{_tail(log_file)} (log: {log_file})")
        time.sleep(0.05)
    else:
        raise DeviceError(f"the mirror daemon of {a.path} did not start in {START_WAIT:.0f} s "
                          f"(log: {log_file})")
    return Report({"volume": a.path, "destination": a.destination or a.increments,
                   "interval": parse_interval(a.interval), "pid": child.pid,
                   "pid_file": _run_file(a.path, "pid"), "log": log_file, "served": False},
                  [f"{a.path}: mirroring to {a.destination or a.increments} every "
                   f"{a.interval} (pid {child.pid}, log {log_file})"])


def _tail(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [ln.strip() for ln in f.read().splitlines() if ln.strip()]
    except OSError:
        return "no log"
    return lines[-1] if lines else "no log"


def run_foreground(src: str, every: float) -> None:
    """The loop in this process until SIGTERM or SIGINT; the pid and runtime status
    files say it runs and when the next update is due."""
    from blockxfer.transfer.mirror import Tick, run_loop
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set())
                for s in (signal.SIGTERM, signal.SIGINT)}
    pid_file, status_file = _run_file(src, "pid"), _run_file(src, "json")
    runtime: dict[str, Any] = {"pid": os.getpid(), "next": time.time(), "updating": False,
                               "skipped": 0}

    def publish() -> None:
        _write_atomic(status_file, json.dumps(runtime))

    def update() -> None:
        runtime["updating"] = True
        publish()
        def keep(state: bytes | None, generation: int) -> None:
            runtime.update(state=state.decode() if state else None, generation=generation)
        try:
            update_once(src, publish=keep)
        finally:
            runtime["updating"] = False

    def on_tick(t: Tick) -> None:
        runtime.update(next=t.next_due, skipped=runtime["skipped"] + t.skipped,
                       error=t.error, last_end=t.ended)
        publish()
    runtime.update(_state_at_start(src))
    publish()
    _write_atomic(pid_file, f"{os.getpid()}\n")
    log.info("mirroring %s every %g s", src, every)
    try:
        run_loop(update, every, stop, on_tick=on_tick)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        for path in (pid_file, status_file):
            with contextlib.suppress(OSError):
                os.remove(path)
        log.info("mirror of %s stopped", src)


def _state_at_start(src: str) -> dict[str, Any]:
    """The mirror state the volume holds when the daemon starts, for its runtime file:
    `mirror status` reads it there while the first update holds the volume (before,
    a status asked during a first update was refused as busy)."""
    from blockxfer.handles import open_volume
    from blockxfer.transfer.mirror.state import KEY
    try:
        with open_volume(src) as vol:
            state = vol.get_property(KEY)
            return {"state": state.decode() if state else None, "generation": vol.generation}
    except BlockxferError:
        return {}


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
    served = _service(a.path)
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
            served = _service(a.path)
    prog.finish()
    text = [f"{a.path} -> {r.get('destination')}: {r.get('kind')} up to "
            f"{r.get('snapshot')}, {r.get('blocks')} blocks, {r.get('bytes')} bytes in "
            f"{r.get('seconds')} s"]
    return Report(r, text)


def cmd_status(a: argparse.Namespace) -> Report:
    from blockxfer.handles import open_volume
    from blockxfer.transfer.mirror import MirrorState, load
    from blockxfer.transfer.mirror.status import describe, status_lines
    served = _service(a.path)
    job, held = None, None
    if served is not None:          # the state as the volume holds it, the job's runtime
        got = served.call("mirror", op="status")
        st, generation = MirrorState.unpack(got["state"].encode()), got["generation"]
        runtime, job, held = got["runtime"], got["job"], got.get("held_by")
        if held is not None:        # a pull holds it: any daemon's runtime is its own
            served, runtime = None, _runtime(a.path)
    else:
        runtime = _runtime(a.path)
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
    d["increments_status"] = _increments().mirror_status(st.incr) \
        if st.incremental_mode and st.incr is not None else None
    d["volume"] = a.path
    return Report(d, status_lines(d, a.path))


def cmd_stop(a: argparse.Namespace) -> Report:
    served = _service(a.path)
    held = None
    if served is not None:
        r: dict[str, Any] = served.call("mirror", op="stop", forget=a.forget, timeout=None)
        held = r.get("held_by")      # a pull holds it: the stop is recorded, the daemon
        if held is None:             # (if any) is stopped below
            return _stopped_served(a, r)
    pid = daemon_pid(a.path)
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_WAIT
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(pid):
            raise DeviceError(f"the mirror daemon of {a.path} (pid {pid}) did not stop in "
                              f"{STOP_WAIT:.0f} s (an update may still run); try again")
    forgot = _forget(a.path) if a.forget else []
    if pid is not None and not a.forget and held is None:
        _mark_stopped(a.path)
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


def _mark_stopped(src: str) -> None:
    """Recorded in the volume, so a service started on it later leaves it stopped."""
    from blockxfer.handles import open_volume
    from blockxfer.transfer.mirror import load_if_any, save
    try:
        with open_volume(src, write=True) as vol:
            st = load_if_any(vol)
            if st is not None and not st.stopped:
                st.stopped = True
                save(vol, st)
    except BlockxferError as e:       # the daemon is stopped all the same
        log.warning("%s: could not record the mirror as stopped: %s", src, e)


def _forget(src: str) -> list[str]:
    from blockxfer.handles import open_volume
    from blockxfer.transfer.mirror.update import forget_mirror
    _refuse_served(src)
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
