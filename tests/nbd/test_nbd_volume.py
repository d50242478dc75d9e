"""The NBD export over the real volume (not the fake): real clients write through it,
snapshots are served read-only, holes are reported, and the volume checks clean."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path

import pytest

from blockxfer.drivers.blockdev import open_device
from blockxfer.nbd.server import Server
from blockxfer.volume import Volume
from blockxfer.volume.check import check_volume
from tests.nbd.test_nbd_interop import need, run
from tests.test_mirror_served import wait_for

MiB = 1 << 20


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Volume, str, Path]]:
    path = str(tmp_path / "vol.img")
    vol = Volume.create(open_device(path, write=True, create_size=96 * MiB),
                        virtual_size=64 * MiB)
    sock = str(tmp_path / "nbd.sock")
    server = Server(vol)
    server.listen(f"unix:{sock}")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield vol, sock, tmp_path
    server.stop()
    thread.join(30)


def test_qemu_img_round_trip_on_real_volume(served: tuple[Volume, str, Path]) -> None:
    vol, sock, tmp = served
    qemu_img = need("qemu-img", "qemu-utils")
    src = tmp / "src.raw"
    with open(src, "wb") as f:
        f.truncate(64 * MiB)
        f.seek(5 * MiB)
        f.write(os.urandom(3 * MiB))
    uri = f"nbd+unix:///?socket={sock}"
    run(qemu_img, "convert", "-n", "-f", "raw", "-O", "raw", str(src), uri)
    run(qemu_img, "compare", "-f", "raw", "-F", "raw", str(src), uri)
    vol.create_snapshot("after")
    run(qemu_img, "compare", "-f", "raw", "-F", "raw", str(src),
        f"nbd+unix:///@after?socket={sock}")
    vol.commit()
    assert check_volume(vol).clean


def test_nbdinfo_map_reports_holes_on_real_volume(served: tuple[Volume, str, Path]) -> None:
    vol, sock, _ = served
    nbdinfo = need("nbdinfo", "libnbd-bin")
    vol.write(2 * MiB, b"x" * MiB)
    out = run(nbdinfo, "--map", f"nbd+unix:///?socket={sock}")
    assert "hole" in out and "data" in out


def test_merged_writes_reach_the_volume_as_parts(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Pipelined large WRITEs that continue each other go to the real volume as one
    `write_parts` call (copied once, into its aligned buffer), never joined first;
    the data lands intact whichever way the timing merged them."""
    from blockxfer.nbd import protocol as p
    from tests.nbd.nbdclient import Client
    path = str(tmp_path / "vol.img")
    vol = Volume.create(open_device(path, write=True, create_size=96 * MiB),
                        virtual_size=64 * MiB)
    sizes: list[int] = []
    joined: list[int] = []
    parts, write = vol.write_parts, vol.write
    def counted_parts(off: int, ps: Sequence[bytes | bytearray | memoryview]) -> None:
        sizes.append(len(ps))
        parts(off, ps)

    def counted_write(off: int, data: bytes | bytearray | memoryview) -> None:
        joined.append(len(data))
        write(off, data)
    monkeypatch.setattr(vol, "write_parts", counted_parts)
    monkeypatch.setattr(vol, "write", counted_write)
    server = Server(vol)
    try:
        c = Client.attach(server)
        c.handshake()
        c.go("")
        piece = 256 << 10
        data = os.urandom(16 * piece)
        c.sock.sendall(b"".join(
            p.pack_request(p.Request(0, p.CMD_WRITE, k, k * piece, piece))
            + data[k * piece:(k + 1) * piece] for k in range(16)))
        assert sorted(cookie for error, cookie, _ in (c.simple() for _ in range(16))
                      if error == 0) == list(range(16))
        assert vol.read(0, len(data)) == data
        assert all(n <= piece for n in joined) and sum(sizes) + len(joined) == 16
    finally:
        server.stop()
        vol.close()
    vol = Volume.open(open_device(path, write=True))
    assert vol.read(0, 16 * (256 << 10)) == data
    assert check_volume(vol).clean
    vol.close()


