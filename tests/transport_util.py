"""Shared by the transport tests: the installed command and a volume with two snapshots."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.clihelp import run as bxrun

BLOCKXFER = os.path.join(os.path.dirname(sys.executable), "blockxfer")


def bx(*args: str, env: dict[str, str] | None = None, data: bytes | None = None,
       timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    return bxrun(args, input=data, timeout=timeout, env={**os.environ, **(env or {})})


def ok(r: subprocess.CompletedProcess[bytes]) -> subprocess.CompletedProcess[bytes]:
    assert r.returncode == 0, r.stderr.decode()
    return r


def two_snapshots(folder: Path, name: str = "vol.img") -> str:
    """A volume with snapshot a (3 MiB) and b (a 1 MiB overwrite after it)."""
    vol = str(folder / name)
    ok(bx("init", vol, "--size", "64M"))
    ok(bx("write", vol, "--offset", "0", data=os.urandom(3 << 20)))
    ok(bx("snapshot", f"{vol}@a"))
    ok(bx("write", vol, "--offset", str(1 << 20), data=os.urandom(1 << 20)))
    ok(bx("snapshot", f"{vol}@b"))
    return vol


def same_image(one: str, two: str, snapshot: str) -> bool:
    a = ok(bx("read", f"{one}@{snapshot}")).stdout
    return a == ok(bx("read", f"{two}@{snapshot}")).stdout
