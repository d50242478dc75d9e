"""`blockxfer serve` refuses what it cannot serve safely, in one line, before it
opens the volume; and serves TLS from the command line to a real client.

Refusals (exit 2, one line on stderr, the volume untouched and not locked): a
malformed `--listen`; a listener the network can reach without `--tls require`
unless `--insecure` (which then warns); TLS options that contradict each other
or files that do not load.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from blockxfer.handles import init_volume
from blockxfer.nbd.server import is_loopback
from tests.nbd.serveproc import serve_process
from tests.nbd.test_nbd_interop import need, run
from tests.pki import Pki, make_pki

BX = [sys.executable, "-m", "blockxfer.cli"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def volume(tmp_path: Path, run_dir: str) -> Path:
    path = tmp_path / "vol.img"
    init_volume(str(path), size=32 << 20, block_size=4096, force=False).close()
    return path


def serve(volume: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*BX, "serve", str(volume), *args], capture_output=True,
                          text=True, timeout=30)


def one_line_usage_error(r: subprocess.CompletedProcess[str], *words: str) -> None:
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("blockxfer: ") and "Traceback" not in r.stderr
    for w in words:
        assert w in lines[0], lines[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("spec", ["bogus", "tcp:host", "tcp::x", "unix:", "udp:1:2"])
def test_bad_listen_is_one_line_exit_2(volume: Path, spec: str) -> None:
    before = volume.read_bytes()
    one_line_usage_error(serve(volume, "--listen", spec), "--listen", "unix:PATH")
    assert volume.read_bytes() == before


@pytest.mark.parametrize("host", ["0.0.0.0", "[::]"])
def test_network_listener_without_tls_needs_insecure(volume: Path, host: str) -> None:
    r = serve(volume, "--listen", f"tcp:{host}:{free_port()}")
    one_line_usage_error(r, "--insecure", "--tls require")


def test_tls_on_still_needs_insecure_on_the_network(volume: Path, pki: Pki) -> None:
    r = serve(volume, "--listen", f"tcp:0.0.0.0:{free_port()}", "--tls", "on",
              "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key))
    one_line_usage_error(r, "--insecure")


@pytest.mark.parametrize("args, words", [
    (["--tls", "on"], ["--tls-cert"]),
    (["--tls", "require"], ["--tls-cert"]),
    (["--tls", "off", "--tls-ca", "x.pem"], ["--tls-ca", "--tls off"]),
    (["--tls-cert", "/nonexistent.pem"], ["/nonexistent.pem"]),
])
def test_tls_mistakes_are_one_line(volume: Path, args: list[str], words: list[str]) -> None:
    one_line_usage_error(serve(volume, "--listen", "unix:/tmp/never.sock", *args), *words)


def test_bad_ca_file_is_one_line(volume: Path, pki: Pki, tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    r = serve(volume, "--listen", "unix:/tmp/never.sock", "--tls-cert", str(pki.server_cert),
              "--tls-key", str(pki.server_key), "--tls-ca", str(junk))
    one_line_usage_error(r, "--tls-ca", str(junk))


def test_insecure_serves_and_warns(volume: Path, tmp_path: Path) -> None:
    nbdinfo = need("nbdinfo", "libnbd-bin")
    port = free_port()
    with serve_process(str(volume), str(tmp_path / "nbd.sock"), "--listen",
                       f"tcp:0.0.0.0:{port}", "--insecure", timeout=30) as proc:
        info = json.loads(run(nbdinfo, "--json", f"nbd://127.0.0.1:{port}/"))
        assert info["TLS"] is False
    _, err = proc.output          # type: ignore[attr-defined]  # set by serveproc
    assert "warning" in err and f"tcp:0.0.0.0:{port}" in err and "write" in err


def test_serve_tls_require_from_the_command_line(volume: Path, pki: Pki,
                                                 tmp_path: Path) -> None:
    """A real `blockxfer serve` on a real volume, on every address, with client
    certificates verified: TLS clients in, plain ones refused, no --insecure needed."""
    nbdinfo = need("nbdinfo", "libnbd-bin")
    nbdcopy = need("nbdcopy", "libnbd-bin")
    port = free_port()
    data = bytes(range(256)) * 4096
    src = tmp_path / "src.raw"
    src.write_bytes(data)
    with serve_process(str(volume), str(tmp_path / "nbd.sock"), "--listen",
                       f"tcp:0.0.0.0:{port}", "--tls", "require",
                       "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
                       "--tls-ca", str(pki.ca), timeout=30):
        uri = f"nbds://localhost:{port}/?tls-certificates={pki.client_dir}"
        assert json.loads(run(nbdinfo, "--json", uri))["TLS"] is True
        run(nbdcopy, "--flush", str(src), uri)
        out = tmp_path / "out.raw"
        run(nbdcopy, uri, str(out))
        assert out.read_bytes()[:len(data)] == data
        r = subprocess.run([nbdinfo, f"nbd://localhost:{port}/"], capture_output=True,
                           text=True, timeout=30)
        assert r.returncode != 0


def test_is_loopback() -> None:
    for spec in ("unix:/x.sock", "tcp:127.0.0.1:1", "tcp:127.1.2.3:1", "tcp:[::1]:1",
                 "tcp:localhost:1"):
        assert is_loopback(spec), spec
    for spec in ("tcp:0.0.0.0:1", "tcp:[::]:1", "tcp:10.1.2.3:1", "tcp:192.168.0.1:1",
                 "tcp:no-such-host.invalid:1"):
        assert not is_loopback(spec), spec
