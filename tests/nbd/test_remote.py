"""Commands routed through a real `blockxfer serve` on a real volume.

The server runs as its own process (the volume's lock is a POSIX record lock,
which never conflicts within one process), so opening the volume directly here
must fail and name the serving pid, while a `ServedSession` answers every
operation through the control socket with the JSON the local command prints.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockxfer.errors import AlreadyExists, DeviceBusy, NotFound, VolumeError
from blockxfer.handles import init_volume, open_volume
from blockxfer.nbd import protocol as p
from blockxfer.service.session import ServedSession, server_for
from tests.clihelp import run as bxrun
from tests.nbd.nbdclient import Client
from tests.nbd.serveproc import serve_process

BX = [sys.executable, "-m", "blockxfer.cli"]


def bx(*args: str) -> subprocess.CompletedProcess[str]:
    return bxrun(args, text=True, timeout=60)


@pytest.fixture
def serving(tmp_path: Path, run_dir: str) -> Iterator[tuple[str, str, subprocess.Popen[str]]]:
    path, sock = str(tmp_path / "vol.img"), str(tmp_path / "nbd.sock")
    init_volume(path, size=32 << 20, block_size=4096, force=False).close()
    with serve_process(path, sock, timeout=30) as proc:
        yield path, sock, proc


def served(path: str) -> ServedSession:
    client = server_for(path)
    assert client is not None, f"nobody serves {path}"
    return ServedSession(client)


def test_no_server_means_none(tmp_path: Path) -> None:
    assert server_for(str(tmp_path / "nothing")) is None


def test_commands_go_through_the_server(serving: tuple[str, str, subprocess.Popen[str]]) -> None:
    path, sock, proc = serving
    with pytest.raises(DeviceBusy, match=f"process {proc.pid}"), open_volume(path):
        pass
    assert server_for(path) is not None

    c = Client.connect(sock)
    assert c.request(p.CMD_WRITE, 0, 8, payload=b"before!!") == 0
    snap = served(path).snapshot("s1", master=True)
    assert snap is not None and snap["name"] == "s1" and snap["master"] and not snap["shadow"]
    assert c.request(p.CMD_WRITE, 0, 8, payload=b"after!!!") == 0
    assert Client.connect(sock, "@s1").read(0, 8) == b"before!!"
    with pytest.raises(AlreadyExists):
        served(path).snapshot("s1")

    info = served(path).info()
    assert info is not None and info["snapshots"] == 1 and info["block_size"] == 4096
    assert info["server"]["pid"] == proc.pid and info["server"]["exports"] == ["", "@s1"]

    assert served(path).snapshot("s2") is not None
    assert served(path).pointer("master", "s1") == {"pointer": "master", "snapshot": "s1"}
    listing = served(path).snapshots()
    assert listing is not None
    assert [r["name"] for r in listing["snapshots"]] == ["s1", "s2"]
    assert listing["pointers"] == {"master": "s1"}

    img = served(path).image("s2 - master")
    assert img is not None and img["top"] == "s2" and img["base"] == "s1" and img["blocks"] >= 1
    with pytest.raises(VolumeError):          # the pointer still refers to s1
        served(path).destroy("s1")
    assert served(path).pointer("master", delete=True) == {"pointer": "master", "snapshot": None}
    with pytest.raises(NotFound):
        served(path).pointer("master", delete=True)
    assert served(path).destroy("s2") == {"destroyed": "s2", "pointer": False}
    final = served(path).snapshots()
    c.close()

    proc.send_signal(signal.SIGTERM)             # a clean stop: final CP, lock released
    assert proc.wait(30) == 0
    assert server_for(path) is None
    local = bx("snapshots", path, "--json")      # the local command prints the same JSON
    assert local.returncode == 0, local.stderr
    assert json.loads(local.stdout) == final
    with open_volume(path) as vol:
        assert vol.read(0, 8) == b"after!!!" and vol.read(0, 8, snapshot="s1") == b"before!!"
    img_local = json.loads(bx("image", path, "s1", "--json").stdout)
    assert set(img_local) == set(img)


def test_served_volume_survives_sigterm_without_flush(
        serving: tuple[str, str, subprocess.Popen[str]]) -> None:
    path, sock, proc = serving
    data = os.urandom(3 << 20)
    c = Client.connect(sock)
    for off in range(0, len(data), 256 << 10):
        assert c.request(p.CMD_WRITE, off, 256 << 10, payload=data[off:off + (256 << 10)]) == 0
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    with open_volume(path) as vol:
        assert vol.read(0, len(data)) == data


def test_send_goes_through_the_server(serving: tuple[str, str, subprocess.Popen[str]],
                                      tmp_path: Path) -> None:
    path, sock, _ = serving
    c = Client.connect(sock)
    data = os.urandom(1 << 20)
    assert c.request(p.CMD_WRITE, 0, len(data), payload=data) == 0
    c.sock.close()
    assert served(path).snapshot("s1") is not None
    stream = tmp_path / "s1.stream"
    r = bx("send", path, "s1", "-o", str(stream))      # the volume is locked by the server
    assert r.returncode == 0, r.stderr
    assert "through the server" in r.stderr
    assert bx("verify", str(stream)).returncode == 0
    copy = tmp_path / "copy.img"
    assert bx("receive", str(copy), "-i", str(stream)).returncode == 0
    got = subprocess.run([*BX, "read", f"{copy}@s1", "--length", str(1 << 20)],
                         capture_output=True, check=True).stdout
    assert got == data
    piped = subprocess.run(f"{' '.join(BX)} send {path} s1 | {' '.join(BX)} verify",
                           shell=True, capture_output=True, text=True)
    assert piped.returncode == 0 and "digest verified" in piped.stdout, piped.stderr
