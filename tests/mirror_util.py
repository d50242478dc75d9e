"""Helpers for the mirror tests: small volumes, a configured mirror, comparisons."""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Callable, Iterable, Iterator

from blockxfer.drivers.blockdev import open_device
from blockxfer.stream.send import plain_reader
from blockxfer.transfer.mirror import MirrorState, run_update, save
from blockxfer.transfer.mirror.target import LocalTarget
from blockxfer.volume import Volume
from blockxfer.volume.check import check_volume

BS = 4096


def make_volume(path: str, size: int = 16 << 20, virtual: int = 4 << 20) -> Volume:
    dev = open_device(path, write=True, create_size=size)
    return Volume.create(dev, virtual_size=virtual)


def open_vol(path: str, write: bool = True) -> Volume:
    return Volume.open(open_device(path, write=write), writable=write)


Reader = Callable[[Iterable[tuple[int, int]]], Iterator[tuple[int, memoryview]]]


def dying_reader(vol: Volume, after: int) -> Reader:
    """A block reader for `run_update` in a forked child that kills its own process
    (SIGKILL) a moment after `after` bytes were read (the receive meanwhile saves
    its plane of received blocks)."""
    inner, done = plain_reader(vol), [0]

    def reader(runs: Iterable[tuple[int, int]]) -> Iterator[tuple[int, memoryview]]:
        for vbn, view in inner(runs):
            yield vbn, view
            done[0] += len(view)
            if done[0] >= after:
                time.sleep(0.3)
                os.kill(os.getpid(), signal.SIGKILL)
    return reader


def configure(vol: Volume, dest: str, every: float = 10.0) -> None:
    save(vol, MirrorState(dest=dest, every=every))


def target(dest: str) -> LocalTarget:
    return LocalTarget(dest, open_device)


def update(vol: Volume, dest: str) -> dict:
    return run_update(vol, target(dest))


def churn(vol: Volume, rng: random.Random, writes: int = 20, trims: int = 3) -> None:
    nb = vol.virtual_size // BS
    for _ in range(writes):
        b = rng.randrange(nb)
        n = min(rng.randint(1, 8), nb - b)
        vol.write(b * BS, os.urandom(n * BS))
    for _ in range(trims):
        b = rng.randrange(nb)
        vol.trim(b * BS, min(rng.randint(1, 8), nb - b) * BS)


def image_of(vol: Volume, snapshot: str | None = None) -> bytes:
    return vol.read(0, vol.virtual_size, snapshot)


def dest_image(dest: str) -> bytes:
    d = open_vol(dest, write=False)
    try:
        return d.read(0, d.virtual_size)
    finally:
        d.close()


def dest_clean(dest: str) -> bool:
    d = open_vol(dest, write=False)
    try:
        return check_volume(d).clean
    finally:
        d.close()
