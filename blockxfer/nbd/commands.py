"""What each NBD command does to the volume, and the replies it gets.

`Commands` is the part of a connection that knows the commands; the threads,
queues and batching around it are in `transmit`, the pipelined READs in
`readpipe`. A volume call that fails with one of `ANSWERED` gets its error
reply; any other exception is a bug, and the caller hangs up (transmit's
`_fail`) rather than guess what the volume did.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from blockxfer.errors import BlockxferError, VolumeFull

from . import protocol as p
from .errmap import nbd_error
from .exports import MAX_PAYLOAD, LockedVolume
from .negotiate import Session

log = logging.getLogger(__name__)

KNOWN_FLAGS = (p.CMD_FLAG_FUA | p.CMD_FLAG_NO_HOLE | p.CMD_FLAG_DF | p.CMD_FLAG_REQ_ONE
               | p.CMD_FLAG_FAST_ZERO)
_MAX_DESCRIPTORS = 1 << 16
Payload = bytes | bytearray | memoryview | None    # a write's payload as the reader left it
Part = bytes | bytearray | memoryview               # one piece of a reply
Release = Callable[[], None]                        # hands a read buffer back after the send
# what a request is answered with (errmap's table names these, an OSError is EIO);
# anything else raised by a volume call is a bug that closes the connection
ANSWERED = (BlockxferError, OSError, ValueError, MemoryError)


class RequestError(Exception):
    def __init__(self, error: int, message: str) -> None:
        super().__init__(message)
        self.error = error


class Commands:
    def __init__(self, session: Session, vol: LockedVolume) -> None:
        self.session, self.vol = session, vol
        self.export = session.export
        self._leases: list[Release] = []     # read buffers in replies not sent

    def _dispatch(self, req: p.Request, buf: Payload) -> list[Part]:
        if req.flags & ~KNOWN_FLAGS:
            raise RequestError(p.EINVAL, f"unknown command flags {req.flags:#x}")
        handler = _COMMANDS.get(req.type)
        if handler is None:
            raise RequestError(p.EINVAL, f"unknown command {req.type}")
        if req.type != p.CMD_FLUSH:
            self._check_range(req)
        return handler(self, req, buf)

    def _check_range(self, req: p.Request) -> None:
        if req.offset + req.length > self.export.size:
            error = p.ENOSPC if req.type == p.CMD_WRITE else p.EINVAL
            raise RequestError(error, f"{req.offset}+{req.length} beyond {self.export.size}")
        if req.type in (p.CMD_WRITE, p.CMD_TRIM, p.CMD_WRITE_ZEROES) and self.export.read_only:
            raise RequestError(p.EPERM, f"export {self.export.name!r} is read-only")

    def _error_reply(self, req: p.Request, error: int, message: str) -> bytes:
        if self.session.structured and req.type in (p.CMD_READ, p.CMD_BLOCK_STATUS):
            return p.pack_chunk_error(req.cookie, error, message)
        return p.pack_simple_reply(req.cookie, error)

    def _read(self, req: p.Request, buf: Payload) -> list[Part]:
        """A READ that is not pipelined (see `readpipe`): read here, the buffer goes
        back once the reply has left."""
        if req.length > MAX_PAYLOAD:
            raise RequestError(p.EINVAL, f"read of {req.length} bytes exceeds {MAX_PAYLOAD}")
        parts, leases = self.read_replies([req])
        self._leases += leases
        return parts

    def read_replies(self, reqs: Sequence[p.Request]) -> tuple[list[Part], list[Release]]:
        """The replies to valid READs that continue each other, from one volume read,
        and what hands their buffers back once the replies have been sent. A read
        that fails with an answered error is read again request by request, so a
        damaged block fails only the requests that cover it; a bug propagates."""
        first = reqs[0]
        total = reqs[-1].offset + reqs[-1].length - first.offset
        try:
            data, release = self.vol.read(first.offset, total, self.export.snapshot)
        except ANSWERED as e:
            if len(reqs) == 1:
                return self.error_replies(reqs, e), []
            parts: list[Part] = []
            leases: list[Release] = []
            for req in reqs:
                more, held = self.read_replies([req])
                parts += more
                leases += held
            return parts, leases
        try:
            view, parts = memoryview(data), []
            for req in reqs:
                at = req.offset - first.offset
                parts += self._read_reply(req, view[at:at + req.length])
        except BaseException:
            release()
            raise
        return parts, [release]

    def error_replies(self, reqs: Sequence[p.Request], e: Exception) -> list[Part]:
        """The replies to requests whose one volume call raised `e` (one of ANSWERED)."""
        if not isinstance(e, BlockxferError):        # not raised on purpose: say where
            log.error("request %s%s failed: %s", reqs[0],
                      f" and {len(reqs) - 1} more" if len(reqs) > 1 else "", e, exc_info=e)
        error = nbd_error(e)
        return [self._error_reply(req, error, str(e)) for req in reqs]

    def _read_reply(self, req: p.Request, data: bytes | memoryview) -> list[Part]:
        if not self.session.structured:
            return [p.pack_simple_reply(req.cookie), data]
        if req.length == 0:
            return [p.pack_chunk(req.cookie, p.REPLY_TYPE_NONE)]
        return [p.pack_offset_data_header(req.cookie, req.offset, req.length), data]

    def _write(self, req: p.Request, buf: Payload) -> list[Part]:
        assert buf is not None
        self._change("write", req.offset, memoryview(buf)[:req.length],
                     fua=bool(req.flags & p.CMD_FLAG_FUA))
        return [p.pack_simple_reply(req.cookie)]

    def _flush(self, req: p.Request, buf: Payload) -> list[Part]:
        if not self.export.read_only:
            self.vol.sync()               # an intent log record, not a whole CP
        return [p.pack_simple_reply(req.cookie)]

    def _trim(self, req: p.Request, buf: Payload) -> list[Part]:
        return self._modify(req, "trim")

    def _write_zeroes(self, req: p.Request, buf: Payload) -> list[Part]:
        if req.flags & p.CMD_FLAG_FAST_ZERO:
            raise RequestError(p.ENOTSUP, "fast zero is not offered")
        return self._modify(req, "write_zeroes")

    def _modify(self, req: p.Request, method: str) -> list[Part]:
        self._change(method, req.offset, req.length, fua=bool(req.flags & p.CMD_FLAG_FUA))
        return [p.pack_simple_reply(req.cookie)]

    def _change(self, method: str, *args: object, fua: bool) -> None:
        """A write, trim or zeroing under the lock; FUA then syncs (an intent log
        record with everything written so far, or a CP when the log is full). Blocks freed since
        the last CP are not reusable until the next one, so a client rewriting a
        nearly full disk between CPs would see ENOSPC although the space is there:
        on VolumeFull, commit once (freeing them) and try again."""
        call = getattr(self.vol.volume, method)
        with self.vol.lock:
            try:
                call(*args)
            except VolumeFull:                # (a repeated write_blocks is the same)
                self.vol.volume.commit()
                call(*args)
        if fua:
            self.vol.sync()               # outside the lock where the volume allows it

    def _block_status(self, req: p.Request, buf: Payload) -> list[Part]:
        if not self.session.contexts:
            raise RequestError(p.EINVAL, "no meta context was negotiated")
        if req.length == 0:
            raise RequestError(p.EINVAL, "block status of zero bytes")
        extents = self.vol.call("extents", req.offset, req.length, self.export.snapshot)
        descriptors = merge_extents(extents, req.offset, req.length)
        if req.flags & p.CMD_FLAG_REQ_ONE:
            descriptors = descriptors[:1]
        ids = sorted(self.session.contexts)
        return [p.pack_block_status(req.cookie, ctx, descriptors[:_MAX_DESCRIPTORS],
                                    done=ctx == ids[-1]) for ctx in ids]


def merge_extents(extents: list[tuple[int, int, bool]], offset: int,
                  length: int) -> list[tuple[int, int]]:
    """Volume extents -> base:allocation descriptors, clipped, adjacent ones merged."""
    out: list[tuple[int, int]] = []
    end = offset + length
    for off, n, mapped in extents:
        lo, hi = max(off, offset), min(off + n, end)
        if hi <= lo:
            continue
        state = 0 if mapped else p.STATE_HOLE | p.STATE_ZERO
        if out and out[-1][1] == state:
            out[-1] = (out[-1][0] + hi - lo, state)
        else:
            out.append((hi - lo, state))
    if not out:                      # the volume said nothing: call it data, never lie "zero"
        out.append((length, 0))
    return out


_COMMANDS: dict[int, Callable[[Commands, p.Request, Payload], list[Part]]] = {
    p.CMD_READ: Commands._read,
    p.CMD_WRITE: Commands._write,
    p.CMD_FLUSH: Commands._flush,
    p.CMD_TRIM: Commands._trim,
    p.CMD_WRITE_ZEROES: Commands._write_zeroes,
    p.CMD_BLOCK_STATUS: Commands._block_status,
}
