"""ioctl request numbers and kernel structure layouts, declared once.

Numbers come from the kernel macros through ioctl-opt where the header uses
`_IO*`; literals where the header itself gives a literal (linux/loop.h).
Structures handed to the kernel use native layout (`@`): they are the kernel's
ABI on this machine, not a file format. tests/test_ioctls.py pins each value
for x86-64. Nothing here touches a device.
"""

import struct

from ioctl_opt import IO, IOR, IOW, IOWR

U64 = struct.Struct("@Q")
INT = struct.Struct("@i")

# --- linux/fs.h ------------------------------------------------------------
BLKGETSIZE64 = IOR(0x12, 114, U64)          # size in bytes (u64)
BLKSSZGET = IO(0x12, 104)                   # logical sector size (int)
BLKPBSZGET = IO(0x12, 123)                  # physical sector size (int)
BLKDISCARD = IO(0x12, 119)                  # uint64[2] {start, length}
BLKFLSBUF = IO(0x12, 97)
FIFREEZE = IOWR(ord("X"), 119, INT)         # freeze a mounted file system (int)
FITHAW = IOWR(ord("X"), 120, INT)           # thaw it (int)

# struct flock for F_GETLK/F_SETLK (x86-64): short type, short whence, off_t start,
# off_t len, pid_t pid (+ padding)
FLOCK = struct.Struct("@hhqqi4x")

# --- linux/loop.h ----------------------------------------------------------
LOOP_SET_FD = 0x4C00
LOOP_CLR_FD = 0x4C01
LOOP_SET_STATUS64 = 0x4C04
LOOP_GET_STATUS64 = 0x4C05
LOOP_SET_DIRECT_IO = 0x4C08
LOOP_SET_BLOCK_SIZE = 0x4C09
LOOP_CONFIGURE = 0x4C0A
LOOP_CTL_ADD = 0x4C80
LOOP_CTL_REMOVE = 0x4C81
LOOP_CTL_GET_FREE = 0x4C82

LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4
LO_FLAGS_PARTSCAN = 8
LO_FLAGS_DIRECT_IO = 16
LO_NAME_SIZE = 64
LO_KEY_SIZE = 32

# struct loop_info64: lo_device, lo_inode, lo_rdevice, lo_offset, lo_sizelimit (u64),
# lo_number, lo_encrypt_type, lo_encrypt_key_size, lo_flags (u32),
# lo_file_name[64], lo_crypt_name[64], lo_encrypt_key[32], lo_init[2] (u64)
LOOP_INFO64 = struct.Struct("@5Q4I64s64s32s2Q")
assert LOOP_INFO64.size == 232
# struct loop_config: fd (u32), block_size (u32), struct loop_info64 info, __u64 reserved[8]
LOOP_CONFIG = struct.Struct(f"@II{LOOP_INFO64.size}s64x")
assert LOOP_CONFIG.size == 304

# --- linux/mtio.h ----------------------------------------------------------
MTOP = struct.Struct("@hi")                 # short mt_op; int mt_count
MTGET = struct.Struct("@5l2i")              # type, resid, dsreg, gstat, erreg; fileno, blkno
MTPOS = struct.Struct("@l")                 # long mt_blkno
assert (MTOP.size, MTGET.size, MTPOS.size) == (8, 48, 8)

MTIOCTOP = IOW(ord("m"), 1, MTOP)
MTIOCGET = IOR(ord("m"), 2, MTGET)
MTIOCPOS = IOR(ord("m"), 3, MTPOS)

MTRESET, MTFSF, MTBSF, MTFSR, MTBSR, MTWEOF, MTREW, MTOFFL, MTNOP = 0, 1, 2, 3, 4, 5, 6, 7, 8
MTRETEN, MTBSFM, MTFSFM, MTEOM, MTERASE = 9, 10, 11, 12, 13
MTSETBLK, MTSETDENSITY, MTSEEK, MTTELL, MTSETDRVBUFFER = 20, 21, 22, 23, 24
MTLOCK, MTUNLOCK, MTLOAD, MTUNLOAD, MTCOMPRESSION = 28, 29, 30, 31, 32
MTWEOFI = 35

GMT_EOF = 0x80000000
GMT_BOT = 0x40000000
GMT_EOT = 0x20000000
GMT_SM = 0x10000000
GMT_EOD = 0x08000000
GMT_WR_PROT = 0x04000000
GMT_ONLINE = 0x01000000
GMT_DR_OPEN = 0x00040000
MT_ST_BLKSIZE_MASK = 0xFFFFFF

MT_ST_SETBOOLEANS = 0x30000000
MT_ST_CLEARBOOLEANS = 0x40000000
MT_ST_FAST_MTEOM = 0x20                     # MTEOM spaces straight to EOD; fileno becomes -1
MT_ST_CAN_BSR = 0x100
MT_ST_SCSI2LOGICAL = 0x800

# --- scsi/sg.h -------------------------------------------------------------
SG_IO = 0x2285
