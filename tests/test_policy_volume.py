"""`policy_tick` on a real volume with a given clock, and `blockxfer policy ...` as an
operator runs it: what it takes, what it prunes, what it never prunes."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from blockxfer.transfer.policy import PROPERTY, Policy, policy_tick
from blockxfer.volume import Volume
from tests.clihelp import bx, one_line
from tests.conftest import reopen

T0 = datetime(2026, 11, 30, 14, 7, tzinfo=UTC)


def names(vol: Volume) -> list[str]:
    return [e.name for e in vol.snapshots()]


def test_no_policy_does_nothing(volume: Volume) -> None:
    r = policy_tick(volume, now=T0)
    assert r.skipped and "no policy" in r.skipped and names(volume) == []


def test_ticks_take_and_prune_and_the_policy_survives_reopen(volume: Volume) -> None:
    volume.set_property(PROPERTY, Policy({"hourly": 2, "daily": 1}).to_json())
    volume.create_snapshot("june1")                          # not the schedule's
    r = policy_tick(volume, now=T0)
    assert r.taken == ["hourly.20261130T14", "daily.20261130"] and r.pruned == []
    assert policy_tick(volume, now=T0 + timedelta(minutes=30)).taken == []
    volume = reopen(volume)
    try:
        for h in (1, 2):
            r = policy_tick(volume, now=T0 + timedelta(hours=h))
        assert r.pruned == ["hourly.20261130T14"] and r.taken == ["hourly.20261130T16"]
        r = policy_tick(volume, now=T0 + timedelta(days=1))
        assert r.pruned == ["hourly.20261130T15", "daily.20261130"]
        assert sorted(names(volume)) == ["daily.20261201", "hourly.20261130T16",
                                         "hourly.20261201T14", "june1"]
    finally:
        volume.close()


def test_master_pointer_and_held_snapshots_are_never_pruned(volume: Volume) -> None:
    volume.set_property(PROPERTY, Policy({"hourly": 1}).to_json())
    volume.create_snapshot("hourly.20261130T10", master=True)
    volume.create_snapshot("hourly.20261130T11")
    volume.create_snapshot("hourly.20261130T12")
    volume.create_snapshot("hourly.20261130T13")
    volume.set_pointer("last-sent", "hourly.20261130T11")
    volume.hold("hourly.20261130T12", "mirror")
    r = policy_tick(volume, now=T0)
    assert r.pruned == ["hourly.20261130T13"] and r.taken == ["hourly.20261130T14"]
    assert sorted(r.kept_protected) == ["hourly.20261130T10", "hourly.20261130T11",
                                        "hourly.20261130T12"]
    volume.release("hourly.20261130T12", "mirror")
    assert policy_tick(volume, now=T0).pruned == ["hourly.20261130T12"]


def test_a_dry_run_changes_nothing(volume: Volume) -> None:
    volume.set_property(PROPERTY, Policy({"daily": 1}).to_json())
    volume.create_snapshot("daily.20261101")
    gen = volume.generation
    r = policy_tick(volume, now=T0, dry_run=True)
    assert r.dry_run and r.taken == ["daily.20261130"] and r.pruned == ["daily.20261101"]
    assert names(volume) == ["daily.20261101"] and volume.generation == gen


def test_cli_set_show_run(tmp_path: Path) -> None:
    vol = str(tmp_path / "v.img")
    assert bx("init", vol, "--size", "16M").returncode == 0
    r = bx("policy", "set", vol, "hourly=24", "daily=7", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["policy"] == {"hourly": 24, "daily": 7}
    shown = json.loads(bx("policy", "show", vol, "--json").stdout)
    assert [n.split(".")[0] for n in shown["due"]] == ["hourly", "daily"]
    assert set(shown["classes"]) == {"hourly", "daily"}
    dry = json.loads(bx("policy", "run", vol, "-n", "--json").stdout)
    assert dry["dry_run"] and len(dry["taken"]) == 2
    assert json.loads(bx("snapshots", vol, "--json").stdout)["snapshots"] == []
    done = json.loads(bx("policy", "run", vol, "--json").stdout)
    assert done["taken"] == dry["taken"] and done["pruned"] == []
    again = bx("policy", "run", vol)
    assert again.returncode == 0 and b"nothing due" in again.stdout
    r = bx("policy", "set", vol, "daily=seven")
    assert r.returncode == 2 and "CLASS=COUNT" in one_line(r)
    assert bx("policy", "clear", vol).returncode == 0
    assert b"no policy" in bx("policy", "run", vol).stdout


def test_a_served_volume_takes_its_policy_through_the_service(tmp_path: Path) -> None:
    """set/show/run go to the service, and the service's own job runs the schedule."""
    import json

    from tests.nbd.serveproc import serve_process
    vol = str(tmp_path / "v.img")
    assert bx("init", vol, "--size", "16M").returncode == 0
    with serve_process(vol, str(tmp_path / "s.sock")):
        assert bx("policy", "set", vol, "daily=2").returncode == 0
        shown = json.loads(bx("policy", "show", vol, "--json").stdout)
        assert shown["policy"] == {"daily": 2}
        assert [d.split(".")[0] for d in shown["due"]] == ["daily"]
        r = json.loads(bx("policy", "run", vol, "-n", "--json").stdout)
        assert r["dry_run"] and len(r["taken"]) == 1
        jobs = json.loads(bx("info", vol, "--json").stdout)["server"]["jobs"]
        assert [j["name"] for j in jobs] == ["policy"]
        assert bx("policy", "run", vol).returncode == 0
        names = json.loads(bx("snapshots", vol, "--json").stdout)["snapshots"]
        assert [n["name"].split(".")[0] for n in names] == ["daily"]
        assert json.loads(bx("policy", "run", vol, "--json").stdout)["taken"] == []
        assert bx("policy", "clear", vol).returncode == 0
        assert json.loads(bx("policy", "show", vol, "--json").stdout)["policy"] is None


