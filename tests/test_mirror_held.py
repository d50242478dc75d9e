"""The mirror commands on a volume a `replicate pull` holds open while it receives
(service/replication.py's `hosting`, as `replicate pull --every` does on a middle
host): before, its control socket did not know `mirror` at all. Now `mirror
status` and `mirror update -n` are answered from the volume, `mirror stop` is
recorded in it, and what would take or destroy snapshots while the pull receives
(`start`, `update`, `stop --forget`) is refused with one line saying what to do."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from blockxfer.errors import DeviceBusy
from blockxfer.service.replication import hosting
from blockxfer.transfer.mirror import load
from tests.mirror_util import churn, configure, make_volume, open_vol, update
from tests.test_mirror_served import run_dir  # noqa: F401 - a fixture


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    from blockxfer.cli.app import main
    capsys.readouterr()
    code = main(list(argv))
    got = capsys.readouterr()
    return code, got.out, got.err


def test_mirror_commands_on_a_volume_a_pull_holds(
        tmp_path: Path, run_dir: str, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    from blockxfer.cli.mirror_source import update_once
    src, dest = str(tmp_path / "src.img"), str(tmp_path / "dst.img")
    vol = make_volume(src, 8 << 20, 1 << 20)
    churn(vol, random.Random(1), 30, 0)
    configure(vol, dest)
    first = update(vol, dest)
    vol.close()
    with hosting(src):
        code, out, err = _run(capsys, "mirror", "status", src, "--json")
        assert code == 0, err
        st = json.loads(out)
        assert st["held_by"] and "pull" in st["held_by"] and not st["served"]
        assert st["snapshot"] == first["snapshot"] and not st["running"]
        assert st["destination_state"]["note"] == "up to date"
        code, out, err = _run(capsys, "mirror", "update", "-n", src, "--json")
        assert code == 0 and json.loads(out)["dry_run"], err
        for argv in (("update", src), ("start", src, str(tmp_path / "other.img")),
                     ("stop", src, "--forget")):
            code, out, err = _run(capsys, "mirror", *argv)
            assert code == DeviceBusy.exit_code, (argv, err)
            assert err.count("\n") == 1 and "when it ends" in err, (argv, err)
        with pytest.raises(DeviceBusy, match="replicate pull"):
            update_once(src)                   # the daemon's update waits for its tick
        code, out, err = _run(capsys, "mirror", "stop", src, "--json")
        assert code == 0, err
        stopped = json.loads(out)
        assert stopped["held_by"] and stopped["pid"] is None
    vol = open_vol(src, write=False)
    st = load(vol, src)
    vol.close()
    assert st.stopped and st.snap == first["snapshot"]
