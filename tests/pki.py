"""Throwaway X.509 certificates for the TLS tests, made with the openssl CLI.

`make_pki(dir)` writes a CA, a server certificate for localhost/127.0.0.1 and a
client certificate, plus a second CA and a client certificate it signed (a
stranger). `client_dir` is laid out as libnbd's `tls-certificates` and qemu's
`tls-creds-x509,dir=...,endpoint=client` both expect: ca-cert.pem,
client-cert.pem, client-key.pem.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
_LEAF = "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_dir: Path          # ca-cert.pem, client-cert.pem, client-key.pem
    anonymous_dir: Path       # ca-cert.pem only: a client with no certificate
    stranger_dir: Path        # a client certificate from another CA


def _openssl(*argv: str | Path) -> None:
    r = subprocess.run(["openssl", *map(str, argv)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr


def _ca(d: Path, name: str) -> tuple[Path, Path]:
    cert, key = d / f"{name}-cert.pem", d / f"{name}-key.pem"
    _openssl("req", "-x509", *_EC, "-keyout", key, "-out", cert, "-days", "2",
             "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return cert, key


def _leaf(d: Path, name: str, ca: tuple[Path, Path], ext: str) -> tuple[Path, Path]:
    cert, key, csr, extfile = (d / f"{name}-cert.pem", d / f"{name}-key.pem",
                               d / f"{name}.csr", d / f"{name}.ext")
    _openssl("req", *_EC, "-keyout", key, "-out", csr, "-subj", f"/CN={name}")
    extfile.write_text(_LEAF + ext)
    _openssl("x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
             "-out", cert, "-days", "2", "-extfile", extfile)
    return cert, key


def _client_dir(d: Path, ca: Path, leaf: tuple[Path, Path] | None) -> Path:
    d.mkdir()
    shutil.copy(ca, d / "ca-cert.pem")
    if leaf is not None:
        shutil.copy(leaf[0], d / "client-cert.pem")
        shutil.copy(leaf[1], d / "client-key.pem")
    return d


def make_pki(d: Path) -> Pki:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed (apt-get install openssl)")
    ca = _ca(d, "ca")
    server = _leaf(d, "server", ca, "extendedKeyUsage=serverAuth\n"
                                    "subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    client = _leaf(d, "client", ca, "extendedKeyUsage=clientAuth\n")
    other = _ca(d, "other-ca")
    stranger = _leaf(d, "stranger", other, "extendedKeyUsage=clientAuth\n")
    return Pki(ca[0], server[0], server[1],
               _client_dir(d / "client", ca[0], client),
               _client_dir(d / "anonymous", ca[0], None),
               _client_dir(d / "stranger", ca[0], stranger))


def tls_folder(d: Path, ca: tuple[Path, Path], client_cn: str = "client") -> Path:
    """One folder laid out as blockxfer's $BLOCKXFER_TLS_DIR (and qemu's): ca-cert.pem,
    server-cert.pem/-key.pem for 127.0.0.1, client-cert.pem/-key.pem named `client_cn`."""
    d.mkdir(parents=True)
    shutil.copy(ca[0], d / "ca-cert.pem")
    for role, leaf in (("server", _leaf(d, "server", ca, "extendedKeyUsage=serverAuth\n"
                                        "subjectAltName=DNS:localhost,IP:127.0.0.1\n")),
                       ("client", _leaf(d, client_cn, ca, "extendedKeyUsage=clientAuth\n"))):
        if leaf[0] != d / f"{role}-cert.pem":
            shutil.move(leaf[0], d / f"{role}-cert.pem")
            shutil.move(leaf[1], d / f"{role}-key.pem")
    return d


def new_ca(d: Path, name: str) -> tuple[Path, Path]:
    """A CA (certificate, key) in `d`; skips the test without the openssl command."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed (apt-get install openssl)")
    d.mkdir(parents=True, exist_ok=True)
    return _ca(d, name)
