"""A synchronous writer through `blockxfer serve`, killed: the installed command
serves a real volume, a client writes 4 KiB blocks and flushes after each write,
one request at a time (fio --fsync=1, a guest's fsync: the server writes the
intent log record ahead of each FLUSH), and the server is SIGKILLed at a random
moment. After the kill, every block holds what its last flushed write put there
or what a later write of it did (replied or still in flight), whole; `check` is
clean; a writable open replays the log and keeps the same contents.
"""

from __future__ import annotations

import os
import random
import signal
import struct
import threading
import time
from pathlib import Path

import pytest

from blockxfer.drivers.blockdev import open_device
from blockxfer.nbd import protocol as p
from blockxfer.volume import Volume
from blockxfer.volume.check import check_volume
from tests.marks import first_fast
from tests.nbd.nbdclient import Client
from tests.nbd.serveproc import serve_process

BS = 4096
BLOCKS = 48                      # the client's blocks: rewritten often
VSIZE = 16 << 20


def _data(block: int, seq: int) -> bytes:
    return struct.pack("<QQ", block, seq) * (BS // 16)


def _writer(sock: str, seed: int, acked: dict[int, int], written: dict[int, list[int]],
            stop: threading.Event) -> None:
    """Write and flush one request at a time until the server goes away. `acked`:
    each block's last write whose FLUSH was answered; `written`: every write of a
    block sent since (a later write may or may not have reached the disk)."""
    rng = random.Random(seed)
    c = Client.connect(sock)
    seq = 0
    try:
        while not stop.is_set():
            seq += 1
            block = rng.randrange(BLOCKS)
            written.setdefault(block, []).append(seq)
            if c.request(p.CMD_WRITE, block * BS, BS, payload=_data(block, seq)) != 0:
                return
            if c.request(p.CMD_FLUSH) != 0:
                return
            for b, seqs in written.items():      # flushed: each block's last write holds
                if seqs:
                    acked[b] = seqs[-1]
                    written[b] = seqs[-1:]
    except (OSError, EOFError):
        return                                   # the server was killed
    finally:
        c.close()


@pytest.mark.parametrize("seed", first_fast(list(range(8)), 2))
def test_sigkill_of_serve_under_a_synchronous_writer(tmp_path: Path, seed: int) -> None:
    path = str(tmp_path / "vol.img")
    Volume.create(open_device(path, write=True, create_size=32 << 20),
                  virtual_size=VSIZE).close()
    sock = str(tmp_path / "nbd.sock")
    acked: dict[int, int] = {}
    written: dict[int, list[int]] = {}
    stop = threading.Event()
    with serve_process(path, sock) as proc:
        t = threading.Thread(target=_writer, args=(sock, seed, acked, written, stop))
        t.start()
        time.sleep(0.2 + random.Random(seed).random() * 0.8)   # some hundreds of cycles
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        stop.set()
        t.join(30)
    assert acked, "the writer never got a FLUSH answered"
    for writable in (False, True, False):     # replayed in memory; committed; after the CP
        vol = Volume.open(open_device(path, write=writable), writable=writable)
        try:
            report = check_volume(vol)
            assert report.clean, report.problems
            for block in range(BLOCKS):
                got = vol.read(block * BS, BS)
                allowed = {_data(block, s) for s in written.get(block, [])}
                if block in acked:
                    allowed.add(_data(block, acked[block]))
                else:
                    allowed.add(bytes(BS))          # never flushed: may be absent
                assert got in allowed, (seed, block, acked.get(block), got[:16].hex())
        finally:
            vol.close()
