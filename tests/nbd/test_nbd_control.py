"""The service's control socket, freeze ioctls, the serve command and its clean stop on
SIGTERM."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from blockxfer.drivers import freeze
from blockxfer.drivers.blockdev import open_device
from blockxfer.errors import AlreadyExists, DeviceBusy, DeviceError, UsageError
from blockxfer.nbd import protocol as p
from blockxfer.nbd.server import parse_listen
from blockxfer.service import control
from blockxfer.service.service import Service
from blockxfer.service.session import ServedSession, server_for
from blockxfer.volume import Volume
from tests.nbd.fakes import FakeVolume
from tests.nbd.nbdclient import Client

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def served(tmp_path: Path, volume: FakeVolume) -> Iterator[tuple[str, Service]]:
    path = str(tmp_path / "vol.img")
    s = Service(volume, path)
    s.serve_control()
    t = threading.Thread(target=s.run, daemon=True)
    t.start()
    yield path, s
    s.stop()
    t.join(10)


def served_session(path: str) -> ServedSession:
    client = server_for(path)
    assert client is not None
    return ServedSession(client)


def test_socket_path_is_stable_per_realpath(tmp_path: Path, run_dir: str) -> None:
    (tmp_path / "a").touch()
    os.symlink(tmp_path / "a", tmp_path / "b")
    assert control.socket_path(str(tmp_path / "a")) == control.socket_path(str(tmp_path / "b"))
    assert control.socket_path(str(tmp_path / "a")).startswith(run_dir + "/")


def test_call_round_trip(served: tuple[str, Service]) -> None:
    path, service = served
    assert control.call(path, "ping")["pid"] == os.getpid()
    info = service.status()
    assert info["pid"] == os.getpid() and info["exports"] == ["", "@s1"]
    assert [j["name"] for j in info["jobs"]] == ["policy"]     # the snapshot schedule
    assert control.call(path, "commit") is None
    with pytest.raises(UsageError):
        control.call(path, "no-such-command")
    with pytest.raises(UsageError):
        control.call(path, "ping", bogus=1)


def test_snapshot_via_control_is_exported_at_once(tmp_path: Path) -> None:
    path = str(tmp_path / "real.img")
    service = Service(Volume.create(open_device(path, write=True, create_size=16 << 20)), path)
    service.serve_control()
    t = threading.Thread(target=service.run, daemon=True)
    t.start()
    try:
        service.nbd.vol.call("write", 0, b"live")
        assert served_session(path).snapshot("new")["name"] == "new"
        with pytest.raises(AlreadyExists):
            served_session(path).snapshot("new")
        with pytest.raises(UsageError):
            control.call(path, "snapshot", bogus=1)
        c = Client.attach(service.nbd)
        c.handshake()
        c.go("@new")
        assert c.read(0, 4) == b"live"
    finally:
        service.stop()
        t.join(10)
        service.volume.close()


def test_second_server_on_same_volume_is_refused(served: tuple[str, Service]) -> None:
    path, _ = served
    with pytest.raises(DeviceBusy):
        control.bind_control(path)


def test_no_server(tmp_path: Path) -> None:
    with pytest.raises(control.ServerNotRunning):
        control.call(str(tmp_path / "nothing"), "info")
    assert not control.server_running(str(tmp_path / "nothing"))


def test_garbage_line_gets_an_error_reply(served: tuple[str, Service]) -> None:
    import socket
    path, _ = served
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(control.socket_path(path))
        s.sendall(b"not json\n[1]\n")
        f = s.makefile("rb")
        assert b'"ok": false' in f.readline() and b'"ok": false' in f.readline()


def test_snapshot_with_freeze_thaws_around_it(tmp_path: Path) -> None:
    events: list[str] = []

    @contextlib.contextmanager
    def fake_frozen(mnt: str) -> Iterator[None]:
        events.append(f"freeze {mnt}")
        yield
        events.append(f"thaw {mnt}")

    service = Service(Volume.create(open_device(str(tmp_path / "v"), write=True,
                                                create_size=16 << 20)), str(tmp_path / "v"),
                      freezer=fake_frozen)
    ctl = service.control
    vol = service.volume
    orig = vol.create_snapshot
    def create_snapshot(*a: Any, **k: Any) -> None:
        events.append("snapshot")
        orig(*a, **k)
    vol.create_snapshot = create_snapshot
    reply = ctl.handle({"id": 3, "command": "snapshot", "args": {"name": "f", "freeze": "/mnt"}})
    assert reply["ok"] and reply["result"]["name"] == "f" and reply["result"]["frozen"] == "/mnt"
    assert events == ["freeze /mnt", "snapshot", "thaw /mnt"]
    vol.close()


def test_freeze_needs_a_freezer(tmp_path: Path) -> None:
    service = Service(Volume.create(open_device(str(tmp_path / "v"), write=True,
                                                create_size=16 << 20)), str(tmp_path / "v"))
    ctl = service.control
    reply = ctl.handle({"id": 1, "command": "snapshot", "args": {"name": "f", "freeze": "/m"}})
    assert not reply["ok"] and reply["error"]["type"] == "UsageError"
    assert service.nbd.vol.call("snapshot_names") == []
    service.volume.close()


def test_freeze_ioctl_numbers_are_pinned() -> None:
    assert freeze.FIFREEZE == 0xC0045877
    assert freeze.FITHAW == 0xC0045878


def test_frozen_thaws_on_failure_and_maps_errors(tmp_path: Path) -> None:
    calls: list[int] = []

    def ioctl(fd: int, request: int, arg: int) -> int:
        calls.append(request)
        return 0

    with pytest.raises(RuntimeError), freeze.frozen(str(tmp_path), ioctl=ioctl):
        raise RuntimeError("snapshot failed")
    assert calls == [freeze.FIFREEZE, freeze.FITHAW]

    def busy(fd: int, request: int, arg: int) -> int:
        raise OSError(errno.EBUSY, "busy")

    with pytest.raises(DeviceBusy, match="already frozen"):
        freeze.freeze(str(tmp_path), ioctl=busy)

    def unsupported(fd: int, request: int, arg: int) -> int:
        raise OSError(errno.EOPNOTSUPP, "nope")

    with pytest.raises(DeviceError, match="cannot be frozen"):
        freeze.freeze(str(tmp_path), ioctl=unsupported)
    with pytest.raises(DeviceError):
        freeze.freeze(str(tmp_path / "missing"), ioctl=ioctl)


def test_parse_listen() -> None:
    import socket
    assert parse_listen("unix:/x.sock") == (socket.AF_UNIX, "/x.sock")
    assert parse_listen("tcp:127.0.0.1:10809") == (socket.AF_INET, ("127.0.0.1", 10809))
    assert parse_listen("tcp:[::1]:10809") == (socket.AF_INET6, ("::1", 10809))
    for bad in ("unix:", "tcp:host", "tcp::x", "udp:1:2", "nonsense"):
        with pytest.raises(UsageError):
            parse_listen(bad)


SERVE_SCRIPT = textwrap.dedent("""
    import argparse, contextlib, sys
    sys.path.insert(0, {root!r})
    from blockxfer.cli import serve
    from blockxfer.cli.spec import add_commands
    from tests.nbd.fakes import FakeVolume
    vol = FakeVolume(1 << 20)
    vol.start_cp_timer = lambda: print("timer", flush=True)
    @contextlib.contextmanager
    def open_volume(path):
        yield vol
        vol.close()
        print("closed", vol.commits, vol.read(0, 4), flush=True)
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(), serve.COMMANDS, "command")
    args = parser.parse_args(sys.argv[1:])
    sys.exit(serve.serve_volume(args, open_volume))
""")


def test_serve_stops_cleanly_on_sigterm(tmp_path: Path, run_dir: str) -> None:
    sock = str(tmp_path / "nbd.sock")
    script = SERVE_SCRIPT.format(root=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", script, "serve", str(tmp_path / "v"),
                             "--listen", f"unix:{sock}"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "BLOCKXFER_RUN_DIR": run_dir})
    try:
        for _ in range(100):
            if os.path.exists(sock) and control.server_running(str(tmp_path / "v")):
                break
            time.sleep(0.05)
        c = Client.connect(sock)
        assert c.request(p.CMD_WRITE, 0, 4, payload=b"kept") == 0
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert out.startswith("timer\n")              # serve starts the CP timer
    assert "closed" in out and "b'kept'" in out
    assert int(out.split()[2]) >= 2            # the server's final commit, then close()
    assert not os.path.exists(sock)
    assert not os.path.exists(control.socket_path(str(tmp_path / "v")))
