"""NBD over TLS (NBD_OPT_STARTTLS, X.509), against real clients and our own.

The server runs in this process over the fake volume on 127.0.0.1 with
certificates the test makes (`pki.make_pki`); libnbd's tools (nbdinfo,
nbdcopy: `nbds://` URIs with `tls-certificates=DIR`) and qemu-img
(`--object tls-creds-x509`) are the clients nobody here wrote. Python's
`ssl` is the client for the protocol details the real ones never send.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockxfer.nbd import protocol as p
from blockxfer.nbd.server import Server
from blockxfer.nbd.tls import Mode, TlsPolicy, server_context
from tests.nbd.fakes import FakeVolume
from tests.nbd.nbdclient import Client
from tests.nbd.test_nbd_interop import (
    LIBNBD_SCRIPT,
    SIZE,
    SYSTEM_PYTHON,
    MiB,
    need,
    pattern_file,
    run,
)
from tests.pki import Pki, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


class TlsServed:
    def __init__(self, pki: Pki, mode: Mode, verify_clients: bool = True) -> None:
        self.pki = pki
        self.volume = FakeVolume(SIZE)
        self.volume.write(8 * MiB, b"snapshot" * (MiB // 8))
        self.volume.create_snapshot("s1")
        ctx = server_context(str(pki.server_cert), str(pki.server_key),
                             str(pki.ca) if verify_clients else None)
        self.server = Server(self.volume, tls=TlsPolicy(mode, ctx))
        self.port = self.server.listen("tcp:127.0.0.1:0").getsockname()[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def uri(self, export: str = "", certs: Path | None = None) -> str:
        return (f"nbds://localhost:{self.port}/{export}"
                f"?tls-certificates={certs or self.pki.client_dir}")

    def plain_uri(self, export: str = "") -> str:
        return f"nbd://localhost:{self.port}/{export}"

    def connect(self) -> Client:
        return Client(socket.create_connection(("127.0.0.1", self.port)))

    def stop(self) -> None:
        self.server.stop()
        self.thread.join(30)


@pytest.fixture(params=["require"])
def served(request: pytest.FixtureRequest, pki: Pki) -> Iterator[TlsServed]:
    s = TlsServed(pki, request.param)
    yield s
    s.stop()


def refused(argv: list[str]) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0, f"{argv[0]} was let in: {r.stdout}"
    return r.stderr


# --- real clients ---

def test_nbdinfo_negotiates_tls_and_lists_exports(served: TlsServed) -> None:
    nbdinfo = need("nbdinfo", "libnbd-bin")
    info = json.loads(run(nbdinfo, "--json", served.uri()))
    assert info["TLS"] is True and info["exports"][0]["export-size"] == SIZE
    listing = json.loads(run(nbdinfo, "--json", "--list", served.uri()))
    assert {e["export-name"] for e in listing["exports"]} == {"", "@s1"}


def test_nbdcopy_in_and_out_over_tls(served: TlsServed, tmp_path: Path) -> None:
    nbdcopy = need("nbdcopy", "libnbd-bin")
    src = tmp_path / "src.raw"
    data = pattern_file(src)
    run(nbdcopy, "--flush", str(src), served.uri())
    assert served.volume.read(0, SIZE) == data
    out = tmp_path / "out.raw"
    run(nbdcopy, served.uri(), str(out))
    assert out.read_bytes() == data


def test_qemu_img_with_tls_creds_x509(served: TlsServed, tmp_path: Path) -> None:
    qemu_img = need("qemu-img", "qemu-utils")
    creds = f"tls-creds-x509,id=tls0,dir={served.pki.client_dir},endpoint=client"

    def opts(export: str = "") -> str:
        return (f"driver=nbd,server.type=inet,server.host=127.0.0.1,"
                f"server.port={served.port},export={export},tls-creds=tls0")

    src = tmp_path / "src.raw"
    data = pattern_file(src)
    run(qemu_img, "convert", "--object", creds, "-n", "-f", "raw", "--target-image-opts",
        str(src), opts())
    assert served.volume.read(0, SIZE) == data
    out = tmp_path / "snap.raw"
    run(qemu_img, "convert", "--object", creds, "--image-opts", opts("@s1"), "-O", "raw",
        str(out))
    assert out.read_bytes()[8 * MiB:9 * MiB] == b"snapshot" * (MiB // 8)
    info = json.loads(run(qemu_img, "info", "--object", creds, "--output=json",
                          "--image-opts", opts()))
    assert info["virtual-size"] == SIZE


def test_plain_clients_are_refused_under_require(served: TlsServed) -> None:
    nbdinfo = need("nbdinfo", "libnbd-bin")
    err = refused([nbdinfo, served.plain_uri()])
    assert "opt_go" in err or "TLS" in err
    qemu_img = need("qemu-img", "qemu-utils")
    refused([qemu_img, "info", served.plain_uri()])
    assert served.volume.read(0, 4) == bytes(4)


def test_clients_without_a_trusted_certificate_are_refused(served: TlsServed) -> None:
    nbdinfo = need("nbdinfo", "libnbd-bin")
    refused([nbdinfo, served.uri(certs=served.pki.anonymous_dir)])
    refused([nbdinfo, served.uri(certs=served.pki.stranger_dir)])


def test_tls_on_lets_both_kinds_in(pki: Pki) -> None:
    nbdinfo = need("nbdinfo", "libnbd-bin")
    s = TlsServed(pki, "on", verify_clients=False)
    try:
        assert json.loads(run(nbdinfo, "--json", s.plain_uri()))["TLS"] is False
        anonymous = s.uri(certs=pki.anonymous_dir)      # no client certificate needed
        assert json.loads(run(nbdinfo, "--json", anonymous))["TLS"] is True
    finally:
        s.stop()


# --- the protocol, with our own client ---

def _upgrade(c: Client, pki: Pki) -> Client:
    """STARTTLS, then the same test client over Python's TLS socket."""
    assert c.option(p.OPT_STARTTLS) == [(p.REP_ACK, b"")]
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    ctx.load_cert_chain(pki.client_dir / "client-cert.pem", pki.client_dir / "client-key.pem")
    c.sock = ctx.wrap_socket(c.sock, server_hostname="localhost")
    return c


