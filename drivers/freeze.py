"""FIFREEZE / FITHAW on a mounted file system, for `snapshot --freeze MOUNTPOINT`.

Freezing makes the file system flush its dirty data and journal to the device
(here: through NBD to our own server) and block new writes until thawed, so a
snapshot taken in between is consistent for the file system too.

The core never imports this module: `blockxfer serve` (the wiring) hands
`frozen` to the control server, which calls it for `snapshot --freeze`.
Request numbers live in `ioctls` with the others.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from blockxfer.errors import DeviceBusy, DeviceError

from .ioctls import FIFREEZE, FITHAW

_BY_ERRNO: dict[int, type[DeviceError]] = {errno.EBUSY: DeviceBusy}
_WHY = {
    errno.EOPNOTSUPP: "this file system cannot be frozen",
    errno.EBUSY: "already frozen",
    errno.EINVAL: "not frozen (or not a mount point)",
    errno.EPERM: "needs root (CAP_SYS_ADMIN)",
}

Ioctl = Callable[[int, int, Any], Any]


def _fs_ioctl(what: str, mountpoint: str, request: int, ioctl: Ioctl) -> None:
    try:
        fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise DeviceError(f"{what} {mountpoint}: {e.strerror}") from e
    try:
        ioctl(fd, request, 0)
    except OSError as e:
        why = _WHY.get(e.errno or 0, e.strerror)
        raise _BY_ERRNO.get(e.errno or 0, DeviceError)(f"{what} {mountpoint}: {why}") from e
    finally:
        os.close(fd)


def freeze(mountpoint: str, *, ioctl: Ioctl = fcntl.ioctl) -> None:
    _fs_ioctl("freeze", mountpoint, FIFREEZE, ioctl)


def thaw(mountpoint: str, *, ioctl: Ioctl = fcntl.ioctl) -> None:
    _fs_ioctl("thaw", mountpoint, FITHAW, ioctl)


@contextmanager
def frozen(mountpoint: str, *, ioctl: Ioctl = fcntl.ioctl) -> Iterator[None]:
    """Freeze for the body; always thaw, even when the body fails."""
    freeze(mountpoint, ioctl=ioctl)
    try:
        yield
    finally:
        thaw(mountpoint, ioctl=ioctl)
