"""The connection a scheduled pull keeps to its source (a session of requests on one
`stdio-serve`), over the stand-in for ssh of test_replicate.py: several pulls on
one channel with the same far-side process; a far side killed between pulls is
replaced by the next pull, once, transparently; each request is still checked on
its own (another volume on the kept channel is refused and logged); the far side's
idle timeout ends it; a request that asks no session ends the connection as
before.
Each starts several blockxfer processes (seconds on a busy machine): make test runs
the authorization one, make test-slow (CI) all."""

from __future__ import annotations

import os
import signal
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockxfer.drivers.blockdev import open_device
from blockxfer.errors import BlockxferError
from blockxfer.transfer.replicate import pull_once
from blockxfer.transport.endpoint import EndpointPull, Sessions, open_channel
from blockxfer.transport.ssh import SshChannel
from tests.test_replicate import FAKE_SSH, master, same, source, url
from tests.test_transport_tls import pki, tls_serve  # noqa: F401 - the fixture
from tests.transport_util import BLOCKXFER, bx, ok

# the far side runs as this forced command (the volume pinned, a short idle time)
FORCED_SSH = """#!/bin/sh
exec {bx} stdio-serve --volume "$FORCED_VOLUME" --allow replicate --idle-timeout "$IDLE" \\
    2>>"$FAR_LOG"
"""


@pytest.fixture
def fake_ssh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    script = tmp_path / "fakessh"
    script.write_text(FAKE_SSH)
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("BLOCKXFER_SSH", str(script))
    monkeypatch.setenv("BLOCKXFER_REMOTE_COMMAND", BLOCKXFER)
    monkeypatch.setenv("BLOCKXFER_STATE_DIR", str(tmp_path / "state"))
    return script


