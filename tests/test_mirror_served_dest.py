"""A mirror into a destination that `blockxfer serve` owns (issue 12): the mirror
reaches it through its service's control socket, which answers the same look
(`mirror_inspect`: what it holds, the plane an interrupted receive placed) and
rollback (`mirror_revert`) as the far side of ssh:// does, so an interrupted
update resumes block by block and local writes there (an NBD client's, a
snapshot) are rolled back at the next update, while the volume stays served."""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest

from blockxfer.cli.mirror_source import mirror_target
from blockxfer.nbd import protocol as p
from blockxfer.service import control
from blockxfer.service.mirrordest import ServedTarget
from blockxfer.transfer.mirror import load, run_update
from blockxfer.volume.check import check_volume
from tests.mirror_util import (
    churn,
    configure,
    dest_image,
    dying_reader,
    image_of,
    make_volume,
    open_vol,
)
from tests.mirror_util import update as local_update
from tests.nbd.nbdclient import Client
from tests.test_mirror_remote import far  # noqa: F401 - a fixture
from tests.test_mirror_served import run_dir, served, wait_for  # noqa: F401 - a fixture

MiB = 1 << 20


def _cut_update(src: str, dest: str, after: int) -> None:
    """In a forked child: an update into the served `dest` that dies (SIGKILL) once
    `after` bytes were read, a moment later (the service saves the received plane
    every 64 KiB meanwhile, and once more when the stream is cut)."""
    try:
        vol = open_vol(src)
        reader = dying_reader(vol, after)
        run_update(vol, mirror_target(dest), reader=reader)
    finally:
        os._exit(1)


def test_an_interrupted_update_into_a_served_destination_resumes_block_by_block(
        tmp_path: Path, run_dir: str) -> None:  # noqa: F811
    src, dest, sock = (str(tmp_path / n) for n in ("src.img", "dst.img", "nbd.sock"))
    vol = make_volume(src, 24 << 20, 8 << 20)
    churn(vol, random.Random(1), 20, 0)
    configure(vol, dest)
    local_update(vol, dest)                       # the full image, before it is served
    vol.write(0, random.Random(8).randbytes(6 * MiB))
    vol.close()
    with served(dest, sock, persist_every=64 << 10):
        target = mirror_target(dest)
        assert isinstance(target, ServedTarget)
        pid = os.fork()
        if pid == 0:
            _cut_update(src, dest, 2 * MiB)
        os.waitpid(pid, 0)
        wait_for(lambda: target.look().pending is not None)   # the service saw the cut
        vol = open_vol(src)
        st = load(vol, src)
        seen = target.look()
        assert st.pending is not None and seen.pending == bytes.fromhex(st.pending.sid)
        assert seen.received is not None
        have = seen.received.count()
        assert have > 0
        r = run_update(vol, target)
        assert r["kind"].startswith("incremental") and r["kind"].endswith(", resumed"), r
        assert r["resumed"]
        total = (6 * MiB) // 4096
        assert r["blocks"] <= total - have + 64, (r["blocks"], have)   # only the rest
        assert target.look().newest == vol.resolve(r["snapshot"]).guid
        want = image_of(vol, r["snapshot"])
        vol.close()
        nbd = Client.connect(sock)
        try:
            assert nbd.read(0, 6 * MiB) == want[:6 * MiB]      # its clients see it
        finally:
            nbd.close()
    assert dest_image(dest) == want
    d = open_vol(dest, write=False)
    assert check_volume(d).clean
    d.close()


def test_local_writes_at_a_served_destination_are_rolled_back(
        tmp_path: Path, run_dir: str) -> None:  # noqa: F811
    src, dest, sock = (str(tmp_path / n) for n in ("src.img", "dst.img", "nbd.sock"))
    vol = make_volume(src, 8 << 20, 1 << 20)
    churn(vol, random.Random(3), 40, 0)
    configure(vol, dest)
    local_update(vol, dest)
    with served(dest, sock):
        nbd = Client.connect(sock)
        try:
            assert nbd.request(p.CMD_WRITE, 0, 8192, payload=os.urandom(8192)) == 0
            assert nbd.request(p.CMD_FLUSH) == 0
            control.call(dest, "snapshot", name="local")
            churn(vol, random.Random(4))
            r = run_update(vol, mirror_target(dest))     # rolled back there, then sent
            assert r["kind"].startswith("incremental") and not r["resumed"], r
            want = image_of(vol, r["snapshot"])
            assert nbd.read(0, len(want)) == want        # the served view went back too
        finally:
            nbd.close()
        names = {s["name"] for s in control.call(dest, "snapshots")["snapshots"]}
        assert "local" not in names and r["snapshot"] in names
    vol.close()
    assert dest_image(dest) == want
    d = open_vol(dest, write=False)
    assert check_volume(d).clean
    d.close()


