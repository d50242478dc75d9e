"""X.509 certificates for tests, made with the openssl command: a CA, a server
certificate for 127.0.0.1, client certificates by common name, and a rogue CA.

The folder layout is qemu's and libnbd's (ca-cert.pem, server-cert.pem,
server-key.pem, client-cert.pem, client-key.pem), which blockxfer uses too.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


def need_openssl() -> None:
    if not shutil.which("openssl"):
        pytest.skip("needs the openssl command")


def _run(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_ca(folder: Path, name: str = "blockxfer test CA") -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    key, cert = folder / "ca-key.pem", folder / "ca-cert.pem"
    _run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}",
         "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=keyCertSign")
    return key, cert


def issue(ca: tuple[Path, Path], out_cert: Path, out_key: Path, cn: str,
          server: bool = False) -> None:
    csr = out_cert.with_suffix(".csr")
    _run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(out_key), "-out", str(csr), "-subj", f"/CN={cn}")
    ext = out_cert.with_suffix(".ext")
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"
                   if server else "extendedKeyUsage=clientAuth\n")
    _run("x509", "-req", "-in", str(csr), "-CA", str(ca[1]), "-CAkey", str(ca[0]),
         "-CAcreateserial", "-out", str(out_cert), "-days", "2", "-extfile", str(ext))


def tls_folder(root: Path, ca: tuple[Path, Path], client_cn: str = "backup1") -> Path:
    """A folder with the CA, a server certificate and one client certificate."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(ca[1], root / "ca-cert.pem")
    issue(ca, root / "server-cert.pem", root / "server-key.pem", "localhost", server=True)
    issue(ca, root / "client-cert.pem", root / "client-key.pem", client_cn)
    return root
