"""Opening volumes by path: the wiring between the CLI and the drivers.

This is the one core-side module that imports `blockxfer.drivers`; everything
below it receives an already-open device. Every volume is opened through
`drivers.blockdev.open_device`, which claims it by identity and refuses a
device in use.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager

from blockxfer.drivers.blockdev import open_device
from blockxfer.errors import DeviceError, UsageError, VolumeError
from blockxfer.volume import Volume, has_signature


def split_target(text: str) -> tuple[str, str | None]:
    """'PATH@SNAP' -> (PATH, SNAP); 'PATH' -> (PATH, None)."""
    path, sep, snap = text.rpartition("@")
    if not sep or not path:
        return text, None
    if not snap:
        raise UsageError(f"{text!r}: a snapshot name must follow '@'")
    return path, snap


@contextmanager
def open_volume(path: str, *, write: bool = False) -> Iterator[Volume]:
    dev = open_device(path, write=write)
    try:
        vol = Volume.open(dev, writable=write)
    except BaseException:
        dev.close()
        raise
    with vol:
        yield vol


def refuse_volume_output(path: str) -> None:
    """A stream renamed over a volume would destroy it: `send v.img s1 -o v.img`
    replaced the very volume it read. Refused before anything is written."""
    try:
        st = os.stat(path)
    except OSError:
        return                               # missing: the output file says what is wrong
    if not stat.S_ISREG(st.st_mode) or st.st_size < 4096:
        return
    dev = open_device(path, direct=False)
    try:
        found = has_signature(dev)
    finally:
        dev.close()
    if found in ("a blockxfer volume", "an interrupted receive"):
        raise UsageError(f"{path} holds {found}; refusing to write a stream over it: "
                         "give another output file")


def init_volume(path: str, *, size: int | None, block_size: int, force: bool,
                virtual_size: int | None = None) -> Volume:
    """Create a volume on a file (created when missing) or a whole device."""
    exists = os.path.exists(path)
    if not exists and size is None:
        raise UsageError(f"{path} does not exist; give --size to create it as a file")
    dev = open_device(path, write=True, create_size=size)
    try:
        if dev.size == 0 and not stat.S_ISREG(os.fstat(dev.fd).st_mode):
            raise DeviceError(f"{path} is a device of 0 bytes: a loop or NBD device with "
                              "nothing attached; attach its backing first (losetup, nbd-client)")
        if exists and size is not None and dev.size == 0:
            os.ftruncate(dev.fd, size)          # an empty file: make it the size asked
            dev.size = size
        found = has_signature(dev)
        if found and not force:
            raise VolumeError(f"{path} already holds {found}; use --force to overwrite it")
        return Volume.create(dev, block_size=block_size, virtual_size=virtual_size)
    except BaseException:
        dev.close()
        raise