@pytest.fixture
def forced_ssh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    script = tmp_path / "forcedssh"
    script.write_text(FORCED_SSH.format(bx=BLOCKXFER))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    log = tmp_path / "far.log"
    monkeypatch.setenv("BLOCKXFER_SSH", str(script))
    monkeypatch.setenv("BLOCKXFER_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("FAR_LOG", str(log))
    monkeypatch.setenv("IDLE", "600")
    return log


@pytest.fixture
def sessions() -> Iterator[Sessions]:
    s = Sessions()
    yield s
    s.close()


def _children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            out.setdefault(ppid, []).append(int(d))
    return out


def far_sides(root: int) -> list[int]:
    """The `stdio-serve` processes under `root`, deepest last (a shell may run one as
    its child)."""
    tree, todo, found = _children(), [root], []
    while todo:
        pid = todo.pop(0)
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"stdio-serve" in f.read():
                    found.append(pid)
        except OSError:
            pass
        todo += tree.get(pid, [])
    return found


def raw(ch: object) -> object:
    """The channel itself, out of the wrapper Sessions lends it in."""
    return getattr(ch, "inner", ch)


def far_side(sessions: Sessions, where: str) -> int:
    """The pid of the `stdio-serve` behind the channel kept for `where`."""
    ch = raw(sessions._idle[where].ch)
    assert isinstance(ch, SshChannel)
    found = far_sides(ch.pid)
    assert found, "no stdio-serve under the kept channel"
    return found[-1]


def _pull(a: Path, b: Path, sessions: Sessions, keep: float = 60.0) -> str:
    return pull_once(url(a), str(b), open_device, name="B", sessions=sessions, keep=keep).kind


@pytest.mark.slow
def test_pulls_share_one_far_side(tmp_path: Path, fake_ssh: Path, sessions: Sessions) -> None:
    a, b = source(tmp_path), tmp_path / "b.img"
    assert _pull(a, b, sessions) == "full"
    far = far_side(sessions, url(a))
    for k, kind in ((2, "incremental"), (3, "incremental"), (3, "current")):
        if kind == "incremental":
            master(a, f"m{k}", os.urandom(1 << 16), k << 20)
        assert _pull(a, b, sessions) == kind
        assert far_side(sessions, url(a)) == far
    assert (sessions.opened, sessions.reopened) == (1, 0) and same(a, b, "m3")


@pytest.mark.slow
def test_a_far_side_killed_between_pulls_is_replaced(tmp_path: Path, fake_ssh: Path,
                                                     sessions: Sessions) -> None:
    a, b = source(tmp_path), tmp_path / "b.img"
    _pull(a, b, sessions)
    os.kill(far_side(sessions, url(a)), signal.SIGKILL)
    time.sleep(0.2)
    assert _pull(a, b, sessions) == "current" and sessions.opened == 2
    # killed and found alive still (the kill not seen yet): the request finds it closed
    kept = sessions._idle[url(a)]
    os.kill(far_side(sessions, url(a)), signal.SIGKILL)
    kept.ch.alive = lambda: True  # type: ignore[method-assign]  # as if the kill came late
    assert _pull(a, b, sessions) == "current"
    assert (sessions.opened, sessions.reopened) == (3, 1)
    assert ok(bx("replicate", "destinations", str(a), "--json")).stdout.count(b'"B"') == 1


def test_each_request_on_a_session_is_authorized(tmp_path: Path, forced_ssh: Path,
                                                 sessions: Sessions,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "o").mkdir()
    a, other = source(tmp_path), source(tmp_path / "o")
    b = tmp_path / "b.img"
    monkeypatch.setenv("FORCED_VOLUME", str(a))
    assert _pull(a, b, sessions) == "full"
    kept = sessions._take(url(a))
    assert kept is not None
    with pytest.raises(BlockxferError, match="for another volume") as e:
        EndpointPull(kept.ch, str(other), {"dest": "B", "have": []}, reused=True)
    assert e.value.exit_code == 4
    deadline = time.monotonic() + 10
    while b"for another volume" not in forced_ssh.read_bytes():
        assert time.monotonic() < deadline, forced_ssh.read_text()
        time.sleep(0.05)
    ok(bx("check", str(b)))


@pytest.mark.slow
def test_the_far_side_ends_an_idle_session(tmp_path: Path, forced_ssh: Path,
                                           sessions: Sessions,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = source(tmp_path), tmp_path / "b.img"
    monkeypatch.setenv("FORCED_VOLUME", str(a))
    monkeypatch.setenv("IDLE", "0.5")
    assert _pull(a, b, sessions, keep=60) == "full"
    ch = raw(sessions._idle[url(a)].ch)
    assert isinstance(ch, SshChannel)
    deadline = time.monotonic() + 15
    while ch.alive():
        assert time.monotonic() < deadline, "the far side outlived its idle time"
        time.sleep(0.05)
    assert ch._proc.returncode == 0          # it ended by itself, not killed
    master(a, "m2", os.urandom(1 << 16))
    assert _pull(a, b, sessions) == "incremental" and sessions.opened == 2


@pytest.mark.slow
def test_no_session_asked_ends_the_connection(tmp_path: Path, fake_ssh: Path,
                                              sessions: Sessions) -> None:
    a, b = source(tmp_path), tmp_path / "b.img"
    assert _pull(a, b, sessions, keep=0) == "full"
    assert not sessions.kept(url(a))
    ch, volume = open_channel(url(a))                 # as a one-shot pull asks
    p = EndpointPull(ch, volume, {"dest": "B", "have": []})
    assert p.plan["kind"] == "full"
    p.close()


@pytest.mark.slow
def test_a_tls_session(pki: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
                       sessions: Sessions) -> None:
    """The same over tls-serve: one connection for several pulls, another volume on it
    refused and logged with the certificate's name, the idle end replaced."""
    a, b, other = source(pki), pki / "b.img", pki / "other.img"
    ok(bx("init", str(other), "--size", "64M"))
    monkeypatch.setenv("BLOCKXFER_TLS_DIR", str(pki / "client"))
    monkeypatch.setenv("BLOCKXFER_STATE_DIR", str(pki / "state"))
    with tls_serve(pki, "--peer", f"backup1={a}", "--allow", "replicate",
                   "--idle-timeout", "1") as port:
        src = f"tls://127.0.0.1:{port}{a}"

        def pull() -> str:
            return pull_once(src, str(b), open_device, name="backup1", sessions=sessions,
                             keep=30).kind
        assert pull() == "full"
        assert pull() == "current" and sessions.opened == 1
        kept = sessions._take(src)
        assert kept is not None
        with pytest.raises(BlockxferError, match="for another volume"):
            EndpointPull(kept.ch, str(other), {"dest": "backup1", "have": []}, reused=True)
        assert pull() == "current" and sessions.opened == 2
        time.sleep(1.5)                               # the server's idle time passes
        assert pull() == "current" and sessions.opened == 3
    log = (pki / "tls-serve.log").read_text()
    assert "backup1@127.0.0.1: refused or failed" in log and "for another volume" in log
    assert "session idle for 1 s" in log


@pytest.mark.slow
def test_a_served_targets_schedule_keeps_one_connection(tmp_path: Path, fake_ssh: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """`replicate pull --every` into a served volume: its service's pulls, and a one-shot
    `replicate pull` asking it, go over one ssh; `replicate stop` ends it."""
    from tests.nbd.serveproc import serve_process
    counting = tmp_path / "countingssh"
    counting.write_text(FAKE_SSH.replace("while", 'echo ssh >> "$SSH_LOG"\nwhile', 1))
    counting.chmod(counting.stat().st_mode | stat.S_IXUSR)
    log = tmp_path / "ssh.log"
    log.touch()
    monkeypatch.setenv("BLOCKXFER_SSH", str(counting))
    monkeypatch.setenv("SSH_LOG", str(log))
    monkeypatch.setenv("BLOCKXFER_RUN_DIR", str(tmp_path / "run"))
    a, b = source(tmp_path), tmp_path / "b.img"
    ok(bx("replicate", "pull", url(a), str(b), "--name", "B"))
    with serve_process(str(b), str(tmp_path / "b.sock")) as service:
        ok(bx("replicate", "pull", url(a), str(b), "--name", "B", "--every", "1s"))
        for k in (2, 3):
            master(a, f"m{k}", os.urandom(1 << 16), k << 20)
            deadline = time.monotonic() + 60
            while b'"m%d"' % k not in ok(bx("snapshots", str(b), "--json")).stdout:
                assert time.monotonic() < deadline, f"the service did not pull m{k}"
                time.sleep(0.3)
        r = ok(bx("replicate", "pull", url(a), str(b), "--name", "B", "--json"))
        assert b'"current"' in r.stdout
        assert log.read_text().count("ssh") == 2      # the first pull's, the service's
        assert far_sides(service.pid)
        ok(bx("replicate", "stop", str(b)))
        deadline = time.monotonic() + 20
        while far_sides(service.pid):
            assert time.monotonic() < deadline, "the kept far side outlived the schedule"
            time.sleep(0.1)
    assert same(a, b, "m3")


class _Quiet:
    """A channel stand-in that is open until closed."""
    peer = "fake"

    def __init__(self) -> None:
        self.open = True

    def alive(self) -> bool:
        return self.open

    def close(self) -> None:
        self.open = False

    abort = close


def test_a_second_pull_waits_for_the_channel_in_use() -> None:
    """Two pulls to one URL at once (a hand-run pull into a served copy during its
    scheduled one): the second takes the first's channel once it is given back,
    instead of logging in again; one that ends without giving it back frees the URL."""
    from blockxfer.transport.endpoint import _Kept, _Lent
    sessions, where = Sessions(), "ssh://a/x.img"
    assert sessions._take(where) is None            # the first pull opens a channel...
    lent = _Lent(_Quiet(), sessions, where)          # type: ignore[arg-type]
    sessions._lend(where, lent)
    got: list[object] = []
    second = threading.Thread(target=lambda: got.append(sessions._take(where)))
    second.start()
    time.sleep(0.3)
    assert second.is_alive()                         # ...and the second waits for it
    sessions.give(where, _Kept(lent, "x.img", time.monotonic() + 60))
    second.join(5)
    assert got and got[0] is not None and got[0].ch is lent     # type: ignore[attr-defined]
    third = threading.Thread(target=lambda: got.append(sessions._take(where)))
    third.start()
    time.sleep(0.3)
    assert third.is_alive()
    lent.abort()                                     # the second pull failed: cut
    third.join(5)
    assert got[-1] is None and not third.is_alive()
