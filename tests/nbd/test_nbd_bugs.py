"""A bug in the server or the volume never leaves a client waiting: the connection
that met it is closed at once, every other connection goes on, and the volume is
untouched by the request that failed.

The fault is a RuntimeError (not an error the server answers with an errno) from
a volume read or write that covers one poisoned offset. `blockxfer serve` runs on
a real volume in a forked child of the test process (tests/nbd/serveproc.py), so
the wrapper set here with monkeypatch is the one it calls; the clients are
libnbd's Python binding (python3-libnbd, under /usr/bin/python3), each run with a
timeout so a hang fails the test instead of stalling it. The in-process tests
below reach the reader's inline path, the worker and the read pipeline over the
fake volume with exact timing.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from blockxfer.handles import init_volume
from blockxfer.nbd import protocol as p
from blockxfer.nbd.commands import Commands
from blockxfer.nbd.server import Server
from blockxfer.volume import Volume
from tests import clihelp
from tests.nbd.fakes import FakeVolume
from tests.nbd.nbdclient import Client
from tests.nbd.serveproc import serve_forked
from tests.nbd.test_nbd_interop import SYSTEM_PYTHON

MiB = 1 << 20
POISON = 8 * MiB                 # a read or write covering this byte meets the bug
BUG = "injected bug"


def poisoned(method: Callable[..., Any], offsets: Callable[..., list[int]],
             lengths: Callable[..., list[int]]) -> Callable[..., Any]:
    """`method` that raises RuntimeError when one of the ranges it is given covers
    POISON, before it touches anything."""
    def wrapper(self: Any, *args: Any, **kw: Any) -> Any:
        for off, n in zip(offsets(*args), lengths(*args), strict=True):
            if off <= POISON < off + n:
                raise RuntimeError(f"{BUG} at {off}+{n}")
        return method(self, *args, **kw)
    return wrapper


def poison_volume(monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """Every Volume method the NBD server reads (or writes) through, in the class:
    the forked server inherits it."""
    if kind == "read":
        monkeypatch.setattr(Volume, "read_leased", poisoned(
            Volume.read_leased, lambda off, n, *_: [off], lambda off, n, *_: [n]))
        return
    monkeypatch.setattr(Volume, "write", poisoned(
        Volume.write, lambda off, data: [off], lambda off, data: [len(data)]))
    monkeypatch.setattr(Volume, "write_parts", poisoned(
        Volume.write_parts, lambda off, parts: [off],
        lambda off, parts: [sum(len(x) for x in parts)]))
    monkeypatch.setattr(Volume, "write_blocks", poisoned(
        Volume.write_blocks, lambda offs, datas: list(offs),
        lambda offs, datas: [len(d) for d in datas]))


# One run of the clients: `good` is connected throughout; `bad` sends a few
# requests and then the poisoned one, and must see an error or the disconnect
# within seconds; `good` and a client that connects afterwards read and write.
CLIENTS = textwrap.dedent("""
    import json, os, sys, time, nbd
    uri, kind, length, poison = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    MiB = 1 << 20

    def connect():
        h = nbd.NBD()
        h.connect_uri(uri)
        return h

    good = connect()
    a = os.urandom(2 * MiB)
    good.pwrite(a, 0)
    bad = connect()
    bad.pwrite(os.urandom(MiB), 16 * MiB)            # the bad connection worked first
    start = time.monotonic()
    cookies = [bad.aio_pread(nbd.Buffer(length), 20 * MiB + i * 2 * length)
               for i in range(4)]                      # requests in flight with the bug
    try:
        if kind == "read":
            bad.pread(length, poison)
        else:
            bad.pwrite(os.urandom(length), poison)
        error = None
    except nbd.Error as e:
        error = str(e)
    seconds = time.monotonic() - start
    try:                                               # the rest: answered or dropped
        while bad.aio_in_flight() > 0 and time.monotonic() - start < 10:
            bad.poll(1000)
    except nbd.Error:
        pass
    unfinished = bad.aio_in_flight()
    hung_up = bad.aio_is_dead() or bad.aio_is_closed()

    assert good.pread(len(a), 0) == a                  # the other connection goes on
    b = os.urandom(MiB)
    good.pwrite(b, 4 * MiB)
    good.flush()
    late = connect()                                   # and a new one works
    assert late.pread(len(a), 0) == a and late.pread(MiB, 4 * MiB) == b
    c = os.urandom(3 * MiB)
    late.pwrite(c, 24 * MiB)
    late.flush()
    assert late.pread(len(c), 24 * MiB) == c
    assert good.pread(len(c), 24 * MiB) == c
    late.shutdown()
    good.shutdown()
    print(json.dumps({"error": error, "seconds": seconds, "unfinished": unfinished,
                      "hung_up": hung_up}))
