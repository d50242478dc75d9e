"""The Linux kernel NBD client on our server: ext4 on the live export, a snapshot
taken with the file system frozen while a writer runs, that snapshot mounted
read-only from its own export, then sent and received to a second volume that is
served read-only and mounted too.

Runs in the test bed (`make testbed`), which has the nbd module, nbd-client and
root; `/dev/nbd0` there is taken by the qemu-nbd connection, so this uses nbd1
and nbd2. Everything it attaches is detached even when it fails.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockxfer.handles import init_volume, open_volume
from blockxfer.volume.check import check_volume
from tests import clihelp
from tests.nbd.serveproc import serve_forked
from tests.nbd.test_remote import served

LIVE, SNAP = "/dev/nbd1", "/dev/nbd2"
TOOLS = ("nbd-client", "mkfs.ext4", "e2fsck", "mount", "umount")

pytestmark = pytest.mark.device


def _missing() -> str | None:
    if os.environ.get("BLOCKXFER_TESTBED") != "1":
        return "kernel NBD client test runs in the test bed (make testbed)"
    if os.geteuid() != 0:
        return "needs root"
    for tool in TOOLS:
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    for dev in (LIVE, SNAP):
        if not os.path.exists(dev):
            return f"{dev} is missing (modprobe nbd)"
    return None


def sh(*argv: str, timeout: float = 120) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(argv)}: {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r.stdout


def payload(name: str, size: int) -> bytes:
    return random.Random(name).randbytes(size)


@contextlib.contextmanager
def attached(sock: str, dev: str, export: str, *, read_only: bool = False) -> Iterator[str]:
    argv = ["nbd-client", "-N", export, "-b", "4096", "-u", sock, dev]
    sh(*argv, *(["-R"] if read_only else []))
    try:
        name = os.path.basename(dev)
        for _ in range(100):
            if int(Path(f"/sys/block/{name}/size").read_text()) > 0:
                break
            time.sleep(0.1)
        yield dev
    finally:
        subprocess.run(["nbd-client", "-d", dev], capture_output=True, timeout=60)


@contextlib.contextmanager
def mounted(dev: str, where: Path, *options: str) -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    sh("mount", *(["-o", ",".join(options)] if options else []), dev, str(where))
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


class Writer(threading.Thread):
    """Writes numbered files until stopped, so the snapshot lands mid-stream."""

    SIZE = 96 << 10

    def __init__(self, root: Path) -> None:
        super().__init__(daemon=True)
        self.root, self.stop, self.done = root, threading.Event(), 0

    def run(self) -> None:
        while not self.stop.is_set():
            name = f"during-{self.done:04}"
            with open(self.root / name, "wb") as f:
                data = payload(name, self.SIZE)
                for i in range(0, self.SIZE, 16 << 10):
                    f.write(data[i:i + (16 << 10)])
            self.done += 1


@pytest.mark.skipif(_missing() is not None, reason=str(_missing()))
def test_ext4_snapshot_with_freeze_mounts_read_only(tmp_path: Path) -> None:
    path, sock = str(tmp_path / "vol.img"), str(tmp_path / "nbd.sock")
    init_volume(path, size=160 << 20, block_size=4096, force=False,
                virtual_size=96 << 20).close()
    before = {f"before-{i:02}": payload(f"before-{i:02}", (i + 1) * 12345) for i in range(12)}
    with serve_forked(path, sock) as proc:
        with attached(sock, LIVE, "active"):
            sh("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", LIVE,
               timeout=300)
            with mounted(LIVE, tmp_path / "live") as live:
                for name, data in before.items():
                    (live / name).write_bytes(data)
                writer = Writer(live)
                writer.start()
                try:
                    while writer.done < 3:
                        assert writer.is_alive()
                        time.sleep(0.05)
                    n0 = writer.done                        # finished before the freeze
                    snap = served(path).snapshot("snap", freeze=str(live))
                    n1 = writer.done                        # finished by the thaw, or soon after
                    while writer.done < n1 + 2:             # thawed: writes go on
                        assert writer.is_alive()
                        time.sleep(0.05)
                finally:
                    writer.stop.set()
                    writer.join(60)
                assert snap is not None and snap["frozen"] == str(live)
                with attached(sock, SNAP, "@snap", read_only=True):
                    sh("e2fsck", "-fn", SNAP)             # frozen: clean, nothing to replay
                    with mounted(SNAP, tmp_path / "snap", "ro", "noload") as frozen:
                        _compare(frozen, before, n0, n1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    with open_volume(path) as vol:
        assert "snap" in vol.snapshot_names()
        assert check_volume(vol).clean
    _send_receive_and_mount(path, tmp_path, before, n0, n1)


def _send_receive_and_mount(path: str, tmp: Path, before: dict[str, bytes], n0: int,
                            n1: int) -> None:
    """The snapshot travels as a stream to a second volume, which is served
    read-only; its file system mounts and holds the same files."""
    stream, copy, sock = tmp / "snap.stream", str(tmp / "copy.img"), str(tmp / "copy.sock")
    for argv in (["send", path, "snap", "-o", str(stream)], ["receive", copy, "-i", str(stream)]):
        r = clihelp.run(argv, timeout=300)     # the command, without its start-up under TCG
        assert r.returncode == 0, f"blockxfer {' '.join(argv)}: {r.returncode}\n{r.stderr!r}"
    with serve_forked(copy, sock, "--read-only") as proc:
        with attached(sock, SNAP, "@snap", read_only=True):
            sh("e2fsck", "-fn", SNAP)
            with mounted(SNAP, tmp / "copy", "ro", "noload") as mnt:
                _compare(mnt, before, n0, n1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0


def _compare(snap: Path, before: dict[str, bytes], n0: int, n1: int) -> None:
    """Files written before the snapshot are exact; of the writer's files, those
    it finished before the freeze are whole, and at most one more (the one it was
    in when frozen) is there, holding a prefix of its data."""
    for name, data in before.items():
        assert hashlib.sha256((snap / name).read_bytes()).digest() == \
            hashlib.sha256(data).digest(), name
    during = sorted(p.name for p in snap.glob("during-*"))
    assert during[:n0] == [f"during-{i:04}" for i in range(n0)], during
    assert len(during) <= n1 + 1, during
    for i, name in enumerate(during):
        got, want = (snap / name).read_bytes(), payload(name, Writer.SIZE)
        assert got == want if i < n0 else want.startswith(got), name
