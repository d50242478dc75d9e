"""NBD clients that load a served volume from a thread while a test does
something else: writing random 64 KiB pieces in a region, or reading and
comparing against the data an export must show. Every error is kept."""

from __future__ import annotations

import random
import threading

from blockxfer.nbd import protocol as p
from tests.nbd.nbdclient import Client

MiB = 1 << 20


class NbdLoad:
    """Writes into `region` (offset, size), a FLUSH every 16 requests and one at the
    end; or, with `expect`, reads 4 KiB pieces and compares them."""

    def __init__(self, sock: str, export: str, *, expect: bytes | None = None,
                 region: tuple[int, int] = (8 * MiB, 16 * MiB), seed: int = 11) -> None:
        self.client = Client.connect(sock, export)
        self.expect, self.region, self.rng = expect, region, random.Random(seed)
        self.errors: list[str] = []
        self.requests = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while not self.stop.wait(0.002):
                if self.expect is None:
                    self._write()
                else:
                    self._read(self.expect)
                self.requests += 1
        except Exception as e:        # a dropped connection is an error the client saw
            self.errors.append(repr(e))

    def _write(self) -> None:
        start, size = self.region
        off = start + self.rng.randrange(0, size, 64 << 10)
        err = self.client.request(p.CMD_WRITE, off, 64 << 10,
                                  payload=self.rng.randbytes(64 << 10))
        if err == 0 and self.requests % 16 == 0:
            err = self.client.request(p.CMD_FLUSH)
        if err:
            self.errors.append(f"write at {off}: error {err}")

    def _read(self, expect: bytes) -> None:
        off = self.rng.randrange(0, len(expect), 4096)
        if self.client.read(off, 4096) != expect[off:off + 4096]:
            self.errors.append(f"read at {off}: wrong data")

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(30)
        if self.expect is None and not self.errors:
            assert self.client.request(p.CMD_FLUSH) == 0
        self.client.close()
