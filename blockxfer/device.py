"""The block-device interface the core sees.

`drivers/` implements it for files, loop devices, md arrays and nbd devices;
the core never imports a driver (the CLI opens devices and hands them down).
Offsets and lengths of `pread`/`pwrite` are multiples of `logical_block_size`
and buffers are page aligned, so implementations may use O_DIRECT.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class BlockDevice(Protocol):
    path: str
    size: int                  # bytes
    logical_block_size: int    # smallest aligned I/O unit
    physical_block_size: int

    def pread(self, buf: memoryview | bytearray, offset: int) -> None:
        """Fill all of `buf` from `offset`; short reads are errors."""

    def pwrite(self, data: bytes | memoryview | bytearray, offset: int) -> None:
        """Write all of `data` at `offset`."""

    def flush(self) -> None:
        """Make every completed write durable (fdatasync / cache flush)."""

    def discard(self, offset: int, length: int) -> None:
        """Tell the device the range is unused (BLKDISCARD, or a punched hole)."""

    def close(self) -> None:
        """Release the device (and the lock that came with opening it)."""
