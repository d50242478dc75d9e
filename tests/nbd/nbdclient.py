"""A minimal NBD client for tests: speaks exactly what the tests ask, checks little.

It is deliberately separate from the server's code paths except for the
protocol tables, so it can send malformed messages too.
"""

from __future__ import annotations

import socket
from typing import Any

from blockxfer.nbd import protocol as p
from blockxfer.nbd.sockio import recv_exact


class Client:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(10)

    @classmethod
    def attach(cls, server: Any) -> Client:
        a, b = socket.socketpair()
        server.start_connection(b)
        return cls(a)

    @classmethod
    def connect(cls, path: str, name: str = "") -> Client:
        """Connected to a server's unix socket `path`, in transmission on export `name`."""
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)
        c = cls(s)
        c.handshake()
        c.go(name)
        return c

    @classmethod
    def opened(cls, server: Any, name: str = "", **kw: bool) -> Client:
        """Attached to `server`, past the handshake, in transmission on export `name`."""
        c = cls.attach(server)
        c.handshake()
        c.go(name, **kw)
        return c

    def recv(self, n: int) -> bytes:
        return recv_exact(self.sock, n)

    def handshake(self, cflags: int = p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES) -> int:
        magic, opt, hflags = p.GREETING.unpack(self.recv(p.GREETING.size))
        assert (magic, opt) == (p.NBDMAGIC, p.IHAVEOPT)
        self.sock.sendall(p.CLIENT_FLAGS.pack(cflags))
        return int(hflags)

    def option(self, option: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        """Send one option; collect replies up to the ACK or an error."""
        self.sock.sendall(p.pack_option(option, data))
        replies = []
        while True:
            magic, opt, rtype, n = p.OPTION_REPLY.unpack(self.recv(p.OPTION_REPLY.size))
            assert magic == p.REPLY_MAGIC and opt == option
            replies.append((rtype, self.recv(n)))
            if rtype == p.REP_ACK or rtype & p.REP_FLAG_ERROR:
                return replies

    def go(self, name: str = "", *, structured: bool = False, meta: bool = False,
           ) -> tuple[int, int]:
        if structured:
            assert self.option(p.OPT_STRUCTURED_REPLY)[-1][0] == p.REP_ACK
        if meta:
            r = self.option(p.OPT_SET_META_CONTEXT,
                            p.pack_meta_context_request(name, [p.META_BASE_ALLOCATION]))
            assert r[-1][0] == p.REP_ACK, r
        replies = self.option(p.OPT_GO, p.pack_info_request(name, []))
        assert replies[-1][0] == p.REP_ACK, replies
        _, size, flags = p.INFO_EXPORT_BODY.unpack(replies[0][1])
        return int(size), int(flags)

    def send(self, typ: int, offset: int = 0, length: int = 0, *, flags: int = 0,
             cookie: int = 1, payload: bytes = b"") -> None:
        self.sock.sendall(p.pack_request(p.Request(flags, typ, cookie, offset, length)) + payload)

    def simple(self, length: int = 0) -> tuple[int, int, bytes]:
        """(error, cookie, data) of a simple reply; data only when error is 0."""
        magic, error, cookie = p.SIMPLE_REPLY.unpack(self.recv(p.SIMPLE_REPLY.size))
        assert magic == p.SIMPLE_REPLY_MAGIC
        return int(error), int(cookie), self.recv(length) if not error else b""

    def chunk(self) -> tuple[int, int, int, bytes]:
        """(flags, type, cookie, payload) of one structured reply chunk."""
        magic, flags, typ, cookie, n = p.CHUNK.unpack(self.recv(p.CHUNK.size))
        assert magic == p.STRUCTURED_REPLY_MAGIC
        return int(flags), int(typ), int(cookie), self.recv(n)

    def request(self, typ: int, offset: int = 0, length: int = 0, **kw: Any) -> int:
        """Send, wait for the simple reply, return its error."""
        self.send(typ, offset, length, **kw)
        error, _, _ = self.simple()
        return error

    def read(self, offset: int, length: int) -> bytes:
        self.send(p.CMD_READ, offset, length)
        error, _, data = self.simple(length)
        assert error == 0, error
        return data

    def closed(self) -> bool:
        """True when the server has closed the connection."""
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True

    def closed_after_reply(self) -> bool:
        """Read one simple reply (True if none came: the server closed instead)."""
        try:
            error, _, _ = self.simple()
        except EOFError:
            return True
        assert error == 0
        return False

    def close(self) -> None:
        self.sock.close()
