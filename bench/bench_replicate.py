"""Replication bench (issue 13): `replicate pull` between two network namespaces vs
`ssh host cat` of the same stream bytes and vs `btrfs send | ssh | btrfs receive` of
the same change, over the same sshd, key and cipher.

Host A holds a volume of random data (1 GiB; BX_BENCH_SIZE) with master m1. The
full pull into a fresh target is repeated (the target removed in between) against
`ssh A cat STREAM > FILE; sync` of the very stream. Then, each round, A rewrites
5 % at random places and takes the next master, the same bytes are written at the
same places into a file on a btrfs on A (and a read-only snapshot taken), and B
pulls the incremental, fetches its stream with ssh cat, and receives the btrfs
incremental (`ssh A btrfs send -p OLD NEW | btrfs receive`), in a rotating order.
A pull with nothing to send against `ssh A true` shows the fixed cost of a
one-shot pull (ssh's login, the two Python start-ups, the plan, the records).

The same rounds pull each incremental a second way: into a second copy on B that
`blockxfer serve` owns, whose service keeps its connection to A open between
pulls (its schedule's session, docs/replication.md). Its rows take the pull's own
duration from the pull's record (`elapsed`: ask, plan, stream, commit, state
recorded; the schedule's interval is long, and each pull is made "now" through
the service, which is the same code on the same kept channel), against `ssh A cat`
of the stream through an already-open OpenSSH master (ControlMaster: the fair
peer of a kept session) and against a fresh `ssh A cat`; and the wall time of the
`replicate pull` command that asks the service (its own Python start-up in it).
A third copy, served without a schedule, pulls each increment on a new connection
(the service's pulls before the session), timed from its record the same way.
Every `cat` peer fsyncs its file (`sync FILE`), as a pull commits durably. The
goal (>= 0.9) is the scheduled pull against the ControlMaster cat. Medians of the
rounds (BX_BENCH_ROUNDS, 3), the order rotated each round. Root, openssh-server,
iproute2 and btrfs-progs: `python -m bench.bench_replicate`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from .common import SCRATCH, interleaved, row, stop, timed

GIB = 1 << 30
SIZE = int(os.environ.get("BX_BENCH_SIZE", str(GIB)))
ROUNDS = int(os.environ.get("BX_BENCH_ROUNDS", "3"))
CHANGED = 0.05
CHUNK = 4 << 20
BX = os.path.join(os.path.dirname(sys.executable), "blockxfer")
SSH_OPTS = ("-o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
            "-o LogLevel=ERROR -c aes128-gcm@openssh.com")


def _sh(prefix: list[str], script: str, env: dict[str, str] | None = None) -> Callable[[], None]:
    def run() -> None:
        subprocess.run([*prefix, "sh", "-c", script], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, env={**os.environ, **(env or {})})
    return run


def _elapsed(prefix: list[str], script: str, env: dict[str, str]) -> float:
    """Run a `replicate pull --json` of an incremental and return its record's own
    `elapsed` seconds."""
    out = subprocess.run([*prefix, "sh", "-c", script], check=True, capture_output=True,
                         env={**os.environ, **env}).stdout
    rec = json.loads(out)
    if rec["kind"] != "incremental" or not rec["bytes"]:
        raise RuntimeError(f"the served copy's pull was not the incremental: {rec}")
    return float(rec["elapsed"])


@contextmanager
def _served(prefix: list[str], vol: str, sock: str, env: dict[str, str]) -> Iterator[None]:
    """`blockxfer serve VOL` inside a host, until the block ends."""
    proc = subprocess.Popen([*prefix, BX, "serve", vol, "--listen", f"unix:{sock}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, **env})
    try:
        deadline = time.monotonic() + 60
        while subprocess.run([*prefix, BX, "info", vol, "--json"], capture_output=True,
                             env={**os.environ, **env}).stdout.find(b'"server"') < 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"blockxfer serve {vol} did not start")
            time.sleep(0.2)
        yield
    finally:
        stop(proc, 60)


def _quiet(*argv: str) -> None:
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@contextmanager
def _btrfs(folder: Path, name: str) -> Iterator[Path]:
    """A btrfs on a loop device (a sparse file), mounted in the root mount namespace
    (the hosts' `ip netns exec` sees it)."""
    img, mnt = folder / f"{name}.btrfs", folder / name
    with open(img, "wb") as f:
        f.truncate(SIZE * 3 + (512 << 20))
    subprocess.run(["mkfs.btrfs", "-q", "-f", str(img)], check=True, capture_output=True)
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def _change(vol: str, data_file: Path, snap: str, rnd: random.Random) -> None:
    """5 % of the volume rewritten at random places, then master `snap`; the same
    bytes at the same places into the btrfs file."""
    from blockxfer.handles import open_volume
    with open_volume(vol, write=True) as v, open(data_file, "r+b") as f:
        for off in rnd.sample(range(0, SIZE, CHUNK), max(1, int(SIZE * CHANGED) // CHUNK)):
            data = rnd.randbytes(CHUNK)
            v.write(off, data)
            f.seek(off)
            f.write(data)
        v.commit()
        v.create_snapshot(snap, master=True)
        f.flush()
        os.fsync(f.fileno())


def main() -> None:
    if os.geteuid() != 0 or not os.path.exists("/usr/sbin/sshd") or not shutil.which("ip") \
            or not shutil.which("mkfs.btrfs"):
        print("bench_replicate: needs root, openssh-server, iproute2 and btrfs-progs; skipped")
        return
    from tests.netns import network
    from tests.sshd import keygen, sshd
    os.makedirs(SCRATCH, exist_ok=True)
    folder = Path(tempfile.mkdtemp(dir=SCRATCH))
    rnd = random.Random(1)
    try:
        with network(["A", "B"], subnet="10.231.78") as net, ExitStack() as stack:
            a, b = net.hosts["A"].exec(), net.hosts["B"].exec()
            key = folder / "key"
            pub = keygen(key)
            # mounted first: sshd's mount namespace is a copy taken when it starts
            fa, fb = stack.enter_context(_btrfs(folder, "fa")), \
                stack.enter_context(_btrfs(folder, "fb"))
            s = stack.enter_context(sshd(folder / "sshd", net.hosts["A"].addr, a))
            s.authorize(pub)
            ssh = f"ssh -i {key} {SSH_OPTS} root@{net.hosts['A'].addr}"
            env = {"BLOCKXFER_SSH": f"ssh -i {key} {SSH_OPTS}", "BLOCKXFER_REMOTE_COMMAND": BX,
                   "BLOCKXFER_STATE_DIR": str(folder / "state"),
                   "BLOCKXFER_RUN_DIR": str(folder / "run")}
            vol, copy = str(folder / "a.img"), str(folder / "b.img")
            stream = folder / "s.stream"
            url = f"ssh://root@{net.hosts['A'].addr}{vol}"
            pull = _sh(b, f"{BX} replicate pull {url} {copy} --name B", env)
            got = folder / "peer.stream"
            cat = _sh(b, f"{ssh} cat {stream} > {got} && sync {got}")

            def fresh_pull() -> None:
                for p in (copy, *(str(x) for x in (folder / "state").glob("*.json"))):
                    if os.path.exists(p):
                        os.unlink(p)
                pull()

            _quiet(BX, "init", vol, "--size", str(SIZE + SIZE // 2))
            _sh([], f"head -c {SIZE} /dev/urandom | {BX} write {vol} --offset 0")()
            _quiet(BX, "snapshot", "--master", f"{vol}@m1")
            _quiet(BX, "send", vol, "m1", str(stream))
            ours, peer = interleaved(fresh_pull, cat, rounds=ROUNDS)
            print(row(f"replicate pull full {SIZE >> 20} MiB vs ssh cat", ours, peer,
                      stream.stat().st_size, goal=0.9), flush=True)
            ours, peer = interleaved(pull, _sh(b, f"{ssh} true"), rounds=ROUNDS)
            print(row("replicate pull, nothing to send vs ssh true", ours, peer,
                      unit="s", better="lower"), flush=True)

            # the btrfs twin of m1: the same bytes, snapshot s1, received on B
            subprocess.run(["btrfs", "-q", "subvolume", "create", str(fa / "vol")], check=True)
            data_file = fa / "vol" / "data"
            _sh([], f"{BX} read {vol}@m1 > {data_file} && sync")()
            subprocess.run(["btrfs", "-q", "subvolume", "snapshot", "-r", str(fa / "vol"),
                            str(fa / "s1")], check=True)
            _sh([], f"btrfs send -q {fa}/s1 | btrfs receive -q {fb}")()

            # the served copy: a full pull first (a service takes incrementals only),
            # then its service with a schedule whose session it keeps open
            served, sock = str(folder / "c.img"), str(folder / "c.sock")
            _sh(b, f"{BX} replicate pull {url} {served} --name B2", env)()
            stack.enter_context(_served(b, served, sock, env))
            # and one served without a schedule: its pulls open a connection each (before)
            unkept, sock2 = str(folder / "d.img"), str(folder / "d.sock")
            _sh(b, f"{BX} replicate pull {url} {unkept} --name B3", env)()
            stack.enter_context(_served(b, unkept, sock2, env))
            _sh(b, f"{BX} replicate pull {url} {served} --name B2 --every 9m", env)()
            host = f"root@{net.hosts['A'].addr}"
            kept = f"ssh -i {key} {SSH_OPTS} -o ControlPath={folder / 'cm.sock'}"
            _sh(b, f"{kept} -o ControlMaster=yes -o ControlPersist=yes -N -f {host}")()
            stack.callback(subprocess.run, [*b, "sh", "-c", f"{kept} -O exit {host}"],
                           check=False, capture_output=True)
            wall: dict[str, list[float]] = {}    # each run's wall time, by name
            own: dict[str, list[float]] = {"sched": [], "unkept": []}   # pulls' records

            def recorded(name: str, copy: str, dest: str) -> Callable[[], None]:
                script = f"{BX} replicate pull {url} {copy} --name {dest} --json"
                return lambda: own[name].append(_elapsed(b, script, env))
            size = 0
            for k in range(2, ROUNDS + 2):
                _change(vol, data_file, f"m{k}", rnd)
                subprocess.run(["btrfs", "-q", "subvolume", "snapshot", "-r", str(fa / "vol"),
                                str(fa / f"s{k}")], check=True)
                _quiet(BX, "send", vol, f"m{k} - m{k - 1}", str(stream))
                size = stream.stat().st_size
                runs: dict[str, Callable[[], object]] = {
                    "ours": pull, "cat": cat,
                    "btrfs": _sh(b, f"{ssh} btrfs send -q -p {fa}/s{k - 1} {fa}/s{k} | "
                                    f"btrfs receive -q {fb} && sync"),
                    "sched": recorded("sched", served, "B2"),
                    "unkept": recorded("unkept", unkept, "B3"),
                    "cm cat": _sh(b, f"{kept} {host} cat {stream} > {got} && sync {got}")}
                names = list(runs)
                order = names[k % len(names):] + names[:k % len(names)]   # rotate
                for name in order:
                    wall.setdefault(name, []).append(timed(runs[name]))
            med = {n: statistics.median(t) for n, t in wall.items()}
            med["sched cli"] = med.pop("sched")      # the command's wall, start-up in it
            med.update({n: statistics.median(t) for n, t in own.items()})
            print(f"5 % incremental, {size / 1e6:.1f} MB of stream, median seconds: "
                  + ", ".join(f"{n} {t:.3f}" for n, t in med.items()), flush=True)
            print(row("replicate pull 5 % incremental vs ssh cat", med["ours"], med["cat"],
                      size), flush=True)
            print(row("replicate pull 5 % incremental vs btrfs send", med["ours"],
                      med["btrfs"], size), flush=True)
            print(row("scheduled pull 5 % (kept session) vs ssh cat (ControlMaster)",
                      med["sched"], med["cm cat"], size, goal=0.9), flush=True)
            print(row("scheduled pull 5 % (kept session) vs fresh ssh cat", med["sched"],
                      med["cat"], size), flush=True)
            print(row("replicate pull into a served copy (command) vs ssh cat",
                      med["sched cli"], med["cat"], size), flush=True)
            print(row("served pull, a new connection each (before) vs ssh cat (ControlMaster)",
                      med["unkept"], med["cm cat"], size), flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