def test_require_answers_tls_reqd_until_the_upgrade(served: TlsServed) -> None:
    c = served.connect()
    c.handshake()
    for option, data in [(p.OPT_LIST, b""), (p.OPT_GO, p.pack_info_request("", [])),
                         (p.OPT_INFO, p.pack_info_request("", [])),
                         (p.OPT_STRUCTURED_REPLY, b""), (99, b"")]:
        assert c.option(option, data)[-1][0] == p.REP_ERR_TLS_REQD
    c = _upgrade(c, served.pki)
    assert c.option(p.OPT_STARTTLS)[-1][0] == p.REP_ERR_INVALID    # already TLS
    c.go("", structured=True)
    c.send(p.CMD_WRITE, MiB, 5, payload=b"hello")
    assert c.simple() == (0, 1, b"")
    assert served.volume.read(MiB, 5) == b"hello"


def test_export_name_without_tls_closes_and_abort_is_answered(served: TlsServed) -> None:
    c = served.connect()
    c.handshake()
    c.sock.sendall(p.pack_option(p.OPT_EXPORT_NAME, b""))
    assert c.closed()
    c = served.connect()
    c.handshake()
    assert c.option(p.OPT_ABORT) == [(p.REP_ACK, b"")]


def test_starttls_with_data_is_invalid(served: TlsServed) -> None:
    c = served.connect()
    c.handshake()
    assert c.option(p.OPT_STARTTLS, b"x")[-1][0] == p.REP_ERR_INVALID
    _upgrade(c, served.pki).go("")


def test_plain_text_negotiation_is_forgotten_at_the_upgrade(pki: Pki) -> None:
    s = TlsServed(pki, "on")
    try:
        c = s.connect()
        c.handshake()
        assert c.option(p.OPT_STRUCTURED_REPLY)[-1][0] == p.REP_ACK
        c = _upgrade(c, pki)
        c.go("")
        c.send(p.CMD_READ, 8 * MiB, 8)             # a simple reply: structured was dropped
        assert c.simple(8) == (0, 1, b"snapshot")
    finally:
        s.stop()


def test_many_requests_in_flight_over_tls(served: TlsServed) -> None:
    """Batched reads and writes, replies gathered and sent by two threads, while the
    reader keeps decrypting requests: every byte must come back in order. (The
    client sends everything before it reads: an ssl.SSLSocket must not be read and
    written by two threads at once, the reason the server uses TlsStream.)"""
    c = served.connect()
    c.handshake()
    c = _upgrade(c, served.pki)
    c.go("")
    blocks = {i: bytes([i % 251]) * (256 << 10) for i in range(64)}
    for i, b in blocks.items():
        c.send(p.CMD_WRITE, i * (256 << 10), len(b), cookie=i, payload=b)
    assert {c.simple()[1] for _ in blocks} == set(blocks)
    for i in blocks:
        c.send(p.CMD_READ, i * (256 << 10), 256 << 10, cookie=1000 + i)
    seen = {}
    for _ in blocks:
        error, cookie, data = c.simple(256 << 10)
        assert error == 0
        seen[cookie - 1000] = data
    assert seen == blocks
    c.send(p.CMD_DISC)
    assert c.closed()


def test_python_libnbd_many_in_flight_over_tls(served: TlsServed) -> None:
    if not os.path.exists(SYSTEM_PYTHON) or subprocess.run(
            [SYSTEM_PYTHON, "-c", "import nbd"], capture_output=True).returncode:
        pytest.skip("Python libnbd binding missing (apt-get install python3-libnbd)")
    script = LIBNBD_SCRIPT.replace("h = nbd.NBD()\n",     # tls-certificates= is a local file
                                   "h = nbd.NBD()\nh.set_uri_allow_local_file(True)\n")
    assert script != LIBNBD_SCRIPT
    assert run(SYSTEM_PYTHON, "-c", script, served.uri()).startswith("ok")


def test_stop_answers_and_commits_a_tls_client(served: TlsServed) -> None:
    """SIGTERM's path with a TLS client attached: what it wrote is answered and
    committed, and the server does not hang on the encrypted connection."""
    c = served.connect()
    c.handshake()
    c = _upgrade(c, served.pki)
    c.go("")
    c.send(p.CMD_WRITE, 2 * MiB, 4, payload=b"kept")
    assert c.simple() == (0, 1, b"")
    commits = served.volume.commits
    served.stop()
    assert not served.thread.is_alive()
    assert served.volume.commits > commits and served.volume.read(2 * MiB, 4) == b"kept"
    assert c.closed()
