"""One volume, one owner, on real loop devices (root; issue 10 item 1).

`blockxfer serve /dev/loopN` owns the volume; the same volume reached by any
other name (the backing file, a symlink, a second loop device over the file, a
bind mount of the file, a relative path, a /dev/disk/by-* link) is routed to the
server (snapshot, info, send, read, write, check, dump) or refused: init --force
with exit 4 and one line naming the server's pid and command line, a full receive
or restore (which would replace what NBD clients see) with exit 5. A SIGKILLed owner
leaves no stale lock. Writing to a mounted device is refused on every write path.
The original corruption is reproduced end to end and shown fixed.
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

from blockxfer.drivers.loop import attach_loop, detach_loop
from blockxfer.handles import init_volume
from blockxfer.nbd import protocol as p
from blockxfer.service.session import ServedSession, server_for
from tests.clihelp import run as bxrun
from tests.nbd.nbdclient import Client
from tests.nbd.serveproc import serve_process

pytestmark = pytest.mark.root

ROOT = Path(__file__).resolve().parent.parent
BX = [sys.executable, "-m", "blockxfer.cli"]
MiB = 1 << 20


def bx(*args: str, cwd: str | None = None, data: bytes | None = None,
       ) -> subprocess.CompletedProcess[bytes]:
    return bxrun(args, cwd=cwd, input=data)


def refused_while_served(r: subprocess.CompletedProcess[bytes]) -> None:
    err = r.stderr.decode()
    assert r.returncode == 5, (r.returncode, err)
    assert err.count("\n") == 1 and "incremental streams only" in err, err


def refused_naming(r: subprocess.CompletedProcess[bytes], pid: int) -> None:
    err = r.stderr.decode()
    assert r.returncode == 4, (r.returncode, err)
    assert err.count("\n") == 1 and err.startswith("blockxfer: "), err
    assert f"process {pid} (" in err and " serve " in err, err


@pytest.fixture(autouse=True)
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLOCKXFER_RUN_DIR", str(tmp_path / "run"))


@pytest.fixture
def volume(root: None, tmp_path: Path) -> Iterator[tuple[str, str, str]]:
    """(backing file, loop device over it, a second loop device over it)."""
    path = str(tmp_path / "vol.img")
    init_volume(path, size=64 * MiB, block_size=4096, force=False).close()
    loop = attach_loop(path)
    try:
        second = attach_loop(path)
        try:
            yield path, loop, second
        finally:
            detach_loop(second)
    finally:
        detach_loop(loop)


@pytest.fixture
def served(volume: tuple[str, str, str], tmp_path: Path,
           ) -> Iterator[tuple[str, str, str, subprocess.Popen[str]]]:
    path, loop, second = volume
    with serve_process(loop, str(tmp_path / "nbd.sock")) as proc:
        yield path, loop, second, proc


def make_stream(tmp_path: Path) -> str:
    """A full stream of an unrelated volume (for receive)."""
    other, out = str(tmp_path / "other.img"), str(tmp_path / "s.bxs")
    init_volume(other, size=64 * MiB, block_size=4096, force=False).close()
    assert bx("snapshot", f"{other}@a").returncode == 0
    r = bx("send", other, "a", "-o", out)
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture
def stream(root: None, tmp_path: Path) -> str:
    return make_stream(tmp_path)


@pytest.fixture
def tape(root: None, tmp_path: Path) -> str:
    """A virtual tape holding one full image of an unrelated volume (for restore)."""
    other, t = str(tmp_path / "taped.img"), str(tmp_path / "t.vtape")
    init_volume(other, size=64 * MiB, block_size=4096, force=False).close()
    assert bx("snapshot", f"{other}@a").returncode == 0
    assert bx("tape", "create", t, "--capacity", "256M").returncode == 0
    r = bx("dump", other, "a", "--tape", t)
    assert r.returncode == 0, r.stderr
    return t


@pytest.fixture
def bind_mount(volume: tuple[str, str, str], tmp_path: Path) -> Iterator[str]:
    target = tmp_path / "bind" / "elsewhere.img"
    target.parent.mkdir()
    target.write_bytes(b"")
    r = subprocess.run(["mount", "--bind", volume[0], str(target)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {r.stderr.strip()}")
    try:
        yield str(target)
    finally:
        subprocess.run(["umount", str(target)], check=True)


def by_link(loop: str) -> str:
    """A /dev/disk/by-* link to `loop`, when udev made one."""
    disk = Path("/dev/disk")
    if not disk.is_dir():
        pytest.skip("udev does not populate /dev/disk here (no /dev/disk/by-*)")
    for link in sorted(disk.glob("by-*/*")):
        if os.path.realpath(link) == loop:
            return str(link)
    pytest.skip(f"udev made no /dev/disk/by-* link to {loop}")


ALIASES = ["backing-file", "symlink-to-file", "symlink-to-loop", "second-loop", "bind-mount",
           "relative", "by-id"]


@pytest.fixture(params=ALIASES)
def alias(request: pytest.FixtureRequest, served: tuple[str, str, str, subprocess.Popen[str]],
          tmp_path: Path) -> tuple[str, str | None]:
    """(name, cwd to run in) of the served volume under another name."""
    path, loop, second, _ = served
    kind = request.param
    if kind == "backing-file":
        return path, None
    if kind in ("symlink-to-file", "symlink-to-loop"):
        link = tmp_path / f"{kind}.img"
        link.symlink_to(path if kind == "symlink-to-file" else loop)
        return str(link), None
    if kind == "second-loop":
        return second, None
    if kind == "bind-mount":
        return str(request.getfixturevalue("bind_mount")), None
    if kind == "relative":
        sub = tmp_path / "sub"
        sub.mkdir()
        return "../vol.img", str(sub)
    return by_link(loop), None


def test_every_alias_is_refused_or_routed(
        served: tuple[str, str, str, subprocess.Popen[str]], alias: tuple[str, str | None],
        stream: str, tape: str) -> None:
    path, loop, _, proc = served
    name, cwd = alias
    data = os.urandom(MiB)
    r = bx("write", name, "--offset", "1M", cwd=cwd, data=data)
    assert r.returncode == 0, r.stderr
    r = bx("read", name, "--offset", "1M", "--length", str(MiB), cwd=cwd)
    assert r.returncode == 0 and r.stdout == data, r.stderr
    r = bx("check", name, cwd=cwd)
    assert r.returncode == 0 and b"clean" in r.stdout, r.stdout + r.stderr
    refused_while_served(bx("receive", name, "-i", stream, cwd=cwd))
    refused_while_served(bx("receive", name, "-i", stream, "--force", cwd=cwd))
    refused_naming(bx("init", name, "--force", cwd=cwd), proc.pid)
    refused_while_served(bx("restore", name, "--tape", tape, "--image", "1", "--force",
                            cwd=cwd))

    r = bx("snapshot", f"{name}@routed", cwd=cwd)
    assert r.returncode == 0, r.stderr
    r = bx("info", name, "--json", cwd=cwd)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["server"]["pid"] == proc.pid
    client = server_for(loop)
    assert client is not None
    listing = ServedSession(client).snapshots()
    assert [s["name"] for s in listing["snapshots"]] == ["routed"]
    out = os.path.join(os.path.dirname(path), "routed.bxs")
    r = bx("send", name, "routed", "-o", out, cwd=cwd)
    assert r.returncode == 0 and b"through the server" in r.stderr, r.stderr
    assert bx("tape", "create", out + ".tape", "--capacity", "256M").returncode == 0
    r = bx("dump", name, "routed", "--tape", out + ".tape", cwd=cwd)
    assert r.returncode == 0 and b"through the server" in r.stdout, r.stdout + r.stderr

    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    r = bx("check", path)
    assert r.returncode == 0 and b"clean" in r.stdout, r.stdout + r.stderr


def test_second_server_by_another_name_is_refused(
        served: tuple[str, str, str, subprocess.Popen[str]], tmp_path: Path) -> None:
    path, _, _, proc = served
    refused_naming(bx("serve", path, "--listen", f"unix:{tmp_path}/two.sock"), proc.pid)


def test_sigkilled_owner_leaves_no_stale_lock(volume: tuple[str, str, str],
                                              tmp_path: Path) -> None:
    path, loop, second = volume
    for i in range(3):
        with serve_process(loop, str(tmp_path / f"nbd{i}.sock")) as proc:
            refused_naming(bx("init", path, "--force"), proc.pid)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        # the backing file stays refused (loop devices over it); the loops are the volume
        r = bx("write", loop, "--offset", str(i * MiB), data=os.urandom(MiB))
        assert r.returncode == 0, r.stderr
        assert bx("snapshot", f"{second}@after{i}").returncode == 0
    r = bx("check", loop)
    assert r.returncode == 0 and b"clean" in r.stdout, r.stdout + r.stderr


def test_the_reported_corruption_is_gone(served: tuple[str, str, str, subprocess.Popen[str]],
                                         tmp_path: Path) -> None:
    """The issue's scenario: serve /dev/loopN with an NBD client writing, then `write`
    and `snapshot` on the backing file. Before: both succeeded and `check` found bad
    checksums. Now: write and snapshot go through the server, check is clean."""
    path, loop, _, proc = served
    c = Client.connect(str(tmp_path / "nbd.sock"))
    for i in range(64):
        assert c.request(p.CMD_WRITE, i * 65536, 65536, payload=os.urandom(65536)) == 0
    assert c.request(p.CMD_FLUSH) == 0
    assert bx("write", path, "--offset", "16M", data=os.urandom(4 * MiB)).returncode == 0
    r = bx("snapshot", f"{path}@x")
    assert r.returncode == 0, r.stderr
    for i in range(64):
        assert c.request(p.CMD_WRITE, 8 * MiB + i * 65536, 65536,
                         payload=os.urandom(65536)) == 0
    assert c.request(p.CMD_FLUSH) == 0
    c.close()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    r = bx("check", loop)
    assert r.returncode == 0 and b"clean" in r.stdout, r.stdout + r.stderr
    assert b"x " in bx("snapshots", path).stdout


# -- the device-safety checks on every write path ------------------------------------------
@pytest.fixture
def mounted(root: None, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """(loop device holding a mounted ext4, its backing file)."""
    img = str(tmp_path / "fs.img")
    with open(img, "wb") as f:
        f.truncate(32 * MiB)
    loop = attach_loop(img)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0",
                        loop], check=True, capture_output=True)
        r = subprocess.run(["mount", loop, str(mnt)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount here: {r.stderr.strip()}")
        try:
            yield loop, img
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
    finally:
        detach_loop(loop)


def test_mounted_device_is_refused_on_every_write_path(mounted: tuple[str, str],
                                                       stream: str, tmp_path: Path) -> None:
    loop, img = mounted
    before = head(img)
    for args in (["init", loop, "--force"], ["receive", loop, "-i", stream, "--force"],
                 ["write", loop], ["snapshot", f"{loop}@s"], ["destroy", f"{loop}@s"],
                 ["pointer", loop, "p", "s"], ["serve", loop, "--listen",
                                               f"unix:{tmp_path}/m.sock"],
                 ["init", img, "--force"], ["receive", img, "-i", stream, "--force"]):
        r = bx(*args, data=b"")
        err = r.stderr.decode()
        assert r.returncode == 4 and err.count("\n") == 1, (args, r.returncode, err)
        assert ("mounted" in err) if args[1].startswith(loop) else ("loop-backing" in err), \
            (args, err)
    assert head(img) == before


def head(path: str) -> bytes:
    """Where a volume's superblock would go (the mounted file system keeps the rest)."""
    with open(path, "rb") as f:
        return f.read(64 << 10)


