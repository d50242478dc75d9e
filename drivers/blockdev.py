"""Files and block devices behind `blockxfer.device.BlockDevice`.

Bulk I/O uses O_DIRECT into page-aligned buffers when the file system allows it
(tmpfs does not: then buffered I/O plus fdatasync). Opening for writing takes a
POSIX record lock on the whole device so a second blockxfer process is refused
with the holder's pid. OS errors become blockxfer errors here and nowhere else.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager

from blockxfer.errors import DeviceBusy, DeviceError, MediumError, VolumeFull

from . import ioctls

_BY_ERRNO: dict[int, type[DeviceError]] = {
    errno.EBUSY: DeviceBusy,
    errno.EIO: MediumError,
}


@contextmanager
def device_op(what: str, path: str) -> Iterator[None]:
    """Turn an OSError from one device operation into a blockxfer error."""
    try:
        yield
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise VolumeFull(f"{what} {path}: no space left on the backing device") from e
        cls = _BY_ERRNO.get(e.errno or 0, DeviceError)
        raise cls(f"{what} {path}: {e.strerror}") from e


def aligned_buffer(size: int) -> mmap.mmap:
    """A page-aligned, zero-filled buffer usable for O_DIRECT."""
    return mmap.mmap(-1, max(size, mmap.PAGESIZE))


class FileDevice:
    """A regular file or a block device opened for block I/O."""

    def __init__(self, path: str, fd: int, size: int, direct: bool, sector: int, physical: int):
        self.path = path
        self.fd = fd
        self.size = size
        self.direct = direct
        self.logical_block_size = sector
        self.physical_block_size = physical
        self.is_block_device = stat.S_ISBLK(os.fstat(fd).st_mode)

    def pread(self, buf: memoryview | bytearray, offset: int) -> None:
        view = memoryview(buf)
        done = 0
        with device_op("read", self.path):
            while done < len(view):
                n = os.preadv(self.fd, [view[done:]], offset + done)
                if n == 0:
                    raise MediumError(f"read {self.path}: unexpected end at byte {offset + done}")
                done += n

    def pwrite(self, data: bytes | memoryview | bytearray, offset: int) -> None:
        view = memoryview(data)
        done = 0
        with device_op("write", self.path):
            while done < len(view):
                done += os.pwritev(self.fd, [view[done:]], offset + done)

    def flush(self) -> None:
        with device_op("flush", self.path):
            os.fdatasync(self.fd)

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

    def __enter__(self) -> FileDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _punch_hole(fd: int, offset: int, length: int) -> None:
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
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


def lock_owner(fd: int) -> int | None:
    """The pid holding a conflicting write lock on the whole file, or None."""
    probe = ioctls.FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
    got = fcntl.fcntl(fd, fcntl.F_GETLK, probe)
    ltype, _, _, _, pid = ioctls.FLOCK.unpack(got)
    return None if ltype == fcntl.F_UNLCK else pid


def _lock(fd: int, path: str, exclusive: bool) -> None:
    kind = fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK
    try:
        fcntl.fcntl(fd, fcntl.F_SETLK, ioctls.FLOCK.pack(kind, os.SEEK_SET, 0, 0, 0))
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EAGAIN):
            raise DeviceError(f"lock {path}: {e.strerror}") from e
        pid = lock_owner(fd)
        who = f"process {pid}" if pid else "another process"
        raise DeviceBusy(f"{path} is in use by {who}; stop it or wait for it to finish") from e


def open_device(path: str, *, write: bool = False, lock: bool = True,
                direct: bool = True, create_size: int | None = None) -> FileDevice:
    """Open a file or block device for block I/O.

    `create_size` creates (or extends) a regular file to that many bytes first.
    `lock` takes a shared lock for reading and an exclusive one for writing.
    A block device opened for writing is opened O_EXCL: the kernel then refuses
    it while mounted, held by md/dm or opened O_EXCL by anyone else, and this
    raises DeviceBusy naming the holder. Call `drivers.safety.check_writable`
    first for the full set of refusals.
    """
    if create_size is not None and not os.path.exists(path):
        with device_op("create", path):
            fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
            try:
                os.ftruncate(fd, create_size)
            finally:
                os.close(fd)
    flags = (os.O_RDWR if write else os.O_RDONLY) | os.O_CLOEXEC
    if not os.path.exists(path):
        raise DeviceError(f"{path}: no such file or device")
    if write and stat.S_ISBLK(os.stat(path).st_mode):
        flags |= os.O_EXCL
    fd, used_direct = _open_fd(path, flags, direct)
    try:
        if lock:
            _lock(fd, path, exclusive=write)
        logical, physical = _sector_sizes(fd)
        return FileDevice(path, fd, _device_size(fd), used_direct, logical, physical)
    except BaseException:
        os.close(fd)
        raise


def _open_fd(path: str, flags: int, direct: bool) -> tuple[int, bool]:
    try:
        return _open_fd_once(path, flags, direct)
    except DeviceBusy as e:
        if not flags & os.O_EXCL:
            raise
        from .safety import describe_users  # only on the error path

        raise DeviceBusy(f"{path} is in use ({describe_users(path)}); "
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
