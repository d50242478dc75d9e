"""A real OpenSSH server for tests: its own host key, client key, config and port.

Started by the test (openssh-server from apt, tests/apt-packages.txt), listening
only on the address it is given, and stopped by pid. `ssh_command` is what
`$BLOCKXFER_SSH` should hold for a client that trusts nothing but this server.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

SSHD = "/usr/sbin/sshd"


def need_sshd() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (sshd)")
    if not os.path.exists(SSHD) or not shutil.which("ssh-keygen"):
        pytest.skip("needs openssh-server (tests/apt-packages.txt; make test installs it)")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path.with_suffix(".pub").read_text().strip()


@dataclass
class Sshd:
    host: str
    port: int
    client_key: Path
    authorized_keys: Path

    def ssh_command(self) -> str:
        return (f"ssh -i {self.client_key} -o BatchMode=yes -o StrictHostKeyChecking=no "
                f"-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -p {self.port}")

    def authorize(self, line: str) -> None:
        self.authorized_keys.write_text(line + "\n")


@contextmanager
def sshd(folder: Path, host: str = "127.0.0.1", netns: list[str] | None = None) -> Iterator[Sshd]:
    """An sshd on `host` (inside `netns`, e.g. ["ip", "netns", "exec", "bxA"])."""
    folder.mkdir(parents=True, exist_ok=True)
    os.makedirs("/run/sshd", exist_ok=True)
    keygen(folder / "host_key")
    pub = keygen(folder / "client_key")
    auth = folder / "authorized_keys"
    auth.write_text(pub + "\n")
    port = free_port(host) if netns is None else 22
    cfg = folder / "sshd_config"
    cfg.write_text(f"Port {port}\nListenAddress {host}\nHostKey {folder / 'host_key'}\n"
                   f"AuthorizedKeysFile {auth}\nPidFile {folder / 'sshd.pid'}\nUsePAM no\n"
                   "StrictModes no\nPermitRootLogin prohibit-password\n"
                   "PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
                   "AcceptEnv BLOCKXFER_*\nLogLevel ERROR\n")
    log = open(folder / "sshd.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([*(netns or []), SSHD, "-D", "-e", "-f", str(cfg)],
                            stdout=log, stderr=log)
    try:
        _wait_listening(host, port, proc, netns)
        yield Sshd(host, port, folder / "client_key", auth)
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _wait_listening(host: str, port: int, proc: subprocess.Popen[bytes],
                    netns: list[str] | None) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited with {proc.returncode}")
        probe = [*(netns or []), "bash", "-c", f"exec 3<>/dev/tcp/{host}/{port}"]
        if subprocess.run(probe, capture_output=True).returncode == 0:
            return
        time.sleep(0.05)
    raise RuntimeError(f"sshd did not listen on {host}:{port}")
