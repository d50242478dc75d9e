"""One parser for every duration an operator gives (units.parse_duration): the mirror's
--interval, replicate pull --every, policy and store retention, stdio-serve's
--idle-timeout (which also takes 0). A bad one is refused with exit 2 and no
traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from blockxfer.errors import UsageError
from blockxfer.units import parse_duration
from tests.clihelp import bx, one_line


@pytest.mark.parametrize(("text", "seconds"), [
    ("90", 90), ("30s", 30), ("1.5m", 90), ("2h", 7200), ("1d", 86400), ("2w", 1209600),
    (" 5M ", 300),
])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "-5m", "1x", "abc", "m", "nan"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(UsageError, match="bad duration"):
        parse_duration(text)


@pytest.mark.parametrize("argv", [
    ("stdio-serve", "--idle-timeout", "abc"),
    ("stdio-serve", "--idle-timeout", "-1"),
    ("replicate", "pull", "ssh://a/v", "t.img", "--every", "0"),
])
def test_a_bad_duration_option_is_one_line(argv: tuple[str, ...]) -> None:
    r = bx(*argv)
    err = r.stderr.decode()
    assert r.returncode == 2 and "Traceback" not in err
    assert "bad duration" in err.splitlines()[-1]      # argparse's usage line, then it


def test_a_bad_mirror_interval_names_the_option(tmp_path: Path) -> None:
    vol = str(tmp_path / "v.img")
    assert bx("init", vol, "--size", "16M", "-q").returncode == 0
    r = bx("mirror", "start", vol, str(tmp_path / "c.img"), "--interval", "1x")
    assert r.returncode == 2
    assert "--interval" in one_line(r) and "bad duration" in r.stderr.decode()


def test_idle_timeout_zero_is_one_request_per_connection() -> None:
    r = bx("stdio-serve", "--idle-timeout", "0", data=b"")
    assert r.returncode == 3            # parsed: it waited for a request, got EOF
