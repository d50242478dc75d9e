"""A virtual tape in a plain file that behaves like an `st` tape device node.

`VirtualTape` is a handle with `write`, `readinto`, `fileno`, `close` and an
`ioctl(fd, request, arg)` answering MTIOCTOP, MTIOCGET and MTIOCPOS with the
same structures, errno values and state changes as the st driver over a drive
(see docs/tape-format.md, "virtual tape file"): so `drivers.st.StTape` runs
unchanged on top of it and every `make test` exercises the real adapter.
Capacity has an early-warning zone and a hard end of medium; the tape can be
write-protected and can lack LOCATE/READ POSITION (like tgt's drive) so the
spacing path is tested too. It models one drive with one loaded medium; it
is not a tape library and does not emulate compression, setmarks or
partitions.
"""

from __future__ import annotations

import errno
import os
import struct
import zlib
from dataclasses import dataclass, replace
from typing import Any

from blockxfer.errors import FormatError, UsageError
from blockxfer.outfile import output_file

from . import ioctls as io

MAGIC = b"BXVTAPE\0"
VERSION = 1
HEADER_SIZE = 4096                      # the data area starts here
FLAG_NO_LOCATE = 0x1
FLAG_WRITE_PROTECT = 0x2
MAX_RECORD = (1 << 24) - 1              # READ/WRITE(6) carry a 24-bit length

# magic, version, flags, block_size, capacity, early_warning, pos, file, block, crc32
_HEADER = struct.Struct("<8sHHIQQQqqI")
assert _HEADER.size == 60
# tag, payload length: b"REC\0" + data, or b"FMK\0" with length 0
_ENTRY = struct.Struct("<4sI")
assert _ENTRY.size == 8
REC, FMK = b"REC\0", b"FMK\0"

# st's eof states (drivers/scsi/st.h), the part of its state that users can see
NOEOF, FM, EOM_OK, EOM_ERROR, EOD_1, EOD_2, EOD = range(7)


@dataclass(frozen=True, slots=True)
class VtapeHeader:
    """The first bytes of a virtual tape file: medium properties and saved position."""

    capacity: int           # bytes of entries (headers + payloads) the medium holds
    early_warning: int      # size of the early-warning zone before the end
    flags: int = 0
    block_size: int = 0     # 0: variable-block mode
    pos: int = 0            # entry index of the saved position
    file: int = 0
    block: int = 0

    def pack(self) -> bytes:
        body = _HEADER.pack(MAGIC, VERSION, self.flags, self.block_size, self.capacity,
                            self.early_warning, self.pos, self.file, self.block, 0)[:-4]
        return body + struct.pack("<I", zlib.crc32(body))

    @classmethod
    def unpack(cls, raw: bytes) -> VtapeHeader:
        if len(raw) < _HEADER.size:
            raise FormatError("virtual tape: header truncated")
        (magic, version, flags, block_size, capacity, ew, pos, file, block,
         crc) = _HEADER.unpack_from(raw)
        if magic != MAGIC:                   # first: a stream or a volume is not damage
            raise FormatError("not a blockxfer virtual tape (bad magic); create one with "
                              "'blockxfer tape create'")
        if zlib.crc32(raw[:_HEADER.size - 4]) != crc:
            raise FormatError("virtual tape: header checksum mismatch")
        if version != VERSION:
            raise FormatError(f"virtual tape version {version} is not supported")
        return cls(capacity, ew, flags, block_size, pos, file, block)


