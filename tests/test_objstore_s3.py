"""The s3:// commands against real S3 servers: SeaweedFS `weed mini` and `rclone serve
s3` (no conditional PUT), each started on 127.0.0.1 on free ports with generated
credentials. What the installed `blockxfer` command does, through subprocesses."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockxfer.transfer.objstore.servers import START, Server
from tests.clihelp import run as bxrun
from tests.objstore_helpers import contents, make_chain

N = 4


# SeaweedFS on every change; rclone, the second implementation, in make test-slow
@pytest.fixture(scope="module", params=[
    p if p == "seaweedfs" else pytest.param(p, marks=pytest.mark.slow) for p in sorted(START)])
def server(request: pytest.FixtureRequest,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    try:
        srv = START[request.param](tmp_path_factory.mktemp(request.param))
    except (subprocess.CalledProcessError, OSError) as e:
        pytest.skip(f"{request.param} S3 server not available: {e}")
    with srv:
        yield srv


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, bytes]]]:
    d = tmp_path_factory.mktemp("s3src")
    vol = make_chain(str(d / "src.img"), N)
    want = {f"s{i}": vol.read(0, vol.virtual_size, snapshot=f"s{i}") for i in range(1, N + 1)}
    vol.close()
    yield str(d / "src.img"), want


def bx(server: Server, *args: str, env: dict[str, str] | None = None,
       check: bool = True) -> subprocess.CompletedProcess[str]:
    e = {**os.environ, **server.env(), **(env or {})}
    r = bxrun(args, env=e, text=True, timeout=300)
    if check and r.returncode != 0:
        raise AssertionError(f"blockxfer {' '.join(args)}: exit {r.returncode}\n{r.stderr}")
    return r


def _prefix(server: Server) -> str:
    return server.url(f"t{uuid.uuid4().hex[:8]}")


def send_chain(server: Server, src: str, store: str, upto: int = N) -> None:
    bx(server, "send", src, "s1", "-o", f"{store}/vol")
    for i in range(2, upto + 1):
        bx(server, "send", src, f"s{i} - s{i - 1}", "-o", f"{store}/vol")


def test_chain_ls_restore_any_verify(server: Server, source: tuple[str, dict[str, bytes]],
                                     tmp_path: Path) -> None:
    src, want = source
    store = _prefix(server)
    send_chain(server, src, store)
    info = json.loads(bx(server, "store", "ls", store, "--json").stdout)
    snaps = info["volumes"][0]["snapshots"]
    assert [s["name"] for s in snaps] == [f"s{i}" for i in range(1, N + 1)]
    assert all(s["incremental"] for s in snaps[1:]) and not snaps[0]["incremental"]
    assert all(s["new_bytes"] < snaps[0]["new_bytes"] / 4 for s in snaps[1:])
    target = str(tmp_path / "replica.img")
    for name in ("s2", f"s{N}"):              # the second is pulled as an increment
        r = bx(server, "receive", target, "-i", f"{store}/vol@{name}")
        assert contents(target, name) == want[name]
        assert ("only what changed" in r.stdout) == (name != "s2"), r.stdout
    r = bx(server, "store", "verify", store)
    assert "clean" in r.stdout


def test_prune_gc_keep_the_rest_restorable(server: Server, source: tuple[str, dict[str, bytes]],
                                           tmp_path: Path) -> None:
    src, want = source
    store = _prefix(server)
    send_chain(server, src, store)
    bx(server, "store", "prune", f"{store}/vol", "--keep-last", "2")
    r = bx(server, "store", "gc", store, "--grace", "0")
    assert "deleted" in r.stdout
    info = json.loads(bx(server, "store", "ls", store, "--json").stdout)
    assert [s["name"] for s in info["volumes"][0]["snapshots"]] == [f"s{N - 1}", f"s{N}"]
    assert "clean" in bx(server, "store", "verify", store).stdout
    target = str(tmp_path / "r.img")
    bx(server, "receive", target, "-i", f"{store}/vol@s{N - 1}")
    assert contents(target, f"s{N - 1}") == want[f"s{N - 1}"]


def test_gc_repacks_and_the_rest_still_restores(server: Server,
                                                source: tuple[str, dict[str, bytes]],
                                                tmp_path: Path) -> None:
    src, want = source
    store = _prefix(server)
    send_chain(server, src, store)
    bx(server, "store", "prune", f"{store}/vol", "--keep-last", "1", "--keep", "s2")
    r = json.loads(bx(server, "store", "gc", store, "--grace", "0", "--repack-below", "1",
                      "--json").stdout)
    assert r["packs_repacked"] >= 1 and r["manifests_rewritten"] >= 1 and not r["problems"]
    assert "clean" in bx(server, "store", "verify", store).stdout
    for name in ("s2", f"s{N}"):
        target = str(tmp_path / f"{name}.img")
        bx(server, "receive", target, "-i", f"{store}/vol@{name}")
        assert contents(target, name) == want[name]


def test_send_retain_locks_the_copy(server: Server, source: tuple[str, dict[str, bytes]]) -> None:
    """SeaweedFS takes object lock (a bucket made with it); rclone has none: --retain
    is refused there in one line before anything is stored."""
    from blockxfer.transfer.objstore.s3 import client_for
    src, _ = source
    env = server.env()
    c = client_for(env.get("AWS_ENDPOINT_URL"), env.get("AWS_ACCESS_KEY_ID"),
                   env.get("AWS_SECRET_ACCESS_KEY"))
    bucket = f"locked{uuid.uuid4().hex[:8]}"
    if server.kind == "rclone":
        r = bx(server, "send", src, "s1", "-o", server.url("x/vol"), "--retain", "1d",
               check=False)
        assert r.returncode == 2 and "no object lock" in r.stderr
        assert r.stderr.count("\n") == 1, r.stderr
        return
    c.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
    store = f"s3://{bucket}/p"
    bx(server, "send", src, "s1", "-o", f"{store}/vol", "--retain", "2d")
    bx(server, "send", src, "s2 - s1", "-o", f"{store}/vol")
    info = json.loads(bx(server, "store", "ls", store, "--json").stdout)
    snaps = {s["name"]: s for s in info["volumes"][0]["snapshots"]}
    assert snaps["s1"]["retain_until"] > time.time() + 86400 and snaps["s2"]["retain_until"] is None
    listed = c.list_objects_v2(Bucket=bucket, Prefix="p/volumes/vol/manifests/")
    manifests = [o["Key"] for o in listed["Contents"]]
    modes = []
    for key in manifests:                 # s1's manifest is locked, s2's is not
        try:
            modes.append(c.get_object_retention(Bucket=bucket, Key=key)["Retention"]["Mode"])
        except Exception:
            modes.append(None)
    assert sorted(modes, key=str) == ["COMPLIANCE", None]
    r = bx(server, "store", "rm", f"{store}/vol@s1", check=False)
    assert r.returncode == 5 and "retained by object lock" in r.stderr
    assert "clean" in bx(server, "store", "verify", store).stdout


def test_store_commands_give_their_results_as_json(server: Server,
                                                   source: tuple[str, dict[str, bytes]]) -> None:
    from tests.test_cli_json import ELSEWHERE, documented
    src, _ = source
    store = _prefix(server)
    send_chain(server, src, store, upto=3)

    def run(*args: str) -> dict[str, object]:
        return json.loads(bx(server, "store", *args, "--json").stdout)
    got = {"store ls": run("ls", store), "store verify": run("verify", store),
           "store rm": run("rm", f"{store}/vol@s2"),
           "store prune": run("prune", f"{store}/vol", "--keep-last", "1", "--dry-run"),
           "store gc": run("gc", store, "--grace", "0"),
           "store recover": run("recover", f"{store}/vol", "--force")}
    keys = documented()
    assert set(got) == ELSEWHERE
    for name, result in got.items():
        assert keys[name] <= set(result), f"{name}: documented keys missing"
    assert got["store verify"]["clean"] is True and got["store rm"]["removed"] == ["s2"]


def test_wrong_credentials_one_line_exit_4(server: Server,
                                           source: tuple[str, dict[str, bytes]]) -> None:
    src, _ = source
    store = _prefix(server)
    for args in (["store", "ls", store], ["send", src, "s1", "-o", f"{store}/vol"]):
        r = bx(server, *args, env={"AWS_SECRET_ACCESS_KEY": "wrong" * 8}, check=False)
        assert r.returncode == 4, r.stderr
        assert r.stderr.count("\n") == 1 and "credentials" in r.stderr


def test_unknown_snapshot_and_bad_address(server: Server, tmp_path: Path) -> None:
    store = _prefix(server)
    r = bx(server, "receive", str(tmp_path / "x.img"), "-i", f"{store}/vol@nope", check=False)
    assert r.returncode == 5 and "no volume" in r.stderr
    r = bx(server, "receive", str(tmp_path / "x.img"), "-i", f"{store}/vol", check=False)
    assert r.returncode == 2 and "@SNAP" in r.stderr
    assert not os.path.exists(tmp_path / "x.img")


def _sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_damaged_chunk_refused_target_unchanged(server: Server,
                                                source: tuple[str, dict[str, bytes]],
                                                tmp_path: Path) -> None:
    from blockxfer.transfer.objstore.s3 import S3Objects, client_for
    src, _ = source
    store = _prefix(server)
    send_chain(server, src, store, 2)
    target = str(tmp_path / "t.img")
    bx(server, "receive", target, "-i", f"{store}/vol@s1")
    before = _sha(target)
    objs = S3Objects(client_for(server.endpoint, server.access_key, server.secret_key),
                     server.bucket)
    prefix = store.split("/", 3)[3]
    packs = sorted(o.key for o in objs.list(f"{prefix}/packs/"))
    raw = bytearray(objs.get(packs[0]))
    raw[len(raw) // 2] ^= 0x10
    objs.put(packs[0], bytes(raw))
    r = bx(server, "receive", target, "-i", f"{store}/vol@s2", "--force", check=False)
    assert r.returncode == 3 and "damaged" in r.stderr, r.stderr
    assert _sha(target) == before
    r = bx(server, "store", "verify", store, check=False)
    assert r.returncode == 1 and "problem" in r.stdout


def _kill_and_resume(server: Server, src: str, points: int, seed: int) -> None:
    rng = random.Random(seed)
    store = _prefix(server)
    bx(server, "send", src, "s1", "-o", f"{store}/vol")
    env = dict(os.environ, **server.env())
    cmd = [sys.executable, "-m", "blockxfer.cli", "send", src, "s2 - s1", "-o", f"{store}/vol"]
    start = time.monotonic()
    subprocess.run(cmd, env=env, capture_output=True, check=True)
    took = time.monotonic() - start
    bx(server, "store", "rm", f"{store}/vol@s2")
    for _ in range(points):
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0, took))
        p.send_signal(signal.SIGKILL)
        p.wait()
        if rng.random() < 0.3:                 # sometimes a removal between runs
            bx(server, "store", "rm", f"{store}/vol@s2", check=False)
    bx(server, "send", src, "s2 - s1", "-o", f"{store}/vol")
    assert "clean; 2 snapshots" in bx(server, "store", "verify", store).stdout, seed
    bx(server, "store", "gc", store, "--grace", "0")
    assert "clean; 2 snapshots" in bx(server, "store", "verify", store).stdout, seed


def test_killed_uploader_resumes(server: Server, source: tuple[str, dict[str, bytes]]) -> None:
    seed = int(os.environ.get("BX_SEED", str(random.randrange(1 << 30))))
    print(f"seed {seed}")
    _kill_and_resume(server, source[0], 6, seed)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_killed_uploader_resumes_at_fifty_points(server: Server,
                                                 source: tuple[str, dict[str, bytes]]) -> None:
    seed = int(os.environ.get("BX_SEED", str(random.randrange(1 << 30))))
    print(f"seed {seed}")
    _kill_and_resume(server, source[0], 52, seed)


def test_demo_leg(tmp_path: Path) -> None:
    """The function `make demo` calls: its own SeaweedFS, started and stopped by pid."""
    from blockxfer.drivers.blockdev import open_device
    from blockxfer.transfer.objstore.demo import run_objstore_leg
    from blockxfer.volume import Volume
    path = str(tmp_path / "v.img")
    vol = Volume.create(open_device(path, write=True, create_size=48 << 20))
    for i in range(3):
        vol.write(i * (2 << 20), os.urandom(2 << 20))
        vol.create_snapshot(f"d{i}")
    vol.close()
    lines: list[str] = []
    assert run_objstore_leg(path, ["d0", "d1", "d2"], str(tmp_path), lines.append, open_device)
    assert any("identical" in line for line in lines)
    pid = int((tmp_path / "seaweedfs" / "weed.pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
