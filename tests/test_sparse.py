"""Sparse data: all-zero blocks written (by `blockxfer write`, NBD WRITE, WRITE_ZEROES)
are left unmapped, `read` into a file leaves holes where the volume has them, and a
send carries only the blocks that hold data. Block counts come from `info --json`."""

from __future__ import annotations

import io
import json
import os
import subprocess
from pathlib import Path

import pytest

from blockxfer.drivers.blockdev import open_device
from blockxfer.nbd import protocol as p
from blockxfer.nbd.server import Server
from blockxfer.stream.send import send_image
from blockxfer.volume import Volume
from blockxfer.volume.check import check_volume
from tests.clihelp import run as bxrun
from tests.nbd.nbdclient import Client

MiB = 1 << 20
BS = 4096


def cli(*args: str, stdin: bytes | None = None, stdout: int | None = None) -> bytes:
    r = bxrun(args, input=stdin, stdout=stdout if stdout is not None else subprocess.PIPE)
    assert r.returncode == 0, r.stderr.decode()
    return r.stdout or b""


def used_blocks(path: str) -> int:
    return int(json.loads(cli("info", path, "--json"))["used_blocks"])


@pytest.fixture
def vol_path(tmp_path: Path) -> str:
    path = str(tmp_path / "vol.img")
    cli("init", path, "--size", "64M", "--virtual-size", "32M")
    return path


def image(data_blocks: int = 64, zero_mib: int = 16) -> bytes:
    """Data, a long run of zeros, a little data, zeros to the end."""
    return (os.urandom(data_blocks * BS) + bytes(zero_mib * MiB) + os.urandom(3000)
            + bytes(MiB + 1096))


def test_write_leaves_zero_blocks_unmapped(vol_path: str) -> None:
    empty = used_blocks(vol_path)
    data = image()
    cli("write", vol_path, stdin=data)
    grown = used_blocks(vol_path) - empty
    # 65 data blocks and a few map and plane blocks, not the 4,400 blocks written
    assert 65 <= grown < 65 + 16, grown
    assert cli("read", vol_path, "--length", str(len(data))) == data


def test_zeros_over_data_free_its_blocks(vol_path: str) -> None:
    empty = used_blocks(vol_path)
    cli("write", vol_path, stdin=os.urandom(4 * MiB))
    assert used_blocks(vol_path) - empty >= 1024
    cli("write", vol_path, "--offset", "4096", stdin=bytes(4 * MiB - 8192))
    assert used_blocks(vol_path) - empty < 16
    got = cli("read", vol_path, "--length", str(4 * MiB))
    assert not any(got[BS:4 * MiB - BS]) and any(got[:BS]) and any(got[-BS:])


def test_read_into_a_file_keeps_holes(vol_path: str, tmp_path: Path) -> None:
    data = image(data_blocks=256, zero_mib=24)
    cli("write", vol_path, stdin=data)
    out = tmp_path / "out.raw"
    with open(out, "wb") as f:
        cli("read", vol_path, "--length", str(len(data)), stdout=f.fileno())
    assert out.read_bytes() == data and out.stat().st_size == len(data)
    assert out.stat().st_blocks * 512 < 2 * MiB, out.stat().st_blocks  # not 26 MiB
    # a file that already holds data there is overwritten, never left with old bytes
    out.write_bytes(b"\xff" * (len(data) + 10))
    with open(out, "r+b") as f:
        cli("read", vol_path, "--length", str(len(data)), stdout=f.fileno())
    assert out.read_bytes()[:len(data)] == data


def test_send_carries_data_blocks_only(vol_path: str) -> None:
    cli("write", vol_path, stdin=image(data_blocks=256, zero_mib=24))
    vol = Volume.open(open_device(vol_path, write=True))
    try:
        vol.create_snapshot("s")
        buf = io.BytesIO()
        send_image(vol, "s", buf, compress=False)
    finally:
        vol.close()
    assert len(buf.getvalue()) < 2 * MiB, len(buf.getvalue())   # 1 MiB of data, not 25


def test_nbd_zero_writes_and_write_zeroes_unmap(tmp_path: Path) -> None:
    path = str(tmp_path / "vol.img")
    vol = Volume.create(open_device(path, write=True, create_size=64 * MiB),
                        virtual_size=32 * MiB)
    server = Server(vol)
    try:
        c = Client.attach(server)
        c.handshake()
        c.go("")
        assert c.request(p.CMD_WRITE, 0, 8 * BS, payload=os.urandom(8 * BS)) == 0
        assert c.request(p.CMD_WRITE, MiB, 2 * MiB, payload=os.urandom(2 * MiB)) == 0
        used = vol.info()["used_blocks"]
        assert isinstance(used, int)
        assert c.request(p.CMD_WRITE, BS, 2 * BS, payload=bytes(2 * BS)) == 0
        assert c.request(p.CMD_WRITE_ZEROES, MiB, 2 * MiB) == 0
        gen = vol.generation
        assert c.request(p.CMD_FLUSH) == 0
        assert vol.generation == gen           # a log record, not a CP
        now = vol.info()["used_blocks"]
        assert isinstance(now, int) and used - now >= 2 + 512
        assert c.read(0, 4 * BS)[BS:3 * BS] == bytes(2 * BS)
        c.close()
    finally:
        server.shutdown(timeout=5)
    vol.close()
    vol = Volume.open(open_device(path, write=False), writable=False)
    try:
        assert check_volume(vol).clean
        assert not any(vol.read(MiB, 2 * MiB)) and not any(vol.read(BS, 2 * BS))
    finally:
        vol.close()
