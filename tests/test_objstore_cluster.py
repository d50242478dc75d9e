"""A real SeaweedFS cluster across network namespaces: master, filer and S3 gateway in
one, a volume server in each of three others (replication 001), joined by a bridge
that lives in its own namespace (nothing touches the root namespace). A volume
server is killed during an upload and another during a restore: both complete and
the restored snapshot is byte-identical."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockxfer.transfer.objstore.servers import binary, ensure_binaries
from tests.objstore_helpers import contents, make_chain

pytestmark = [pytest.mark.root, pytest.mark.slow]
HOSTS = "abcd"                              # a: master + filer + s3; b, c, d: volume servers


_WAIT_BUCKET = """
import sys, time
from blockxfer.transfer.objstore.s3 import client_for
c, end = client_for(), time.time() + float(sys.argv[2])
while True:
    try:
        c.create_bucket(Bucket=sys.argv[1])
        break
    except Exception as e:
        if "BucketAlready" in str(e):
            break
        if time.time() > end:
            raise
        time.sleep(0.5)
"""


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


class Cluster:
    def __init__(self, d: Path):
        self.d = d
        self.tag = f"bx{os.getpid() % 100000}"
        self.net = f"10.231.{random.randrange(100, 250)}"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.access, self.secret = "BXCLUSTER" + os.urandom(4).hex().upper(), os.urandom(16).hex()

    def ns(self, h: str) -> str:
        return f"{self.tag}{h}"

    def ip(self, h: str) -> str:
        return f"{self.net}.{HOSTS.index(h) + 1}"

    def setup_network(self) -> None:
        sw = self.ns("sw")
        sh("ip", "netns", "add", sw)
        sh("ip", "-n", sw, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", sw, "link", "set", "br0", "up")
        for h in HOSTS:
            n, veth = self.ns(h), f"{self.tag}v{h}"
            sh("ip", "netns", "add", n)
            sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", n)
            sh("ip", "link", "set", veth, "netns", sw)
            sh("ip", "-n", sw, "link", "set", veth, "master", "br0", "up")
            sh("ip", "-n", n, "addr", "add", f"{self.ip(h)}/24", "dev", "eth0")
            sh("ip", "-n", n, "link", "set", "eth0", "up")
            sh("ip", "-n", n, "link", "set", "lo", "up")

    def start(self, name: str, h: str, *args: str) -> None:
        log = open(self.d / f"{name}.log", "ab")  # noqa: SIM115 - the child holds it
        self.procs[name] = subprocess.Popen(
            ["ip", "netns", "exec", self.ns(h), binary("weed") or "weed", *args],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            cwd=self.d)                     # the filer keeps its metadata in its cwd

    def volume(self, h: str) -> None:
        (self.d / f"vol-{h}").mkdir(exist_ok=True)
        ip = self.ip(h)
        self.start(f"volume-{h}", h, "volume", f"-ip={ip}", f"-ip.bind={ip}", "-port=8080",
                   f"-dir={self.d / f'vol-{h}'}", f"-master={self.ip('a')}:9333", "-max=30")

    def start_all(self) -> None:
        a = self.ip("a")
        (self.d / "m").mkdir()
        (self.d / "s3.json").write_text(json.dumps({"identities": [{
            "name": "bx", "credentials": [{"accessKey": self.access, "secretKey": self.secret}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}))
        self.start("master", "a", "master", f"-ip={a}", f"-ip.bind={a}", "-port=9333",
                   f"-mdir={self.d / 'm'}", "-defaultReplication=001", "-telemetry=false",
                   "-volumeSizeLimitMB=256")
        for h in "bcd":
            self.volume(h)
        self.start("filer", "a", "filer", f"-ip={a}", f"-ip.bind={a}", "-port=8888",
                   f"-master={a}:9333", "-s3", "-s3.port=8333", f"-s3.ip.bind={a}",
                   f"-s3.config={self.d / 's3.json'}")

    def env(self) -> dict[str, str]:
        return {**os.environ, "AWS_ACCESS_KEY_ID": self.access,
                "AWS_SECRET_ACCESS_KEY": self.secret, "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_ENDPOINT_URL": f"http://{self.ip('a')}:8333",
                "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}

    def run(self, *args: str, background: bool = False) -> subprocess.Popen[str]:
        cmd = ["ip", "netns", "exec", self.ns("a"), sys.executable, *args]
        return subprocess.Popen(cmd, env=self.env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def wait_bucket(self, bucket: str, timeout: float = 90) -> None:
        p = self.run("-c", _WAIT_BUCKET, bucket, str(timeout))
        _, err = p.communicate(timeout=timeout + 30)
        assert p.returncode == 0, err

    def master(self, path: str) -> dict:
        """GET a master URL from inside the cluster's namespace."""
        code = ("import json,sys,urllib.request\n"
                f"print(urllib.request.urlopen('http://{self.ip('a')}:9333{path}').read().decode())")
        p = self.run("-c", code)
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        return json.loads(out)

    def nodes(self) -> dict[str, int]:
        """Volume servers the master sees, with how many volumes each holds."""
        out: dict[str, int] = {}
        for dc in self.master("/dir/status")["Topology"]["DataCenters"] or []:
            for rack in dc["Racks"] or []:
                for n in rack["DataNodes"] or []:
                    out[n["Url"].split(":")[0]] = int(n["Volumes"])
        return out

    def wait_nodes(self, hosts: str, volumes: bool, timeout: float = 60) -> None:
        end = time.monotonic() + timeout
        while True:
            nodes = self.nodes()
            if all(nodes.get(self.ip(h), 0 if volumes else -1) > (0 if volumes else -1)
                   for h in hosts):
                return
            assert time.monotonic() < end, f"volume servers did not join: {nodes}"
            time.sleep(0.5)

    def kill(self, name: str) -> None:
        p = self.procs.pop(name)
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()

    def stop(self) -> None:
        for name in ["filer", "volume-b", "volume-c", "volume-d", "master"]:
            p = self.procs.pop(name, None)
            if p is None:
                continue
            os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(3)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)   # `weed filer` may ignore SIGTERM
                p.wait()

    def teardown_network(self) -> None:
        for h in [*HOSTS, "sw"]:
            subprocess.run(["ip", "netns", "del", self.ns(h)], capture_output=True)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces")
    try:
        ensure_binaries()
    except (subprocess.CalledProcessError, OSError) as e:
        pytest.skip(f"SeaweedFS not available: {e}")
    c = Cluster(tmp_path)
    try:
        c.setup_network()
        c.start_all()
        c.wait_bucket("bxcluster")
        c.wait_nodes("bcd", volumes=False)
        # every pair of servers gets volumes now, so none is created while one is down
        c.master("/vol/grow?collection=bxcluster&count=6&replication=001")
        c.wait_nodes("bcd", volumes=True)
        yield c
    finally:
        c.stop()
        c.teardown_network()


