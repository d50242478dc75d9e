"""Backends the NBD bench can serve: the real volume, and a raw-file stand-in.

`real_volume` creates a `Volume` on a file with room for the virtual disk and
its metadata, and runs the CP timer as `blockxfer serve` does. `FileVolume`
has the Volume surface over a sparse file: pread/pwrite, holes
punched for TRIM, extents from SEEK_DATA/SEEK_HOLE, fdatasync for a commit.
It has no snapshots. It is what makes the bench compare our protocol handling
with qemu-nbd serving the same kind of raw file on the same disk.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager

from blockxfer.drivers.blockdev import open_device
from blockxfer.volume import Volume

_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]


class FileVolume:
    def __init__(self, path: str, virtual_size: int, block_size: int = 4096) -> None:
        self.block_size, self.virtual_size = block_size, virtual_size
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(self.fd, virtual_size)

    def read(self, offset: int, length: int, snapshot: str | None = None) -> bytes:
        return os.pread(self.fd, length, offset)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        os.pwrite(self.fd, data, offset)

    def trim(self, offset: int, length: int) -> None:
        if _libc.fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE,
                           offset, length):
            os.pwrite(self.fd, bytes(length), offset)

    write_zeroes = trim

    def extents(self, offset: int, length: int,
                snapshot: str | None = None) -> list[tuple[int, int, bool]]:
        out, pos, end = [], offset, offset + length
        while pos < end:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno != errno.ENXIO:
                    raise
                data = end
            if data > pos:
                out.append((pos, min(data, end) - pos, False))
                pos = min(data, end)
                continue
            hole = min(os.lseek(self.fd, pos, os.SEEK_HOLE), end)
            out.append((pos, hole - pos, True))
            pos = hole
        return out

    def commit(self) -> None:
        os.fdatasync(self.fd)

    sync = commit

    def snapshot_names(self) -> list[str]:
        return []

    def create_snapshot(self, name: str, *, shadow: bool = False, master: bool = False) -> None:
        raise NotImplementedError("FileVolume has no snapshots")

    def close(self) -> None:
        self.commit()
        os.close(self.fd)


@contextmanager
def file_volume(path: str, size: int) -> Iterator[FileVolume]:
    vol = FileVolume(path, size)
    try:
        yield vol
    finally:
        vol.close()


@contextmanager
def real_volume(path: str, size: int) -> Iterator[Volume]:
    """A volume whose virtual disk is `size` bytes, on a file a quarter larger (the
    bench rewrites the disk, and copy-on-write needs room beside the old blocks)."""
    vol = Volume.create(open_device(path, write=True, create_size=size + size // 4 + (64 << 20)),
                        virtual_size=size)
    vol.start_cp_timer()
    with vol:
        yield vol


BACKENDS = {"volume": real_volume, "file": file_volume}