""")


def need_libnbd() -> None:
    if not os.path.exists(SYSTEM_PYTHON) or subprocess.run(
            [SYSTEM_PYTHON, "-c", "import nbd"], capture_output=True).returncode:
        pytest.skip("Python libnbd binding missing (apt-get install python3-libnbd)")


@pytest.mark.parametrize("kind, length", [
    ("read", 4096),            # a small READ: on the reader's thread or the worker
    ("read", MiB),             # a large READ: on a read pipeline thread
    ("write", 4096),           # a one-block WRITE
    ("write", MiB),            # a large WRITE: on the worker
])
def test_bug_closes_only_its_connection(tmp_path: Path, run_dir: str,
                                        monkeypatch: pytest.MonkeyPatch,
                                        kind: str, length: int) -> None:
    need_libnbd()
    path = str(tmp_path / "vol.img")
    init_volume(path, size=64 * MiB, block_size=4096, force=False).close()
    sock = str(tmp_path / "nbd.sock")
    poison_volume(monkeypatch, kind)
    with serve_forked(path, sock) as server:
        r = subprocess.run([SYSTEM_PYTHON, "-c", CLIENTS, f"nbd+unix:///?socket={sock}",
                            kind, str(length), str(POISON)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        got = json.loads(r.stdout)
    assert server.returncode == 0, Path(server.log).read_text()
    assert got["error"] is not None, "the poisoned request was answered as a success"
    assert got["seconds"] < 5, got
    assert got["unfinished"] == 0 and got["hung_up"], got
    log = Path(server.log).read_text()
    lines = [line for line in log.splitlines() if BUG in line]
    assert len(lines) == 1, log
    assert "connection 2 from" in lines[0] and "RuntimeError" in lines[0], lines[0]
    assert "Traceback" not in log                     # that is for --log-level debug
    monkeypatch.undo()
    check = clihelp.bx("check", path)
    assert check.returncode == 0 and b"clean" in check.stdout, check


# --- in process, over the fake volume ---

@pytest.fixture
def fake() -> FakeVolume:
    return FakeVolume(64 * MiB)


@pytest.fixture
def fserver(fake: FakeVolume) -> Iterator[Server]:
    s = Server(fake)
    yield s
    s.shutdown(timeout=5)


def broken(volume: FakeVolume, monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    """AssertionError from the volume's `method` (read, write) covering POISON, or
    from the server's own code that builds a READ's reply (`reply`)."""
    if method == "reply":
        real_reply = Commands._read_reply

        def bad_reply(self: Commands, req: p.Request, data: Any) -> Any:
            if req.offset == POISON:
                raise AssertionError(BUG)
            return real_reply(self, req, data)
        monkeypatch.setattr(Commands, "_read_reply", bad_reply)
        return
    real = getattr(volume, method)

    def bug(off: int, *args: Any) -> Any:
        if off <= POISON < off + (len(args[0]) if method == "write" else args[0]):
            raise AssertionError(BUG)
        return real(off, *args)
    monkeypatch.setattr(volume, method, bug)


def closed_within(c: Client, seconds: float, length: int) -> list[int]:
    """The cookies answered before the server hung up (READs of 4096 bytes from
    cookie 100, of `length` from 200); fails if it did not hang up."""
    c.sock.settimeout(seconds)
    cookies: list[int] = []
    while True:
        try:
            head = c.sock.recv(p.SIMPLE_REPLY.size, socket.MSG_WAITALL)
        except TimeoutError:
            pytest.fail(f"the server neither answered nor hung up in {seconds} s")
        if len(head) < p.SIMPLE_REPLY.size:
            return cookies
        _, error, cookie = p.SIMPLE_REPLY.unpack(head)
        cookies.append(cookie)
        if cookie >= 100 and not error:                      # a READ's data
            c.sock.recv(4096 if cookie < 200 else length, socket.MSG_WAITALL)


@pytest.mark.parametrize("where, typ, length", [
    ("read", p.CMD_READ, 4096), ("read", p.CMD_READ, MiB), ("write", p.CMD_WRITE, 4096),
    ("write", p.CMD_WRITE, MiB), ("reply", p.CMD_READ, 4096), ("reply", p.CMD_READ, MiB)])
def test_bug_hangs_up_on_every_path(fserver: Server, fake: FakeVolume,
                                    monkeypatch: pytest.MonkeyPatch,
                                    caplog: pytest.LogCaptureFixture,
                                    where: str, typ: int, length: int) -> None:
    """Requests queued behind the bug, then the client waits for every reply: the
    server closes the connection at once and logs one line; another connection,
    open all along, still works."""
    broken(fake, monkeypatch, where)
    other = Client.opened(fserver)
    c = Client.opened(fserver)
    wire = [p.pack_request(p.Request(0, p.CMD_READ, 100 + i, i * 4096, 4096))
            for i in range(8)]                                # answered before it
    payload = os.urandom(length) if typ == p.CMD_WRITE else b""
    wire.append(p.pack_request(p.Request(0, typ, 1, POISON, length)) + payload)
    wire += [p.pack_request(p.Request(0, p.CMD_READ, 200 + i, (16 + i) * MiB, length))
             for i in range(8)]       # queued behind it (small ones: on the reader's thread)
    with caplog.at_level(logging.DEBUG, logger="blockxfer.nbd"):
        c.sock.sendall(b"".join(wire))
        start = time.monotonic()
        answered = closed_within(c, 5, length)
    assert time.monotonic() - start < 5
    assert 1 not in answered
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(errors) == 1 and BUG in errors[0].getMessage(), errors
    assert "connection" in errors[0].getMessage() and "AssertionError" in errors[0].getMessage()
    assert any(r.exc_info for r in caplog.records if r.levelno == logging.DEBUG)
    assert other.request(p.CMD_WRITE, 0, 4096, payload=b"\x42" * 4096) == 0
    assert other.read(0, 4096) == b"\x42" * 4096
    later = Client.opened(fserver)
    assert later.read(0, 4096) == b"\x42" * 4096
