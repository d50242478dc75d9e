"""Files and block devices behind `blockxfer.device.BlockDevice`.

Bulk I/O uses O_DIRECT into page-aligned buffers when the file system allows it
(tmpfs does not: then buffered I/O plus fdatasync). `open_device` is the one
door to a volume: it claims the volume by identity (`drivers.owner`, so a
second blockxfer process is refused with the holder's pid and command line
whatever name it used) and, to write, refuses a device in use
(`drivers.safety`). OS errors become blockxfer errors here and nowhere else.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import mmap
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from blockxfer.errors import BlockxferError, DeviceBusy, DeviceError, MediumError, VolumeFull

from . import ioctls, owner, safety

_BY_ERRNO: dict[int, type[DeviceError]] = {
    errno.EBUSY: DeviceBusy,
    errno.EIO: MediumError,
}


def device_error(what: str, path: str, e: OSError) -> BlockxferError:
    """The blockxfer error for an OSError from one device operation (raise it `from e`)."""
    if e.errno == errno.ENOSPC:
        return VolumeFull(f"{what} {path}: no space left on the backing device")
    cls = _BY_ERRNO.get(e.errno or 0, DeviceError)
    return cls(f"{what} {path}: {e.strerror}")


@contextmanager
def device_op(what: str, path: str) -> Iterator[None]:
    """Turn an OSError from one device operation into a blockxfer error. The
    per-request calls (pread, pwrite, flush) catch it themselves: a
    @contextmanager costs ~2-3 us a call, more than a 4 KiB intent log record's
    Python around its pwrite and fdatasync should."""
    try:
        yield
    except OSError as e:
        raise device_error(what, path, e) from e


def aligned_buffer(size: int) -> mmap.mmap:
    """A page-aligned, zero-filled buffer usable for O_DIRECT."""
    return mmap.mmap(-1, max(size, mmap.PAGESIZE))


class FileDevice:
    """A regular file or a block device opened for block I/O."""

    def __init__(self, path: str, fd: int, size: int, direct: bool, sector: int, physical: int,
                 claim: owner.Claim | None = None):
        self.path = path
        self.claim = claim          # this process's hold on the volume, released by close
        self.fd = fd
        self.size = size
        self.direct = direct
        self.logical_block_size = sector
        self.physical_block_size = physical
        self.is_block_device = stat.S_ISBLK(os.fstat(fd).st_mode)

    def pread(self, buf: memoryview | bytearray, offset: int) -> None:
        view = memoryview(buf)
        done = 0
        try:
            while done < len(view):
                n = os.preadv(self.fd, [view[done:]], offset + done)
                if n == 0:
                    raise MediumError(f"read {self.path}: unexpected end at byte {offset + done}")
                done += n
        except OSError as e:
            raise device_error("read", self.path, e) from e

    def pwrite(self, data: bytes | memoryview | bytearray, offset: int) -> None:
        try:
            done = os.pwrite(self.fd, data, offset)
            if done < len(data):              # a short write: the rest, from where it stopped
                view = memoryview(data).cast("B")
                while done < len(view):
                    done += os.pwrite(self.fd, view[done:], offset + done)
        except OSError as e:
            raise device_error("write", self.path, e) from e

    def flush(self) -> None:
        try:
            os.fdatasync(self.fd)
        except OSError as e:
            raise device_error("flush", self.path, e) from e

    def discard(self, offset: int, length: int) -> None:
        if self.is_block_device:
            with device_op("discard", self.path):
                fcntl.ioctl(self.fd, ioctls.BLKDISCARD,
                            ioctls.U64.pack(offset) + ioctls.U64.pack(length))
            return
        # discard is advisory: a file system without hole punching keeps the bytes
        with contextlib.suppress(OSError):
            _punch_hole(self.fd, offset, length)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.claim is not None:
            self.claim.release()
            self.claim = None

    def __enter__(self) -> FileDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@functools.cache
def _libc() -> Any:
    """libc, looked up once: find_library runs ldconfig in a child process, which a
    receive that discards hundreds of runs must not pay each time."""
    import ctypes
    import ctypes.util
    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _punch_hole(fd: int, offset: int, length: int) -> None:
    import ctypes

    libc = _libc()
    falloc_punch = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    if libc.fallocate(fd, falloc_punch, ctypes.c_long(offset), ctypes.c_long(length)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _device_size(fd: int) -> int:
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        raw = fcntl.ioctl(fd, ioctls.BLKGETSIZE64, bytes(ioctls.U64.size))
        return int(ioctls.U64.unpack(raw)[0])
    return st.st_size


def _sector_sizes(fd: int) -> tuple[int, int]:
    if not stat.S_ISBLK(os.fstat(fd).st_mode):
        return 512, 4096
    logical = int.from_bytes(fcntl.ioctl(fd, ioctls.BLKSSZGET, bytes(4)), "little")
    physical = int.from_bytes(fcntl.ioctl(fd, ioctls.BLKPBSZGET, bytes(4)), "little")
    return logical, physical


def open_device(path: str, *, write: bool = False, lock: bool = True,
                direct: bool = True, create_size: int | None = None) -> FileDevice:
    """Open a file or block device for block I/O: the one place blockxfer opens a
    volume, so every command gets the same refusals.

    `create_size` creates a missing regular file of that many bytes first.
    `lock` claims the volume (`drivers.owner`): shared for reading, exclusive for
    writing, keyed by what the path names (a loop device and its backing file are
    one volume), held until `close`. Opening for writing also refuses a device in
    use (`drivers.safety.refuse_in_use`: mounted, held by md/dm, swap, backing a
    loop device, open O_EXCL), and opens a block device O_EXCL so the kernel keeps
    refusing others while we write.
    """
    if create_size is not None and not os.path.exists(path):
        _create(path, create_size)
    if not os.path.exists(path):
        raise DeviceError(f"{path}: no such file or device")
    held = owner.claim(path, exclusive=write) if lock else None
    fd = -1
    try:
        if write:
            safety.refuse_in_use(path)
        fd, used_direct = _open_fd(path, _flags(path, write), direct)
        logical, physical = _sector_sizes(fd)
        return FileDevice(path, fd, _device_size(fd), used_direct, logical, physical, held)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        if held:
            held.release()
        raise


def _flags(path: str, write: bool) -> int:
    if not write:
        return os.O_RDONLY | os.O_CLOEXEC
    with device_op("open", path):
        block = stat.S_ISBLK(os.stat(path).st_mode)
    return os.O_RDWR | os.O_CLOEXEC | (os.O_EXCL if block else 0)


def _create(path: str, size: int) -> None:
    with device_op("create", path):
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)


def _open_fd(path: str, flags: int, direct: bool) -> tuple[int, bool]:
    try:
        return _open_fd_once(path, flags, direct)
    except DeviceBusy as e:
        if not flags & os.O_EXCL:
            raise
        raise DeviceBusy(f"{path} is in use ({safety.describe_users(path)}); "
                         "refusing to open it for writing") from e


def _open_fd_once(path: str, flags: int, direct: bool) -> tuple[int, bool]:
    if direct:
        try:
            return os.open(path, flags | os.O_DIRECT), True
        except OSError as e:
            if e.errno != errno.EINVAL:  # tmpfs and friends refuse O_DIRECT
                with device_op("open", path):
                    raise
    with device_op("open", path):
        return os.open(path, flags), False
