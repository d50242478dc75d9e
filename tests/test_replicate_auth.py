"""Replication's security model, through a real sshd and `blockxfer tls-serve` (root,
openssh-server and openssl): a forced command allowing only `replicate` of one
volume, mutual TLS with the certificate's name mapped to its volumes; refused:
no key, no certificate, a certificate from another CA, an unknown name, another
volume, another operation."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pki import tls_folder
from tests.sshd import Sshd, keygen, need_sshd, sshd
from tests.test_transport_tls import pki, tls_serve  # noqa: F401 - the fixture
from tests.transport_util import BLOCKXFER, bx, ok


def _source(folder: Path) -> str:
    vol = str(folder / "a.img")
    ok(bx("init", vol, "--size", "64M"))
    ok(bx("write", vol, "--offset", "0", data=os.urandom(1 << 20)))
    ok(bx("snapshot", "--master", f"{vol}@m1"))
    return vol


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Sshd]:
    need_sshd()
    with sshd(tmp_path / "sshd") as s:
        yield s


def _one_line(r: subprocess.CompletedProcess[bytes]) -> str:
    err = r.stderr.decode().strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.root
def test_forced_command_allows_only_replicate_of_one_volume(tmp_path: Path,
                                                             server: Sshd) -> None:
    vol = _source(tmp_path)
    pub = server.client_key.with_suffix(".pub").read_text().strip()
    server.authorize(f'command="{BLOCKXFER} stdio-serve --volume {vol} --allow replicate",'
                     f"restrict {pub}")
    env = {"BLOCKXFER_SSH": server.ssh_command(), "BLOCKXFER_STATE_DIR": str(tmp_path / "st"),
           "BLOCKXFER_REMOTE_COMMAND": "ignored-by-the-forced-command"}
    base = f"ssh://root@127.0.0.1:{server.port}"
    r = json.loads(ok(bx("replicate", "pull", f"{base}{vol}", str(tmp_path / "b.img"),
                         "--name", "B", "--json", env=env)).stdout)
    assert r["kind"] == "full"
    other = tmp_path / "other.img"
    ok(bx("init", str(other), "--size", "64M"))
    r2 = bx("replicate", "pull", f"{base}{other}", str(tmp_path / "c.img"), env=env)
    assert r2.returncode == 4 and "is for another volume" in _one_line(r2)
    assert not (tmp_path / "c.img").exists()
    r3 = bx("receive", str(tmp_path / "d.img"), f"{base}{vol}", "--image", "m1", env=env)
    assert r3.returncode == 4 and "may not send here" in _one_line(r3)
    stranger = keygen(tmp_path / "stranger")
    assert stranger
    env["BLOCKXFER_SSH"] = server.ssh_command().replace(str(server.client_key),
                                                        str(tmp_path / "stranger"))
    r4 = bx("replicate", "pull", f"{base}{vol}", str(tmp_path / "e.img"), env=env)
    assert r4.returncode == 4 and "ssh to" in _one_line(r4)
    assert not (tmp_path / "e.img").exists()


@pytest.mark.root
def test_tls_certificate_maps_to_volumes(pki: Path) -> None:  # noqa: F811
    vol = _source(pki)
    ca = (pki / "ca" / "blockxfer-test-ca-cert.pem", pki / "ca" / "blockxfer-test-ca-key.pem")
    tls_folder(pki / "other2", ca, client_cn="backup2")      # another name, the same CA
    with tls_serve(pki, "--peer", f"backup1={vol}", "--peer", f"backup2={vol}",
                   "--allow", "replicate") as port:
        def pull(folder: str, path: str = vol,
                 target: str = "b.img") -> subprocess.CompletedProcess[bytes]:
            return bx("replicate", "pull", f"tls://127.0.0.1:{port}{path}",
                      str(pki / target), "--name", "backup1", "--json",
                      env={"BLOCKXFER_TLS_DIR": str(pki / folder),
                           "BLOCKXFER_STATE_DIR": str(pki / "st")})

        r = ok(pull("client"))
        assert json.loads(r.stdout)["kind"] == "full"
        dests = json.loads(ok(bx("replicate", "destinations", vol, "--json")).stdout)
        assert dests["destinations"][0]["identity"].startswith("backup1@")
        for folder, code, words in (("other", 4, "has no --peer entry"),
                                    ("rogue", 4, "TLS with"),
                                    ("nocert", 2, "client-cert.pem is missing")):
            bad = pull(folder, target="x.img")
            assert bad.returncode == code and words in _one_line(bad), folder
            assert not (pki / "x.img").exists()
        other = bx("replicate", "pull", f"tls://127.0.0.1:{port}{vol}", str(pki / "x.img"),
                   "--name", "backup1", env={"BLOCKXFER_TLS_DIR": str(pki / "other2"),
                                             "BLOCKXFER_STATE_DIR": str(pki / "st2")})
        assert other.returncode == 4 and "is registered to 'backup1'" in _one_line(other)
        assert _anonymous_answer(pki, port, vol) == b""         # no certificate: no answer
        bad = pull("client", str(pki / "elsewhere.img"), "x.img")
        assert bad.returncode == 4 and "is for another volume" in _one_line(bad)
    log = (pki / "tls-serve.log").read_text()
    assert "intruder" in log and "refused" in log


def _anonymous_answer(folder: Path, port: int, vol: str) -> bytes:
    """What the server answers a client that shows no certificate (the blockxfer client
    refuses to try without one, so this one is raw)."""
    import socket
    import ssl
    ctx = ssl.create_default_context(cafile=str(folder / "nocert" / "ca-cert.pem"))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=20) as raw, \
                ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            s.sendall(b'BXS1 {"dest": "x", "op": "replicate", "volume": "%s"}\n'
                      % vol.encode())
            return s.recv(100)
    except (ssl.SSLError, OSError):
        return b""
