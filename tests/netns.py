"""Several hosts on one machine for tests: network namespaces joined by a bridge.

`network(["A", "B"])` makes one namespace per host and a switch namespace
holding a bridge; each host's `eth0` is one end of a veth whose other end sits
on that bridge (both ends are created from the switch namespace, so nothing
ever touches the root namespace, and no route leaves the machine). Names carry
a per-run prefix so parallel runs do not meet. Everything is deleted on the
way out, also when the test fails. Root only: the test is skipped with the
reason otherwise (docs: ../shared/research/scale-out-and-replication.md).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest


@dataclass
class Host:
    name: str
    ns: str
    addr: str
    veth: str                       # its cable's end on the switch

    def exec(self) -> list[str]:
        """The prefix that runs a command inside this host."""
        return ["ip", "netns", "exec", self.ns]


@dataclass
class Net:
    switch: str
    hosts: dict[str, Host] = field(default_factory=dict)

    def run(self, host: str, *argv: str, timeout: float = 120, check: bool = False,
            env: dict[str, str] | None = None,
            data: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([*self.hosts[host].exec(), *argv], capture_output=True,
                              timeout=timeout, check=check, input=data,
                              env={**os.environ, **(env or {})})

    def link(self, host: str, up: bool) -> None:
        """Plug or pull `host`'s cable (at the switch)."""
        _ip("-n", self.switch, "link", "set", self.hosts[host].veth, "up" if up else "down")


def _ip(*argv: str) -> None:
    r = subprocess.run(["ip", *argv], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(argv)}: {r.stderr.strip()}")


def need_netns() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    if shutil.which("ip") is None:
        pytest.skip("needs the ip command (iproute2)")


@contextmanager
def network(names: list[str], subnet: str = "10.231.77") -> Iterator[Net]:
    """Hosts `names` at subnet.1, .2, ... on one bridge; deleted on the way out."""
    need_netns()
    prefix = f"bxr{os.getpid() % 100000}"
    net = Net(f"{prefix}sw")
    made: list[str] = []
    try:
        try:
            _ip("netns", "add", net.switch)
        except RuntimeError as e:
            pytest.skip(f"cannot create network namespaces here: {e}")
        made.append(net.switch)
        _ip("-n", net.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", net.switch, "link", "set", "br0", "up")
        for i, name in enumerate(names, start=1):
            h = Host(name, f"{prefix}{name}", f"{subnet}.{i}", f"{prefix}v{name}")
            _ip("netns", "add", h.ns)
            made.append(h.ns)
            _ip("-n", net.switch, "link", "add", h.veth, "type", "veth", "peer", "name",
                "eth0", "netns", h.ns)
            _ip("-n", net.switch, "link", "set", h.veth, "master", "br0", "up")
            _ip("-n", h.ns, "addr", "add", f"{h.addr}/24", "dev", "eth0")
            _ip("-n", h.ns, "link", "set", "eth0", "up")
            _ip("-n", h.ns, "link", "set", "lo", "up")
            net.hosts[name] = h
        yield net
    finally:
        for ns in reversed(made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
