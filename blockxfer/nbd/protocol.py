"""NBD wire formats: constants and `struct.Struct` tables, nothing that does I/O.

Every value and layout comes from the NBD protocol document (`doc/proto.md` of
the NetworkBlockDevice project); names keep the spec's spelling without the
`NBD_` prefix. Only the fixed newstyle handshake and compact (not extended)
headers are described here: that is all the server speaks. Integers on the wire
are big-endian ("network byte order"). Parsing is split into small functions
that raise `ProtocolError` on anything malformed, so the server and the fuzz
tests share one parser.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

from blockxfer.errors import FormatError

# --- magics (proto.md "Handshake", "Transmission") ---
NBDMAGIC = 0x4E42444D41474943          # b"NBDMAGIC"
IHAVEOPT = 0x49484156454F5054          # b"IHAVEOPT"
REPLY_MAGIC = 0x0003E889045565A9       # option reply magic
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# --- handshake flags (server, u16) and client flags (u32) ---
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

# --- transmission flags (u16) ---
FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_ROTATIONAL = 1 << 4
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_SEND_DF = 1 << 7
FLAG_CAN_MULTI_CONN = 1 << 8
FLAG_SEND_RESIZE = 1 << 9
FLAG_SEND_CACHE = 1 << 10
FLAG_SEND_FAST_ZERO = 1 << 11

# --- options ---
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_PEEK_EXPORT = 4
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

# --- option reply types; errors have bit 31 set ---
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_FLAG_ERROR = 1 << 31
REP_ERR_UNSUP = REP_FLAG_ERROR | 1
REP_ERR_POLICY = REP_FLAG_ERROR | 2
REP_ERR_INVALID = REP_FLAG_ERROR | 3
REP_ERR_PLATFORM = REP_FLAG_ERROR | 4
REP_ERR_TLS_REQD = REP_FLAG_ERROR | 5
REP_ERR_UNKNOWN = REP_FLAG_ERROR | 6
REP_ERR_SHUTDOWN = REP_FLAG_ERROR | 7
REP_ERR_BLOCK_SIZE_REQD = REP_FLAG_ERROR | 8
REP_ERR_TOO_BIG = REP_FLAG_ERROR | 9

# --- NBD_REP_INFO types ---
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# --- commands and command flags ---
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# --- structured reply flags and chunk types ---
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) | 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) | 2

# --- base:allocation states ---
META_BASE_ALLOCATION = "base:allocation"
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1

# --- error values: fixed by the spec, not the host's errno (they agree on Linux) ---
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108
assert (EPERM, EIO, EINVAL, ENOSPC) == (errno.EPERM, errno.EIO, errno.EINVAL, errno.ENOSPC)

# --- layouts ---
GREETING = struct.Struct(">QQH")            # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS = struct.Struct(">I")
OPTION = struct.Struct(">QII")              # IHAVEOPT, option, data length
OPTION_REPLY = struct.Struct(">QIII")       # REPLY_MAGIC, option, reply type, data length
EXPORT_NAME_REPLY = struct.Struct(">QH")    # size, transmission flags (+124 zeroes)
INFO_EXPORT_BODY = struct.Struct(">HQH")    # INFO_EXPORT, size, transmission flags
INFO_BLOCK_SIZE_BODY = struct.Struct(">HIII")  # INFO_BLOCK_SIZE, minimum, preferred, maximum
REQUEST = struct.Struct(">IHHQQI")          # magic, command flags, type, cookie, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")        # magic, error, cookie
CHUNK = struct.Struct(">IHHQI")             # magic, flags, type, cookie, payload length
OFFSET_DATA = struct.Struct(">IHHQIQ")      # CHUNK + offset (data follows)
OFFSET_HOLE = struct.Struct(">IHHQIQI")     # CHUNK + offset, hole size
CHUNK_ERROR = struct.Struct(">IHHQIIH")     # CHUNK + error, message length (message follows)
DESCRIPTOR = struct.Struct(">II")           # extent length, status flags
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
assert (GREETING.size, OPTION.size, OPTION_REPLY.size, REQUEST.size) == (18, 16, 20, 28)
assert (SIMPLE_REPLY.size, CHUNK.size, OFFSET_DATA.size, CHUNK_ERROR.size) == (16, 20, 28, 26)

ZEROES_124 = bytes(124)
MAX_STRING = 4096           # proto.md: strings MUST be no longer than 4096 bytes


class ProtocolError(FormatError):
    """A peer sent something the NBD protocol does not allow."""


class Request(NamedTuple):
    """A tuple, not a dataclass: one is built per request, and a frozen dataclass's
    __init__ (five object.__setattr__ calls) was ~10 % of the server's Python time
    under 4 KiB random writes."""

    flags: int
    type: int
    cookie: int
    offset: int
    length: int


def parse_request(raw: bytes | bytearray | memoryview, at: int = 0) -> Request:
    """The request header at byte `at` of `raw` (no slice needed)."""
    fields = REQUEST.unpack_from(raw, at)
    if fields[0] != REQUEST_MAGIC:
        raise ProtocolError(f"bad request magic {fields[0]:#x}")
    return _new_request(fields[1:])


# tuple.__new__ directly: Request._make is a Python function around it
_new_request: Callable[[tuple[int, ...]], Request] = partial(tuple.__new__, Request)


def pack_request(req: Request) -> bytes:
    return REQUEST.pack(REQUEST_MAGIC, req.flags, req.type, req.cookie, req.offset, req.length)


def parse_option_header(raw: bytes | bytearray | memoryview) -> tuple[int, int]:
    """(option, data length) of one client option header."""
    magic, option, length = OPTION.unpack(raw)
    if magic != IHAVEOPT:
        raise ProtocolError(f"bad option magic {magic:#x}")
    return option, length


def pack_option(option: int, data: bytes = b"") -> bytes:
    return OPTION.pack(IHAVEOPT, option, len(data)) + data


def pack_option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    return OPTION_REPLY.pack(REPLY_MAGIC, option, reply, len(data)) + data


def pack_simple_reply(cookie: int, error: int = 0) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def pack_chunk(cookie: int, typ: int, payload: bytes = b"", flags: int = REPLY_FLAG_DONE) -> bytes:
    return CHUNK.pack(STRUCTURED_REPLY_MAGIC, flags, typ, cookie, len(payload)) + payload


def pack_offset_data_header(cookie: int, offset: int, length: int, done: bool = True) -> bytes:
    """Header of an OFFSET_DATA chunk; `length` bytes of data follow it."""
    flags = REPLY_FLAG_DONE if done else 0
    return OFFSET_DATA.pack(STRUCTURED_REPLY_MAGIC, flags, REPLY_TYPE_OFFSET_DATA, cookie,
                            8 + length, offset)


def pack_offset_hole(cookie: int, offset: int, length: int, done: bool = True) -> bytes:
    flags = REPLY_FLAG_DONE if done else 0
    return OFFSET_HOLE.pack(STRUCTURED_REPLY_MAGIC, flags, REPLY_TYPE_OFFSET_HOLE, cookie,
                            12, offset, length)


def pack_chunk_error(cookie: int, error: int, message: str = "") -> bytes:
    msg = message.encode()[:MAX_STRING]
    return CHUNK_ERROR.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, cookie,
                            6 + len(msg), error, len(msg)) + msg


def pack_block_status(cookie: int, context_id: int, extents: list[tuple[int, int]],
                      done: bool = True) -> bytes:
    """One BLOCK_STATUS chunk: `extents` is [(length, state flags), ...]."""
    body = U32.pack(context_id) + b"".join(DESCRIPTOR.pack(n, s) for n, s in extents)
    return pack_chunk(cookie, REPLY_TYPE_BLOCK_STATUS, body, REPLY_FLAG_DONE if done else 0)


# --- option payloads ---

class _Reader:
    """Bounds-checked cursor over an option's data."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ProtocolError("option data shorter than its fields say")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u16(self) -> int:
        return int(U16.unpack(self.take(2))[0])

    def u32(self) -> int:
        return int(U32.unpack(self.take(4))[0])

    def string(self) -> str:
        n = self.u32()
        if n > MAX_STRING:
            raise ProtocolError(f"string of {n} bytes exceeds {MAX_STRING}")
        try:
            s = self.take(n).decode()
        except UnicodeDecodeError as e:
            raise ProtocolError("string is not UTF-8") from e
        if "\0" in s:
            raise ProtocolError("string contains NUL")
        return s

    def end(self) -> None:
        if self.pos != len(self.data):
            raise ProtocolError("trailing bytes after option data")