def _finish(p: subprocess.Popen[str], timeout: float = 600) -> str:
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, err
    return out + err


def test_volume_server_killed_during_upload_and_restore(cluster: Cluster, tmp_path: Path) -> None:
    src = str(tmp_path / "src.img")
    vol = make_chain(src, 2, size=192 << 20)
    want = vol.read(0, vol.virtual_size, snapshot="s2")
    vol.close()
    store = "s3://bxcluster/site/vol"
    up = cluster.run("-m", "blockxfer.cli", "send", src, "s1", "-o", store)
    time.sleep(1.5)
    assert up.poll() is None, "the upload ended before the kill: make the volume larger"
    cluster.kill("volume-d")                    # mid-upload
    _finish(up)
    _finish(cluster.run("-m", "blockxfer.cli", "send", src, "s2 - s1", "-o", store))
    cluster.volume("d")                         # back, with what it held
    cluster.wait_nodes("d", volumes=True)
    target = str(tmp_path / "restored.img")
    down = cluster.run("-m", "blockxfer.cli", "receive", target, "-i", f"{store}@s2")
    deadline = time.monotonic() + 60           # kill as soon as the restore writes
    while not os.path.exists(target) and down.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert down.poll() is None, "the restore ended before the kill: make the volume larger"
    cluster.kill("volume-b")                    # mid-restore
    _finish(down)
    assert contents(target, "s2") == want
    assert "clean" in _finish(cluster.run("-m", "blockxfer.cli", "store", "verify", "s3://bxcluster/site"))
