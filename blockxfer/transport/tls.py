"""`tls://host:port/path`: mutual TLS to a blockxfer stream service (`blockxfer tls-serve`).

Both ends prove who they are with X.509 certificates signed by one CA. The
certificates live in one folder laid out as qemu and libnbd lay theirs out
(`ca-cert.pem`, `client-cert.pem`, `client-key.pem`, `server-cert.pem`,
`server-key.pem`): `$BLOCKXFER_TLS_DIR`, default /etc/blockxfer/tls. The client
checks the server's name against its certificate; the server maps the client
certificate's common name to what it may do (docs/transport.md).
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from blockxfer.errors import BlockxferError, DeviceError, UsageError

TLS_DIR = "/etc/blockxfer/tls"
CONNECT_TIMEOUT = 30.0


def tls_dir(folder: str | None = None) -> str:
    return folder or os.environ.get("BLOCKXFER_TLS_DIR", TLS_DIR)


def _need(folder: str, name: str) -> str:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise UsageError(f"{path} is missing: TLS needs ca-cert.pem and the certificate "
                         f"and key of this end in {folder} ($BLOCKXFER_TLS_DIR)")
    return path


def client_context(folder: str | None = None) -> ssl.SSLContext:
    d = tls_dir(folder)
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=_need(d, "ca-cert.pem"))
    try:
        ctx.load_cert_chain(_need(d, "client-cert.pem"), _need(d, "client-key.pem"))
    except ssl.SSLError as e:
        raise UsageError(f"{d}: the client certificate or key does not load: {e.reason}") from e
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def server_context(folder: str | None = None) -> ssl.SSLContext:
    """A server context that requires a client certificate from the same CA."""
    d = tls_dir(folder)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(_need(d, "server-cert.pem"), _need(d, "server-key.pem"))
        ctx.load_verify_locations(_need(d, "ca-cert.pem"))
    except ssl.SSLError as e:
        raise UsageError(f"{d}: the server certificate or key does not load: {e.reason}") from e
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def peer_name(sock: ssl.SSLSocket) -> str | None:
    """The common name of the verified peer certificate."""
    cert = sock.getpeercert() or {}
    for rdn in cert.get("subject", ()):
        for item in rdn:
            if isinstance(item, tuple) and len(item) == 2 and item[0] == "commonName":
                return str(item[1])
    return None


@dataclass(frozen=True, slots=True)
class TlsUrl:
    host: str
    port: int
    path: str

    @classmethod
    def parse(cls, url: str) -> TlsUrl:
        u = urlsplit(url)
        try:
            port = u.port
        except ValueError as e:
            raise UsageError(f"{url!r}: the port is not a number") from e
        if u.scheme != "tls" or not u.hostname or not port or not u.path or u.path == "/":
            raise UsageError(f"{url!r}: a TLS URL is tls://host:port/path")
        return cls(u.hostname, port, unquote(u.path))


class TlsChannel:
    """A verified mutual-TLS connection."""

    def __init__(self, url: TlsUrl, folder: str | None = None) -> None:
        self.peer = f"{url.host}:{url.port}"
        ctx = client_context(folder)
        try:
            raw = socket.create_connection((url.host, url.port), timeout=CONNECT_TIMEOUT)
        except OSError as e:
            raise DeviceError(f"cannot connect to {self.peer}: {e.strerror or e}") from e
        try:
            self._sock = ctx.wrap_socket(raw, server_hostname=url.host)
        except (ssl.SSLError, ssl.CertificateError) as e:
            raw.close()
            raise DeviceError(f"TLS with {self.peer} failed: {getattr(e, 'reason', e)}") from e
        except OSError as e:
            raw.close()
            raise DeviceError(f"TLS with {self.peer} failed: {e.strerror or e}") from e
        self._sock.settimeout(None)
        self.reader = self._sock.makefile("rb")
        self.writer = self._sock.makefile("wb")

    def close(self) -> None:
        for f in (self.writer, self.reader):
            with contextlib.suppress(OSError):
                f.close()
        with contextlib.suppress(OSError):
            self._sock.unwrap()
        self._sock.close()

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()

    def alive(self) -> bool:
        """Nothing arrived on the idle connection (a close would have: EOF, close_notify)."""
        if self._sock.pending():
            return False
        from .endpoint import quiet
        return quiet(self._sock)

    def explain(self, e: BlockxferError, cause: OSError | None = None) -> BlockxferError:
        """TLS 1.3 tells a client its certificate was refused only on the first read."""
        if isinstance(cause, ssl.SSLError):
            return DeviceError(f"TLS with {self.peer} failed: the server refused this end's "
                               f"certificate or the connection ({cause.reason or cause})")
        return e
