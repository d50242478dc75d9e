"""A tree of four hosts in network namespaces: A -> B -> {C, D}, pulled over ssh (an sshd in
each host, a forced command allowing only replication of that host's volume), every
blockxfer of a host run inside its namespace. Masters are taken on A while writers run
and a retention loop destroys old masters (held ones are refused); meanwhile links are
cut and pulls killed at random points. At the end every host holds A's newest master,
every master a host holds whole is byte-identical to A's, `check` is clean everywhere,
and no master a registered destination needs was released (the last pulls are
incremental). Root, sshd and ip only; the seed is printed (BX_SEED repeats a run)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.netns import Net, network
from tests.sshd import keygen, need_sshd, sshd
from tests.transport_util import BLOCKXFER

PARENT = {"B": "A", "C": "B", "D": "B"}
EVENTS = int(os.environ.get("BX_EVENTS", "50"))
SSH_OPTS = ("-o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
            "-o LogLevel=ERROR -o ConnectTimeout=5 -o ServerAliveInterval=2 "
            "-o ServerAliveCountMax=3 -c aes128-gcm@openssh.com")


class Tree:
    def __init__(self, net: Net, root: Path, key: Path) -> None:
        self.net, self.root = net, root
        self.vol = {h: str(root / h / "vol.img") for h in net.hosts}
        self.env = {h: {"BLOCKXFER_SSH": f"ssh -i {key} {SSH_OPTS}",
                        "BLOCKXFER_STATE_DIR": str(root / h / "state")} for h in net.hosts}
        self.masters = 0
        self.lock = threading.Lock()

    def bx(self, host: str, *argv: str, data: bytes | None = None,
           timeout: float = 180) -> subprocess.CompletedProcess[bytes]:
        return self.net.run(host, BLOCKXFER, *argv, env=self.env[host], data=data,
                            timeout=timeout)

    def pull_argv(self, host: str) -> list[str]:
        p = PARENT[host]
        return [*self.net.hosts[host].exec(), BLOCKXFER, "replicate", "pull", "--json",
                f"ssh://root@{self.net.hosts[p].addr}{self.vol[p]}", self.vol[host],
                "--name", host]

    def take_master(self, tries: int = 300) -> str | None:
        with self.lock:
            name = f"m{self.masters}"
            self.masters += 1
        for _ in range(tries):
            if self.bx("A", "snapshot", "--master", f"{self.vol['A']}@{name}").returncode == 0:
                return name
            time.sleep(0.1)                   # a pull holds the volume: again
        return None

    def listing(self, host: str) -> dict[str, dict[str, object]]:
        r = self.bx(host, "snapshots", self.vol[host], "--json")
        assert r.returncode == 0, r.stderr.decode()
        return {s["name"]: s for s in json.loads(r.stdout)["snapshots"]}

    def digest(self, host: str, snap: str) -> str:
        r = self.bx(host, "read", f"{self.vol[host]}@{snap}")
        assert r.returncode == 0, r.stderr.decode()
        return hashlib.sha256(r.stdout).hexdigest()


@contextmanager
def tree(tmp_path: Path) -> Iterator[Tree]:
    need_sshd()
    with network(list("ABCD")) as net, ExitStack() as stack:
        key = tmp_path / "key"
        pub = keygen(key)
        t = Tree(net, tmp_path, key)
        for h, host in net.hosts.items():
            (tmp_path / h).mkdir()
            s = stack.enter_context(sshd(tmp_path / h / "sshd", host.addr, host.exec()))
            s.authorize(f'command="{BLOCKXFER} stdio-serve --volume {t.vol[h]} '
                        f'--allow replicate",restrict {pub}')
        yield t


class Chaos:
    """Writers and a retention loop on A, a pull loop per destination, and the
    events: a cable pulled for a while, or a pull killed (its whole process group)."""

    def __init__(self, t: Tree, rnd: random.Random) -> None:
        self.t, self.rnd = t, rnd
        self.stop = threading.Event()
        self.live: dict[str, subprocess.Popen[bytes]] = {}
        self.outcomes: dict[str, list[int]] = {h: [] for h in PARENT}
        self.refused_destroys = 0
        self.failed: BaseException | None = None
        self.threads = [threading.Thread(target=self.write, daemon=True)]
        self.threads += [threading.Thread(target=self.pull, args=(h,), daemon=True)
                         for h in PARENT]

    def write(self) -> None:
        try:
            self._write(random.Random(self.rnd.random()))
        except BaseException as e:            # the test fails on it, not a thread warning
            self.failed = e

    def _write(self, rnd: random.Random) -> None:
        while not self.stop.is_set():
            offset = rnd.randrange(0, 48 << 20, 4096)
            self.t.bx("A", "write", self.t.vol["A"], "--offset", str(offset),
                      data=rnd.randbytes(rnd.choice([64 << 10, 512 << 10, 2 << 20])))
            if rnd.random() < 0.3:
                self.t.take_master()
            if rnd.random() < 0.3:
                self.retention()

    def retention(self) -> None:
        """Destroy all but the two newest masters; held ones must be refused."""
        r = self.t.bx("A", "snapshots", self.t.vol["A"], "--json")
        if r.returncode != 0:                 # a pull holds the volume: next time
            return
        snaps = json.loads(r.stdout)["snapshots"]
        names = sorted((str(s["name"]) for s in snaps), key=lambda n: int(n[1:]))
        for n in names[:-2]:
            r = self.t.bx("A", "destroy", f"{self.t.vol['A']}@{n}")
            if r.returncode == 5 and b"held by" in r.stderr:
                self.refused_destroys += 1

    def pull(self, host: str) -> None:
        while not self.stop.is_set():
            p = subprocess.Popen(self.t.pull_argv(host), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, start_new_session=True,
                                 env={**os.environ, **self.t.env[host]})
            self.live[host] = p
            try:
                code = p.wait(300)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                code = p.wait()
            self.outcomes[host].append(code)
            time.sleep(0.2)

    def event(self) -> str:
        if self.rnd.random() < 0.5:
            host = self.rnd.choice(list(self.t.net.hosts))
            self.t.net.link(host, up=False)
            time.sleep(self.rnd.uniform(0.3, 3.0))
            self.t.net.link(host, up=True)
            return f"cut {host}"
        host = self.rnd.choice(list(PARENT))
        p = self.live.get(host)
        if p is None or p.poll() is not None:
            return f"kill {host}: nothing running"
        os.killpg(p.pid, signal.SIGKILL)
        return f"kill {host}"

    def run(self, events: int) -> list[str]:
        for th in self.threads:
            th.start()
        log = []
        try:
            for _ in range(events):
                time.sleep(self.rnd.uniform(0.2, 2.0))
                log.append(self.event())
        finally:
            self.stop.set()
            for h in self.t.net.hosts:
                self.t.net.link(h, up=True)
            for th in self.threads:
                th.join(400)
        return log


def converge(t: Tree, host: str) -> dict[str, object]:
    last = None
    for _ in range(10):
        r = subprocess.run(t.pull_argv(host), capture_output=True, timeout=400,
                           env={**os.environ, **t.env[host]})
        if r.returncode == 0:
            return json.loads(r.stdout)
        last = r.stderr.decode()
        time.sleep(1)
    raise AssertionError(f"{host} did not converge: {last}")


def whole_masters(t: Tree, host: str) -> dict[str, str]:
    """Master name -> guid for the masters `host` holds whole."""
    return {n: str(s["guid"]) for n, s in t.listing(host).items()
            if s["master"] and not s["incomplete"]}


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_tree_under_cuts_and_kills(tmp_path: Path) -> None:
    seed = int(os.environ.get("BX_SEED", random.randrange(1 << 30)))
    print(f"BX_SEED={seed}")
    rnd = random.Random(seed)
    with tree(tmp_path) as t:
        assert t.bx("A", "init", t.vol["A"], "--size", "64M").returncode == 0
        t.bx("A", "write", t.vol["A"], "--offset", "0", data=rnd.randbytes(8 << 20))
        t.take_master()
        chaos = Chaos(t, rnd)
        log = chaos.run(EVENTS)
        assert chaos.failed is None, chaos.failed
        print("\n".join(log))
        print({h: o for h, o in chaos.outcomes.items()}, "refused destroys:",
              chaos.refused_destroys)
        had = {h: bool(os.path.exists(t.vol[h]) and whole_masters(t, h)) for h in PARENT}
        newest = t.take_master()
        assert newest is not None
        kinds = {h: converge(t, h)["kind"] for h in ("B", "C", "D")}
        print("final pulls:", kinds, "had a master before:", had)
        a = whole_masters(t, "A")
        for h in "BCD":
            mine = whole_masters(t, h)
            assert newest in mine and mine[newest] == a[newest], h
            for name, guid in mine.items():
                if name in a:
                    assert guid == a[name] and t.digest(h, name) == t.digest("A", name)
            if had[h]:                            # its base was held: no full again
                assert kinds[h] == "incremental", (h, kinds[h])
        for h in "ABCD":
            r = t.bx(h, "check", t.vol[h])
            assert r.returncode == 0, (h, r.stderr.decode())
        for src in ("A", "B"):
            out = json.loads(t.bx(src, "replicate", "destinations", t.vol[src],
                                  "--json").stdout)
            held = whole_masters(t, src)
            for d in out["destinations"]:
                assert d["confirmed"] is None or d["confirmed"] in held, (src, d)
        assert sum(len(o) for o in chaos.outcomes.values()) >= 10


def _pull(t: Tree, host: str, parent: str) -> dict[str, Any]:
    argv = t.pull_argv(host)
    argv[-4] = f"ssh://root@{t.net.hosts[parent].addr}{t.vol[parent]}"
    r = subprocess.run(argv, capture_output=True, timeout=400,
                       env={**os.environ, **t.env[host]})
    assert r.returncode == 0, r.stderr.decode()
    return json.loads(r.stdout)


@pytest.mark.root
@pytest.mark.slow
def test_child_reparents_to_its_grandparent(tmp_path: Path) -> None:
    """B is destroyed; C pulls from A instead, with an incremental from the master it
    shares with A (held at A for B's child)."""
    with tree(tmp_path) as t:
        assert t.bx("A", "init", t.vol["A"], "--size", "64M").returncode == 0
        t.bx("A", "write", t.vol["A"], "--offset", "0", data=os.urandom(8 << 20))
        t.take_master()
        _pull(t, "B", "A")
        _pull(t, "C", "B")
        t.bx("A", "write", t.vol["A"], "--offset", "0", data=os.urandom(1 << 20))
        t.take_master()
        assert _pull(t, "B", "A")["kind"] == "incremental"
        t.bx("A", "write", t.vol["A"], "--offset", str(4 << 20), data=os.urandom(1 << 20))
        newest = t.take_master()
        assert t.bx("A", "destroy", f"{t.vol['A']}@m0").returncode == 5   # held for C
        t.net.link("B", up=False)                 # B is gone
        os.unlink(t.vol["B"])
        r = _pull(t, "C", "A")
        assert (r["kind"], r["base"], r["top"]) == ("incremental", "m0", newest)
        assert r["blocks"] < 1000
        assert t.digest("C", str(newest)) == t.digest("A", str(newest))
        assert t.bx("C", "check", t.vol["C"]).returncode == 0


@pytest.mark.root
@pytest.mark.slow
def test_bwlimit_matches_tbf_shaping(tmp_path: Path) -> None:
    """--bwlimit 2M against the same rate shaped by `tc tbf` on A's link: both pulls of
    the same 6 MiB take about as long (3 s and more)."""
    import shutil
    if shutil.which("tc") is None:
        pytest.skip("needs tc (iproute2)")
    with tree(tmp_path) as t:
        assert t.bx("A", "init", t.vol["A"], "--size", "64M").returncode == 0
        t.bx("A", "write", t.vol["A"], "--offset", "0", data=os.urandom(6 << 20))
        t.take_master()
        took = {}
        for how in ("tbf", "bwlimit"):
            extra = ["--bwlimit", "2M"] if how == "bwlimit" else []
            shaped = how == "tbf"
            if shaped:
                r = t.net.run("A", "tc", "qdisc", "add", "dev", "eth0", "root", "tbf",
                              "rate", "16777kbit", "burst", "64kb", "latency", "400ms")
                assert r.returncode == 0, r.stderr.decode()
            host = "B" if shaped else "C"
            argv = [*t.pull_argv(host)[:-4], f"ssh://root@{t.net.hosts['A'].addr}{t.vol['A']}",
                    t.vol[host], "--name", host, "--no-compress", *extra]
            t0 = time.monotonic()
            r2 = subprocess.run(argv, capture_output=True, timeout=300,
                                env={**os.environ, **t.env[host]})
            took[how] = time.monotonic() - t0
            assert r2.returncode == 0, r2.stderr.decode()
            if shaped:
                t.net.run("A", "tc", "qdisc", "del", "dev", "eth0", "root")
        print(took)
        assert took["tbf"] >= 2.5 and took["bwlimit"] >= 2.5
        assert 0.5 <= took["bwlimit"] / took["tbf"] <= 2.0, took
