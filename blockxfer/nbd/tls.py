"""NBD over TLS: the server's policy, its X.509 context, and a TLS byte stream.

`TlsPolicy` says what the handshake does with NBD_OPT_STARTTLS: `off` (the
option is unsupported), `on` (a client may upgrade), `require` (every option
but STARTTLS and ABORT is answered NBD_REP_ERR_TLS_REQD until it does: the
spec's FORCEDTLS mode). `server_context` loads a certificate and key and, with
a CA, demands and verifies a client certificate.

`TlsStream` is what the connection reads and writes after the upgrade. It has
the two calls both protocol phases use on a plain socket (`recv_into`,
`sendmsg`), so negotiation and transmission run unchanged over either. It
drives an `ssl.SSLObject` over memory BIOs rather than wrapping the socket:
transmission reads requests in one thread while other threads send replies,
and an OpenSSL connection must not be used by two threads at once (a TLS 1.3
read may itself produce output). Here every call on the TLS object is under
one lock, held only while encrypting or decrypting, never across socket I/O.

TLS-PSK is not offered: Python 3.11's `ssl` has no PSK API (3.13 added
`set_psk_server_callback`).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import cast

from blockxfer.errors import UsageError

from .tlsmodes import MODES, Mode  # noqa: F401 - MODES: part of this module's interface

CHUNK = 256 << 10        # plaintext sealed per TLS write, and ciphertext read per recv
_SMALL = 16 << 10        # parts smaller than this are gathered first (fewer TLS records)


@dataclass(frozen=True)
class TlsPolicy:
    mode: Mode = "off"
    context: ssl.SSLContext | None = None

    def __post_init__(self) -> None:
        assert (self.mode == "off") == (self.context is None), "TLS on/require needs a context"

    @property
    def offered(self) -> bool:
        return self.mode != "off"

    @property
    def required(self) -> bool:
        return self.mode == "require"


def server_context(cert: str, key: str, ca: str | None = None) -> ssl.SSLContext:
    """TLS 1.2 or later (the NBD spec's minimum); with `ca`, clients must present a
    certificate that CA signed."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise UsageError(f"cannot load --tls-cert {cert} / --tls-key {key}: {_why(e)}; "
                         "give a PEM certificate and its private key") from e
    if ca is not None:
        try:
            ctx.load_verify_locations(cafile=ca)
        except (OSError, ssl.SSLError) as e:
            raise UsageError(f"cannot load --tls-ca {ca}: {_why(e)}; give a PEM CA "
                             "certificate") from e
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _why(e: OSError) -> str:
    return str(getattr(e, "reason", None) or e.strerror or e)


class TlsStream:
    """The server side of a TLS connection over a connected socket."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext) -> None:
        self.sock = sock
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._in, self._out, server_side=True)
        self._state = threading.Lock()   # the SSLObject: one call at a time
        self._wire = threading.Lock()    # ciphertext leaves in the order it was made

    def handshake(self) -> None:
        """Complete the TLS handshake (the socket's timeout bounds each wait);
        raises ssl.SSLError (an OSError) when the peer or its certificate is refused,
        after sending the alert that tells the client why."""
        while True:
            try:
                with self._state:
                    self._tls.do_handshake()
                self._drain()
                return
            except ssl.SSLWantReadError:
                self._drain()
                if not self._fill():
                    raise ConnectionResetError("peer closed during the TLS handshake") from None
            except ssl.SSLError:
                with contextlib.suppress(OSError):
                    self._drain()
                raise

    @property
    def peer(self) -> str:
        """The client certificate's subject CN, or '' when it gave none."""
        cert = self._tls.getpeercert() or {}
        for rdn in cert.get("subject", ()):
            for attr in rdn:
                if attr[0] == "commonName":
                    return str(attr[1])
        return ""

    @property
    def version(self) -> str:
        return self._tls.version() or ""

    # --- the socket calls the protocol uses ---

    def recv_into(self, buffer: memoryview | bytearray, nbytes: int = 0) -> int:
        """Up to `nbytes` (default len(buffer)) plaintext bytes; 0 at end of stream."""
        n = nbytes or len(buffer)
        while True:
            with self._state:
                try:
                    return cast(int, self._tls.read(n, buffer))   # with a buffer: a count
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLZeroReturnError:       # close_notify: a clean end
                    return 0
                finally:
                    made = self._out.pending
            if made:       # a read may answer the peer (TLS 1.3 key update): send it soon
                self._drain(wait=False)
            if not self._fill():
                return 0

    def sendmsg(self, buffers: Iterable[bytes | bytearray | memoryview]) -> int:
        """Send every byte of `buffers` (as sockio.send_all would loop for); returns
        their total. Small parts are gathered so they share TLS records."""
        total, small = 0, bytearray()
        with self._wire:
            for b in buffers:
                view = memoryview(b).cast("B")
                total += len(view)
                if len(view) < _SMALL:
                    small += view
                    if len(small) >= CHUNK:
                        self._seal(small)
                        small = bytearray()
                    continue
                if small:
                    self._seal(small)
                    small = bytearray()
                for at in range(0, len(view), CHUNK):
                    self._seal(view[at:at + CHUNK])
            if small:
                self._seal(small)
            self._send_pending()
        return total

    def shutdown(self, how: int) -> None:
        self.sock.shutdown(how)

    def settimeout(self, timeout: float | None) -> None:
        self.sock.settimeout(timeout)

    def close(self) -> None:
        """Say close_notify (best effort: the peer may be gone); the socket stays
        open for its owner to close."""
        with contextlib.suppress(OSError, ValueError), self._state:
            self._tls.unwrap()
        with contextlib.suppress(OSError):
            self._drain(wait=False)

    # --- ciphertext in and out ---

    def _seal(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt `data`; send what is sealed once a chunk has gathered. Caller holds _wire."""
        with self._state:
            self._tls.write(data)
            ready = self._out.pending >= CHUNK
        if ready:
            self._send_pending()

    def _send_pending(self) -> None:
        with self._state:
            data = self._out.read()
        if data:
            self.sock.sendall(data)

    def _drain(self, wait: bool = True) -> None:
        """Send what the TLS object produced outside sendmsg. Without `wait`, a sender
        busy on the wire sends it instead (with its next reply); waiting for it could
        deadlock a reader against a client that waits for its own send to finish."""
        if not self._wire.acquire(blocking=wait):
            return
        try:
            self._send_pending()
        finally:
            self._wire.release()

    def _fill(self) -> bool:
        data = self.sock.recv(CHUNK)
        if not data:
            return False
        with self._state:
            self._in.write(data)
        return True
