"""New snapshot names may not hold '-' (the difference operator of image
expressions); names that arrive by receive keep theirs; pointers are unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest

from blockxfer.errors import UsageError
from blockxfer.volume import Volume, snapshots
from tests.clihelp import bx, one_line


@pytest.mark.parametrize("name", ["june3-june1", "a-", "daily.2026-11-30"])
def test_a_new_snapshot_name_with_a_dash_is_refused(volume: Volume, name: str) -> None:
    with pytest.raises(UsageError, match="difference operator"):
        volume.create_snapshot(name)
    assert volume.snapshots() == []


@pytest.mark.parametrize("name", ["a+b", "a b", "(a)", "a&b", "daily.*", "-a", "a@b"])
def test_other_operators_stay_refused(volume: Volume, name: str) -> None:
    with pytest.raises(UsageError, match="letters, digits and . _ :"):
        volume.create_snapshot(name)


def test_dotted_and_colon_names_are_taken(volume: Volume) -> None:
    for name in ("daily.20261130", "hourly.20261130T14", "june3_june1", "t:1"):
        volume.create_snapshot(name)
    assert [e.name for e in volume.snapshots()][-1] == "t:1"


def test_pointer_names_keep_their_dash(volume: Volume) -> None:
    volume.create_snapshot("s1")
    volume.set_pointer("last-sent", "s1")
    assert volume.pointers == {"last-sent": "s1"}


def test_the_cli_refuses_in_one_line_and_changes_nothing(tmp_path: Path) -> None:
    vol = str(tmp_path / "v.img")
    assert bx("init", vol, "--size", "16M").returncode == 0
    before = Path(vol).read_bytes()
    r = bx("snapshot", f"{vol}@june3-june1")
    assert r.returncode == 2 and "'june3_june1'" in one_line(r)
    assert Path(vol).read_bytes() == before


def test_a_received_name_with_a_dash_is_kept(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """An older volume's 'june-1' still replicates: receive does not apply the rule."""
    src, dst = str(tmp_path / "src.img"), str(tmp_path / "dst.img")
    assert bx("init", src, "--size", "16M").returncode == 0
    assert bx("write", src, data=b"x" * 65536).returncode == 0
    from blockxfer.handles import open_volume
    with monkeypatch.context() as m:       # as blockxfer made it before the rule
        m.setattr(snapshots, "SNAPSHOT_NAME_RE", snapshots.NAME_RE)
        with open_volume(src, write=True) as vol:
            vol.create_snapshot("june-1")
    stream = str(tmp_path / "s.bs")
    assert bx("send", src, "june-1", "-o", stream).returncode == 0
    r = bx("receive", dst, "-i", stream)
    assert r.returncode == 0, r.stderr
    got = bx("read", f"{dst}@june-1", "--length", "65536")
    assert got.returncode == 0 and got.stdout == b"x" * 65536