def create_virtual_tape(path: str, capacity: int, *, early_warning: int | None = None,
                        locate: bool = True, write_protect: bool = False) -> VtapeHeader:
    """Create an empty virtual tape file (refuses to overwrite one)."""
    if early_warning is None:
        early_warning = min(max(capacity // 50, 64 * 1024), capacity // 2)
    if capacity <= 0 or not 0 <= early_warning < capacity:
        raise UsageError(f"{path}: capacity must be positive and the early-warning zone smaller")
    flags = (0 if locate else FLAG_NO_LOCATE) | (FLAG_WRITE_PROTECT if write_protect else 0)
    header = VtapeHeader(capacity, early_warning, flags)
    with output_file(path, replace=False) as f:     # whole or not at all, never over one
        f.write(header.pack().ljust(HEADER_SIZE, b"\0"))
    return header


def _oserror(code: int) -> OSError:
    return OSError(code, os.strerror(code))


class VirtualTape:
    """An st device node emulated over a file; one open handle on one medium."""

    def __init__(self, path: str, *, write: bool = True):
        self.name = path
        # the saved position is drive state: keep it even when opened read-only
        self._can_save = os.access(path, os.W_OK)
        self._fd = os.open(path, (os.O_RDWR if self._can_save else os.O_RDONLY) | os.O_CLOEXEC)
        try:
            try:
                self.header = VtapeHeader.unpack(os.pread(self._fd, _HEADER.size, 0))
            except FormatError as e:
                raise FormatError(f"{path}: {e}") from None
            if write and self.header.flags & FLAG_WRITE_PROTECT:
                raise _oserror(errno.EROFS)     # st refuses O_RDWR on a protected tape
            self._entries = self._scan()
        except BaseException:
            os.close(self._fd)
            raise
        h = self.header
        self._pos, self._file, self._block = min(h.pos, len(self._entries)), h.file, h.block
        self._block_size = h.block_size
        self._writable = write
        self._eof = NOEOF
        self._writing = False
        self._online = True

    def _scan(self) -> list[tuple[int, bytes, int]]:
        """(offset, tag, length) of every entry, read from the entry headers."""
        entries, off, end = [], HEADER_SIZE, os.fstat(self._fd).st_size
        while off + _ENTRY.size <= end:
            tag, length = _ENTRY.unpack(os.pread(self._fd, _ENTRY.size, off))
            if tag not in (REC, FMK) or off + _ENTRY.size + length > end:
                raise FormatError(f"{self.name}: damaged entry at byte {off}")
            entries.append((off, tag, length))
            off += _ENTRY.size + length
        return entries

    # -- the file-like half ---------------------------------------------------
    def fileno(self) -> int:
        return self._fd

    @property
    def _end(self) -> int:
        """Byte offset of the current position (= end of data after a write)."""
        return self._entries[self._pos][0] if self._pos < len(self._entries) else (
            os.fstat(self._fd).st_size)

    def _used_after(self, nbytes: int) -> int:
        return self._end - HEADER_SIZE + nbytes

    def _ready(self) -> None:
        if not self._online:
            raise _oserror(errno.ENOMEDIUM)

    def write(self, data: Any) -> int:
        self._ready()
        view = memoryview(data).cast("B")
        if not self._writable or self.header.flags & FLAG_WRITE_PROTECT:
            raise _oserror(errno.EACCES)
        if self._eof == EOM_OK:
            self._eof = EOD_1           # st: this one fails, the next may go through
            raise _oserror(errno.ENOSPC)
        if self._eof == EOM_ERROR:
            raise _oserror(errno.EIO)
        bs = self._block_size
        if not view or len(view) > MAX_RECORD or (bs and len(view) % bs):
            raise _oserror(errno.EINVAL)
        sizes = [bs] * (len(view) // bs) if bs else [len(view)]
        need = sum(_ENTRY.size + s for s in sizes)
        if self._used_after(need) > self.header.capacity:
            self._eof = EOM_ERROR       # VOLUME OVERFLOW: nothing written
            raise _oserror(errno.ENOSPC)
        off = self._truncate_here()
        for s in sizes:
            os.pwrite(self._fd, _ENTRY.pack(REC, s) + view[:s], off)
            self._entries.append((off, REC, s))
            off, view = off + _ENTRY.size + s, view[s:]
        self._pos, self._writing = len(self._entries), True
        self._block = self._block + len(sizes) if self._block >= 0 else -1
        past_ew = self._used_after(0) > self.header.capacity - self.header.early_warning
        self._eof = EOM_OK if past_ew else NOEOF
        return need - _ENTRY.size * len(sizes)

    def _truncate_here(self) -> int:
        off = self._end
        del self._entries[self._pos:]
        os.ftruncate(self._fd, off)
        return off

    def readinto(self, buf: Any) -> int:
        self._ready()
        view = memoryview(buf).cast("B")
        self._writing = False
        if self._pos >= len(self._entries):
            return self._read_at_eod()
        off, tag, length = self._entries[self._pos]
        if tag == FMK:
            self._pos += 1
            self._file, self._block, self._eof = self._file + 1, 0, FM
            return 0
        bs = self._block_size
        if bs:
            return self._read_fixed(view)
        self._pos += 1
        self._block = self._block + 1 if self._block >= 0 else -1
        self._eof = NOEOF
        if len(view) < length:
            raise _oserror(errno.ENOMEM)     # st: the block is skipped
        view[:length] = os.pread(self._fd, length, off + _ENTRY.size)
        return length

    def _read_fixed(self, view: memoryview) -> int:
        bs = self._block_size
        if len(view) % bs:
            raise _oserror(errno.EINVAL)
        done = 0
        while done < len(view) and self._pos < len(self._entries):
            off, tag, length = self._entries[self._pos]
            if tag == FMK:
                break                       # the next read returns 0 for it
            view[done:done + bs] = os.pread(self._fd, bs, off + _ENTRY.size).ljust(bs, b"\0")
            self._pos, self._block, done = self._pos + 1, self._block + 1, done + bs
        self._eof = NOEOF
        return done

    def _read_at_eod(self) -> int:
        if self._eof in (EOD_2, EOD):
            self._eof = EOD
            raise _oserror(errno.EIO)
        self._eof = EOD_2 if self._eof == EOD_1 else EOD_1
        return 0

    def close(self) -> None:
        if self._fd < 0:
            return
        try:
            if self._writing:
                self._write_filemarks(1)    # st writes a filemark at close after writing
            if self._can_save:
                h = replace(self.header, pos=self._pos, file=self._file, block=self._block,
                            block_size=self._block_size)
                os.pwrite(self._fd, h.pack(), 0)
        finally:
            os.close(self._fd)
            self._fd = -1

    # -- the ioctl half -------------------------------------------------------
    def ioctl(self, fd: int, request: int, arg: Any = 0) -> bytes:
        if fd != self._fd:
            raise _oserror(errno.EBADF)
        if request == io.MTIOCGET:
            return self._mtget()
        if request == io.MTIOCPOS:
            self._ready()
            if self.header.flags & FLAG_NO_LOCATE:
                raise _oserror(errno.EIO)   # tgt: READ POSITION says "position unknown"
            return io.MTPOS.pack(self._pos)
        if request != io.MTIOCTOP:
            raise _oserror(errno.ENOTTY)
        op, count = io.MTOP.unpack(bytes(arg))
        if op not in (io.MTLOAD, io.MTNOP):
            self._ready()
        if self._writing and op in (io.MTREW, io.MTOFFL, io.MTUNLOAD, io.MTSEEK,
                                    io.MTBSF, io.MTBSFM):
            self._write_filemarks(1)        # st.rst: "a filemark is written" first
        self._writing = False
        handler = self._OPS.get(op)
        if handler is None:
            raise _oserror(errno.ENOSYS if op == io.MTTELL else errno.EINVAL)
        keep_eof = op in (io.MTNOP,)
        if not keep_eof:
            self._eof = NOEOF
        handler(self, count)
        return bytes(arg)

    def _mtget(self) -> bytes:
        g = 0
        if self._online:
            g |= io.GMT_ONLINE
            if self._pos == 0:
                g |= io.GMT_BOT
            if self._block == 0 and self._file > 0:
                g |= io.GMT_EOF
            if self._eof in (EOM_OK, EOM_ERROR):
                g |= io.GMT_EOT
            if self._eof in (EOD_1, EOD_2, EOD):
                g |= io.GMT_EOD
            if self.header.flags & FLAG_WRITE_PROTECT:
                g |= io.GMT_WR_PROT
        else:
            g |= io.GMT_DR_OPEN
        gstat = g - (1 << 32) if g & 0x80000000 else g      # a C long holds it signed
        return io.MTGET.pack(0x72, 0, self._block_size, gstat, 0, self._file, self._block)

    def _rewind(self, _count: int) -> None:
        self._pos, self._file, self._block = 0, 0, 0

    def _unload(self, count: int) -> None:
        self._rewind(count)
        self._online = False

    def _load(self, count: int) -> None:
        self._online = True
        self._rewind(count)

    def _write_filemarks(self, count: int) -> None:
        if not self._writable or self.header.flags & FLAG_WRITE_PROTECT:
            raise _oserror(errno.EACCES)
        if count <= 0:
            return
        if self._used_after(count * _ENTRY.size) > self.header.capacity:
            raise _oserror(errno.EIO)
        off = self._truncate_here()
        os.pwrite(self._fd, _ENTRY.pack(FMK, 0) * count, off)
        for i in range(count):
            self._entries.append((off + i * _ENTRY.size, FMK, 0))
        self._pos = len(self._entries)
        self._file, self._block = self._file + count, 0
        self._writing = False

    def _fsf(self, count: int) -> None:
        for _ in range(count):
            while self._pos < len(self._entries) and self._entries[self._pos][1] != FMK:
                self._pos += 1
            if self._pos >= len(self._entries):
                self._block, self._eof = -1, EOD_1
                raise _oserror(errno.EIO)
            self._pos += 1
            self._file, self._block = self._file + 1, 0
        self._eof = FM

    def _bsf(self, count: int) -> None:
        for _ in range(count):
            self._pos -= 1
            while self._pos >= 0 and self._entries[self._pos][1] != FMK:
                self._pos -= 1
            if self._pos < 0:
                self._rewind(0)
                raise _oserror(errno.EIO)
            self._file = self._file - 1 if self._file > 0 else -1
        self._block = -1                    # st: the block number is unknown now

    def _fsr(self, count: int) -> None:
        for _ in range(count):
            if self._pos >= len(self._entries):
                self._eof = EOD_1
                raise _oserror(errno.EIO)
            tag = self._entries[self._pos][1]
            self._pos += 1
            if tag == FMK:                  # SPACE stops after the filemark, sense FMK
                self._file, self._block, self._eof = self._file + 1, 0, FM
                raise _oserror(errno.EIO)
            self._block = self._block + 1 if self._block >= 0 else -1

    def _bsr(self, count: int) -> None:
        for _ in range(count):
            if self._pos == 0:
                raise _oserror(errno.EIO)
            if self._entries[self._pos - 1][1] == FMK:
                # SSC: SPACE reverse stops on the BOT side of the filemark, sense FMK
                self._file, self._block = self._file - 1 if self._file > 0 else -1, -1
                self._pos -= 1
                raise _oserror(errno.EIO)
            self._pos -= 1
            self._block = self._block - 1 if self._block > 0 else -1

    def _eom(self, _count: int) -> None:
        self._pos = len(self._entries)
        marks = [i for i, e in enumerate(self._entries) if e[1] == FMK]
        self._file = len(marks)
        self._block = len(self._entries) - (marks[-1] + 1 if marks else 0)
        self._eof = EOD

    def _seek(self, count: int) -> None:
        if self.header.flags & FLAG_NO_LOCATE:
            raise _oserror(errno.EIO)       # tgt: LOCATE is an invalid opcode
        self._file = self._block = -1
        if count > len(self._entries):
            self._pos, self._eof = len(self._entries), EOD_1
            raise _oserror(errno.EIO)
        self._pos = count

    def _erase(self, _count: int) -> None:
        if not self._writable or self.header.flags & FLAG_WRITE_PROTECT:
            raise _oserror(errno.EACCES)
        self._truncate_here()

    def _setblk(self, count: int) -> None:
        if not 0 <= count <= MAX_RECORD:
            raise _oserror(errno.EINVAL)
        self._block_size = count

    def _compression(self, _count: int) -> None:
        raise _oserror(errno.EIO)           # like a drive whose page 0x0F says DCC=0

    def _nop(self, _count: int) -> None:
        pass

    _OPS = {
        io.MTREW: _rewind, io.MTOFFL: _unload, io.MTUNLOAD: _unload, io.MTLOAD: _load,
        io.MTWEOF: _write_filemarks, io.MTWEOFI: _write_filemarks, io.MTFSF: _fsf,
        io.MTBSF: _bsf, io.MTFSR: _fsr, io.MTBSR: _bsr, io.MTEOM: _eom, io.MTSEEK: _seek,
        io.MTERASE: _erase, io.MTSETBLK: _setblk, io.MTCOMPRESSION: _compression,
        io.MTNOP: _nop, io.MTSETDRVBUFFER: _nop,
    }