class Interrupted(Exception):
    pass


class StopsAfter:
    """The volume, but the run is cut off before its `n`th snapshot or destroy."""

    def __init__(self, vol: Volume, n: int) -> None:
        self._vol, self._left = vol, n

    def __getattr__(self, name: str) -> object:
        return getattr(self._vol, name)

    def _step(self) -> None:
        if self._left == 0:
            raise Interrupted
        self._left -= 1

    def create_snapshot(self, name: str) -> None:
        self._step()
        self._vol.create_snapshot(name)

    def destroy_snapshot(self, name: str) -> None:
        self._step()
        self._vol.destroy_snapshot(name)


def test_a_run_cut_off_after_any_step_is_finished_by_the_next(volume_path: str) -> None:
    from blockxfer.drivers.blockdev import open_device
    from blockxfer.volume.check import check_volume
    pol = Policy({"hourly": 2, "daily": 1, "weekly": 1}).to_json()
    start = ["hourly.20261130T10", "hourly.20261130T11", "hourly.20261130T12",
             "daily.20261128", "daily.20261129", "weekly.2026W47", "june1"]
    expected = {"hourly.20261130T13", "hourly.20261130T14", "daily.20261130",
                "weekly.2026W49", "june1"}
    for cut in range(9):                   # 6 destroys, 3 snapshots: before each of them
        path = f"{volume_path}.{cut}"
        vol = Volume.create(open_device(path, write=True, create_size=32 << 20),
                            virtual_size=8 << 20)
        vol.set_property(PROPERTY, pol)
        for name in start + ["hourly.20261130T13"]:
            vol.create_snapshot(name)
        try:
            policy_tick(StopsAfter(vol, cut), now=T0)  # type: ignore[arg-type]  # volume double
            raise AssertionError(f"not cut off at {cut}")
        except Interrupted:
            pass
        vol = reopen(vol)
        try:
            policy_tick(vol, now=T0)
            assert set(names(vol)) == expected, cut
            assert policy_tick(vol, now=T0).taken == [] and check_volume(vol).clean
        finally:
            vol.close()


def test_a_replica_is_left_alone(tmp_path: Path) -> None:
    """A snapshot taken on a replica would end its incrementals: run does nothing."""
    src, dst, stream = (str(tmp_path / n) for n in ("src.img", "dst.img", "s.bs"))
    assert bx("init", src, "--size", "16M").returncode == 0
    assert bx("snapshot", f"{src}@s1").returncode == 0
    assert bx("send", src, "s1", "-o", stream).returncode == 0
    assert bx("receive", dst, "-i", stream).returncode == 0
    assert bx("policy", "set", dst, "daily=1").returncode == 0
    r = json.loads(bx("policy", "run", dst, "--json").stdout)
    assert r["taken"] == [] and "replica" in r["skipped"]
    assert [s["name"] for s in json.loads(bx("snapshots", dst, "--json").stdout)
            ["snapshots"]] == ["s1"]
