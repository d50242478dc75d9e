"""Replication bench (issue 13): `replicate pull` between two network namespaces vs
`ssh host cat` of the same stream bytes, over the same sshd, key and cipher.

Host A holds a 1 GiB volume of random data with master m1; host B pulls it (a full
image), then A rewrites 5 % of it at random places, takes m2, and B pulls again (an
incremental). The peer fetches the very streams (written on A beforehand) with
`ssh A cat STREAM > FILE; sync` run in B. One round each (a pull cannot be
repeated without undoing it), interleaved; goal >= 0.9 of the peer. Root,
openssh-server and iproute2: `python -m bench.bench_replicate`.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import SCRATCH, drop_caches, row

GIB = 1 << 30
SIZE = int(os.environ.get("BX_BENCH_SIZE", str(GIB)))
CHANGED = 0.05
CHUNK = 4 << 20
BX = os.path.join(os.path.dirname(sys.executable), "blockxfer")
SSH_OPTS = ("-o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
            "-o LogLevel=ERROR -c aes128-gcm@openssh.com")


def _run(prefix: list[str], *argv: str, env: dict[str, str] | None = None,
         stdin: str | None = None) -> float:
    drop_caches()
    t = time.perf_counter()
    with open(stdin or os.devnull, "rb") as f:
        subprocess.run([*prefix, *argv], check=True, stdin=f, stdout=subprocess.DEVNULL,
                       env={**os.environ, **(env or {})})
    return time.perf_counter() - t


def _fill(a: list[str], vol: str, folder: Path, nbytes: int, rnd: random.Random) -> None:
    """Random data: all of the disk, or `nbytes` in 4 MiB pieces at random places."""
    if nbytes >= SIZE:
        subprocess.run([*a, "sh", "-c", f"head -c {SIZE} /dev/urandom | {BX} write {vol} "
                        "--offset 0"], check=True)
        return
    data = folder / "chunk"
    for off in rnd.sample(range(0, SIZE, CHUNK), max(1, nbytes // CHUNK)):
        data.write_bytes(os.urandom(CHUNK))
        _run(a, BX, "write", vol, "--offset", str(off), stdin=str(data))
    data.unlink()


def main() -> None:
    if os.geteuid() != 0 or not os.path.exists("/usr/sbin/sshd") or not shutil.which("ip"):
        print("bench_replicate: needs root, openssh-server and iproute2; skipped")
        return
    from tests.netns import network
    from tests.sshd import keygen, sshd
    os.makedirs(SCRATCH, exist_ok=True)
    folder = Path(tempfile.mkdtemp(dir=SCRATCH))
    rnd = random.Random(1)
    try:
        with network(["A", "B"], subnet="10.231.78") as net:
            a, b = net.hosts["A"].exec(), net.hosts["B"].exec()
            key = folder / "key"
            pub = keygen(key)
            with sshd(folder / "sshd", net.hosts["A"].addr, a) as s:
                s.authorize(pub)
                ssh = f"ssh -i {key} {SSH_OPTS}"
                env = {"BLOCKXFER_SSH": ssh, "BLOCKXFER_REMOTE_COMMAND": BX,
                       "BLOCKXFER_STATE_DIR": str(folder / "state")}
                vol, copy = str(folder / "a.img"), str(folder / "b.img")
                url = f"ssh://root@{net.hosts['A'].addr}{vol}"
                peer_cmd = [*b, *ssh.split(), f"root@{net.hosts['A'].addr}"]
                _run(a, BX, "init", vol, "--size", str(SIZE + SIZE // 2))
                _fill(a, vol, folder, SIZE, rnd)
                _run(a, BX, "snapshot", "--master", f"{vol}@m1")
                for kind, expr, nbytes in (("full 1 GiB", "m1", SIZE),
                                           ("5 % incremental", "m2 - m1", 0)):
                    if nbytes == 0:
                        _fill(a, vol, folder, int(SIZE * CHANGED), rnd)
                        _run(a, BX, "snapshot", "--master", f"{vol}@m2")
                    stream = str(folder / "s.stream")
                    _run(a, BX, "send", vol, expr, stream)
                    size = os.path.getsize(stream)
                    peer = _run([*b, "sh", "-c", f"{' '.join(peer_cmd[len(b):])} cat {stream} "
                                 f"> {folder}/peer.stream && sync"])
                    ours = _run(b, BX, "replicate", "pull", url, copy, "--name", "B", env=env)
                    os.unlink(stream)
                    print(row(f"replicate pull {kind} vs ssh cat", ours, peer, size, goal=0.9))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
