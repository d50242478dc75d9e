#!/usr/bin/env python3
"""A deliberately slow NBD server: each export behaves like one disk arm.

Usage: slownbd.py PORT BPS LATENCY_MS NAME=FILE ...

Serves each FILE as export NAME on 127.0.0.1:PORT (fixed newstyle handshake,
NBD_OPT_EXPORT_NAME or NBD_OPT_GO; simple replies; READ, WRITE, FLUSH, DISC).
Every request on an export is served one at a time, and takes LATENCY_MS plus
its length / BPS, however many the client has in flight. That is what QEMU's
I/O throttling does not model (it admits a request at once and charges its
bytes afterwards), and what tells a reader that keeps every RAID member busy
from one that reads one chunk after another. The test bed's benchmark puts
four of these under md RAID0 (vm-testbed/run.sh --bench). stdlib only.
"""

from __future__ import annotations

import os
import socket
import struct
import sys
import threading
import time

NBDMAGIC, IHAVEOPT = b"NBDMAGIC", b"IHAVEOPT"
FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES = 1, 2
OPT_EXPORT_NAME, OPT_ABORT, OPT_INFO, OPT_GO = 1, 2, 6, 7
REP_MAGIC = 0x3E889045565A9
REP_ACK, REP_INFO, REP_ERR_UNSUP, REP_ERR_UNKNOWN = 1, 3, 0x80000001, 0x80000006
INFO_EXPORT = 0
TFLAG_HAS_FLAGS, TFLAG_SEND_FLUSH = 1, 4
REQUEST = struct.Struct(">IHHQQI")      # magic, flags, type, cookie, offset, length
REQUEST_MAGIC, REPLY_MAGIC = 0x25609513, 0x67446698
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH = 0, 1, 2, 3
EINVAL, EIO = 22, 5


class Export:
    def __init__(self, path: str, bps: float, latency: float):
        self.fd = os.open(path, os.O_RDWR)
        self.size = os.fstat(self.fd).st_size
        self.bps, self.latency = bps, latency
        self.arm = threading.Lock()     # one request at a time, like one disk

    def serve(self, kind: int, offset: int, data: bytes | int) -> bytes:
        with self.arm:
            n = data if isinstance(data, int) else len(data)
            t_end = time.monotonic() + self.latency + n / self.bps
            if kind == CMD_READ:
                out = os.pread(self.fd, n, offset).ljust(n, b"\0")
            else:
                assert isinstance(data, bytes)
                os.pwrite(self.fd, data, offset)
                out = b""
            time.sleep(max(0.0, t_end - time.monotonic()))
            return out


def recv(conn: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("client went away")
        buf += chunk
    return bytes(buf)


def opt_reply(conn: socket.socket, opt: int, kind: int, data: bytes = b"") -> None:
    conn.sendall(struct.pack(">QIII", REP_MAGIC, opt, kind, len(data)) + data)


def negotiate(conn: socket.socket, exports: dict[str, Export]) -> Export | None:
    conn.sendall(NBDMAGIC + IHAVEOPT + struct.pack(">H", FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
    (cflags,) = struct.unpack(">I", recv(conn, 4))
    tflags = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH
    while True:
        magic, opt, length = struct.unpack(">8sII", recv(conn, 16))
        if magic != IHAVEOPT:
            return None
        data = recv(conn, length)
        if opt == OPT_EXPORT_NAME:
            exp = exports.get(data.decode())
            if exp is None:
                return None
            tail = b"" if cflags & FLAG_NO_ZEROES else bytes(124)
            conn.sendall(struct.pack(">QH", exp.size, tflags) + tail)
            return exp
        if opt in (OPT_INFO, OPT_GO):
            (nlen,) = struct.unpack(">I", data[:4])
            exp = exports.get(data[4:4 + nlen].decode())
            if exp is None:
                opt_reply(conn, opt, REP_ERR_UNKNOWN)
                continue
            opt_reply(conn, opt, REP_INFO, struct.pack(">HQH", INFO_EXPORT, exp.size, tflags))
            opt_reply(conn, opt, REP_ACK)
            if opt == OPT_GO:
                return exp
        elif opt == OPT_ABORT:
            opt_reply(conn, opt, REP_ACK)
            return None
        else:
            opt_reply(conn, opt, REP_ERR_UNSUP)


def transmit(conn: socket.socket, exp: Export) -> None:
    while True:
        magic, _flags, kind, cookie, offset, length = REQUEST.unpack(recv(conn, REQUEST.size))
        if magic != REQUEST_MAGIC or kind == CMD_DISC:
            return
        err, out = 0, b""
        if kind == CMD_WRITE:
            payload = recv(conn, length)
            if offset + length > exp.size:
                err = EINVAL
            else:
                exp.serve(CMD_WRITE, offset, payload)
        elif kind == CMD_READ:
            if offset + length > exp.size:
                err = EINVAL
            else:
                out = exp.serve(CMD_READ, offset, length)
        elif kind == CMD_FLUSH:
            os.fsync(exp.fd)
        else:
            err = EINVAL
        conn.sendall(struct.pack(">IIQ", REPLY_MAGIC, err, cookie) + out)


def handle(conn: socket.socket, exports: dict[str, Export]) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        exp = negotiate(conn, exports)
        if exp is not None:
            transmit(conn, exp)
    except (ConnectionError, OSError):
        pass
    finally:
        conn.close()


def main() -> None:
    if len(sys.argv) < 5:
        sys.exit(__doc__)
    port, bps, latency = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]) / 1000
    exports = {}
    for spec in sys.argv[4:]:
        name, _, path = spec.partition("=")
        exports[name] = Export(path, bps, latency)
    srv = socket.create_server(("127.0.0.1", port))
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=handle, args=(conn, exports), daemon=True).start()


if __name__ == "__main__":
    main()
