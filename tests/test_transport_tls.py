"""tls:// end to end: `blockxfer tls-serve` with certificates made by the test; clients
without the right certificate, or asking for another volume, are refused."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.pki import new_ca, tls_folder
from tests.sshd import free_port
from tests.transport_util import BLOCKXFER, bx, ok, same_image, two_snapshots


@contextmanager
def tls_serve(folder: Path, *args: str) -> Iterator[int]:
    port = free_port()
    log = open(folder / "tls-serve.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([BLOCKXFER, "tls-serve", "--listen", f"127.0.0.1:{port}",
                             "--tls-dir", str(folder / "server"), *args],
                            stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 15
        while b"listening" not in (folder / "tls-serve.log").read_bytes():
            assert proc.poll() is None, (folder / "tls-serve.log").read_text()
            assert time.monotonic() < deadline, "tls-serve did not start"
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    ca = new_ca(tmp_path / "ca", "blockxfer-test-ca")
    tls_folder(tmp_path / "server", ca)
    tls_folder(tmp_path / "client", ca, client_cn="backup1")
    tls_folder(tmp_path / "other", ca, client_cn="intruder")
    rogue = new_ca(tmp_path / "rogue-ca", "rogue-ca")
    tls_folder(tmp_path / "rogue", rogue, client_cn="backup1")
    shutil.copy(ca[0], tmp_path / "rogue" / "ca-cert.pem")  # trusts our server, unknown to it
    nocert = tmp_path / "nocert"
    nocert.mkdir()
    shutil.copy(ca[0], nocert / "ca-cert.pem")
    return tmp_path


def test_tls_push_pull_and_refusals(pki: Path) -> None:
    vol = two_snapshots(pki)
    copy = pki / "copy.img"
    with tls_serve(pki, "--peer", f"backup1={vol}", "--peer", f"backup1={copy}") as port:
        env = {"BLOCKXFER_TLS_DIR": str(pki / "client")}
        ok(bx("send", vol, "a", f"tls://127.0.0.1:{port}{copy}", env=env))
        ok(bx("send", vol, "b - a", f"tls://127.0.0.1:{port}{copy}", env=env))
        assert same_image(vol, str(copy), "b")
        pulled = pki / "pulled.img"
        ok(bx("receive", str(pulled), f"tls://127.0.0.1:{port}{vol}", "--image", "b + a",
              env=env))
        assert same_image(vol, str(pulled), "b")

        def refused(folder: str, path: str = vol) -> str:
            r = bx("receive", str(pki / "x.img"), f"tls://127.0.0.1:{port}{path}",
                   "--image", "b", env={"BLOCKXFER_TLS_DIR": str(pki / folder)})
            assert r.returncode == 4, r.stderr
            assert not (pki / "x.img").exists()
            line = r.stderr.decode().strip()
            assert "\n" not in line and "Traceback" not in line
            return line

        assert "has no --peer entry" in refused("other")          # right CA, unknown name
        assert "TLS with" in refused("rogue") or "certificate" in refused("rogue")
        assert "is for another volume" in refused("client", str(pki / "elsewhere.img"))
        r = bx("receive", str(pki / "x.img"), f"tls://127.0.0.1:{port}{vol}", "--image", "b",
               env={"BLOCKXFER_TLS_DIR": str(pki / "nocert")})
        assert r.returncode == 2 and b"client-cert.pem is missing" in r.stderr
    log = (pki / "tls-serve.log").read_text()
    assert "intruder" in log and "refused" in log
