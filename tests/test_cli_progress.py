"""Progress: a tqdm bar with bytes, rate and ETA when standard error is a
terminal (a pty here), parsable lines with -P, and --log-level through logging."""

from __future__ import annotations

import os
import pty
import select
import socket
import subprocess
from pathlib import Path

from tests.clihelp import BX, bx, one_line
from tests.nbd.serveproc import serve_process

MiB = 1 << 20


def on_a_terminal(*argv: str) -> str:
    """Run with standard error on a pseudo-terminal; what the terminal showed."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([*BX, *argv], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    seen = b""
    while True:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:              # EIO: the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        elif proc.poll() is not None:
            break
    assert proc.wait(timeout=300) == 0, seen.decode(errors="replace")
    os.close(master)
    return seen.decode(errors="replace")


def test_send_on_a_terminal_shows_a_bar_with_rate_and_eta(tmp_path: Path) -> None:
    vol = str(tmp_path / "v.img")
    assert bx("init", vol, "--size", "512M").returncode == 0
    assert bx("write", vol, data=os.urandom(MiB) * 192).returncode == 0
    assert bx("snapshot", f"{vol}@s1").returncode == 0
    shown = on_a_terminal("send", vol, "s1", "-o", str(tmp_path / "s.bs"))
    assert "send:" in shown and "100%" in shown, shown      # tqdm: 'send: 100%|####|'
    assert "MB/s" in shown or "GB/s" in shown, shown        # the rate
    assert "<" in shown and "192M" in shown, shown          # elapsed<ETA, the total


def test_parsable_progress_of_dump_and_restore(tmp_path: Path) -> None:
    d = str(tmp_path)
    vol, tape = f"{d}/v.img", f"{d}/t.vtape"
    assert bx("init", vol, "--size", "32M").returncode == 0
    assert bx("write", vol, data=os.urandom(MiB)).returncode == 0
    assert bx("snapshot", f"{vol}@s1").returncode == 0
    assert bx("tape", "create", tape, "--capacity", "64M").returncode == 0
    for argv in (("dump", vol, "s1", "--tape", tape, "-P"),
                 ("restore", f"{d}/b.img", "--tape", tape, "--image", "1", "-P")):
        r = bx(*argv)
        assert r.returncode == 0, r.stderr
        done = [ln.split("\t") for ln in r.stderr.decode().splitlines()
                if ln.startswith("done\t")]
        assert len(done) == 1 and done[0][1] == argv[0] and int(done[0][3]) > 0, r.stderr
        assert len(done[0]) == 5 and float(done[0][2]) >= 0


def test_log_level_sets_what_the_log_shows(tmp_path: Path) -> None:
    vol = str(tmp_path / "v.img")
    assert bx("init", vol, "--size", "16M").returncode == 0
    for level, shown in (("info", True), ("warning", False)):
        with serve_process(vol, str(tmp_path / "s.sock"), "--log-level", level) as proc:
            pass
        err = proc.output[1]  # type: ignore[attr-defined]  # set by serveproc
        assert ("blockxfer serve: serving" in err) == shown, err


def test_verbose_and_syslog(tmp_path: Path) -> None:
    vol = str(tmp_path / "v.img")
    assert bx("init", vol, "--size", "16M").returncode == 0
    with serve_process(vol, str(tmp_path / "s.sock"), "--log-level", "warning", "-v") as proc:
        pass
    assert "blockxfer serve: serving" in proc.output[1]  # type: ignore[attr-defined]  # set by serveproc

    log = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)   # a stand-in for /dev/log
    log.bind(str(tmp_path / "log"))
    log.settimeout(30)
    try:
        with serve_process(vol, str(tmp_path / "s.sock"), "--syslog", str(tmp_path / "log")):
            line = log.recv(4096).decode()
    finally:
        log.close()
    assert line.startswith("<") and "blockxfer[" in line and "serve: serving" in line, line
    r = bx("serve", vol, "--listen", f"unix:{tmp_path}/t.sock", "--syslog",
           str(tmp_path / "nosuch"))
    assert r.returncode == 2 and "--syslog" in one_line(r)