@pytest.mark.slow                    # four interpreters start on the far side (~7 s loaded)
def test_a_served_far_side_of_ssh_answers_through_its_service(
        tmp_path: Path, run_dir: str, far: tuple[str, str]) -> None:  # noqa: F811
    """The far side's `stdio-serve` asks the service that owns the volume there
    (`inspect`, `revert`): written there since the last update, it is rolled back
    and the update goes in as an incremental, the volume staying served."""
    from blockxfer.transfer.mirror.target import UrlTarget
    dest, url = far
    sock = str(tmp_path / "nbd.sock")
    vol = make_volume(str(tmp_path / "src.img"), 8 << 20, 1 << 20)
    churn(vol, random.Random(5), 40, 0)
    configure(vol, url)
    local_update(vol, dest)                     # the same full image, quicker
    with served(dest, sock):
        control.call(dest, "snapshot", name="local")           # written there since
        churn(vol, random.Random(6))
        r = run_update(vol, UrlTarget(url))
        assert r["kind"].startswith("incremental"), r
        names = {s["name"] for s in control.call(dest, "snapshots")["snapshots"]}
        assert "local" not in names and r["snapshot"] in names
        seen = UrlTarget(url).look(thorough=True)
        assert seen is not None and seen.newest == vol.resolve(r["snapshot"]).guid
    assert dest_image(dest) == image_of(vol, r["snapshot"])
    vol.close()


def _kill_the_destination(tmp_path: Path, kills: int, seed: int) -> int:
    """Kill -9 the service owning the destination at random points of an update
    into it: each time the destination is at a mirrored state equal to the
    source's snapshot; then an update into it served again converges (resuming
    what a kill left when it can), `check` clean. Returns the resumed updates."""
    import math
    import threading

    from blockxfer.errors import BlockxferError
    from tests.test_mirror_kill import _dest_state, _source_image
    from tests.test_mirror_served import _serve_child, stop
    rng = random.Random(seed)
    src, dest, sock = (str(tmp_path / n) for n in ("src.img", "dst.img", "nbd.sock"))
    vol = make_volume(src, 48 << 20, 16 << 20)
    churn(vol, rng, 100, 0)
    configure(vol, dest)
    local_update(vol, dest)
    resumed = 0
    for i in range(kills):
        vol.write(rng.randrange(8) * MiB, rng.randbytes(4 * MiB))
        pid = os.fork()
        if pid == 0:
            _serve_child(dest, sock, 64 << 10)
        wait_for(lambda: control.server_running(dest))
        got: dict[str, object] = {}

        def run(got: dict[str, object] = got) -> None:
            try:
                got.update(run_update(vol, mirror_target(dest)))
            except BlockxferError as e:
                got["error"] = e
        t = threading.Thread(target=run)
        t.start()
        time.sleep(math.exp(rng.uniform(math.log(0.005), math.log(0.3))))
        stop(pid, signal.SIGKILL)
        t.join(60)
        resumed += bool(got.get("resumed"))
        name, image = _dest_state(dest)
        assert name is not None and image == _source_image(src, name), f"kill {i}: torn"
    with served(dest, sock):
        r = run_update(vol, mirror_target(dest))
        resumed += bool(r["resumed"])
    name, image = _dest_state(dest)
    assert name == r["snapshot"] and image == image_of(vol, name)
    vol.close()
    d = open_vol(dest, write=False)
    assert check_volume(d).clean
    d.close()
    return resumed


def test_kill_the_destinations_service_mid_update_quick(
        tmp_path: Path, run_dir: str) -> None:  # noqa: F811
    _kill_the_destination(tmp_path, 1, random.randrange(1 << 30))


@pytest.mark.slow
def test_kill_the_destinations_service_mid_update(tmp_path: Path, run_dir: str) -> None:  # noqa: F811
    seed = int(os.environ.get("MIRROR_SEED", random.randrange(1 << 30)))
    print(f"seed {seed} (MIRROR_SEED={seed} repeats it)")
    kills = int(os.environ.get("MIRROR_SERVED_KILLS", "20"))
    print(f"{kills} kills, {_kill_the_destination(tmp_path, kills, seed)} updates resumed")
