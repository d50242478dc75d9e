"""What an operator sees: a `blockxfer send` of 1 GiB typed into a real terminal
(tmux: new-session, send-keys, capture-pane) draws a progress bar with a rate and
an ETA while it runs; the same send with standard error on a pipe and -P prints
parsable progress lines instead (docs/cli-json.md, "Progress").

About 30 s here (writing 1 GiB, then sending it twice, read at 100 MiB/s), so `slow`."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.clihelp import BX, bx

pytestmark = pytest.mark.slow
GiB = 1 << 30
# tqdm's bar mid-way: 'send:  40%|#####     | 409M/1.00G [00:01<00:02, 225MB/s]'
BAR = re.compile(r"send:\s+(\d+)%\|.*\| *[\d.]+[kMG]?/1\.00G "
                 r"\[\d\d:\d\d<(\d\d:\d\d), +[\d.]+[kMG]?B/s\]")
DONE = re.compile(r"^BXDONE (\d+)$", re.M)      # typed as BX''DONE: only the echo matches
SLOW_READER = ("import sys, time; f = open(sys.argv[1], 'wb'); "
               "[(f.write(c), time.sleep(0.04)) "
               "for c in iter(lambda: sys.stdin.buffer.read(4 << 20), b'')]")


@pytest.fixture(scope="module")
def gib_volume(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A volume holding 1 GiB of incompressible data in snapshot s1."""
    d = tmp_path_factory.mktemp("terminal")
    vol = d / "v.img"
    assert bx("init", str(vol), "--size", "1300M", "-q").returncode == 0
    with open("/dev/urandom", "rb") as rnd:
        head = subprocess.Popen(["head", "-c", str(GiB)], stdin=rnd, stdout=subprocess.PIPE)
        r = subprocess.run([*BX, "write", str(vol), "-q"], stdin=head.stdout,
                           capture_output=True, timeout=600)
        assert head.wait() == 0 and r.returncode == 0, r.stderr
    assert bx("snapshot", f"{vol}@s1", "-q").returncode == 0
    yield vol
    shutil.rmtree(d, ignore_errors=True)         # 2+ GiB: not left for pytest to keep


def tmux(sock: Path, *args: str) -> str:
    r = subprocess.run(["tmux", "-S", str(sock), *args], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, (args, r.stderr)
    return r.stdout


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is missing (apt package tmux)")
def test_a_send_in_a_terminal_draws_a_bar_with_rate_and_eta(gib_volume: Path) -> None:
    sock, out = gib_volume.parent / "tmux.sock", gib_volume.parent / "s.bs"
    tmux(sock, "-f", "/dev/null", "new-session", "-d", "-s", "bx", "-x", "120", "-y", "20",
         "bash --norc --noprofile")
    try:
        # Read at about 100 MiB/s: an unthrottled send of 1 GiB can end (ETA 00:00)
        # between two captures on a fast machine, as it did on CI.
        slow = f"python3 -c \"{SLOW_READER}\" {out}"
        command = " ".join([*BX, "send", str(gib_volume), "s1", "|", slow])
        tmux(sock, "send-keys", "-t", "bx", f"{command}; echo BX''DONE ${{PIPESTATUS[0]}}", "Enter")
        frames: list[str] = []
        deadline = time.monotonic() + 300
        while not any(DONE.search(f) for f in frames[-1:]):
            assert time.monotonic() < deadline, frames[-1:]
            time.sleep(0.3)
            frames.append(tmux(sock, "capture-pane", "-p", "-t", "bx"))
    finally:
        subprocess.run(["tmux", "-S", str(sock), "kill-server"], capture_output=True)
    finished = DONE.search(frames[-1])
    assert finished and finished.group(1) == "0", frames[-1]
    mid = [m for f in frames for m in BAR.finditer(f) if 0 < int(m.group(1)) < 100]
    assert mid, "no progress bar mid-send in:\n" + "\n".join(frames[-3:])
    assert any(m.group(2) != "00:00" for m in mid), "no ETA in the frames"
    assert out.stat().st_size > GiB // 2
    out.unlink()


def test_the_same_send_on_a_pipe_prints_parsable_lines(gib_volume: Path) -> None:
    out = gib_volume.parent / "p.bs"
    # Read slowly here too: -P prints one line a second, and a fast send is done sooner.
    send = subprocess.Popen([*BX, "send", str(gib_volume), "s1", "-P"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    slow = subprocess.run(["python3", "-c", SLOW_READER, str(out)], stdin=send.stdout,
                          timeout=300)
    _, stderr = send.communicate(timeout=60)
    assert send.returncode == 0 and slow.returncode == 0, stderr
    lines = stderr.decode().splitlines()
    rows = [ln.split("\t") for ln in lines if ln.startswith(("progress\t", "done\t"))]
    assert rows and all(len(row) == 5 and row[1] == "send" for row in rows), lines
    assert lines[-1].startswith("sent ") and "\x1b" not in stderr.decode()   # no bar
    progress = [row for row in rows if row[0] == "progress"]
    assert rows[-1][0] == "done" and len(progress) >= 1, rows
    seconds = [float(row[2]) for row in rows]
    done = [int(row[3]) for row in rows]
    assert seconds == sorted(seconds) and done == sorted(done)
    assert {row[4] for row in rows} == {rows[0][4]} and int(rows[0][4]) >= GiB
    assert done[-1] >= GiB * 0.99
    out.unlink()
