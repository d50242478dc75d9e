"""Transport bench (issue 11): `send ... ssh://127.0.0.1/PATH` (the far side receives
into a volume) vs `ssh 127.0.0.1 'cat > file'` of the same stream bytes, through one
sshd started here, interleaved (ours, peer, ours, ...; BLOCKXFER_BENCH_ROUNDS,
default 3), medians compared (goal >= 0.9 of the peer).

Both use the same ssh command ($BLOCKXFER_SSH as the bench sets it, with the cipher
ssh picks by default). Run as root: `python -m bench.bench_transport` (needs
openssh-server; `make test` installs it).
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from .common import SCRATCH, drop_caches, row

GIB = 1 << 30
SIZE = GIB // 2
ROUNDS = int(os.environ.get("BLOCKXFER_BENCH_ROUNDS", "3"))
BX = os.path.join(os.path.dirname(sys.executable), "blockxfer")


def _bx(*args: str, env: dict[str, str] | None = None, stdin: bytes | None = None) -> None:
    subprocess.run([BX, *args], check=True, input=stdin, capture_output=True,
                   env={**os.environ, **(env or {})})


def _source(folder: Path) -> tuple[str, str]:
    vol = str(folder / "src.img")
    _bx("init", vol, "--size", str(SIZE + SIZE // 2))
    data = folder / "data"
    with open(data, "wb") as f:
        for _ in range(SIZE >> 20):
            f.write(os.urandom(1 << 20))
    with open(data, "rb") as f:
        subprocess.run([BX, "write", vol, "--offset", "0"], stdin=f, check=True)
    _bx("snapshot", f"{vol}@a")
    stream = str(folder / "a.stream")
    _bx("send", vol, "a", stream)
    data.unlink()
    return vol, stream


def _timed(cmd: list[str], env: dict[str, str], stdin: str | None = None) -> float:
    import time
    drop_caches()
    t = time.perf_counter()
    with open(stdin or os.devnull, "rb") as f:
        subprocess.run(cmd, check=True, stdin=f, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, env={**os.environ, **env})
    return time.perf_counter() - t


def main() -> None:
    if os.geteuid() != 0 or not os.path.exists("/usr/sbin/sshd"):
        print("bench_transport: needs root and openssh-server; skipped")
        return
    from tests.sshd import sshd
    os.makedirs(SCRATCH, exist_ok=True)
    folder = Path(tempfile.mkdtemp(dir=SCRATCH))
    try:
        vol, stream = _source(folder)
        nbytes = os.path.getsize(stream)
        with sshd(folder / "sshd") as s:
            env = {"BLOCKXFER_SSH": s.ssh_command(), "BLOCKXFER_REMOTE_COMMAND": BX}
            ssh = [*s.ssh_command().split(), "root@127.0.0.1"]
            ours, peer = [], []
            for k in range(ROUNDS):
                dest = folder / f"copy{k}.img"
                ours.append(_timed([BX, "send", vol, "a", f"ssh://127.0.0.1:{s.port}{dest}"],
                                   env))
                dest.unlink()
                peer.append(_timed([*ssh, f"cat > {folder}/peer.stream; sync"], env, stream))
        print(row("send ssh:// (receive there) vs ssh cat", statistics.median(ours),
                  statistics.median(peer), nbytes, goal=0.9))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