def parse_info_request(data: bytes) -> tuple[str, list[int]]:
    """OPT_INFO / OPT_GO data: export name and the NBD_INFO types asked for."""
    r = _Reader(data)
    name = r.string()
    count = r.u16()
    infos = [r.u16() for _ in range(count)]
    r.end()
    return name, infos


def pack_info_request(name: str, infos: list[int]) -> bytes:
    raw = name.encode()
    return U32.pack(len(raw)) + raw + U16.pack(len(infos)) + b"".join(U16.pack(i) for i in infos)


def parse_meta_context_request(data: bytes) -> tuple[str, list[str]]:
    """OPT_LIST/SET_META_CONTEXT data: export name and the queries."""
    r = _Reader(data)
    name = r.string()
    count = r.u32()
    if count > len(data):          # each query takes at least 4 bytes: refuse absurd counts
        raise ProtocolError(f"{count} meta context queries in {len(data)} bytes")
    queries = [r.string() for _ in range(count)]
    r.end()
    return name, queries


def pack_meta_context_request(name: str, queries: list[str]) -> bytes:
    out = [U32.pack(len(name.encode())), name.encode(), U32.pack(len(queries))]
    for q in queries:
        out += [U32.pack(len(q.encode())), q.encode()]
    return b"".join(out)


def pack_rep_server(name: str, description: str = "") -> bytes:
    raw = name.encode()
    return U32.pack(len(raw)) + raw + description.encode()


def pack_rep_meta_context(context_id: int, name: str) -> bytes:
    return U32.pack(context_id) + name.encode()


def pack_info_export(size: int, flags: int) -> bytes:
    return INFO_EXPORT_BODY.pack(INFO_EXPORT, size, flags)


def pack_info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return INFO_BLOCK_SIZE_BODY.pack(INFO_BLOCK_SIZE, minimum, preferred, maximum)


def pack_info_name(name: str) -> bytes:
    return U16.pack(INFO_NAME) + name.encode()


def pack_info_description(text: str) -> bytes:
    return U16.pack(INFO_DESCRIPTION) + text.encode()