@pytest.mark.device
def test_md_member_is_refused_on_every_write_path(root: None, tmp_path: Path) -> None:
    """An active md array's member (vm-testbed: BLOCKXFER_TEST_MD0_CREATED names them)."""
    created = os.environ.get("BLOCKXFER_TEST_MD0_CREATED")
    if not created:
        pytest.skip("BLOCKXFER_TEST_MD0_CREATED is not set (runs in vm-testbed: make testbed)")
    member = dict(kv.split("=", 1) for kv in created.split())["members"].split(",")[0]
    stream = make_stream(tmp_path)
    for args in (["init", member, "--force"], ["receive", member, "-i", stream, "--force"],
                 ["write", member], ["snapshot", f"{member}@s"]):
        r = bx(*args, data=b"")
        err = r.stderr.decode()
        assert r.returncode == 4 and "md-member" in err and err.count("\n") == 1, (args, err)


def test_racing_writers_by_two_loop_devices_take_turns(volume: tuple[str, str, str]) -> None:
    """Sixteen `write`s at once, half through each loop device over the same file: each
    either commits or is refused (exit 4), never both at once; the volume stays clean and
    every committed write reads back."""
    from blockxfer.drivers.identity import identify
    path, loop, second = volume
    assert identify(loop) == identify(second) == identify(path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = []
    for i in range(16):
        data = bytes([i + 1]) * 65536
        p = subprocess.Popen([*BX, "write", (loop, second)[i % 2], "--offset", str(i * 65536)],
                             stdin=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        procs.append((i, data, p))
    for _, data, p in procs:
        assert p.stdin is not None
        p.stdin.write(data)
        p.stdin.close()
    done = []
    for i, data, p in procs:
        err = p.stderr.read().decode() if p.stderr else ""
        assert p.wait(timeout=120) in (0, 4), err
        if p.returncode == 0:
            done.append((i, data))
        else:
            assert "in use by process" in err, err
    assert done, "no writer ever got the volume"
    r = bx("check", loop)
    assert r.returncode == 0 and b"clean" in r.stdout, r.stdout + r.stderr
    for i, data in done:
        assert bx("read", second, "--offset", str(i * 65536), "--length", "65536").stdout == data
