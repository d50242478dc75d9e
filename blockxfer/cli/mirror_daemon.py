"""The mirror daemon of an unserved volume: its run files (pid, log, runtime status
under /run/blockxfer or $BLOCKXFER_RUN_DIR), starting it detached, its loop in
the foreground, stopping it, and recording a stop in the volume.
"""

from __future__ import annotations

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

from blockxfer.errors import BlockxferError, DeviceError, VolumeError

from .mirror_source import update_once

log = logging.getLogger("blockxfer.mirror")
START_WAIT = 30.0                 # seconds `mirror start` waits for the daemon's pid file
STOP_WAIT = 60.0


def run_file(src: str, ext: str) -> str:
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
        with open(run_file(src, "pid")) as f:
            pid = int(f.read().split()[0])
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().split(b"\0")
    except (OSError, ValueError, IndexError):
        return None
    return pid if b"mirror" in cmd and b"start" in cmd else None


def alive(pid: int) -> bool:
    """Is the process there and not a zombie (a detached daemon's parent may be a
    container's init that never reaps)?"""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def runtime(src: str) -> dict[str, Any] | None:
    try:
        with open(run_file(src, "json")) as f:
            d: dict[str, Any] = json.load(f)
    except (OSError, ValueError):
        return None
    d["running"] = daemon_pid(src) == d.get("pid")
    return d


def spawn(src: str, syslog: str | None) -> tuple[int, str]:
    """Start the loop of `src`'s mirror (saved in the volume) as a detached process,
    wait until it runs; its pid and log file."""
    log_file = run_file(src, "log")
    os.makedirs(os.path.dirname(log_file), exist_ok=True)
    cmd = [sys.executable, "-m", "blockxfer.cli", "mirror", "start", src,
           "--foreground", "--daemon-child", "--log-level", "info"]
    if syslog:
        cmd += ["--syslog", syslog]
    with open(log_file, "ab") as err:
        child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=err, start_new_session=True, close_fds=True)
    deadline = time.monotonic() + START_WAIT
    while time.monotonic() < deadline:
        if daemon_pid(src) == child.pid:
            return child.pid, log_file
        if child.poll() is not None:
            raise VolumeError(f"the mirror daemon of {src} stopped at once: "
                              f"{_tail(log_file)} (log: {log_file})")
        time.sleep(0.05)
    raise DeviceError(f"the mirror daemon of {src} did not start in {START_WAIT:.0f} s "
                      f"(log: {log_file})")


def stop(src: str, pid: int) -> None:
    """SIGTERM the daemon and wait for it to end (an update in flight is abandoned)."""
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_WAIT
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if alive(pid):
        raise DeviceError(f"the mirror daemon of {src} (pid {pid}) did not stop in "
                          f"{STOP_WAIT:.0f} s (an update may still run); try again")


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
    on_signal, close_relay = stop_on_signal(stop)
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    pid_file, status_file = run_file(src, "pid"), run_file(src, "json")
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
        close_relay()
        for path in (pid_file, status_file):
            with contextlib.suppress(OSError):
                os.remove(path)
        log.info("mirror of %s stopped", src)


def stop_on_signal(stop: threading.Event) -> tuple[Callable[..., None], Callable[[], None]]:
    """A signal handler that sets `stop`, and what closes it. Python runs the handler in
    the main thread, which may at that moment hold the event's own lock inside
    stop.wait() (between the loop's ticks): Event.set() there waited for that lock
    forever, and the daemon hung on SIGTERM. The handler only writes to a pipe, which
    takes no lock; a thread of its own reads it and sets the event."""
    r, w = os.pipe()
    os.set_blocking(w, False)

    def relay() -> None:
        while os.read(r, 64):
            stop.set()
        os.close(r)

    def handler(*_: object) -> None:
        with contextlib.suppress(BlockingIOError):    # full: a byte already waits
            os.write(w, b"x")

    relay_thread = threading.Thread(target=relay, name="mirror-stop", daemon=True)
    relay_thread.start()

    def close() -> None:
        os.close(w)                   # the relay reads EOF and ends
        relay_thread.join()
    return handler, close


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


def mark_stopped(src: str) -> None:
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
