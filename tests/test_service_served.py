"""Must hold (issue 11): no command needs NBD downtime.

Two volumes are served by `blockxfer serve` (the source read-write, a replica
read-only) while an NBD client writes to the source and another reads a snapshot
of the replica. Meanwhile the installed `blockxfer` command takes a snapshot,
dumps it to a virtual tape, checks the volume, sends an increment and receives it
into the served replica, reads and writes: every command succeeds, neither NBD
client ever sees an error, the replica's NBD export shows the new snapshot once
the receive committed, and the dumped image restores byte for byte.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.clihelp import run as bxrun
from tests.nbd.load import NbdLoad
from tests.nbd.nbdclient import Client
from tests.nbd.serveproc import serve_process

MiB = 1 << 20
INSTALLED = shutil.which("blockxfer", path=os.path.dirname(sys.executable))
BX = [INSTALLED] if INSTALLED else [sys.executable, "-m", "blockxfer.cli"]


def bx(*args: str, data: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return bxrun(args, input=data, timeout=300)


def ok(*args: str, data: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    r = bx(*args, data=data)
    assert r.returncode == 0, (args, r.returncode, r.stderr.decode())
    return r


@pytest.fixture
def volumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, str, bytes]]:
    """(source, replica holding the source's s1, the data of s1's first 4 MiB)."""
    monkeypatch.setenv("BLOCKXFER_RUN_DIR", str(tmp_path / "run"))
    src, rep = str(tmp_path / "src.img"), str(tmp_path / "rep.img")
    base = random.Random(5).randbytes(4 * MiB)
    ok("init", src, "--size", "64M")
    ok("write", src, data=base)
    ok("snapshot", f"{src}@s1")
    ok("send", src, "s1", "-o", str(tmp_path / "full.bxs"))
    ok("receive", rep, "-i", str(tmp_path / "full.bxs"))
    yield src, rep, base


def test_every_command_works_while_served_and_nbd_clients_keep_going(
        volumes: tuple[str, str, bytes], tmp_path: Path) -> None:
    src, rep, base = volumes
    tape, inc = str(tmp_path / "t.vtape"), str(tmp_path / "inc.bxs")
    ok("tape", "create", tape, "--capacity", "512M")
    fresh = random.Random(7).randbytes(MiB)
    with serve_process(src, str(tmp_path / "src.sock")) as server, \
            serve_process(rep, str(tmp_path / "rep.sock"), "--read-only"):
        writer = NbdLoad(str(tmp_path / "src.sock"), "")
        reader = NbdLoad(str(tmp_path / "rep.sock"), "@s1", expect=base)
        try:
            ok("snapshot", f"{src}@s2")
            r = ok("dump", src, "s2", "--tape", tape)
            assert b"through the server" in r.stdout
            r = ok("check", src)
            assert b"clean" in r.stdout
            ok("send", src, "s2 - s1", "-o", inc)
            r = ok("receive", rep, "-i", inc)
            assert b"incremental image up to 's2'" in r.stdout
            listing = json.loads(ok("snapshots", rep, "--json").stdout)
            assert [s["name"] for s in listing["snapshots"]] == ["s1", "s2"]
            s2 = ok("read", f"{src}@s2", "--length", "32M").stdout
            assert Client.connect(str(tmp_path / "rep.sock"), "@s2").read(0, 32 * MiB) == s2
            ok("write", src, "--offset", "40M", data=fresh)
            assert ok("read", src, "--offset", "40M", "--length", "1M").stdout == fresh
            info = json.loads(ok("info", src, "--json").stdout)
            assert info["server"]["pid"] == server.pid
            assert [j["name"] for j in info["server"]["jobs"]] == ["policy"]
        finally:
            writer.finish()
            reader.finish()
        assert writer.errors == [] and reader.errors == []
        assert writer.requests > 0 and reader.requests > 0
    whole = ok("read", f"{src}@s2").stdout
    restored = str(tmp_path / "restored.img")
    ok("restore", restored, "--tape", tape, "--image", "1")
    assert ok("read", f"{restored}@s2").stdout == whole
    assert b"clean" in ok("check", rep).stdout
    assert ok("read", f"{rep}@s2", "--length", "32M").stdout == s2
