"""`blockxfer mirror start|status|stop|update` as an operator runs them: the
daemon with its pid file, one update now, the status with --json, and refusals
as one line with the documented exit code."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from blockxfer.cli.mirror_daemon import stop_on_signal
from tests.clihelp import BX, one_line
from tests.clihelp import run as bxrun
from tests.test_cli_json import documented


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "BLOCKXFER_RUN_DIR": str(tmp_path / "run")}


def bx(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[bytes]:
    return bxrun(args, env=env)


def ok(r: subprocess.CompletedProcess[bytes]) -> dict:
    assert r.returncode == 0, r.stderr.decode()
    out = r.stdout.decode()
    return json.loads(out) if out.startswith("{") else {}


def source(tmp_path: Path, env: dict[str, str]) -> str:
    vol = str(tmp_path / "src.img")
    ok(bx(env, "init", vol, "--size", "32M"))
    r = subprocess.run([*BX, "write", vol], input=os.urandom(1 << 20), capture_output=True,
                       env=env)
    assert r.returncode == 0, r.stderr
    return vol


def status(env: dict[str, str], src: str) -> dict:
    """`mirror status --json`, or {} while there is none yet."""
    r = bx(env, "mirror", "status", src, "--json")
    return json.loads(r.stdout) if r.returncode == 0 else {}


def wait_for(what: Callable[[], Any], timeout: float = 90) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = what()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError("timed out")


def foreground(env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    """`mirror start ... --foreground`, once it runs its loop: its pid file is there.
    Until then `mirror start` claims the volume to record the mirror, and a status
    read holding it just then makes it exit 4 (in use): the tests polled status at
    once, and under load a start lost that race now and then."""
    p = subprocess.Popen([*BX, "mirror", "start", *args, "--foreground"], env=env,
                         stderr=subprocess.PIPE)
    pid_files = Path(env["BLOCKXFER_RUN_DIR"]).glob
    try:
        wait_for(lambda: p.poll() is not None or any(
            f.read_text().split() == [str(p.pid)] for f in pid_files("mirror-*.pid")))
    except BaseException:
        p.kill()
        p.wait()
        raise
    if p.poll() is not None:
        _, err = p.communicate()
        raise AssertionError(f"mirror start exited {p.returncode}: {err.decode()}")
    return p


def test_daemon_mirrors_reports_and_stops(tmp_path: Path, env: dict[str, str]) -> None:
    src, dst = source(tmp_path, env), str(tmp_path / "dst.img")
    started = ok(bx(env, "mirror", "start", src, dst, "--interval", "1s", "--json"))
    pid = started["pid"]
    assert Path(started["pid_file"]).read_text().strip() == str(pid)
    try:
        st = wait_for(lambda: (s := ok(bx(env, "mirror", "status", src, "--json")))["last"]
                      and s)
        assert st["running"] and st["pid"] == pid and st["destination"] == dst
        assert {"last", "lag", "next_update", "error", "destination_state"} <= set(st)
        assert st["last"]["snap"].startswith("mirror.") and st["error"] is None
        r = bx(env, "write", src, "--offset", "0")
        text = bx(env, "mirror", "status", src).stdout.decode()
        assert "last update" in text and "destination   consistent" in text
        wait_for(lambda: status(env, src).get("last", {}).get("snap") not in (None, "mirror.1"))
        now = ok(bx(env, "mirror", "update", src, "--json"))   # between ticks, or it waits
        assert now["snapshot"].startswith("mirror.") and now["kind"] != "full"
    finally:
        stopped = ok(bx(env, "mirror", "stop", src, "--json"))
    assert stopped["stopped"] and not Path(started["pid_file"]).exists()
    from blockxfer.cli.mirror_daemon import alive as _alive
    assert not _alive(pid)
    assert r.returncode == 0
    got = ok(bx(env, "mirror", "update", src, "--json"))
    assert got["kind"] == "incremental (plane difference)"
    a = bx(env, "read", f"{src}@{got['snapshot']}")
    b = bx(env, "read", dst)
    assert a.returncode == b.returncode == 0 and a.stdout == b.stdout
    assert ok(bx(env, "check", dst, "--json"))["clean"]
    forgot = ok(bx(env, "mirror", "stop", src, "--forget", "--json"))
    assert forgot["forgotten"] and forgot["destroyed"] == [got["snapshot"]]
    assert ok(bx(env, "snapshots", src, "--json"))["snapshots"] == []
    keys = documented()
    for name, result in (("mirror start", started), ("mirror status", st),
                         ("mirror update", got), ("mirror stop", stopped)):
        assert keys[name] <= set(result), f"{name}: {keys[name] - set(result)}"


def test_foreground_stops_on_sigterm(tmp_path: Path, env: dict[str, str]) -> None:
    src, dst = source(tmp_path, env), str(tmp_path / "dst.img")
    p = foreground(env, src, dst, "--interval", "1s")
    try:
        wait_for(lambda: status(env, src).get("last"))
    finally:
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert "mirror of" in err.decode() and "stopped" in err.decode()


def test_the_stop_handler_takes_no_lock_the_main_thread_may_hold() -> None:
    """SIGTERM may land while the daemon's main thread is inside stop.wait() holding
    the event's lock (test_foreground_stops_on_sigterm hung so under load): the handler,
    run in that same thread, must not wait for it."""
    stop = threading.Event()
    handler, close = stop_on_signal(stop)
    try:
        with stop._cond:              # type: ignore[attr-defined]  # the lock wait() holds
            handler(signal.SIGTERM, None)   # Event.set() here would wait forever
        assert stop.wait(30)
    finally:
        close()


def test_refusals_are_one_line(tmp_path: Path, env: dict[str, str]) -> None:
    src = source(tmp_path, env)
    r = bx(env, "mirror", "status", src)
    assert r.returncode == 5 and "has no mirror" in one_line(r)
    r = bx(env, "mirror", "update", src)
    assert r.returncode == 5 and "mirror start" in one_line(r)
    r = bx(env, "mirror", "start", src, "ftp://host/x")
    assert r.returncode == 2 and "a mirror goes to a volume" in one_line(r)
    r = bx(env, "mirror", "start", src, str(tmp_path / "d.img"), "--interval", "soon")
    assert r.returncode == 2 and "--interval" in one_line(r)
    r = bx(env, "mirror", "start", src)
    assert r.returncode == 2 and "DESTINATION" in one_line(r)
    r = bx(env, "mirror", "start", src, src)
    assert r.returncode == 2 and "the source itself" in one_line(r)
    r = bx(env, "mirror", "stop", src)
    assert r.returncode == 5 and "no mirror daemon" in one_line(r)
    r = bx(env, "mirror", "start", src, "--base", "x.img")
    assert r.returncode == 2 and "--increments" in one_line(r)
    assert ok(bx(env, "snapshots", src, "--json"))["snapshots"] == []     # nothing changed


def test_an_existing_mirror_is_not_replaced_silently(tmp_path: Path,
                                                     env: dict[str, str]) -> None:
    src, dst = source(tmp_path, env), str(tmp_path / "dst.img")
    p = foreground(env, src, dst)
    try:
        wait_for(lambda: status(env, src).get("running"))
        r = bx(env, "mirror", "start", src, dst)
        assert r.returncode == 5 and "already running" in one_line(r)
    finally:
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=60)
    r = bx(env, "mirror", "start", src, str(tmp_path / "other.img"))
    assert r.returncode == 2 and "already mirrors to" in one_line(r)


@pytest.mark.skipif(importlib.util.find_spec("blockxfer.transfer.increments") is not None,
                    reason="incremental mirroring is in this build")
def test_incremental_mode_without_its_module_is_a_clear_error(tmp_path: Path,
                                                               env: dict[str, str]) -> None:
    src = source(tmp_path, env)
    r = bx(env, "mirror", "start", src, "--base", str(tmp_path / "base.img"),
           "--increments", str(tmp_path / "incr"))
    assert r.returncode == 2 and "not in this build" in one_line(r)


def test_every_mirror_command_has_its_json_keys_documented() -> None:
    keys = documented()
    for name in ("mirror start", "mirror status", "mirror stop", "mirror update"):
        assert keys.get(name), f"docs/cli-json.md has no section for {name!r}"


def test_update_dry_run_counts_what_it_would_send(tmp_path: Path, env: dict[str, str]) -> None:
    src, dst = source(tmp_path, env), str(tmp_path / "dst.img")
    ok(bx(env, "mirror", "start", src, dst, "--interval", "1h", "--json"))
    try:
        wait_for(lambda: status(env, src).get("last"))
    finally:
        ok(bx(env, "mirror", "stop", src, "--json"))
    w = subprocess.run([*BX, "write", src, "--offset", "4M"], input=os.urandom(64 << 10),
                       capture_output=True, env=env)
    assert w.returncode == 0, w.stderr
    nxt = ok(bx(env, "mirror", "update", src, "-n", "--json"))
    assert nxt["dry_run"] and nxt["kind"] == "incremental" and 16 <= nxt["blocks"] < 64, nxt
    assert nxt["bytes"] == nxt["blocks"] * 4096 and nxt["destination"] == dst
    ok(bx(env, "mirror", "update", src, "--json"))
    assert ok(bx(env, "mirror", "update", src, "-n", "--json"))["blocks"] < 16


def test_incremental_daemon_status_names_its_error_and_its_increments(
        tmp_path: Path, env: dict[str, str]) -> None:
    """An incremental mirror keeps its record in the increments directory, not in the
    volume: status reads it there, and a first update refused (its base file exists)
    shows as the daemon's error, with no directory left behind."""
    src, taken = source(tmp_path, env), tmp_path / "taken.bs"
    taken.write_bytes(b"x")
    inc = tmp_path / "inc"
    ok(bx(env, "mirror", "start", src, "--base", str(taken), "--increments", str(inc)))
    try:
        st = wait_for(lambda: (s := status(env, src)).get("error") and s, timeout=30)
        assert "already exists" in st["error"] and st["increments_status"]["state"] == "none"
        assert not inc.exists()
        assert "error" in bx(env, "mirror", "status", src).stdout.decode()
    finally:
        ok(bx(env, "mirror", "stop", src, "--forget"))
    base = tmp_path / "base.bs"
    ok(bx(env, "mirror", "start", src, "--base", str(base), "--increments", str(inc)))
    try:
        st = wait_for(lambda: (s := status(env, src)).get("increments_status", {})
                      .get("state") == "ready" and s, timeout=30)
        text = bx(env, "mirror", "status", src).stdout.decode()
        assert "last update   none yet" not in text and "increments    " in text, text
        assert st["error"] is None and base.exists()
    finally:
        ok(bx(env, "mirror", "stop", src, "--forget"))
