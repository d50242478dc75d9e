"""Shared by the object-store tests: a source volume with a chain of snapshots, and
uploads / restores through the library."""

from __future__ import annotations

import io
import random
from typing import Any

from blockxfer.drivers.blockdev import open_device
from blockxfer.stream.receive import ReceiveResult
from blockxfer.stream.send import send_image
from blockxfer.transfer.objstore.restore import restore_snapshot
from blockxfer.transfer.objstore.store import Store
from blockxfer.transfer.objstore.upload import UploadResult, upload_stream
from blockxfer.volume import Volume

MiB = 1 << 20


def make_chain(path: str, n: int = 10, seed: int = 5, size: int = 24 * MiB) -> Volume:
    """A volume whose snapshots s1..sn each change a few scattered regions."""
    vol = Volume.create(open_device(path, write=True, create_size=size + 16 * MiB),
                        virtual_size=size)
    rng = random.Random(seed)
    vol.write(0, rng.randbytes(size // 2))
    for i in range(1, n + 1):
        for _ in range(6):
            vol.write(rng.randrange(size - 300_000), rng.randbytes(rng.randrange(1, 300_000)))
        vol.trim(rng.randrange(size // MiB) * MiB, 64 * 1024)
        vol.create_snapshot(f"s{i}")
    return vol


def stream_of(vol: Volume, expr: str) -> bytes:
    buf = io.BytesIO()
    send_image(vol, expr, buf, compress=False)
    return buf.getvalue()


def upload(store: Store, vol: Volume, expr: str, name: str = "vol",
           pack_bytes: int = 2 * MiB) -> UploadResult:
    return upload_stream(store, name, io.BytesIO(stream_of(vol, expr)), pack_bytes=pack_bytes)


def upload_chain(store: Store, vol: Volume, n: int, name: str = "vol") -> list[UploadResult]:
    out = [upload(store, vol, "s1", name)]
    out += [upload(store, vol, f"s{i} - s{i - 1}", name) for i in range(2, n + 1)]
    return out


def restore(store: Store, snap: str, target: str, name: str = "vol", **kw: Any) -> ReceiveResult:
    return restore_snapshot(store, name, snap, target, open_device, **kw)


def contents(path: str, snap: str) -> bytes:
    vol = Volume.open(open_device(path), writable=False)
    try:
        return vol.read(0, vol.virtual_size, snapshot=snap)
    finally:
        vol.close()