def test_queued_one_block_writes_go_to_the_volume_together(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Random 4 KiB WRITEs queued at once (fio at a queue depth) reach the real volume
    as `write_blocks` calls; a block written twice in the queue ends with the later
    bytes, a READ queued among them sees the writes before it, a FUA write is not
    batched, and everything acknowledged is there after the volume is reopened."""
    import random

    from blockxfer.nbd import protocol as p
    from tests.nbd.nbdclient import Client
    path = str(tmp_path / "vol.img")
    vol = Volume.create(open_device(path, write=True, create_size=96 * MiB),
                        virtual_size=64 * MiB)
    calls: list[int] = []
    blocks = vol.write_blocks

    def counted(offs: Sequence[int], datas: Sequence[bytes | bytearray | memoryview]) -> None:
        calls.append(len(offs))
        blocks(offs, datas)
    monkeypatch.setattr(vol, "write_blocks", counted)
    rng, bs = random.Random(5), 4096
    model = bytearray(64 * MiB)
    server = Server(vol)
    try:
        c = Client.attach(server)
        c.handshake()
        c.go("")
        wire, expect = [], {}
        spots = [rng.randrange(64 * MiB // bs) * bs for _ in range(300)]
        spots[150] = spots[20]                               # one block written twice
        for k, off in enumerate(spots):
            data = rng.randbytes(bs)
            flags = p.CMD_FLAG_FUA if k == 200 else 0
            wire.append(p.pack_request(p.Request(flags, p.CMD_WRITE, k, off, bs)) + data)
            model[off:off + bs] = data
            if k == 100:                                     # a READ among them
                wire.append(p.pack_request(p.Request(0, p.CMD_READ, 1000, off, bs)))
                expect[1000] = bytes(model[off:off + bs])
        c.sock.sendall(b"".join(wire))
        got = {}
        for _ in range(len(spots) + 1):
            magic, error, cookie = p.SIMPLE_REPLY.unpack(c.recv(p.SIMPLE_REPLY.size))
            assert error == 0, cookie
            got[cookie] = c.recv(bs) if cookie == 1000 else b""
        assert got[1000] == expect[1000]
        assert calls and max(calls) > 1                      # batched, at least once
        assert vol.read(0, 64 * MiB) == bytes(model)
    finally:
        server.stop()
        vol.close()
    vol = Volume.open(open_device(path, write=True))
    assert vol.read(0, 64 * MiB) == bytes(model)
    assert check_volume(vol).clean
    vol.close()


def _records(vol: Volume, n: int) -> bool:
    return vol.log.seq == n


def test_a_synchronous_writer_finds_its_record_written_ahead(tmp_path: Path) -> None:
    """A client that writes and flushes one request at a time (a guest's fsync, fio
    --fsync=1): after the reply to a write that follows a FLUSH or a FUA write, the
    server writes the intent log record before the FLUSH comes, and the FLUSH has
    nothing left to write. Writes that follow writes are left for the FLUSH (a
    client streaming writes would pay a record each). After a crash every flushed
    write reads back."""
    from blockxfer.nbd import protocol as p
    from tests.nbd.nbdclient import Client
    path = str(tmp_path / "vol.img")
    vol = Volume.create(open_device(path, write=True, create_size=96 * MiB),
                        virtual_size=64 * MiB)
    server = Server(vol)
    c = Client.opened(server)
    blocks = {k: os.urandom(4096) for k in range(6)}
    assert c.request(p.CMD_WRITE, 0, 4096, payload=blocks[0]) == 0
    assert c.request(p.CMD_WRITE, 4096, 4096, payload=blocks[1]) == 0
    time.sleep(0.1)
    assert vol.log.seq == 0                      # writes after writes: left for the FLUSH
    assert c.request(p.CMD_FLUSH) == 0
    assert vol.log.seq == 1
    for k in (2, 3):                             # write, FLUSH, write, FLUSH ...
        assert c.request(p.CMD_WRITE, k * 4096, 4096, payload=blocks[k]) == 0
        wait_for(partial(_records, vol, k), 5)   # a record written ahead
        assert c.request(p.CMD_FLUSH) == 0
        assert vol.log.seq == k                  # the FLUSH wrote nothing more
    assert c.request(p.CMD_WRITE, 4 * 4096, 4096, payload=blocks[4],
                     flags=p.CMD_FLAG_FUA) == 0
    assert vol.log.seq == 4                      # FUA: a sync of its own
    assert c.request(p.CMD_WRITE, 5 * 4096, 4096, payload=blocks[5]) == 0
    wait_for(partial(_records, vol, 5), 5)       # ahead after a FUA write too
    assert c.request(p.CMD_FLUSH) == 0
    c.close()
    server.shutdown(timeout=5)
    vol.io.close()                               # a crash: no CP at close
    vol.dev.close()
    again = Volume.open(open_device(path))
    try:
        assert check_volume(again).clean
        for k, raw in blocks.items():
            assert again.read(k * 4096, 4096) == raw
    finally:
        again.close()


def test_qemu_io_writing_and_flushing_finds_records_written_ahead(
        served: tuple[Volume, str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """The same with a real client: qemu-io writes and flushes one request at a
    time. Every write after the first follows a FLUSH, so its record is written
    before the FLUSH comes (`sync_ahead` wrote it); the data reads back through
    the volume and through qemu-io."""
    vol, sock, _ = served
    qemu_io = need("qemu-io", "qemu-utils")
    ahead: list[int] = []
    real = vol.sync_ahead

    def counted() -> None:
        seq = vol.log.seq
        real()
        if vol.log.seq > seq:
            ahead.append(vol.log.seq)
    monkeypatch.setattr(vol, "sync_ahead", counted)
    uri = f"nbd+unix:///?socket={sock}"
    cmds = [a for k in range(4) for a in ("-c", f"write -P {k + 1} {k * 4096} 4k", "-c", "flush")]
    # writeback: qemu-io's default writes through (each write FUA, durable at once)
    run(qemu_io, "-f", "raw", "-t", "writeback", uri, *cmds)
    assert len(ahead) == 3 and vol.log.seq == 4, (ahead, vol.log.seq)
    for k in range(4):
        assert vol.read(k * 4096, 4096) == bytes([k + 1]) * 4096
    run(qemu_io, "-f", "raw", "-r", uri, "-c", "read -P 4 12k 4k")
