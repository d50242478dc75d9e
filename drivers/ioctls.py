"""ioctl request numbers, derived from the kernel macros with ioctl-opt.

One place for every number; tests/test_ioctls.py pins each value.
"""

import struct

from ioctl_opt import IO, IOR

U64 = struct.Struct("@Q")

BLKGETSIZE64 = IOR(0x12, 114, U64)          # linux/fs.h
BLKSSZGET = IO(0x12, 104)                   # linux/fs.h: logical sector size (int)
BLKPBSZGET = IO(0x12, 123)                  # linux/fs.h: physical sector size (int)
BLKDISCARD = IO(0x12, 119)                  # linux/fs.h: uint64[2] {start, length}
BLKFLSBUF = IO(0x12, 97)                    # linux/fs.h

# struct flock for F_GETLK/F_SETLK (x86-64): short type, short whence, off_t start,
# off_t len, pid_t pid (+ padding)
FLOCK = struct.Struct("@hhqqi4x")
