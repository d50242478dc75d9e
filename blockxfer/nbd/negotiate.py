"""The fixed newstyle handshake: greeting, options, and the export chosen.

One function, `negotiate`, runs the option haggling phase on a connected socket
and returns the `Session` the transmission phase needs, or None when the client
aborted. Anything that breaks the protocol beyond repair (bad magic, unknown
client flags, an option too large to read, a client that is not fixed newstyle
asking for more than NBD_OPT_EXPORT_NAME) raises `ProtocolError`: the caller
closes the connection. Recoverable mistakes get the option's error reply.

TLS (`tls.TlsPolicy`): NBD_OPT_STARTTLS is acknowledged in plain text, then
the TLS handshake runs and every later byte of the connection, options and
transmission, goes through the `TlsStream` the session carries. Under
`require` (the spec's FORCEDTLS) every option before the upgrade other than
STARTTLS and ABORT gets NBD_REP_ERR_TLS_REQD, and NBD_OPT_EXPORT_NAME, which
cannot be answered with an error, closes the connection. What a client
negotiated in plain text (structured replies, meta contexts) is forgotten at
the upgrade: it was not protected.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
from dataclasses import dataclass, field

from . import protocol as p
from .exports import MAX_PAYLOAD, Export, ExportTable
from .sockio import Stream, recv_exact, send_all
from .tls import TlsPolicy, TlsStream

log = logging.getLogger(__name__)

MAX_OPTION_DATA = 64 << 10
BASE_ALLOCATION_ID = 1
_KNOWN_CLIENT_FLAGS = p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES


@dataclass
class Session:
    export: Export
    stream: Stream                 # the connection: the socket, or TLS over it
    structured: bool = False
    contexts: dict[int, str] = field(default_factory=dict)   # id -> meta context name


@dataclass
class _State:
    sock: Stream
    exports: ExportTable
    fixed: bool
    no_zeroes: bool
    raw: socket.socket
    tls: TlsPolicy
    secure: bool = False           # TLS is up
    structured: bool = False
    meta_export: str | None = None
    meta: dict[int, str] = field(default_factory=dict)

    def reply(self, option: int, reply: int, data: bytes = b"") -> None:
        send_all(self.sock, [p.pack_option_reply(option, reply, data)])

    def error(self, option: int, reply: int, message: str) -> None:
        self.reply(option, reply, message.encode())


class _Abort(Exception):
    pass


def negotiate(sock: socket.socket, exports: ExportTable,
              tls: TlsPolicy | None = None) -> Session | None:
    send_all(sock, [p.GREETING.pack(p.NBDMAGIC, p.IHAVEOPT,
                                    p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES)])
    (cflags,) = p.CLIENT_FLAGS.unpack(recv_exact(sock, 4))
    if cflags & ~_KNOWN_CLIENT_FLAGS:
        raise p.ProtocolError(f"unknown client flags {cflags:#x}")
    st = _State(sock, exports, bool(cflags & p.FLAG_C_FIXED_NEWSTYLE),
                bool(cflags & p.FLAG_C_NO_ZEROES), sock, tls or TlsPolicy())
    try:
        while True:
            option, length = p.parse_option_header(recv_exact(st.sock, p.OPTION.size))
            if length > MAX_OPTION_DATA:
                raise p.ProtocolError(f"option {option} carries {length} bytes")
            data = recv_exact(st.sock, length)
            if not st.fixed and option != p.OPT_EXPORT_NAME:
                raise p.ProtocolError("client is not fixed newstyle")
            if st.tls.required and not st.secure and option not in _BEFORE_TLS:
                _tls_required(st, option)
                continue
            session = _HANDLERS.get(option, _unsupported)(st, option, data)
            if session is not None:
                return session
    except _Abort:
        return None


def _tls_required(st: _State, option: int) -> None:
    if option == p.OPT_EXPORT_NAME:        # no error reply exists for this option: close
        raise p.ProtocolError("client asked for an export without TLS, which this server "
                              "requires (serve --tls require)")
    st.error(option, p.REP_ERR_TLS_REQD,
             "this server requires TLS: upgrade with NBD_OPT_STARTTLS (nbds:// URI)")


def _starttls(st: _State, option: int, data: bytes) -> None:
    if not st.tls.offered or st.tls.context is None:
        return st.error(option, p.REP_ERR_POLICY,
                        "TLS is not enabled on this server (serve --tls on|require)")
    if data:
        return st.error(option, p.REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
    if st.secure:
        return st.error(option, p.REP_ERR_INVALID, "TLS is already negotiated")
    st.reply(option, p.REP_ACK)
    stream = TlsStream(st.raw, st.tls.context)
    try:
        stream.handshake()
    except ssl.SSLError as e:           # too late for plain text: the spec says close
        raise p.ProtocolError(f"TLS handshake failed: {e.reason or e}") from e
    log.debug("TLS %s with client %r", stream.version, stream.peer)
    st.sock, st.secure = stream, True
    st.structured, st.meta_export, st.meta = False, None, {}


def _unsupported(st: _State, option: int, data: bytes) -> None:
    st.error(option, p.REP_ERR_UNSUP, f"option {option} is not supported")


def _abort(st: _State, option: int, data: bytes) -> None:
    with contextlib.suppress(OSError):     # the client may already be gone: allowed
        st.reply(option, p.REP_ACK)
    raise _Abort


def _export_name(st: _State, option: int, data: bytes) -> Session:
    try:
        export = st.exports.resolve(data.decode())
    except UnicodeDecodeError:
        export = None
    if export is None:           # no error reply exists for this option: close
        raise p.ProtocolError(f"unknown export {data[:64]!r}")
    reply = p.EXPORT_NAME_REPLY.pack(export.size, export.flags(st.structured))
    send_all(st.sock, [reply, b"" if st.no_zeroes else p.ZEROES_124])
    return _session(st, export)


def _list(st: _State, option: int, data: bytes) -> None:
    if data:
        return st.error(option, p.REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
    for ex in st.exports.all():
        st.reply(option, p.REP_SERVER, p.pack_rep_server(ex.name, ex.description))
    st.reply(option, p.REP_ACK)


def _info(st: _State, option: int, data: bytes) -> Session | None:
    try:
        name, infos = p.parse_info_request(data)
    except p.ProtocolError as e:
        st.error(option, p.REP_ERR_INVALID, str(e))
        return None
    export = st.exports.resolve(name)
    if export is None:
        st.error(option, p.REP_ERR_UNKNOWN, f"no export named {name!r}")
        return None
    st.reply(option, p.REP_INFO, p.pack_info_export(export.size, export.flags(st.structured)))
    if p.INFO_NAME in infos:
        st.reply(option, p.REP_INFO, p.pack_info_name(export.name))
    if p.INFO_DESCRIPTION in infos:
        st.reply(option, p.REP_INFO, p.pack_info_description(export.description))
    if p.INFO_BLOCK_SIZE in infos:
        st.reply(option, p.REP_INFO,
                 p.pack_info_block_size(1, export.block_size, MAX_PAYLOAD))
    st.reply(option, p.REP_ACK)
    return _session(st, export) if option == p.OPT_GO else None


def _structured_reply(st: _State, option: int, data: bytes) -> None:
    if data:
        return st.error(option, p.REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
    if st.structured:
        return st.error(option, p.REP_ERR_INVALID, "structured replies already negotiated")
    st.structured = True
    st.reply(option, p.REP_ACK)


def _meta_context(st: _State, option: int, data: bytes) -> None:
    setting = option == p.OPT_SET_META_CONTEXT
    if setting and not st.structured:
        return st.error(option, p.REP_ERR_INVALID,
                        "negotiate NBD_OPT_STRUCTURED_REPLY before NBD_OPT_SET_META_CONTEXT")
    try:
        name, queries = p.parse_meta_context_request(data)
    except p.ProtocolError as e:
        return st.error(option, p.REP_ERR_INVALID, str(e))
    if st.exports.resolve(name) is None:
        return st.error(option, p.REP_ERR_UNKNOWN, f"no export named {name!r}")
    wanted = {p.META_BASE_ALLOCATION} if setting else {p.META_BASE_ALLOCATION, "base:"}
    matched = (not queries and not setting) or any(q in wanted for q in queries)
    if matched:
        st.reply(option, p.REP_META_CONTEXT,
                 p.pack_rep_meta_context(BASE_ALLOCATION_ID, p.META_BASE_ALLOCATION))
    if setting:
        st.meta_export = name
        st.meta = {BASE_ALLOCATION_ID: p.META_BASE_ALLOCATION} if matched else {}
    st.reply(option, p.REP_ACK)


def _session(st: _State, export: Export) -> Session:
    same = st.meta_export is not None and st.exports.resolve(st.meta_export) == export
    return Session(export, st.sock, st.structured, dict(st.meta) if same else {})


_HANDLERS = {
    p.OPT_EXPORT_NAME: _export_name,
    p.OPT_ABORT: _abort,
    p.OPT_LIST: _list,
    p.OPT_INFO: _info,
    p.OPT_GO: _info,
    p.OPT_STRUCTURED_REPLY: _structured_reply,
    p.OPT_LIST_META_CONTEXT: _meta_context,
    p.OPT_SET_META_CONTEXT: _meta_context,
    p.OPT_STARTTLS: _starttls,
}
_BEFORE_TLS = {p.OPT_STARTTLS, p.OPT_ABORT}     # what FORCEDTLS answers without TLS
