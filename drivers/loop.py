"""Loop devices through the loop ioctls (linux/loop.h), never through losetup.

`attach_loop` asks /dev/loop-control for a free device (LOOP_CTL_GET_FREE) and
configures it in one step (LOOP_CONFIGURE) with direct I/O when the backing
file system allows it; `detach_loop` clears it (LOOP_CLR_FD). `loop_device`
is the context manager that detaches even when the body fails. Reading loop
state from sysfs is `loop_info`. Partition scanning is left off.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blockxfer.errors import DeviceBusy

from . import ioctls as io
from .blockdev import device_op

Ioctl = Callable[[int, int, Any], Any]
CONTROL = "/dev/loop-control"


@dataclass(frozen=True, slots=True)
class LoopInfo:
    name: str
    backing_file: str
    offset: int
    sizelimit: int
    direct_io: bool
    autoclear: bool
    read_only: bool


def loop_config(fd: int, *, read_only: bool = False, direct_io: bool = True,
                autoclear: bool = False, block_size: int = 0) -> bytes:
    """struct loop_config for LOOP_CONFIGURE."""
    flags = ((io.LO_FLAGS_READ_ONLY if read_only else 0)
             | (io.LO_FLAGS_DIRECT_IO if direct_io else 0)
             | (io.LO_FLAGS_AUTOCLEAR if autoclear else 0))
    info = io.LOOP_INFO64.pack(0, 0, 0, 0, 0, 0, 0, 0, flags, b"", b"", b"", 0, 0)
    return io.LOOP_CONFIG.pack(fd, block_size, info)


def attach_loop(backing: str, *, read_only: bool = False, direct_io: bool = True,
                autoclear: bool = False, control: str = CONTROL,
                ioctl: Ioctl = fcntl.ioctl) -> str:
    """Attach `backing` to a free loop device and return its path (/dev/loopN).

    Direct I/O falls back to buffered when the backing file system refuses it.
    A device taken by someone else between GET_FREE and CONFIGURE is retried.
    """
    bfd = _open(backing, os.O_RDONLY if read_only else os.O_RDWR)
    try:
        for _ in range(8):
            path = _free_loop(control, ioctl)
            lfd = _open(path, os.O_RDWR)
            try:
                if _configure(lfd, bfd, path, ioctl, read_only=read_only, direct_io=direct_io,
                              autoclear=autoclear):
                    return path
            finally:
                os.close(lfd)
        raise DeviceBusy(f"attach {backing}: every free loop device was taken by another process")
    finally:
        os.close(bfd)


def _open(path: str, flags: int) -> int:
    with device_op("open", path):
        return os.open(path, flags | os.O_CLOEXEC)


def _free_loop(control: str, ioctl: Ioctl) -> str:
    cfd = _open(control, os.O_RDWR)
    try:
        with device_op("find a free loop device via", control):
            return f"/dev/loop{ioctl(cfd, io.LOOP_CTL_GET_FREE, 0)}"
    finally:
        os.close(cfd)


def _configure(lfd: int, bfd: int, path: str, ioctl: Ioctl, **kw: bool) -> bool:
    """True when configured; False when the device was taken meanwhile (EBUSY)."""
    try:
        ioctl(lfd, io.LOOP_CONFIGURE, loop_config(bfd, **kw))
        return True
    except OSError as e:
        if e.errno == errno.EBUSY:
            return False
        if e.errno == errno.EINVAL and kw.get("direct_io"):
            return _configure(lfd, bfd, path, ioctl, **{**kw, "direct_io": False})
        with device_op("configure", path):
            raise


def detach_loop(path: str, *, ioctl: Ioctl = fcntl.ioctl) -> None:
    """Detach a loop device (LOOP_CLR_FD); the kernel finishes once the last opener closes."""
    fd = _open(path, os.O_RDONLY)
    try:
        try:
            ioctl(fd, io.LOOP_CLR_FD, 0)
        except OSError as e:
            if e.errno != errno.ENXIO:      # ENXIO: nothing attached; already detached
                with device_op("detach", path):
                    raise
    finally:
        os.close(fd)


@contextmanager
def loop_device(backing: str, **kw: Any) -> Iterator[str]:
    """Attach `backing` for the duration of the block, detaching even on failure."""
    path = attach_loop(backing, **kw)
    try:
        yield path
    finally:
        detach_loop(path)


def loop_info(name: str, *, sysfs: Path = Path("/sys")) -> LoopInfo | None:
    """Loop state from /sys/block/loopN/loop; None when nothing is attached."""
    d = sysfs / "block" / name / "loop"
    if not d.is_dir():
        return None

    def get(attr: str) -> str:
        try:
            return (d / attr).read_text().strip()
        except OSError:
            return ""

    ro = (sysfs / "block" / name / "ro")
    try:
        read_only = ro.read_text().strip() == "1"
    except OSError:
        read_only = False
    return LoopInfo(name, get("backing_file"), int(get("offset") or 0),
                    int(get("sizelimit") or 0), get("dio") == "1", get("autoclear") == "1",
                    read_only)


